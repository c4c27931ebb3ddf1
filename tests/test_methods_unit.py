"""CAM methods on hand-made arrays, the expected maps worked out by hand (no model, no export).

Every map here is 3x3 at an input of 3x3, so no resize happens, and pgc's chain (reference §2.3)
is n(relu(M)) then n(.) again for the one layer, n(X) = (X - min X) / (max(X - min X) + 1e-7).
"""

import numpy as np
import pytest

from camexport.graph.outputs import BIAS_GRADIENTS, INPUT_GRADIENTS, TANGENTS, fullgrad_names
from camexport.methods import METHODS, RECOMPUTABLE, method
from camexport.methods.inputs import CamInputs

EPS = 1e-7
# A (B=2, C=2, 3, 3): image 0 has one hot pixel per channel, image 1 a uniform channel 0
A = np.zeros((2, 2, 3, 3), np.float32)
A[0, 0, 0, 0] = 1.0
A[0, 1, 2, 2] = 2.0
A[1, 0] = 1.0
A[1, 1, 1, 1] = 4.0
# G: image 0 channel 0 all +1, channel 1 all -0.5; image 1 channel 0 all -1, channel 1 +0.25 at
# the centre only (mean 0.25 / 9)
G = np.zeros_like(A)
G[0, 0] = 1.0
G[0, 1] = -0.5
G[1, 0] = -1.0
G[1, 1, 1, 1] = 0.25


def _chain(m: np.ndarray) -> np.ndarray:
    """pgc's post-processing of one layer's raw maps at the input size: n(n(relu(M)))."""
    def n(x):
        shifted = x - x.min(axis=(1, 2), keepdims=True)
        return shifted / (shifted.max(axis=(1, 2), keepdims=True) + np.float32(EPS))
    return n(n(np.maximum(m, 0).astype(np.float32)))


def _inputs() -> CamInputs:
    return CamInputs(x=np.zeros((2, 3, 3, 3), np.float32), outputs=np.zeros((2, 4), np.float32),
                     targets=[None, None], activations=[A.copy()], gradients=[G.copy()])


def _hot(value: float, at: tuple[int, int]) -> np.ndarray:
    m = np.zeros((3, 3), np.float32)
    m[at] = value
    return m


# (method, raw map of image 0, raw map of image 1), each worked out by hand from A and G above
CASES = {
    # w = mean_s G: image 0 (1, -0.5): M = A0 - 0.5 A1 -> +1 at (0, 0), -1 at (2, 2);
    # image 1 (-1, 0.25/9): M = -1 everywhere but the centre, -1 + 4 * 0.25 / 9
    "gradcam": (_hot(1.0, (0, 0)) + _hot(-1.0, (2, 2)),
                np.full((3, 3), -1.0, np.float32) + _hot(1.0 / 9, (1, 1))),
    # M = sum_c G A: image 0 the same as GradCAM; image 1: -1 everywhere, centre -1 + 0.25 * 4 = 0
    "hirescam": (_hot(1.0, (0, 0)) + _hot(-1.0, (2, 2)),
                 np.full((3, 3), -1.0, np.float32) + _hot(1.0, (1, 1))),
    # M = sum_c relu(G A): image 0 +1 at (0, 0); image 1 +1 at the centre
    "gradcamelementwise": (_hot(1.0, (0, 0)), _hot(1.0, (1, 1))),
    # M = sum_c relu(G) A: image 0 +1 at (0, 0); image 1 0.25 * 4 = 1 at the centre
    "layercam": (_hot(1.0, (0, 0)), _hot(1.0, (1, 1))),
    # w = sum_s G A / (sum_s A + 1e-7): image 0 (1 / (1 + eps), -1 / (2 + eps));
    # image 1 (-9 / (9 + eps), 1 / (4 + eps))
    "xgradcam": (_hot(1 / (1 + EPS), (0, 0)) + _hot(-2 / (2 + EPS), (2, 2)),
                 np.full((3, 3), -9 / (9 + EPS), np.float32) + _hot(4 / (4 + EPS), (1, 1))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_method_on_hand_made_arrays(name):
    expected = _chain(np.stack(CASES[name]))
    cam = method(name)(_inputs())
    assert cam.dtype == np.float32 and cam.shape == (2, 3, 3)
    np.testing.assert_allclose(cam, expected, rtol=1e-6, atol=1e-7)


def test_gradcam_map_by_hand():
    """GradCAM's image 0 written out: one pixel at 1 (after two normalisations), zeros elsewhere;
    image 1: M is negative everywhere (-1, and -1 + 4 * 0.25 / 9 at the centre), so relu leaves
    nothing and the map is all zeros, as pgc gives it."""
    cam = method("gradcam")(_inputs())
    q = 1.0 / (1.0 + EPS)  # first normalisation of a map whose max is 1 and min 0
    assert cam[0, 0, 0] == pytest.approx(q / (q + EPS), rel=1e-6)
    assert np.count_nonzero(cam[0]) == 1
    assert not cam[1].any()


def test_gradcam_plus_plus_alpha_by_hand():
    """GradCAM++ with one channel: alpha = G^2 / (2 G^2 + S G^3 + 1e-6), w = sum_s relu(G) alpha.
    G = 1 everywhere, S = sum_s A = 2: alpha = 1 / (2 + 2 + 1e-6), w = 9 alpha; M = w A."""
    a = np.zeros((1, 1, 3, 3), np.float32)
    a[0, 0, 0, 1] = 2.0
    g = np.ones_like(a)
    inputs = CamInputs(x=np.zeros((1, 3, 3, 3), np.float32), outputs=np.zeros((1, 2), np.float32),
                       targets=[None], activations=[a], gradients=[g])
    weight = 9.0 / (4.0 + 1e-6)
    expected = _chain(weight * a[:, 0])
    np.testing.assert_allclose(method("gradcam++")(inputs), expected, rtol=1e-6, atol=1e-7)


def test_eigencam_rank_one_activation():
    """A = u_c f(s) with f centred: the first principal component is f itself, up to the sign
    numpy's SVD picks; after relu and min-max the map is f's positive part or its negative."""
    f = np.array([[1, 0, -1], [2, 0, -2], [0, 0, 0]], np.float32)
    a = np.stack([f * 3.0, f * -1.0])[None]
    inputs = CamInputs(x=np.zeros((1, 3, 3, 3), np.float32), outputs=np.zeros((1, 2), np.float32),
                       targets=[None], activations=[a], gradients=[None])
    cam = method("eigencam")(inputs)
    assert any(np.allclose(cam, _chain(sign * (f - f.mean())[None]), atol=1e-5) for sign in (1, -1))


def test_records_collect_what_the_graph_gave():
    results = {"gradient/input": np.ones((1, 3, 2, 2), np.float32),
               fullgrad_names(0)[0]: np.ones(4, np.float32),
               fullgrad_names(0)[1]: np.zeros((1, 4, 2, 2), np.float32),
               "tangent/l": np.full((1, 5), 2.0, np.float32)}
    assert INPUT_GRADIENTS.collect(results, ["l"]) is results["gradient/input"]
    ((bias, grad),) = BIAS_GRADIENTS.collect(results, ["l"])
    assert bias is results[fullgrad_names(0)[0]] and grad is results[fullgrad_names(0)[1]]
    assert TANGENTS.collect(results, ["l"])[0] is results["tangent/l"]
    assert TANGENTS.collect({}, ["l"]) is None and BIAS_GRADIENTS.collect({}, ["l"]) == []
    assert [name for name in results if BIAS_GRADIENTS.owns(name, ["l"])] == list(results)[1:3]


def test_recomputable_follows_the_declared_needs():
    """What recompute accepts is derived from the rows: no extra graph output, no model run."""
    assert "gradcam" in RECOMPUTABLE and "eigencam" in RECOMPUTABLE
    for name in ("scorecam", "ablationcam", "fullgrad", "shapleycam", "finercam", "sess", "dff",
                 "guidedbackprop"):
        assert name not in RECOMPUTABLE, name
        assert METHODS[name].extras or METHODS[name].runs
