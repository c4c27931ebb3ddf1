"""The ARCC family natively (camexport.metrics: complexity, coherency:METHOD, arcc:METHOD, adcc:METHOD)
against pytorch-grad-cam 1.5.7's ``pytorch_grad_cam.metrics.arcc`` on the same CAMs.

Our side re-runs GradCAM through the artifact's graph in onnxruntime and scores with the
artifact's plain graph; pgc's side runs GradCAM and the model in torch. ROAD's imputer noise is
the same draws on both sides (torch.randn_like patched to our generator, as tests/test_metrics.py).
Cases: a random-weight resnet18 at 64 × 64 and the pretrained EfficientNet-Lite0 at 128 × 128 on
three packaged photos, the CAMs pgc's GradCAM of a class (its logit on resnet18, the top class's
probability on Lite0, so that ROAD's part of ARCC lies inside (0, 1) there).

Tolerances (TOL, next to each case): complexity is the same float32 numpy reduction (exact);
coherency and ARCC differ by the graph's GradCAM maps against torch's (~1e-6 on resnet18, ~1e-5
on Lite0's real maps, reference §11) and float32 scores of the two runtimes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.metrics import arcc as pgc_arcc
from pytorch_grad_cam.utils import model_targets

from camexport import metrics
from camexport.build import build
from camexport.explain import Explainer
from camexport.metrics import MetricError, evaluate, metric_methods, metric_names
from camexport.targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.xdist_group("arcc"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]

SEED = 5


def _case(net, layer: str, module, size: int, x: np.ndarray, classes: list[int], root,
          softmax: bool = False) -> dict:
    """The artifact (gradcam at ``layer``), pgc's GradCAM maps of ``classes`` (their logits, or
    their probabilities with ``softmax``) as the CAMs."""
    from camexport.load import Preprocessing, from_module

    loaded = from_module(net, "net", Preprocessing(size=(size, size)))
    built = build(loaded, [layer], methods="gradcam", out_dir=root, input_size=(size, size))
    kinds = ((model_targets.ClassifierOutputSoftmaxTarget, ClassifierOutputSoftmaxTarget) if softmax
             else (model_targets.ClassifierOutputTarget, ClassifierOutputTarget))
    theirs = [kinds[0](c) for c in classes]
    cams = GradCAM(net, [module])(torch.from_numpy(x), theirs).astype(np.float32)
    return {"net": net, "module": module, "explainer": Explainer(built.directory), "x": x, "cams": cams,
            "ours": [kinds[1](c) for c in classes], "theirs": theirs}


@pytest.fixture(scope="session")
def resnet18(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    return _case(net, "layer4", net.layer4[-1], 64, x, [3, 5, 7], tmp_path_factory.mktemp("arcc-r18"))


@pytest.fixture(scope="session")
def lite0(tmp_path_factory):
    from camexport.data import preprocess, sample_photos
    from camexport.load import BUILTIN, load

    loaded = load(BUILTIN)
    p = loaded.preprocessing
    photos = [photo for photo in sample_photos() if photo.label is not None][:3]
    x = np.stack([preprocess(photo.image, (128, 128), p.mean, p.std) for photo in photos])
    net = loaded.module.eval()
    with torch.no_grad():  # the top class: its probability's GradCAM is a real map, not all 0
        classes = net(torch.from_numpy(x)).argmax(dim=1).tolist()
    return _case(net, "bn2", net.bn2, 128, x, classes,
                 tmp_path_factory.mktemp("arcc-lite0"), softmax=True)  # ROAD in probabilities


def _same_draws(monkeypatch, seed: int) -> None:
    generator = np.random.default_rng(seed)
    monkeypatch.setattr(torch, "randn_like", lambda t: torch.from_numpy(
        generator.standard_normal(tuple(t.shape), dtype=np.float32)))


def _cam_fn(explainer):
    return lambda method, images, targets: explainer(images, targets=targets, methods=[method]).cams[method]


def _ours(case, name: str) -> np.ndarray:
    explainer = case["explainer"]
    return evaluate(name, case["x"], case["cams"], case["ours"], explainer.forward, seed=SEED,
                    cam_fn=_cam_fn(explainer))


def _theirs(case, metric: str) -> np.ndarray:
    x = torch.from_numpy(case["x"])
    base = GradCAM(case["net"], [case["module"]])
    if metric == "complexity":
        return pgc_arcc.Complexity()(case["cams"])
    if metric == "coherency":
        return pgc_arcc.Coherency()(x, case["cams"], case["theirs"], case["net"], base)
    return pgc_arcc.ARCC(base)(x, case["cams"], case["theirs"], case["net"])


#: case, our metric, pgc's, tolerance
PARITY = [("resnet18", "complexity", "complexity", 0.0), ("resnet18", "coherency:gradcam", "coherency", 1e-5),
          ("resnet18", "arcc:gradcam", "arcc", 1e-5), ("lite0", "complexity", "complexity", 0.0),
          ("lite0", "coherency:gradcam", "coherency", 1e-5), ("lite0", "arcc:gradcam", "arcc", 1e-5)]


@pytest.mark.parametrize("setup, ours, theirs, tol", PARITY, ids=[f"{p[0]}-{p[1]}" for p in PARITY])
def test_parity_with_pgc(request, monkeypatch, setup, ours, theirs, tol):
    case = request.getfixturevalue(setup)
    _same_draws(monkeypatch, SEED)
    expected = np.asarray(_theirs(case, theirs), np.float32)
    got = _ours(case, ours)
    assert got.dtype == np.float32 and got.shape == (3,)
    print(f"{setup} {ours}: max |ours - pgc| = {np.abs(got - expected).max():.2e}; {got}")
    assert np.abs(got - expected).max() <= tol, (got, expected)
    if ours.startswith("arcc"):  # the case exercises every term: ROAD clipped nowhere to 0 and 1 only
        road = evaluate("road-combined:20,40,60,80", case["x"], case["cams"], case["ours"],
                        case["explainer"].forward, seed=SEED)
        assert not np.all((road <= 0) | (road >= 0.5)), road


# -- ADCC on known numbers


def _mean_model(batch: np.ndarray) -> np.ndarray:
    """Outputs (n, 2): the image's mean, and 0: a target value we can compute by hand."""
    return np.stack([batch.mean(axis=(1, 2, 3)), np.zeros(len(batch))], axis=1).astype(np.float32)


def test_adcc_on_known_numbers():
    """x = 1 everywhere, so y = t(f(x)) = 1 and o = t(f(x ⊙ cam)) = mean(cam) = complexity c:
    AD = 1 − c, and with the CAM method giving back the CAM itself (coherency 1)
    ADCC = 3 / (1/1 + 1/(1 − c) + 1/c); with 1 − cam (ρ = −1) coherency is 0 and ADCC ≈ 0."""
    cams = np.zeros((2, 8, 8), np.float32)
    cams[0, :4] = 0.5  # c = 0.25
    cams[1, :, :2] = 1.0  # c = 0.25 as well, another shape
    cams[1, 0, 0] = 0.0
    c = cams.reshape(2, -1).mean(axis=1)
    x = np.ones((2, 3, 8, 8), np.float32)
    targets = [ClassifierOutputTarget(0)] * 2
    same = evaluate("adcc:gradcam", x, cams, targets, _mean_model, cam_fn=lambda m, a, t: a[:, 0])
    expected = 3 / (1 + 1 / (1 - c) + 1 / c)
    np.testing.assert_allclose(same, expected, rtol=1e-6)
    assert abs(same[0] - 3 / (1 + 4 / 3 + 4)) < 1e-6  # 0.47368...
    inverted = evaluate("adcc:gradcam", x, cams, targets, _mean_model, cam_fn=lambda m, a, t: 1 - cams)
    assert np.all(inverted < 1e-6)  # 3 (coherency + ε), coherency a float32 round-off above 0
    # the terms themselves
    np.testing.assert_allclose(evaluate("complexity", x, cams, targets, _mean_model), c)
    coherent = evaluate("coherency:gradcam", x, cams, targets, _mean_model, cam_fn=lambda m, a, t: a[:, 0])
    np.testing.assert_allclose(coherent, 1, atol=1e-6)
    drop = evaluate("drop-in-confidence", x, cams, targets, _mean_model)
    np.testing.assert_allclose(drop, 1 - c, rtol=1e-6)


def test_arcc_on_known_numbers(monkeypatch):
    """ARCC = 3 / (1/coherency + 1/(1 − complexity) + 1/road): with ROADCombined stubbed to 0.2
    (road = 0.4), coherency 1 and complexity 0.25: 3 / (1 + 4/3 + 2.5)."""
    monkeypatch.setattr(metrics, "_road_combined", lambda run, p: np.full(len(run.x), 0.2, np.float32))
    cams = np.zeros((1, 8, 8), np.float32)
    cams[0, :4] = 0.5
    got = evaluate("arcc:gradcam", np.ones((1, 3, 8, 8), np.float32), cams, [0], _mean_model,
                   cam_fn=lambda m, a, t: a[:, 0])
    np.testing.assert_allclose(got, 3 / (1 + 4 / 3 + 2.5), rtol=1e-6)


def test_the_cams_targets_go_to_the_method():
    """cam_fn gets the targets the CAMs were made for (cam_targets), the score the run's targets."""
    seen = []

    def cam_fn(method, images, targets):
        seen.append((method, targets))
        return images[:, 0]

    cams = np.full((2, 4, 4), 0.5, np.float32)
    cams[:, 0] = 1
    x = np.ones((2, 3, 4, 4), np.float32)
    evaluate("coherency:eigencam", x, cams, [ClassifierOutputSoftmaxTarget(0)] * 2, _mean_model,
             cam_fn=cam_fn, cam_targets=[ClassifierOutputTarget(1)] * 2)
    evaluate("coherency:gradcam", x, cams, [0, 1], _mean_model, cam_fn=cam_fn)
    assert seen[0] == ("eigencam", [ClassifierOutputTarget(1)] * 2)
    assert seen[1] == ("gradcam", [ClassifierOutputTarget(0), ClassifierOutputTarget(1)])


def test_names_and_errors():
    assert metric_names("coherency:GradCAM,arcc:gradcam:20,40,60,80,arcc:gradcam:30,70,ADCC:gradcam++,"
                        "Complexity,Coherency,arcc::30,70,arcc::20,40,60,80") == [
        "coherency:gradcam", "arcc:gradcam", "arcc:gradcam:30,70", "adcc:gradcam++", "complexity",
        "coherency", "arcc::30,70", "arcc"]
    named = metric_methods("arcc:eigencam:30,coherency:gradcam,coherency,road-combined")
    assert named == ["eigencam", "gradcam"]
    for bad, message in [("arcc:nope", "unknown method"), ("coherency:gradcam:20", r"coherency\[:METHOD\]"),
                         ("arcc:gradcam:120", r"\[0, 100\]"), ("arcc:gradcam,40", "arcc:gradcam")]:
        with pytest.raises(MetricError, match=message):
            metric_names(bad)
    x, cams = np.ones((1, 3, 4, 4), np.float32), np.zeros((1, 4, 4), np.float32)
    with pytest.raises(MetricError, match="pass cam_fn"):
        evaluate("coherency:gradcam", x, cams, [0], _mean_model)
    with pytest.raises(MetricError, match="pass cam_method"):
        evaluate("arcc", x, cams, [0], _mean_model, cam_fn=lambda m, a, t: a[:, 0])
    with pytest.raises(MetricError, match="must give"):
        evaluate("coherency:gradcam", x, cams, [0], _mean_model, cam_fn=lambda m, a, t: np.zeros((1, 2, 2)))


def test_without_a_method_the_cams_own_is_re_run():
    seen = []

    def cam_fn(method, images, targets):
        seen.append(method)
        return images[:, 0]

    cams = np.full((1, 4, 4), 0.5, np.float32)
    cams[0, 0] = 1
    x = np.ones((1, 3, 4, 4), np.float32)
    own = evaluate("coherency", x, cams, [0], _mean_model, cam_fn=cam_fn, cam_method="eigencam")
    named = evaluate("coherency:gradcam", x, cams, [0], _mean_model, cam_fn=cam_fn, cam_method="eigencam")
    assert seen == ["eigencam", "gradcam"] and own == named
