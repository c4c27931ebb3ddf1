"""Localisation and sparsity metrics (camexport.localisation): hand-made cases with known answers,
the vectorised pieces against per-image brute force, and Quantus 0.6.0 on the same arrays.

Deliberate differences from Quantus are asserted in test_quantus_deliberate_differences, so a
change on either side shows up here.
"""

from __future__ import annotations

import math
import warnings

import cv2
import numpy as np
import pytest

from camexport.errors import CamexportError
from camexport.localisation import (
    METRICS,
    Annotations,
    LocalisationError,
    aggregate,
    energy_pointing_game,
    entropy_complexity,
    evaluate,
    gini_sparseness,
    iou,
    max_box_iou,
    metric_names,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    top_k_intersection,
)

#: Ratios of float64 sums of a few hundred terms: a few ulps.
EXACT = 1e-12
#: Against Quantus; measured: localisation 0, Gini 1.1e-7 (Quantus' +1e-7), entropy 1e-9 (its 1e-12).
QUANTUS_TOL = 1e-6

H, W = 10, 12
NAN = math.nan


def _block(rows: slice, cols: slice, value: float = 1.0) -> np.ndarray:
    cam = np.zeros((H, W))
    cam[rows, cols] = value
    return cam


def _scene() -> tuple[np.ndarray, Annotations, np.ndarray]:
    """Three samples with the same two boxes: class 1 at x 2–6, y 2–6 (columns and rows 2…5,
    16 px) and class 2 at x 8–12, y 0–4 (columns 8…11, rows 0…3). Every CAM is 1 on the class-1
    box. Targets: 1 (on target), 2 (off target), 3 (no box of that class: NaN)."""
    boxes = [[[2, 2, 6, 6], [8, 0, 12, 4]]] * 3
    annotations = Annotations.from_lists(boxes, [[1, 2]] * 3)
    cams = np.stack([_block(slice(2, 6), slice(2, 6))] * 3)
    return cams, annotations, np.array([1, 2, 3])


#: metric spec -> per-sample scores on _scene (first column for (N, T) tables) and the aggregate.
SCENE = {
    "pointing-game:2": ([1, 0, NAN], 0.5),  # the off-target box is 3 px from the peak block
    "pointing-game:3": ([1, 1, NAN], 1.0),
    "energy-pointing-game": ([1, 0, NAN], 0.5),
    "relevance-mass-accuracy": ([1, 0, NAN], 0.5),
    "relevance-rank-accuracy": ([1, 0, NAN], 0.5),
    # k = 20: the 16 ones, then 4 of the 104 tied zeros, of which 16 (sample 1: its box) inside
    "top-k-intersection:20": ([16 / 20, 4 * 16 / 104 / 20, NAN], (16 / 20 + 4 * 16 / 104 / 20) / 2),
    "iou:0.5": ([1, 0, NAN], [0.5]),
    "maxboxacc": ([1, 0, NAN], 0.5),
    "maxboxacc-v2": ([1, 0, NAN], 0.5),
    "gini": ([1 - 16 / 120] * 3, 1 - 16 / 120),  # k equal values of n: 1 − k/n
    "entropy": ([math.log(16)] * 3, math.log(16)),
}


def test_every_metric_has_a_scene_case():
    covered = {metric_names(spec)[0].partition(":")[0] for spec in SCENE}
    assert covered == set(METRICS)


@pytest.mark.parametrize("spec", SCENE)
def test_scene(spec):
    cams, annotations, targets = _scene()
    expected, total = SCENE[spec]
    scores = evaluate(spec, cams, annotations, targets)
    assert len(scores) == 3 and scores.dtype == np.float64
    first = scores if scores.ndim == 1 else scores[:, 0]
    np.testing.assert_allclose(first, expected, rtol=0, atol=EXACT)
    np.testing.assert_allclose(aggregate(spec, scores), total, rtol=0,
                               atol=EXACT)


# ---------------------------------------------------------------------------------------------
# Pointing game


def _one_box(box, label=1, count=1) -> Annotations:
    return Annotations(np.array([[box]], float), np.array([[label]]), np.array([count]))


def _peak(r: int, c: int) -> np.ndarray:
    cam = np.full((1, H, W), 0.2)
    cam[0, r, c] = 1.0
    return cam


@pytest.mark.parametrize("peak, tolerance, hit", [
    ((3, 3), 0, 1),  # inside x 2–6, y 2–6 (columns and rows 2…5)
    ((5, 5), 0, 1),  # last row and column of the box
    ((6, 5), 0, 0),  # first row below it
    ((3, 9), 3, 0),  # 4 px right of column 5
    ((3, 9), 4, 1),
])
def test_pointing_game_tolerance(peak, tolerance, hit):
    score = pointing_game(_peak(*peak), _one_box([2, 2, 6, 6]), np.array([1]), tolerance)
    assert score.tolist() == [hit]


def test_pointing_game_diagonal_distance():
    """(9, 9) to the nearest box pixel (5, 5): 4 rows and 4 columns, √32 ≈ 5.66."""
    annotations, target = _one_box([2, 2, 6, 6]), np.array([1])
    assert pointing_game(_peak(9, 9), annotations, target, 5.6).tolist() == [0]
    assert pointing_game(_peak(9, 9), annotations, target, 5.7).tolist() == [1]


def test_pointing_game_mask_instead_of_boxes():
    mask = np.zeros((1, H, W), bool)
    mask[0, 7, 1] = True  # the mask, not the box (which holds the peak), is the region
    annotations = Annotations(np.array([[[2, 2, 6, 6]]], float), np.array([[1]]), masks=mask)
    assert pointing_game(_peak(3, 3), annotations, np.array([1]), 0).tolist() == [0]
    assert pointing_game(_peak(7, 1), annotations, np.array([1]), 0).tolist() == [1]
    assert pointing_game(_peak(7, 4), annotations, np.array([1]), 3).tolist() == [1]
    assert pointing_game(_peak(7, 4), annotations, np.array([1]), 2.9).tolist() == [0]
    empty = Annotations(np.zeros((1, 0, 4)), np.zeros((1, 0), int), masks=np.zeros((1, H, W), bool))
    assert np.isnan(pointing_game(_peak(3, 3), empty, np.array([1]))).all()


def test_pointing_game_ties_any_maximum_hits():
    annotations, target = _one_box([2, 2, 6, 6]), np.array([1])
    both = _peak(3, 3)
    both[0, 8, 10] = 1.0  # a second maximum far outside
    assert pointing_game(both, annotations, target, 0).tolist() == [1]
    outside = _peak(8, 10)
    outside[0, 0, 0] = 1.0
    assert pointing_game(outside, annotations, target, 0).tolist() == [0]


def test_pointing_game_constant_maps_miss():
    annotations, target = _one_box([0, 0, W, H]), np.array([1])  # the box is the whole image
    for value in (0.0, 0.5):
        assert pointing_game(np.full((1, H, W), value), annotations, target).tolist() == [0]


def test_pointing_game_classes_and_several_boxes():
    boxes = np.array([[[0, 0, 3, 3], [8, 6, 12, 10], [6, 0, 9, 2]]], float)
    labels = np.array([[2, 1, 1]])
    annotations = Annotations(boxes, labels)
    assert pointing_game(_peak(1, 1), annotations, np.array([1]), 0).tolist() == [0]  # class 2
    assert pointing_game(_peak(1, 1), annotations, np.array([2]), 0).tolist() == [1]
    assert pointing_game(_peak(7, 9), annotations, np.array([1]), 0).tolist() == [1]  # 2nd box
    assert pointing_game(_peak(1, 7), annotations, np.array([1]), 0).tolist() == [1]  # 3rd box
    # the third slot is padding when count is 2: its box is no annotation
    padded = Annotations(boxes, labels, np.array([2]))
    assert pointing_game(_peak(1, 7), padded, np.array([1]), 0).tolist() == [0]
    assert np.isnan(pointing_game(_peak(1, 1), annotations, np.array([7]))).all()


def test_pointing_game_tolerance_against_brute_force():
    """Random masks and peaks: hit iff some maximum has a mask pixel within the tolerance."""
    rng = np.random.default_rng(3)
    cams = np.round(rng.random((40, 15, 17)) * 100) / 100  # ties in the maximum
    masks = rng.random((40, 15, 17)) > 0.97
    masks[5] = False
    annotations = Annotations(np.zeros((40, 0, 4)), np.zeros((40, 0), int), masks=masks)
    seen = set()
    for tolerance in (0, 1, 1.5, 2.3, 4, 7.9):
        expected = []
        for cam, mask in zip(cams, masks):
            peaks = np.argwhere(cam == cam.max())
            region = np.argwhere(mask)
            if not len(region):
                expected.append(NAN)
                continue
            gaps = np.hypot(*(peaks[:, None] - region[None]).transpose(2, 0, 1))
            expected.append(float(gaps.min() <= tolerance))
        scores = pointing_game(cams, annotations, np.zeros(40, int), tolerance)
        np.testing.assert_array_equal(scores, expected)
        seen |= {(tolerance, score) for score in scores[~np.isnan(scores)]}
    assert np.isnan(scores).sum() == 1
    assert {(0, 0.0), (0, 1.0), (2.3, 0.0), (2.3, 1.0)} <= seen


# ---------------------------------------------------------------------------------------------
# Energy pointing game, relevance mass and rank accuracy, top-k, IoU


def test_energy_pointing_game_rows_are_y():
    """A wide box (x 1–9, y 2–4): ours sums map[y1:y2, x1:x2]; Score-CAM's reference code sums
    map[x1:x2, y1:y2] (rows indexed by x), another area of the map."""
    cam = _block(slice(2, 4), slice(1, 9))[None] + 0.1
    score = energy_pointing_game(cam, _one_box([1, 2, 9, 4]), np.array([1]))
    np.testing.assert_allclose(score, cam[0, 2:4, 1:9].sum() / cam.sum(), rtol=0, atol=EXACT)
    swapped = cam[0, 1:9, 2:4].sum() / cam.sum()
    assert score[0] > 0.55 and swapped < 0.25


def test_energy_pointing_game_box_union_and_degenerate():
    boxes = np.array([[[0, 0, 4, 4], [2, 2, 6, 6], [0, 0, 12, 10]]], float)  # overlapping pair
    annotations = Annotations(boxes, np.array([[1, 1, 2]]))
    cam = np.ones((1, H, W))
    union = 16 + 16 - 4
    np.testing.assert_allclose(energy_pointing_game(cam, annotations, np.array([1])), union / 120,
                               rtol=0, atol=EXACT)
    assert energy_pointing_game(np.zeros((1, H, W)), annotations, np.array([1])).tolist() == [0]
    assert np.isnan(energy_pointing_game(cam, annotations, np.array([5]))).all()


def test_energy_pointing_game_keeps_boxes_when_masks_given():
    mask = np.zeros((1, H, W), bool)
    mask[0, 8:, :] = True
    annotations = Annotations(np.array([[[0, 0, 6, 10]]], float), np.array([[1]]), masks=mask)
    cam = np.ones((1, H, W))
    target = np.array([1])
    np.testing.assert_allclose(energy_pointing_game(cam, annotations, target), 0.5, atol=EXACT)
    np.testing.assert_allclose(relevance_mass_accuracy(cam, annotations, target), 24 / 120,
                               atol=EXACT)


def test_relevance_rank_accuracy_ties_split_evenly():
    """Mask: 4 pixels. CAM: 3 at one mask pixel, 2 at two pixels (one in the mask), 1 at the
    rest. Top 4 = the 3, both 2s and one of the 115 tied 1s, of which 2 lie in the mask."""
    mask = np.zeros((1, H, W), bool)
    mask[0, 0, :4] = True
    cam = np.ones((1, H, W))
    cam[0, 0, 0] = 3
    cam[0, 0, 1] = cam[0, 5, 5] = 2
    annotations = Annotations(np.zeros((1, 0, 4)), np.zeros((1, 0), int), masks=mask)
    expected = (1 + 1 + 1 * 2 / 117) / 4
    np.testing.assert_allclose(relevance_rank_accuracy(cam, annotations, np.array([0])), expected,
                               rtol=0, atol=EXACT)
    for constant in (0.0, 0.7):  # any constant map: chance level |S| / (H·W)
        score = relevance_rank_accuracy(np.full((1, H, W), constant), annotations, np.array([0]))
        np.testing.assert_allclose(score, 4 / 120, rtol=0, atol=EXACT)


def test_top_k_intersection_known_and_bad_k():
    cam = _block(slice(2, 6), slice(2, 6))[None] + _block(slice(8, 9), slice(0, 4), 0.5)[None]
    annotations = _one_box([0, 8, 12, 10])  # rows 8–9: holds the four 0.5s
    target = np.array([1])
    assert top_k_intersection(cam, annotations, target, 16).tolist() == [0]
    np.testing.assert_allclose(top_k_intersection(cam, annotations, target, 20), 4 / 20, atol=EXACT)
    for k in (0, H * W + 1):
        with pytest.raises(LocalisationError, match="1 ≤ k ≤ H·W"):
            top_k_intersection(cam, annotations, target, k)


def test_iou_thresholds():
    cam = _block(slice(2, 6), slice(2, 6))[None] + _block(slice(2, 6), slice(6, 8), 0.4)[None]
    annotations = _one_box([2, 2, 6, 6])
    scores = iou(cam, annotations, np.array([1]), (0.0, 0.3, 0.4, 0.9))
    # τ = 0: 24 foreground pixels ⊇ 16 box pixels; τ = 0.4: 0.4 is not > 0.4
    np.testing.assert_allclose(scores, [[16 / 24, 16 / 24, 1, 1]], rtol=0, atol=EXACT)
    half = cam / 2  # thresholds are relative to the maximum
    np.testing.assert_allclose(iou(half, annotations, np.array([1]), (0.3, 0.5)), [[16 / 24, 1]])
    assert iou(np.zeros((1, H, W)), annotations, np.array([1]), (0.0, 0.5)).tolist() == [[0, 0]]
    assert np.isnan(iou(cam, annotations, np.array([2]), (0.5,))).all()


# ---------------------------------------------------------------------------------------------
# MaxBoxAcc


def _two_blobs() -> np.ndarray:
    """A large blob (rows 0–4, columns 0–5, 30 px) and a small one (rows 6–9, columns 8–11)."""
    return np.maximum(_block(slice(0, 5), slice(0, 6)), _block(slice(6, 10), slice(8, 12), 0.8))[None]


def test_max_box_iou_largest_component_against_all():
    annotations = _one_box([8, 6, 12, 10])  # the small blob's box
    target = np.array([1])
    thresholds = (0.0, 0.5, 0.85)
    largest = max_box_iou(_two_blobs(), annotations, target, thresholds=thresholds)
    every = max_box_iou(_two_blobs(), annotations, target, all_components=True, thresholds=thresholds)
    # τ = 0.85: only the large blob is left, no overlap with the box
    np.testing.assert_allclose(largest, [[0, 0, 0]], atol=EXACT)
    np.testing.assert_allclose(every, [[1, 1, 0]], atol=EXACT)
    assert aggregate("maxboxacc", largest) == 0
    assert aggregate("maxboxacc-v2", every) == 1


def test_max_box_iou_partial_overlap_and_deltas():
    # component box x 0–6, y 0–5 (30 px) against x 0–6, y 0–10 (60 px): IoU 0.5
    annotations = _one_box([0, 0, 6, 10])
    scores = max_box_iou(_two_blobs(), annotations, np.array([1]), thresholds=(0.5,))
    np.testing.assert_allclose(scores, [[0.5]], atol=EXACT)
    assert aggregate("maxboxacc", scores) == 1 and aggregate("maxboxacc:0.6", scores) == 0
    np.testing.assert_allclose(aggregate("maxboxacc-v2", scores), 2 / 3)  # δ = 0.3, 0.5 of 0.3, 0.5, 0.7


def test_max_box_iou_degenerate_and_missing():
    annotations = Annotations(np.array([[[0, 0, 6, 10]], [[0, 0, 6, 10]]], float), np.array([[1], [1]]))
    scores = max_box_iou(np.zeros((2, H, W)), annotations, np.array([1, 4]), thresholds=(0.0, 0.5))
    assert scores[0].tolist() == [0, 0] and np.isnan(scores[1]).all()
    assert aggregate("maxboxacc", scores) == 0
    assert np.isnan(aggregate("maxboxacc", scores[1:]))


def test_max_box_iou_batch_against_per_image_components():
    """Stacked labelling (one OpenCV call per threshold) against one call per image; maps that
    fill the image touch the next map's first row and must not merge with it."""
    rng = np.random.default_rng(5)
    small = rng.random((12, 4, 5)).astype(np.float32)
    cams = np.stack([cv2.resize(s, (W, H)) for s in small]).astype(np.float64)
    cams[3] = 1.0
    corner = rng.uniform(0, 6, (12, 3, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(1, 6, (12, 3, 2))], axis=2)
    annotations = Annotations(boxes, rng.integers(0, 2, (12, 3)))
    targets = rng.integers(0, 2, 12)
    thresholds = (0.0, 0.3, 0.6, 0.9)
    for all_components in (False, True):
        expected = np.zeros((12, len(thresholds)))
        for n in range(12):
            use = annotations.target_boxes(targets)[n]
            for t, threshold in enumerate(thresholds):
                fg = (cams[n] > threshold * cams[n].max()).astype(np.uint8)
                _, _, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
                stats = stats[1:]
                if not all_components and len(stats):
                    stats = stats[[np.argmax(stats[:, 4])]]
                for x, y, w, h, _ in stats:
                    for box in annotations.boxes[n][use]:
                        ix = max(0, min(x + w, box[2]) - max(x, box[0]))
                        iy = max(0, min(y + h, box[3]) - max(y, box[1]))
                        union = w * h + (box[2] - box[0]) * (box[3] - box[1]) - ix * iy
                        expected[n, t] = max(expected[n, t], ix * iy / union)
            if not use.any():
                expected[n] = NAN
        scores = max_box_iou(cams, annotations, targets, all_components, thresholds)
        np.testing.assert_allclose(scores, expected, rtol=0, atol=EXACT)
        assert scores[3, 0] > 0 or np.isnan(scores[3, 0])


# ---------------------------------------------------------------------------------------------
# Sparsity


def test_gini_and_entropy_known_values():
    one = np.zeros((1, H, W))
    one[0, 4, 4] = 0.3
    constant = np.full((1, H, W), 0.6)
    zero = np.zeros((1, H, W))
    n = H * W
    np.testing.assert_allclose(gini_sparseness(one), (n - 1) / n, atol=EXACT)
    np.testing.assert_allclose(gini_sparseness(constant), 0, atol=EXACT)
    np.testing.assert_allclose(gini_sparseness(zero), 0, atol=EXACT)
    np.testing.assert_allclose(entropy_complexity(one), 0, atol=EXACT)
    np.testing.assert_allclose(entropy_complexity(constant), math.log(n), atol=EXACT)
    np.testing.assert_allclose(entropy_complexity(zero), math.log(n), atol=EXACT)
    # scale-free; the input is not modified
    cams = np.random.default_rng(0).random((3, H, W))
    before = cams.copy()
    np.testing.assert_allclose(gini_sparseness(cams / 4), gini_sparseness(cams), atol=1e-9)
    np.testing.assert_allclose(entropy_complexity(cams / 4), entropy_complexity(cams), atol=EXACT)
    np.testing.assert_array_equal(cams, before)


# ---------------------------------------------------------------------------------------------
# Inputs, names and aggregation


def test_bad_inputs():
    cams, annotations, targets = _scene()
    with pytest.raises(LocalisationError, match=r"cams must be \(N, H, W\)"):
        pointing_game(cams[0], annotations, targets)
    with pytest.raises(LocalisationError, match="finite and ≥ 0"):
        relevance_mass_accuracy(-cams, annotations, targets)
    with pytest.raises(LocalisationError, match="targets must be"):
        relevance_mass_accuracy(cams, annotations, targets[:2])
    with pytest.raises(LocalisationError, match="annotated samples"):
        relevance_mass_accuracy(cams[:2], annotations, targets[:2])
    with pytest.raises(LocalisationError, match="x2 ≥ x1"):
        _one_box([5, 0, 2, 3])
    with pytest.raises(LocalisationError, match="counts must lie"):
        Annotations(np.zeros((1, 1, 4)), np.zeros((1, 1), int), np.array([2]))
    with pytest.raises(LocalisationError, match="masks must be at CAM resolution"):
        relevance_mass_accuracy(cams, Annotations(annotations.boxes, annotations.labels,
                                                  masks=np.ones((3, 4, 4), bool)), targets)
    with pytest.raises(LocalisationError, match="needs annotations"):
        evaluate("pointing-game", cams)
    assert issubclass(LocalisationError, CamexportError) and issubclass(LocalisationError, ValueError)
    _one_box([np.nan, 0, 1, 1], count=0)  # padding slots are not checked


def test_metric_names_and_parameters():
    assert metric_names("pointing-game:15,iou:0.2,0.5,gini,PointingGame,Sparseness, top-k:500") == [
        "pointing-game", "iou:0.2,0.5", "gini", "top-k-intersection:500"]
    assert metric_names(["maxboxacc-v2:0.5", "MaxBoxAcc:0.5", "rma"]) == [
        "maxboxacc-v2:0.5", "maxboxacc", "relevance-mass-accuracy"]
    for bad, message in [("nope", "unknown metric"), ("gini:3", "takes no parameter"),
                         ("pointing-game:-1", "a distance ≥ 0"), ("top-k:2.5", "an integer ≥ 1"),
                         ("iou:1", r"thresholds in \[0, 1\)"), ("maxboxacc:0", r"an IoU in \(0, 1\]"),
                         ("maxboxacc:0.3,0.5", "takes one value"), ("iou:a", "thresholds")]:
        with pytest.raises(LocalisationError, match=message):
            metric_names(bad)


def test_aggregate_over_batches():
    cams, annotations, targets = _scene()
    first = evaluate("pointing-game:0", cams[:2], Annotations(annotations.boxes[:2],
                                                              annotations.labels[:2]), targets[:2])
    second = evaluate("pointing-game:0", cams[2:], Annotations(annotations.boxes[2:],
                                                               annotations.labels[2:]), targets[2:])
    assert aggregate("pointing-game:0", np.concatenate([first, second])) == 0.5
    assert np.isnan(aggregate("pointing-game", second))


# ---------------------------------------------------------------------------------------------
# Quantus 0.6.0 on the same arrays


@pytest.fixture(scope="module")
def quantus_case():
    quantus = pytest.importorskip("quantus", reason="quantus is not installed (test extra)")
    rng = np.random.default_rng(11)
    n, height, width = 24, 28, 36
    small = rng.random((n, 5, 6)).astype(np.float32)
    cams = np.stack([cv2.resize(s, (width, height)) for s in small]).astype(np.float64)
    cams = (cams - cams.min(axis=(1, 2), keepdims=True)) / np.ptp(cams, axis=(1, 2), keepdims=True)
    counts = rng.integers(1, 4, n)
    counts[:3] = 0
    corner = rng.uniform(0, [width - 6, height - 6], (n, 3, 2))
    size = rng.uniform(6, 24, (n, 3, 2))
    boxes = np.concatenate([corner, np.minimum(corner + size, [width, height])], axis=2)
    annotations = Annotations(boxes, rng.integers(0, 2, (n, 3)), counts)
    targets = rng.integers(0, 2, n)
    region = annotations.region(targets, (height, width))
    assert 3 <= (~region.any(axis=(1, 2))).sum() <= n - 12  # some unscored samples
    return quantus, cams, annotations, targets, region


def _quantus(metric, cams: np.ndarray, region: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Quantus' scores (N,) on float64 maps; its warnings on empty masks and 0/0 silenced."""
    x = np.zeros((len(cams), 1, *cams.shape[1:]))
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        scores = metric(model=None, x_batch=x, y_batch=targets, a_batch=cams[:, None].copy(),
                        s_batch=region[:, None].astype(np.float64), channel_first=True)
    return np.asarray(scores, np.float64)


QUANTUS = {  # our metric -> (Quantus class, its arguments)
    "pointing-game:0": ("PointingGame", {}),  # no tolerance in Quantus
    "relevance-mass-accuracy": ("RelevanceMassAccuracy", {}),
    "relevance-rank-accuracy": ("RelevanceRankAccuracy", {}),
    "top-k-intersection:100": ("TopKIntersection", {"k": 100}),
    "gini": ("Sparseness", {}),
    "entropy": ("Complexity", {}),
}


@pytest.mark.parametrize("spec", QUANTUS)
def test_against_quantus(quantus_case, spec):
    """Random smooth maps (no ties), boxes of three classes, 0–3 per sample. Quantus gets our
    region (the target's box union) as s_batch; it normalises by the maximum (a no-op: maps reach
    1). Compared on the samples we score; Quantus' values of the others are its own (a hit or NaN)."""
    quantus, cams, annotations, targets, region = quantus_case
    name, kwargs = QUANTUS[spec]
    theirs = _quantus(getattr(quantus, name)(disable_warnings=True, **kwargs), cams, region, targets)
    ours = evaluate(spec, cams, annotations, targets)
    scored = ~np.isnan(ours)
    assert scored.sum() >= len(cams) // 2
    np.testing.assert_allclose(ours[scored], theirs[scored], rtol=0, atol=QUANTUS_TOL)
    if spec == "pointing-game:0":
        assert 0 < ours[scored].mean() < 1


def test_quantus_deliberate_differences(quantus_case):
    """Ours vs Quantus where we chose otherwise (docstrings of camexport.localisation). Sample 0
    has a 16-pixel mask, sample 1 none; Quantus refuses a batch of constant maps, so sample 1's
    map is one pixel."""
    quantus = quantus_case[0]
    mask = np.zeros((2, H, W), bool)
    mask[0, 2:6, 2:6] = True
    annotations = Annotations(np.zeros((2, 0, 4)), np.zeros((2, 0), int), masks=mask)
    targets = np.zeros(2, int)
    peak = _peak(3, 3)[0] - 0.2
    quiet = {"disable_warnings": True}
    for constant in (0.0, 0.5):
        cams = np.stack([np.full((H, W), constant), peak])
        # a constant map is a miss (Quantus: every pixel is a maximum, a hit); an empty region
        # is NaN (Quantus: True, a NaN written into a bool array)
        assert _quantus(quantus.PointingGame(**quiet), cams, mask, targets).tolist() == [1, 1]
        assert np.array_equal(pointing_game(cams, annotations, targets), [0, NAN], equal_nan=True)
    zero = np.stack([np.zeros((H, W)), peak])
    # the all-zero map: mass accuracy 0 and entropy log(H·W) (Quantus: NaN from 0/0)
    assert np.isnan(_quantus(quantus.RelevanceMassAccuracy(**quiet), zero, mask, targets)[0])
    assert np.isnan(_quantus(quantus.Complexity(**quiet), zero, mask, targets)[0])
    theirs_gini = _quantus(quantus.Sparseness(**quiet), zero, mask, targets)
    assert relevance_mass_accuracy(zero, annotations, targets)[0] == 0
    np.testing.assert_allclose(entropy_complexity(zero)[0], math.log(H * W), atol=EXACT)
    # Gini: 0 for the all-zero map on both sides; for one pixel Quantus' +1e-7 per value lowers
    # the index by a relative 120·1e-7 (ours: the exact (n − 1)/n)
    ours_gini = gini_sparseness(zero)
    np.testing.assert_allclose(ours_gini[0], 0, atol=EXACT)
    np.testing.assert_allclose(theirs_gini[0], 0, atol=EXACT)
    np.testing.assert_allclose(ours_gini[1], 119 / 120, atol=EXACT)
    np.testing.assert_allclose(theirs_gini[1], 119 / 120 / (1 + 120e-7), atol=1e-9)
