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


# -- the batched helpers against the straightforward computation --------------------------------
def _layouts(rng) -> dict[str, np.ndarray]:
    """(B, C, *spatial) float32 tensors as the methods see them: contiguous NCHW, a channel-last
    view (ViT tokens, NHWC: numpy then sums the channels pairwise) and a volume."""
    return {"nchw": rng.standard_normal((3, 37, 5, 6), dtype=np.float32),
            "channels-last": np.moveaxis(rng.standard_normal((3, 5, 6, 37), dtype=np.float32), -1, 1),
            "volume": rng.standard_normal((2, 11, 3, 4, 5), dtype=np.float32)}


# the methods' formulas written the plain way (pgc's expressions, reference §3.1-§3.3)
def _plain_raw(name: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    axes = tuple(range(2, a.ndim))
    expand = (slice(None), slice(None)) + (None,) * len(axes)
    if name == "gradcam":
        return (g.mean(axis=axes)[expand] * a).sum(axis=1)
    if name == "hirescam":
        return (g * a).sum(axis=1)
    if name == "gradcamelementwise":
        return np.maximum(g * a, 0).sum(axis=1)
    if name == "layercam":
        return (np.maximum(g, 0) * a).sum(axis=1)
    sums = a.sum(axis=axes, keepdims=True)
    if name == "xgradcam":
        weights = (g * a / (sums + np.float32(1e-7))).sum(axis=axes)
    else:
        alpha = g ** 2 / (2 * g ** 2 + sums * g ** 3 + np.float32(1e-6))
        weights = (np.maximum(g, 0) * np.where(g != 0, alpha, 0)).sum(axis=axes)
    return (weights[expand] * a).sum(axis=1)


#: methods whose weights sum over positions in einsum's order, not numpy's pairwise one, and
#: how far from the plain formula (of the map's largest value) that may take them here: these
#: random activations have channel sums near zero, where GradCAM++'s alpha = G^2 / (2 G^2 + S G^3)
#: is ill-conditioned (measured 1.5e-5 on NCHW, 4e-6 on the others; GradCAM, XGradCAM <= 9e-7)
REORDERED = {"gradcam": 1e-6, "gradcam++": 5e-5, "xgradcam": 2e-6}


@pytest.mark.parametrize("block", [1, 10 ** 9])
@pytest.mark.parametrize("name", sorted({*CASES, "gradcam++"}))
def test_gradient_methods_equal_their_plain_formulas(name, block, monkeypatch):
    """On every layout, one image per block or the whole batch at once: bit for bit, but for the
    methods whose per-channel weights sum the positions in another order (REORDERED)."""
    from camexport.methods import pipeline

    monkeypatch.setattr(pipeline, "BLOCK_ELEMENTS", block)
    rng = np.random.default_rng(0)
    for layout, a in _layouts(rng).items():
        g = rng.standard_normal(a.shape, dtype=np.float32)
        g[:, :, 0] = 0  # G = 0: GradCAM++'s alpha is 0 there
        inputs = CamInputs(x=np.zeros((len(a), 3, 8, 8), np.float32),
                           outputs=np.zeros((len(a), 2), np.float32), targets=[None] * len(a),
                           activations=[a], gradients=[g])
        ours, plain = method(name).raw(inputs, 0, False), _plain_raw(name, a, g)
        if name in REORDERED:
            np.testing.assert_allclose(ours, plain, rtol=0, atol=REORDERED[name] * np.abs(plain).max(),
                                       err_msg=f"{name} {layout}")
        else:
            np.testing.assert_array_equal(ours, plain, err_msg=f"{name} {layout}")


def test_gradcam_plus_plus_where_the_activation_sum_is_not_finite():
    """S = inf: 0 * S is nan where G = 0, which pgc's where() turns into alpha = 0."""
    a = np.ones((1, 2, 2, 2), np.float32)
    a[0, 0, 0, 0] = np.inf
    g = np.full_like(a, 0.5)
    g[0, 0, 1] = 0
    inputs = CamInputs(x=np.zeros((1, 3, 2, 2), np.float32), outputs=np.zeros((1, 2), np.float32),
                       targets=[None], activations=[a], gradients=[g])
    with np.errstate(invalid="ignore"):
        weights = method("gradcam++").weights(inputs, 0)
        sums = a.sum(axis=(2, 3), keepdims=True)
        alpha = g ** 2 / (2 * g ** 2 + sums * g ** 3 + np.float32(1e-6))
        plain = (np.maximum(g, 0) * np.where(g != 0, alpha, 0)).sum(axis=(2, 3))
    np.testing.assert_array_equal(weights, plain)


def test_product_and_weighted_sums_equal_the_broadcast_products():
    from camexport.methods.pipeline import channel_sum, product_sum, weighted_sum

    rng = np.random.default_rng(1)
    for layout, a in _layouts(rng).items():
        b = rng.standard_normal(a.shape, dtype=np.float32)
        w = rng.standard_normal(a.shape[:2], dtype=np.float32)
        expand = w.reshape(w.shape + (1,) * (a.ndim - 2))
        np.testing.assert_array_equal(product_sum(b, a), (b * a).sum(axis=1), err_msg=layout)
        np.testing.assert_array_equal(weighted_sum(w, a), (expand * a).sum(axis=1), err_msg=layout)
        np.testing.assert_array_equal(channel_sum(b * a), (b * a).sum(axis=1), err_msg=layout)
    # size-1 spatial axes of a larger array's view: numpy adds the channels pairwise there
    a = rng.standard_normal((3, 300, 2, 1), dtype=np.float32)[:, :, :1]
    b, w = np.ascontiguousarray(a[::-1]), rng.standard_normal(a.shape[:2], dtype=np.float32)
    np.testing.assert_array_equal(channel_sum(a), a.sum(axis=1))
    np.testing.assert_array_equal(product_sum(a, b), (a * b).sum(axis=1))
    np.testing.assert_array_equal(weighted_sum(w, a), (w[..., None, None] * a).sum(axis=1))


def test_position_sums_take_empty_batches():
    from camexport.methods.pipeline import spatial_product_total, spatial_total

    a = np.zeros((0, 4, 7, 7), np.float32)
    assert spatial_total(a).shape == (0, 4) and spatial_product_total(a, a).shape == (0, 4)


def test_relu_is_numpys_maximum_with_zero_bit_for_bit(monkeypatch):
    """NaN, -0.0 and infinities as np.maximum(x, 0) leaves them, on contiguous and strided
    arrays, in place, and past the size the zeros are kept for."""
    from camexport.methods import pipeline

    x = np.random.default_rng(2).standard_normal((3, 5, 4, 6)).astype(np.float32)
    x.flat[:5] = [np.nan, -0.0, 0.0, np.inf, -np.inf]
    for value in (x, np.moveaxis(x, 1, -1), x[:, ::-2], x.astype(np.float64)):
        expected = np.maximum(value, 0)
        got = pipeline.relu(value)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(np.signbit(got), np.signbit(expected))
    inplace = x.copy()
    assert pipeline.relu(inplace, out=inplace) is inplace
    np.testing.assert_array_equal(inplace, np.maximum(x, 0))
    monkeypatch.setattr(pipeline, "ZEROS_LIMIT", 10)
    np.testing.assert_array_equal(pipeline.relu(x), np.maximum(x, 0))


def test_by_images_concatenates_blocks(monkeypatch):
    from camexport.methods import pipeline

    a = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    seen = []

    def function(x, y):
        seen.append(len(x))
        return x.sum(axis=1) + y[:, 0]

    monkeypatch.setattr(pipeline, "BLOCK_ELEMENTS", 12)  # two images of 6 elements per block
    np.testing.assert_array_equal(pipeline.by_images(function, a, a), a.sum(axis=1) + a[:, 0])
    assert seen == [2, 2, 1]


def test_resize_and_min_max_as_one_call_per_map():
    import cv2

    from camexport.methods.pipeline import NORM_EPS, min_max, resize

    rng = np.random.default_rng(2)
    for count, (h, w) in ((1, (7, 7)), (5, (14, 9))):
        maps = rng.random((count, h, w), dtype=np.float32)
        expected = np.stack([cv2.resize(m, (20, 30), interpolation=cv2.INTER_LINEAR) for m in maps])
        resized = resize(maps, (30, 20))
        assert resized.shape == (count, 30, 20) and resized.dtype == np.float32
        np.testing.assert_array_equal(resized, expected)
        shifted = resized - resized.min(axis=(1, 2), keepdims=True)
        plain = shifted / (shifted.max(axis=(1, 2), keepdims=True) + np.float32(NORM_EPS))
        np.testing.assert_array_equal(min_max(resized), plain)
        assert min_max(resized, out=resized) is resized
        np.testing.assert_array_equal(resized, plain)


def test_spatial_sums_remembered_for_the_same_tensor_only():
    from camexport.methods.pipeline import spatial_sums

    a = np.ones((2, 3, 4, 4), np.float32)
    sums = spatial_sums(a)
    assert spatial_sums(a) is sums and not sums.flags.writeable
    np.testing.assert_array_equal(sums, np.full((2, 3, 1, 1), 16, np.float32))
    other = a * 2
    np.testing.assert_array_equal(spatial_sums(other), 2 * sums)


def test_product_sums_of_reversed_and_mixed_layouts():
    """Layouts where numpy's order is not channel by channel take the plain product."""
    from camexport.methods.pipeline import product_sum, weighted_sum

    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 300, 4, 4), dtype=np.float32)
    last = np.ascontiguousarray(np.moveaxis(a, 1, -1))
    for first, second in ((a[:, ::-1], a[:, ::-1]), (np.moveaxis(last, -1, 1), a), (a, a[..., ::-1])):
        np.testing.assert_array_equal(product_sum(first, second), (first * second).sum(axis=1))
    w = rng.standard_normal((2, 300), dtype=np.float32)
    np.testing.assert_array_equal(weighted_sum(w, a[:, ::-1]), (w[..., None, None] * a[:, ::-1]).sum(axis=1))
