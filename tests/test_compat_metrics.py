"""camexport.compat.metrics against pytorch-grad-cam 1.5.7: the same classes called as pgc's users
call them, on the same random-weight resnet18 (64 × 64, batch 3), cams and targets, with the same
``torch.manual_seed`` before each call, so the ROAD imputer noise is the same draws on both sides.

Tolerances (measured on CPU, torch 2.14.1):

- SCORE_TOL on scores: float32 round-off of O(1) target values. Measured ≤ 4.8e-7, all of it from
  ClassifierOutputReST, whose compat class computes 2 z_c − logsumexp(z) in numpy where pgc's uses
  torch's cross-entropy (half an ulp at |t| ≈ 5); targets evaluated in torch (the vector ones, user
  callables) give bit-equal scores, although ours run the perturbed images of every threshold in
  one model batch and pgc per threshold.
- IMAGE_TOL on perturbed images: float64 LU solves with another ordering, cast to float32 (an
  ulp; measured 0).
- ARCC_TOL: ARCC's coherency compares maps of compat GradCAM (camexport's graph in onnxruntime)
  with pgc GradCAM's (torch), equal to ~2e-6 (reference §11); measured 1.5e-8 on ARCC.
"""

from __future__ import annotations

import inspect
import warnings

import cv2
import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torchvision
from pytorch_grad_cam.metrics import arcc as pgc_arcc
from pytorch_grad_cam.metrics import cam_mult_image as pgc_cam_mult
from pytorch_grad_cam.metrics import perturbation_confidence as pgc_pc
from pytorch_grad_cam.metrics import road as pgc_road
from pytorch_grad_cam.utils import model_targets as pgc_targets

from camexport import compat
from camexport.compat.metrics import arcc, cam_mult_image, perturbation_confidence, road
from camexport.compat.utils import model_targets as targets
from camexport.metrics import MetricError, evaluate

pytestmark = [
    pytest.mark.usefixtures("compat_cache", "one_torch_thread"),
    pytest.mark.xdist_group("compat"),
    # pgc converts tensors with numpy functions (its code, not ours)
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]

SCORE_TOL = 1e-6
IMAGE_TOL = 1e-6
ARCC_TOL = 1e-5
SIZE = 64
CLASSES = (3, 5, 7)


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(1)
    cams = np.stack([cv2.GaussianBlur(rng.random((SIZE, SIZE)).astype(np.float32), (0, 0), SIZE / 16)
                     for _ in range(3)])
    low, high = cams.min(axis=(1, 2), keepdims=True), cams.max(axis=(1, 2), keepdims=True)
    cams = ((cams - low) / (high - low)).astype(np.float32)
    cams[2] = np.round(cams[2] * 6) / 6  # large ties at the percentile thresholds
    return model, x, cams


def _two_classes(output):
    """A user's target: a lambda-like callable on one output row."""
    return torch.softmax(output, dim=-1)[2] * 3 - output[6]


#: (ours, pgc's) targets for each image
TARGETS = {
    "classes": ([targets.ClassifierOutputTarget(CLASSES[0]),
                 targets.ClassifierOutputSoftmaxTarget(CLASSES[1]),
                 targets.ClassifierOutputReST(CLASSES[2])],
                [pgc_targets.ClassifierOutputTarget(CLASSES[0]),
                 pgc_targets.ClassifierOutputSoftmaxTarget(CLASSES[1]),
                 pgc_targets.ClassifierOutputReST(CLASSES[2])]),
    "softmax-vector": ([targets.SoftmaxOutputTarget()] * 3, [pgc_targets.SoftmaxOutputTarget()] * 3),
    "raw-vector": ([targets.RawScoresOutputTarget()] * 3, [pgc_targets.RawScoresOutputTarget()] * 3),
    "lambda": ([lambda o: o[1] - o[4]] * 2 + [_two_classes], [lambda o: o[1] - o[4]] * 2 + [_two_classes]),
}


def _seeded(metric, *args, **kwargs):
    torch.manual_seed(11)
    return metric(*args, **kwargs)


def _pair(ours, theirs, case, kind="classes", **kwargs):
    """The two results with the same seed, the same cams and the same (kind of) targets."""
    model, x, cams = case
    mine, reference = TARGETS[kind]
    return (_seeded(ours, x, cams, mine, model, **kwargs),
            _seeded(theirs, x, cams, reference, model, **kwargs))


def _diff(got, expected) -> float:
    assert got.dtype == np.float32 and got.shape == expected.shape, (got.shape, expected.shape)
    return float(np.abs(got - expected).max())


#: label, our metric, pgc's metric (built per call), kinds of targets
PARITY = [
    ("CamMultImageConfidenceChange", cam_mult_image.CamMultImageConfidenceChange,
     pgc_cam_mult.CamMultImageConfidenceChange, ("classes", "softmax-vector", "lambda")),
    ("DropInConfidence", cam_mult_image.DropInConfidence, pgc_cam_mult.DropInConfidence,
     ("classes", "raw-vector")),
    ("IncreaseInConfidence", cam_mult_image.IncreaseInConfidence, pgc_cam_mult.IncreaseInConfidence,
     ("classes", "softmax-vector")),
    ("ROADMostRelevantFirst", road.ROADMostRelevantFirst, pgc_road.ROADMostRelevantFirst,
     ("classes", "softmax-vector", "lambda")),
    ("ROADLeastRelevantFirst", road.ROADLeastRelevantFirst, pgc_road.ROADLeastRelevantFirst,
     ("classes", "raw-vector")),
    ("ROADMostRelevantFirst(65)", lambda: road.ROADMostRelevantFirst(65),
     lambda: pgc_road.ROADMostRelevantFirst(65), ("classes",)),
    ("ROADLeastRelevantFirst(percentile=35)", lambda: road.ROADLeastRelevantFirst(percentile=35),
     lambda: pgc_road.ROADLeastRelevantFirst(percentile=35), ("lambda",)),
    ("ROADMostRelevantFirstAverage([30, 70])", lambda: road.ROADMostRelevantFirstAverage([30, 70]),
     lambda: pgc_road.ROADMostRelevantFirstAverage([30, 70]), ("classes", "softmax-vector")),
    ("ROADLeastRelevantFirstAverage([15, 50, 85])", lambda: road.ROADLeastRelevantFirstAverage([15, 50, 85]),
     lambda: pgc_road.ROADLeastRelevantFirstAverage([15, 50, 85]), ("classes",)),
    ("ROADCombined()", road.ROADCombined, pgc_road.ROADCombined, ("classes",)),
    ("ROADCombined([25, 75])", lambda: road.ROADCombined([25, 75]), lambda: pgc_road.ROADCombined([25, 75]),
     ("raw-vector", "lambda")),
    ("PerturbationConfidenceMetric(RemoveMostRelevantFirst(50, NoisyLinearImputer(0.05)))",
     lambda: perturbation_confidence.PerturbationConfidenceMetric(
         perturbation_confidence.RemoveMostRelevantFirst(50, road.NoisyLinearImputer(noise=0.05))),
     lambda: pgc_pc.PerturbationConfidenceMetric(
         pgc_pc.RemoveMostRelevantFirst(50, pgc_road.NoisyLinearImputer(noise=0.05))), ("classes",)),
    ("AveragerAcrossThresholds(ROADLeastRelevantFirst, [45, 15])",
     lambda: perturbation_confidence.AveragerAcrossThresholds(road.ROADLeastRelevantFirst, [45, 15]),
     lambda: pgc_pc.AveragerAcrossThresholds(pgc_road.ROADLeastRelevantFirst, [45, 15]), ("classes",)),
]
CASES = [(label, ours, theirs, kind) for label, ours, theirs, kinds in PARITY for kind in kinds]


@pytest.mark.parametrize("label, ours, theirs, kind", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_every_metric_matches_pgc(case, label, ours, theirs, kind):
    got, expected = _pair(ours(), theirs(), case, kind)
    assert got.shape == ((3, 10) if kind.endswith("vector") else (3,))
    assert _diff(got, expected) <= (0 if label == "IncreaseInConfidence" else SCORE_TOL), label


@pytest.mark.parametrize("ours, theirs", [
    (cam_mult_image.CamMultImageConfidenceChange, pgc_cam_mult.CamMultImageConfidenceChange),
    (road.ROADLeastRelevantFirst, pgc_road.ROADLeastRelevantFirst),
], ids=["cam-mult", "road-lerf"])
@pytest.mark.parametrize("return_diff", [True, False])
def test_return_visualization_and_return_diff(case, ours, theirs, return_diff):
    (got, images), (expected, reference) = _pair(ours(), theirs(), case, return_visualization=True,
                                                 return_diff=return_diff)
    assert _diff(got, expected) <= SCORE_TOL
    assert isinstance(images, torch.Tensor) and images.shape == reference.shape == (3, 3, SIZE, SIZE)
    assert float((images - reference).abs().max()) <= IMAGE_TOL
    alone, _ = _pair(ours(), theirs(), case, return_diff=return_diff)
    np.testing.assert_array_equal(alone, got)
    if not return_diff:  # after alone: after − before is the default result
        np.testing.assert_allclose(got - _pair(ours(), theirs(), case)[0], _before(case), atol=SCORE_TOL)


def _before(case) -> np.ndarray:
    model, x, _ = case
    with torch.no_grad():
        outputs = model(x)
    return np.float32([t(o) for t, o in zip(TARGETS["classes"][1], outputs)])


def test_drop_in_confidence_with_visualization_keeps_the_images(case):
    """Deliberate difference: pgc negates the (scores, images) tuple and raises TypeError."""
    model, x, cams = case
    mine, reference = TARGETS["classes"]
    with pytest.raises(TypeError):
        pgc_cam_mult.DropInConfidence()(x, cams, reference, model, return_visualization=True)
    scores, images = cam_mult_image.DropInConfidence()(x, cams, mine, model, return_visualization=True)
    assert _diff(scores, pgc_cam_mult.DropInConfidence()(x, cams, reference, model)) <= SCORE_TOL
    assert float((images - x * torch.from_numpy(cams)[:, None]).abs().max()) == 0


# -- what users plug in: their perturbations, imputers, metric factories and subclasses


def _noisy_blend(tensor, cam):
    """A user's perturbation with its own torch randomness: called per image in pgc's order."""
    return tensor * cam + 0.1 * torch.randn_like(tensor) * (1 - cam)


def _mean_fill(image, mask):
    """A user's imputer: the removed pixels (mask 0) set to the channel means."""
    return torch.where(mask > 0.5, image, image.mean(dim=(1, 2), keepdim=True))


def _negated(base):
    class Negated(base):
        """A user's subclass that post-processes the scores (its own __call__)."""

        def __call__(self, *args, **kwargs):
            return -super().__call__(*args, **kwargs)
    return Negated


USER = [
    ("a perturbation callable", lambda m: m.PerturbationConfidenceMetric(_noisy_blend)),
    ("a user imputer", lambda m: m.PerturbationConfidenceMetric(m.RemoveLeastRelevantFirst(30, _mean_fill))),
    ("an averager of user perturbations",
     lambda m: m.AveragerAcrossThresholds(
         lambda p: m.PerturbationConfidenceMetric(lambda t, cam: t * (cam > p / 100)), [20, 60])),
    ("an averager of subclasses", lambda m: m.AveragerAcrossThresholds(
        lambda p: _negated(m.PerturbationConfidenceMetric)(
            m.RemoveMostRelevantFirst(p, m.NoisyLinearImputer())), [40, 80])),
]


class _Ours:
    PerturbationConfidenceMetric = perturbation_confidence.PerturbationConfidenceMetric
    RemoveMostRelevantFirst = perturbation_confidence.RemoveMostRelevantFirst
    RemoveLeastRelevantFirst = perturbation_confidence.RemoveLeastRelevantFirst
    AveragerAcrossThresholds = perturbation_confidence.AveragerAcrossThresholds
    NoisyLinearImputer = road.NoisyLinearImputer


class _Theirs:
    PerturbationConfidenceMetric = pgc_pc.PerturbationConfidenceMetric
    RemoveMostRelevantFirst = pgc_pc.RemoveMostRelevantFirst
    RemoveLeastRelevantFirst = pgc_pc.RemoveLeastRelevantFirst
    AveragerAcrossThresholds = pgc_pc.AveragerAcrossThresholds
    NoisyLinearImputer = pgc_road.NoisyLinearImputer


@pytest.mark.parametrize("label, build", USER, ids=[u[0] for u in USER])
def test_user_pieces_match_pgc(case, label, build):
    got, expected = _pair(build(_Ours), build(_Theirs), case, "lambda")
    assert _diff(got, expected) <= SCORE_TOL, label


def test_user_perturbation_gets_pgc_arguments(case):
    model, x, cams = case
    seen = []

    def record(tensor, cam):
        seen.append((tensor.device, tensor.shape, cam.dtype, cam.shape))
        return tensor
    metric = perturbation_confidence.PerturbationConfidenceMetric(record)
    scores = metric(x, cams, TARGETS["classes"][0], model)
    assert seen == [(torch.device("cpu"), (3, SIZE, SIZE), torch.float32, (SIZE, SIZE))] * 3
    np.testing.assert_array_equal(scores, 0)


# -- deliberate difference Q28: 'auto' removes the other end


def _inverted(imputer):
    """pgc's imputer on the complement of pgc's 'auto' mask: the pixels pgc keeps are removed."""
    return lambda image, mask: imputer(image, (mask == 0).float())


@pytest.mark.parametrize("ours, theirs, remover", [
    (road.ROADMostRelevantFirst, pgc_road.ROADMostRelevantFirst, pgc_pc.RemoveMostRelevantFirst),
    (road.ROADLeastRelevantFirst, pgc_road.ROADLeastRelevantFirst, pgc_pc.RemoveLeastRelevantFirst),
], ids=["morf", "lerf"])
def test_auto_percentile_is_pgc_with_the_mask_inverted(case, ours, theirs, remover):
    """Deliberate difference Q28: the same Otsu threshold, the other side of it removed."""
    inverted = pgc_pc.PerturbationConfidenceMetric(remover("auto", _inverted(pgc_road.NoisyLinearImputer())))
    got, expected = _pair(ours("auto"), inverted, case)
    assert _diff(got, expected) <= SCORE_TOL
    _, library = _pair(ours("auto"), theirs("auto"), case)
    assert np.abs(got - library).max() > 1e-3  # pgc's inverted ranking gives other scores


def test_auto_removes_the_most_relevant_pixels(case):
    _, x, cams = case
    captured = []
    remover = perturbation_confidence.RemoveMostRelevantFirst("auto", lambda _, mask: captured.append(mask))
    remover(x[0], torch.from_numpy(cams[0]))
    removed = captured[0].numpy() == 0
    assert captured[0].dtype == torch.float32 and 0 < removed.mean() < 1
    assert cams[0][removed].min() > cams[0][~removed].max()


# -- the imputer itself


def test_noisy_linear_imputer_matches_pgc(case):
    _, x, cams = case
    image = x[1]
    mask = torch.from_numpy(np.float32(cams[1] < np.percentile(cams[1], 70)))
    got = _seeded(road.NoisyLinearImputer(), image, mask)
    expected = _seeded(pgc_road.NoisyLinearImputer(), image, mask)
    assert got.dtype == torch.float32 and float((got - expected).abs().max()) <= IMAGE_TOL
    assert float((got - _seeded(road.NoisyLinearImputer(noise=0), image, mask)).abs().max()) > 1e-3
    gray = _seeded(road.NoisyLinearImputer(), image[:1], mask)  # one channel: spsolve's vector case
    assert float((gray - _seeded(pgc_road.NoisyLinearImputer(), image[:1], mask)).abs().max()) <= IMAGE_TOL


def test_sparse_system_matches_pgc(case):
    _, x, cams = case
    mask = np.float32(cams[0] < np.percentile(cams[0], 60))
    ours, theirs = road.NoisyLinearImputer, pgc_road.NoisyLinearImputer
    a, b = ours.setup_sparse_system(mask, x[0].numpy(), road.neighbors_weights)
    a_ref, b_ref = theirs.setup_sparse_system(mask, x[0].numpy(), pgc_road.neighbors_weights)
    np.testing.assert_array_equal(a.toarray(), a_ref.toarray())
    np.testing.assert_array_equal(b, b_ref)
    indices = np.flatnonzero(mask.ravel() == 0)
    for offset, _ in road.neighbors_weights:
        for got, expected in zip(ours.add_offset_to_indices(indices, offset, mask.shape),
                                 theirs.add_offset_to_indices(indices, offset, mask.shape)):
            np.testing.assert_array_equal(got, expected)


def test_weighting_is_honoured(case):
    """Deliberate difference Q29: pgc ignores ``weighting``; ours uses it (4 edge neighbours here)."""
    _, x, cams = case
    mask = torch.from_numpy(np.float32(cams[0] < np.percentile(cams[0], 50)))
    edges = [((0, 1), 0.25), ((0, -1), 0.25), ((1, 0), 0.25), ((-1, 0), 0.25)]
    filled = road.NoisyLinearImputer(noise=0, weighting=edges)(x[0], mask).numpy().astype(np.float64)
    removed = mask.numpy() == 0
    padded = np.pad(filled, ((0, 0), (1, 1), (1, 1)))
    inside = np.pad(np.ones(removed.shape), 1)
    total = sum(w * padded[:, 1 + dy:SIZE + 1 + dy, 1 + dx:SIZE + 1 + dx] for (dy, dx), w in edges)
    share = sum(w * inside[1 + dy:SIZE + 1 + dy, 1 + dx:SIZE + 1 + dx] for (dy, dx), w in edges)
    np.testing.assert_allclose((total / share)[:, removed], filled[:, removed], atol=1e-5)
    default = road.NoisyLinearImputer(noise=0)(x[0], mask).numpy()
    assert np.abs(default - filled).max() > 1e-3


# -- ARCC


def test_arcc_with_compat_gradcam_matches_pgc_arcc_with_pgc_gradcam(case):
    """The first compat call exports the model (drawing from torch's generator): ROAD must not see it."""
    model, x, _ = case
    layers = [model.layer4[-1]]
    mine, reference = TARGETS["classes"]
    grayscale = pgc.GradCAM(model, layers)(x, reference)
    got = _seeded(arcc.ARCC(compat.GradCAM(model, layers)), x, grayscale, mine, model)
    expected = _seeded(pgc_arcc.ARCC(pgc.GradCAM(model, layers)), x, grayscale, reference, model)
    assert _diff(got, expected) <= ARCC_TOL
    coherency = arcc.Coherency()(x, grayscale, mine, model, compat.GradCAM(model, layers))
    coherency_ref = pgc_arcc.Coherency()(x, grayscale, reference, model, pgc.GradCAM(model, layers))
    assert _diff(coherency, coherency_ref) <= ARCC_TOL
    assert _diff(arcc.Complexity()(grayscale), pgc_arcc.Complexity()(grayscale)) == 0
    road_part = _seeded(road.ROADCombined([20, 40, 60, 80]), x, grayscale, mine, model)
    assert np.any((road_part > 0) & (road_part < 0.5)), "the ARCC case should not clip ROAD everywhere"


def test_batch_pearson_coherency_matches_pgc():
    rng = np.random.default_rng(3)
    a = rng.random((4, 9, 11)).astype(np.float32)
    b = (a + rng.random((4, 9, 11)) * np.float32([[[0.1]], [[1]], [[10]], [[0]]])).astype(np.float32)
    b[3] = 1 - b[3]
    got = arcc.batch_pearson_coherency(a, b)
    assert _diff(got, pgc_arcc.batch_pearson_coherency(a, b)) <= 1e-6
    expected = [np.corrcoef(a[k].ravel(), b[k].ravel())[0, 1] for k in range(4)]
    np.testing.assert_allclose(got, expected, atol=1e-6)


# -- the driver: batching, devices, errors, and the native path unchanged


def test_all_thresholds_go_to_the_model_in_one_batch(case):
    model, x, cams = case
    sizes = []

    def counted(batch):
        sizes.append(len(batch))
        return model(batch)
    road.ROADCombined()(x, cams, TARGETS["classes"][0], counted)
    assert sizes == [54, 3]  # 2 × 9 percentiles × 3 images, then the plain batch


def test_errors_name_the_fix(case):
    model, x, cams = case
    metric = road.ROADMostRelevantFirst()
    with pytest.raises(compat.CompatError, match="one target per image"):
        metric(x, cams, None, model)
    with pytest.raises(MetricError, match="2 targets for 3 images"):
        metric(x, cams, TARGETS["classes"][0][:2], model)
    with pytest.raises(MetricError, match=r"cams must be \(B, H, W\)"):
        metric(x, cams[:, ::2, ::2], TARGETS["classes"][0], model)
    with pytest.raises(compat.CompatError, match="forward"):
        metric(x, cams, TARGETS["classes"][0], lambda batch: {"out": model(batch)})


def test_native_evaluate_still_refuses_vector_targets(case):
    model, x, cams = case

    class Everything:
        def values(self, z):
            return z

    def numpy_model(a):
        with torch.no_grad():
            return model(torch.from_numpy(a)).numpy()
    with pytest.raises(MetricError, match="one number per image"):
        evaluate("drop-in-confidence", x.numpy(), cams, [Everything()] * 3, numpy_model)


# -- introspection: pgc's public names and signatures

MODULES = [(pgc_pc, perturbation_confidence), (pgc_cam_mult, cam_mult_image), (pgc_road, road),
           (pgc_arcc, arcc)]


def _parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@pytest.mark.parametrize("theirs, ours", MODULES, ids=[m.__name__.rsplit(".", 1)[1] for m, _ in MODULES])
def test_every_public_name_of_pgc_is_here_with_its_signature(theirs, ours):
    names = [n for n, v in vars(theirs).items() if not n.startswith("_") and getattr(v, "__module__", "")
             == theirs.__name__ and (inspect.isclass(v) or inspect.isfunction(v))]
    names += [n for n in ("neighbors_weights",) if hasattr(theirs, n)]
    assert names
    for name in names:
        value, mine = getattr(theirs, name), getattr(ours, name)
        if not callable(value):
            assert value == mine, name
            continue
        functions = [("", value, mine)] if inspect.isfunction(value) else [
            (f".{m}", vars(value)[m], getattr(mine, m)) for m in vars(value)
            if m in ("__init__", "__call__") or (not m.startswith("_") and callable(vars(value)[m]))]
        for suffix, function, counterpart in functions:
            function = getattr(function, "__func__", function)
            expected = _parameters(function)
            if "args" in inspect.signature(function).parameters:  # pgc's (*args, **kwargs): its parent's
                continue
            assert _parameters(counterpart)[:len(expected)] == expected, name + suffix


def test_warnings_are_not_ours(case):
    model, x, cams = case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        road.ROADCombined([30, 70])(x, cams, TARGETS["classes"][0], model)
