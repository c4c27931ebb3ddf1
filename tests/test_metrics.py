"""Metrics against pytorch-grad-cam 1.5.7 (reference §7) on the same torch model.

Both sides run one random-weight resnet18 (64×64, batch 3); our ``model`` wraps it in numpy, so
only the metric logic differs. ROAD scores are compared with the library's noise replaced by the
same draws as ours (``torch.randn_like`` patched to our generator) or with noise 0 on both sides.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam.metrics import cam_mult_image, road
from pytorch_grad_cam.metrics.perturbation_confidence import (
    PerturbationConfidenceMetric,
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
)
from pytorch_grad_cam.utils import model_targets

from camexport import imputation, metrics
from camexport.metrics import METRICS, MetricError, evaluate, metric_names, noisy_linear_impute, removal_mask
from camexport.targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.xdist_group("metrics"),
    # the library converts tensors with numpy functions (its code, not ours)
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]

#: Scores: the same model, but our perturbed images go through it in other batches (measured ≤ 3e-7).
SCORE_TOL = 1e-5
#: Imputed pixels: float64 LU solves with other orderings (~1e-15), cast to float32: an ulp.
IMPUTE_TOL = 1e-6

SIZE = 64
CLASSES = [3, 5, 7]


def _smooth_cams(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    cams = np.stack([cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), size / 16)
                     for _ in range(count)])
    low, high = cams.min(axis=(1, 2), keepdims=True), cams.max(axis=(1, 2), keepdims=True)
    return ((cams - low) / (high - low)).astype(np.float32)


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    cams = _smooth_cams(rng, 3, SIZE)
    cams[2] = np.round(cams[2] * 6) / 6  # large ties at the percentile thresholds
    ours = [ClassifierOutputTarget(CLASSES[0]), ClassifierOutputSoftmaxTarget(CLASSES[1]),
            ClassifierOutputTarget(CLASSES[2])]
    theirs = [model_targets.ClassifierOutputTarget(CLASSES[0]),
              model_targets.ClassifierOutputSoftmaxTarget(CLASSES[1]),
              model_targets.ClassifierOutputTarget(CLASSES[2])]

    def model(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(a)).numpy()

    return {"net": net, "x": x, "cams": cams, "ours": ours, "theirs": theirs, "model": model}


def _same_draws(monkeypatch, seed: int) -> None:
    """The library's imputer noise from numpy.random.default_rng(seed), in its call order."""
    generator = np.random.default_rng(seed)
    monkeypatch.setattr(torch, "randn_like", lambda t: torch.from_numpy(
        generator.standard_normal(tuple(t.shape), dtype=np.float32)))


def _no_noise(monkeypatch) -> None:
    monkeypatch.setattr(road.NoisyLinearImputer.__init__, "__defaults__", (0.0, road.neighbors_weights))


# our name, the library's metric, tolerance on the scores, imputer noise on both sides
PARITY = [
    ("cam-mult-image-confidence-change", cam_mult_image.CamMultImageConfidenceChange, SCORE_TOL, None),
    ("drop-in-confidence", cam_mult_image.DropInConfidence, SCORE_TOL, None),
    ("increase-in-confidence", cam_mult_image.IncreaseInConfidence, 0, None),
    ("road-morf", road.ROADMostRelevantFirst, SCORE_TOL, "same-draws"),
    ("road-morf", road.ROADMostRelevantFirst, SCORE_TOL, "zero"),
    ("road-lerf", road.ROADLeastRelevantFirst, SCORE_TOL, "same-draws"),
    ("road-lerf", road.ROADLeastRelevantFirst, SCORE_TOL, "zero"),
    ("road-morf:65", lambda: road.ROADMostRelevantFirst(65), SCORE_TOL, "same-draws"),
    ("road-lerf:35", lambda: road.ROADLeastRelevantFirst(35), SCORE_TOL, "same-draws"),
    ("road-morf-average:30,70", lambda: road.ROADMostRelevantFirstAverage([30, 70]), SCORE_TOL, "same-draws"),
    ("road-lerf-average:30,70", lambda: road.ROADLeastRelevantFirstAverage([30, 70]), SCORE_TOL,
     "same-draws"),
    ("road-combined", road.ROADCombined, SCORE_TOL, "same-draws"),
    ("road-combined:30,70", lambda: road.ROADCombined([30, 70]), SCORE_TOL, "zero"),
]


@pytest.mark.parametrize("name, library, tol, noise", PARITY, ids=[f"{p[0]}-{p[3]}" for p in PARITY])
def test_parity_with_library(case, monkeypatch, name, library, tol, noise):
    if noise == "zero":
        _no_noise(monkeypatch)
    else:
        _same_draws(monkeypatch, seed=5)
    expected = library()(torch.from_numpy(case["x"]), case["cams"], case["theirs"], case["net"])
    got = evaluate(name, case["x"], case["cams"], case["ours"], case["model"], seed=5,
                   noise=0.0 if noise == "zero" else metrics.NOISE)
    assert got.dtype == np.float32 and got.shape == (3,)
    assert np.abs(got - expected).max() <= tol, (got, expected)


def _removal_mean_fill(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference for remove-morf / remove-lerf through the library's own removal classes."""
    mean = image.mean(dim=(1, 2), keepdim=True)
    return torch.where(mask > 0.5, image, mean)


# additions: our name, a reference computed through the library's perturbation machinery
ADDITIONS = [
    ("remove-morf", lambda: PerturbationConfidenceMetric(RemoveMostRelevantFirst(80, _removal_mean_fill))),
    ("remove-lerf:40",
     lambda: PerturbationConfidenceMetric(RemoveLeastRelevantFirst(40, _removal_mean_fill))),
]


@pytest.mark.parametrize("name, reference", ADDITIONS, ids=[a[0] for a in ADDITIONS])
def test_pixel_removal_without_imputer(case, name, reference):
    expected = reference()(torch.from_numpy(case["x"]), case["cams"], case["theirs"], case["net"])
    got = evaluate(name, case["x"], case["cams"], case["ours"], case["model"])
    assert np.abs(got - expected).max() <= SCORE_TOL


def _linear_model(classes: int = 6, shape=(3, 12, 12), seed: int = 0):
    weights = np.random.default_rng(seed).standard_normal((classes, int(np.prod(shape)))).astype(np.float32)
    weights /= np.sqrt(weights.shape[1])
    return lambda a: np.einsum("nd,kd->nk", a.reshape(len(a), -1), weights)


def _curve_reference(x, cam, target, model, steps, deletion):
    """RISE deletion / insertion: points k/steps of the pixels in CAM order, trapezoid AUC."""
    channels, height, width = x.shape
    order = np.argsort(-cam.ravel(), kind="stable")
    blurred = np.stack([cv2.GaussianBlur(c, (11, 11), 5) for c in x])
    start, end = (x, np.zeros_like(x)) if deletion else (blurred, x)
    ys = []
    for k in range(steps + 1):
        image = start.reshape(channels, -1).copy()
        chosen = order[:round(k * height * width / steps)]
        image[:, chosen] = end.reshape(channels, -1)[:, chosen]
        ys.append(target.values(model(image.reshape(1, channels, height, width)))[0])
    assert (ys[0] if deletion else ys[-1]) == target.values(model(x[None]))[0]
    return np.trapezoid(ys, dx=1 / steps)


@pytest.mark.parametrize("name, steps", [("deletion-auc", metrics.AUC_STEPS), ("insertion-auc:7", 7),
                                         ("deletion-auc:3", 3), ("insertion-auc", metrics.AUC_STEPS)])
def test_deletion_insertion_auc(name, steps):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    cams = _smooth_cams(rng, 2, 12)
    cams[1] = np.round(cams[1] * 3) / 3  # ties: row-major order among equal values
    model = _linear_model()
    targets = [ClassifierOutputSoftmaxTarget(1), ClassifierOutputTarget(4)]
    got = evaluate(name, x, cams, targets, model)
    expected = [_curve_reference(x[b], cams[b], targets[b], model, steps, name.startswith("deletion"))
                for b in range(2)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_every_metric_has_a_case():
    covered = {metric_names(n)[0].partition(":")[0] for n, *_ in PARITY + ADDITIONS}
    covered |= {"deletion-auc", "insertion-auc"}  # test_deletion_insertion_auc
    covered |= {"complexity", "coherency", "arcc", "adcc"}  # tests/test_arcc.py
    assert covered == set(METRICS)


# --- the imputer and the masks


def _masks(cams: np.ndarray) -> dict[str, np.ndarray]:
    size = cams.shape[-1]
    rng = np.random.default_rng(3)
    corner = np.ones((size, size), bool)
    corner[0, -1] = False
    border = np.zeros((size, size), bool)
    border[:, :5] = border[-3:, :] = True
    return {"morf-20": removal_mask(cams[0], 20, True), "lerf-70": removal_mask(cams[1], 70, False),
            "ties-50": removal_mask(cams[2], 50, True), "scattered": rng.random((size, size)) < 0.3,
            "all": np.ones((size, size), bool), "none": np.zeros((size, size), bool),
            "one-kept-corner": corner, "border": border}


def test_imputation_matches_library_without_noise(case):
    image = case["x"][0]
    for label, removed in _masks(case["cams"]).items():
        expected = road.NoisyLinearImputer(noise=0)(torch.from_numpy(image),
                                                    torch.from_numpy(np.float32(~removed))).numpy()
        got = noisy_linear_impute(image, removed, noise=0)
        assert got.dtype == np.float32
        assert np.abs(got - expected).max() <= IMPUTE_TOL, label
        np.testing.assert_array_equal(got[:, ~removed], image[:, ~removed])


def test_imputation_is_the_weighted_mean_of_neighbours():
    image = np.random.default_rng(4).standard_normal((2, 9, 11)).astype(np.float32)
    removed = np.zeros((9, 11), bool)
    removed[2:7, 3:9] = removed[0, :] = True
    filled = noisy_linear_impute(image, removed, noise=0).astype(np.float64)
    padded = np.pad(filled, ((0, 0), (1, 1), (1, 1)))
    inside = np.pad(np.ones((9, 11)), 1)
    weights = {(dy, dx): w for (dy, dx), w in imputation.NEIGHBOURS}
    total = sum(w * padded[:, 1 + dy:10 + dy, 1 + dx:12 + dx] for (dy, dx), w in weights.items())
    share = sum(w * inside[1 + dy:10 + dy, 1 + dx:12 + dx] for (dy, dx), w in weights.items())
    np.testing.assert_allclose((total / share)[:, removed], filled[:, removed], atol=1e-6)


def _library_removed(remover, cam: np.ndarray) -> np.ndarray:
    captured = {}

    def capture(image, mask):
        captured["mask"] = mask.numpy()
        return image

    remover.imputer = capture
    remover(torch.zeros(3, *cam.shape), torch.from_numpy(cam))
    return captured["mask"]


@pytest.mark.parametrize("percentile", [0, 10, 33.3, 50, 80, 100, "auto"])
@pytest.mark.parametrize("most_relevant_first", [True, False], ids=["morf", "lerf"])
def test_removal_masks(case, percentile, most_relevant_first):
    kind = RemoveMostRelevantFirst if most_relevant_first else RemoveLeastRelevantFirst
    for cam in case["cams"]:
        library = _library_removed(kind(percentile, None), cam)
        ours = removal_mask(cam, percentile, most_relevant_first)
        if percentile == "auto":
            # Q28 fix: the library keeps what we remove and removes the rest
            np.testing.assert_array_equal(ours, library != 0)
            rank = cam if most_relevant_first else 1 - cam
            assert rank[ours].min() > rank[~ours].max()
        else:
            np.testing.assert_array_equal(ours, library == 0)


def test_noise_statistics_and_known_pixels():
    rng = np.random.default_rng(6)
    image = rng.standard_normal((3, 64, 64)).astype(np.float32)
    removed = rng.random((64, 64)) < 0.5
    clean = noisy_linear_impute(image, removed, noise=0)
    noisy = noisy_linear_impute(image, removed, noise=0.01, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(noisy[:, ~removed], image[:, ~removed])
    draws = (noisy - clean)[:, removed].astype(np.float64)
    assert abs(draws.mean()) < 5 * 0.01 / np.sqrt(draws.size)
    assert abs(draws.std() / 0.01 - 1) < 0.05
    again = noisy_linear_impute(image, removed, noise=0.01, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(noisy, again)


def test_noise_reproducible_for_a_seed(case):
    args = (case["x"], case["cams"], case["ours"], case["model"])
    first = evaluate("road-lerf", *args, seed=3)
    np.testing.assert_array_equal(first, evaluate("road-lerf", *args, seed=3))
    assert not np.array_equal(first, evaluate("road-lerf", *args, seed=4))
    assert not np.array_equal(first, evaluate("road-lerf", *args, noise=0))


# --- batching


def test_model_calls_are_batched_and_chunked(monkeypatch):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 3, 12, 12)).astype(np.float32)
    cams = _smooth_cams(rng, 3, 12)
    targets = [ClassifierOutputTarget(c) for c in (0, 2, 5)]
    linear = _linear_model()
    calls = []

    def model(a):
        calls.append(len(a))
        return linear(a)

    whole = evaluate("road-combined", x, cams, targets, model, workers=1)
    assert calls == [54, 3]  # 2 × 9 percentiles × 3 images at once, then the plain batch
    calls.clear()
    monkeypatch.setattr(metrics, "MAX_BATCH", 4)
    chunked = evaluate("road-combined", x, cams, targets, model, workers=3)
    assert calls == [4] * 13 + [2, 3]
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6)


# --- names


@pytest.mark.parametrize("spec, expected", [
    ("road-combined,drop-in-confidence", ["road-combined", "drop-in-confidence"]),
    (["ROADCombined", "roadcombined", "DropInConfidence", "road_combined"],
     ["road-combined", "drop-in-confidence"]),
    ("camMultImageConfidenceChange, ROADMostRelevantFirstAverage",
     ["cam-mult-image-confidence-change", "road-morf-average"]),
    ("road-morf:80,road-lerf:20,deletion-auc:20", ["road-morf", "road-lerf", "deletion-auc"]),
    ("road-morf:70.0,road-lerf:Auto,remove-morf:12.5",
     ["road-morf:70", "road-lerf:auto", "remove-morf:12.5"]),
    ("road-combined:20,40,60,80,increase-in-confidence",
     ["road-combined:20,40,60,80", "increase-in-confidence"]),
    (["road-combined:20", "40", "deletion", "insertion:50"],
     ["road-combined:20,40", "deletion-auc", "insertion-auc:50"]),
])
def test_metric_names(spec, expected):
    assert metric_names(spec) == expected


def test_every_name_and_alias_round_trips():
    for metric in METRICS.values():
        for alias in (metric.name, *metric.aliases, metric.name.upper()):
            assert metric_names(alias) == [metric.name]


@pytest.mark.parametrize("spec, message", [
    ("road-foo", r"unknown metric 'road-foo'; choose from .*road-combined"),
    ("road-morf:120", r"percentiles in \[0, 100\]"),
    ("road-morf:70,80", r"takes one percentile.*road-morf-average"),
    ("drop-in-confidence:5", "takes no parameter"),
    ("deletion-auc:0", "steps ≥ 1"),
    ("road-combined:20,abc", "unknown metric 'abc'"),
])
def test_bad_names(spec, message):
    with pytest.raises(MetricError, match=message):
        metric_names(spec)


# --- bad inputs


def test_bad_inputs():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 3, 12, 12)).astype(np.float32)
    cams = _smooth_cams(rng, 3, 12)
    targets = [ClassifierOutputTarget(c) for c in (0, 2, 5)]
    model = _linear_model()
    assert issubclass(MetricError, ValueError)
    with pytest.raises(MetricError, match=r"cams must be \(B, H, W\) = \(3, 12, 12\).*resized to the input"):
        evaluate("road-morf", x, cams[:, None], targets, model)
    with pytest.raises(MetricError, match=r"cams must be .* got \(3, 6, 6\)"):
        evaluate("road-morf", x, cams[:, ::2, ::2], targets, model)
    with pytest.raises(MetricError, match="2 targets for 3 images: give one target per image"):
        evaluate("road-morf", x, cams, targets[:2], model)
    with pytest.raises(MetricError, match="one explicit target per image"):
        evaluate("road-morf", x, cams, None, model)
    with pytest.raises(MetricError, match="target 1 .* is not a target object"):
        evaluate("road-morf", x, cams, [targets[0], "cat", targets[2]], model)
    with pytest.raises(MetricError, match="unknown metric 'roadmap'"):
        evaluate("roadmap", x, cams, targets, model)
    with pytest.raises(MetricError, match="NaN or Inf"):
        evaluate("road-morf", x, np.where(cams > 0.5, np.nan, cams), targets, model)
    with pytest.raises(MetricError, match=r"x must be a preprocessed batch \(B, C, H, W\)"):
        evaluate("road-morf", x[0], cams[0], targets[:1], model)
    with pytest.raises(MetricError, match=r"the model returned shape \(1, 6\) for 3 images"):
        evaluate("road-morf", x, cams, targets, lambda a: model(a[:1]))
    # plain class indices are accepted as ClassifierOutputTarget
    np.testing.assert_array_equal(evaluate("drop-in-confidence", x, cams, [0, 2, 5], model),
                                  evaluate("drop-in-confidence", x, cams, targets, model))
