"""Localisation and sparsity metrics of stored CAMs against annotations, numpy only.

Every metric scores a batch of CAMs with one signature::

    compute(cams, annotations, targets, param) -> (N,) or (N, T) float64 per sample

``cams`` are the maps (N, H, W) in [0, 1] at input resolution (finite, ≥ 0; the thresholded
metrics take thresholds relative to each map's maximum, so a map need not reach 1).
``annotations`` (:class:`Annotations`) holds boxes padded to (N, D, 4) float, x1 y1 x2 y2 in CAM
pixels, a (N,) count of real boxes, their labels (N, D) int and optional masks (N, H, W) bool;
``targets`` (N,) int is the class each CAM explains. A metric uses the boxes of the target class
only. Per-sample scores are kept so that batches can be concatenated; ``aggregate`` turns them
into the dataset's number (the mean of the scored samples; MaxBoxAcc's max over CAM thresholds).

Conventions, one place for all metrics:

- Pixel (r, c) covers [c, c + 1) × [r, r + 1); a box x1 y1 x2 y2 covers the pixels whose centre
  (c + ½, r + ½) lies in [x1, x2] × [y1, y2]. An integer box covers columns x1 … x2 − 1 (COCO's
  continuous edges; add 1 to VOC's inclusive x2, y2), as Score-CAM's ``map[y1:y2, x1:x2]``.
- The *region* of a sample is its mask when masks are given (the caller selects the target's
  pixels), else the union of the target class's boxes. Energy pointing game and MaxBoxAcc use
  the boxes always: their papers define them on boxes.
- A sample whose region has no pixel (no box of its target class, only boxes that cover no pixel
  centre, an empty mask) scores NaN, for MaxBoxAcc a sample with no box of its target class:
  it is not scored, never counted as 0; ``aggregate`` averages the other samples and
  ``np.isnan`` flags them. Gini and entropy need no annotations and are never NaN.
- Degenerate maps: a constant CAM (the all-zero map included) points nowhere, so the pointing
  game counts it a miss; mass ratios of the all-zero map are 0; ranks split ties evenly, so any
  constant map scores chance level |S| / (H·W) in rank accuracy and top-k; the thresholded
  foregrounds of the all-zero map are empty (IoU 0, MaxBoxAcc miss); Gini is 0 and entropy
  log(H·W): the all-zero map is taken as a constant map.

Work is vectorised over the batch: the ragged boxes are rasterised by one batched matrix product,
and the Python loops run over thresholds or the tolerance's row offsets, never over images or
pixels. MaxBoxAcc labels every map of a batch in one ``cv2.connectedComponentsWithStats`` call per
CAM threshold (maps stacked with a zero row between them, so no component spans two maps; an
int32 label image of the batch's size): about 1 ms per 224 × 224 map and threshold, 0.1 s per map
for its 100 thresholds; the other metrics take a few ms per map.

Parity with Quantus 0.6.0 (tests/test_localisation.py: 24 smooth 28 × 36 maps without ties, 0–3
boxes of 2 classes): pointing game (tolerance 0), relevance mass and rank accuracy and top-k
intersection agree exactly on the samples we score, Gini (Sparseness) within 1.1e-7 (Quantus'
ε), entropy (Complexity) within 1e-9. Deliberate differences are in each function's docstring
and asserted in the tests.

A metric name may carry its parameter after a colon: ``pointing-game:15``, ``top-k:500``,
``iou:0.2,0.5``, ``maxboxacc:0.7``, ``maxboxacc-v2:0.3,0.5,0.7``; ``metric_names`` gives the
canonical spelling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from camexport.errors import CamexportError
from camexport.metrics import is_number, metric_tokens

#: Zhang et al. 2016 count a point within 15 px of the object as a hit (here CAM pixels).
POINTING_TOLERANCE = 15.0
#: Quantus' TopKIntersection default k (pixels).
TOP_K = 1000
#: Thresholds of the binarised CAM, relative to its maximum (a pixel is in if cam > τ · max).
IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Choe et al. 2020's CAM thresholds: cam_curve_interval 0.01, i.e. 0, 0.01, ..., 0.99.
BOX_CAM_THRESHOLDS = tuple(np.arange(100) / 100)
#: MaxBoxAcc's IoU criterion (Choe et al. 2020, as the earlier top-1 localisation) and V2's three.
BOX_IOU = 0.5
BOX_IOUS_V2 = (0.3, 0.5, 0.7)

__all__ = ["METRICS", "Annotations", "LocalisationError", "LocalisationMetric", "aggregate",
           "energy_pointing_game", "entropy_complexity", "evaluate", "gini_sparseness", "iou",
           "max_box_iou", "metric_names", "pointing_game", "relevance_mass_accuracy",
           "relevance_rank_accuracy", "top_k_intersection"]


class LocalisationError(CamexportError, ValueError):
    """An unknown metric, a bad parameter, or CAMs and annotations that do not fit together."""


# ---------------------------------------------------------------------------------------------
# Annotations and the region of each sample


@dataclass(frozen=True, eq=False)
class Annotations:
    """Ground truth of N samples: ``boxes`` (N, D, 4) float x1 y1 x2 y2 in CAM pixels, padded;
    ``counts`` (N,) the real boxes of each sample (None: all D); ``labels`` (N, D) int class of
    each box; ``masks`` (N, H, W) bool, optional, the target's pixels of each sample."""

    boxes: np.ndarray
    labels: np.ndarray
    counts: np.ndarray | None = None
    masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, np.float64)
        if boxes.ndim != 3 or boxes.shape[2] != 4:
            raise LocalisationError(f"boxes must be (N, D, 4) x1 y1 x2 y2, got shape {boxes.shape}")
        n, d = boxes.shape[:2]
        labels = np.asarray(self.labels)
        if labels.shape != (n, d) or not np.issubdtype(labels.dtype, np.integer):
            raise LocalisationError(f"labels must be (N, D) = {(n, d)} integers, got {labels.shape} "
                                    f"{labels.dtype}")
        counts = np.full(n, d) if self.counts is None else np.asarray(self.counts)
        if counts.shape != (n,) or not np.issubdtype(counts.dtype, np.integer):
            raise LocalisationError(f"counts must be (N,) = ({n},) integers, got {counts.shape}")
        if ((counts < 0) | (counts > d)).any():
            raise LocalisationError(f"counts must lie in [0, D = {d}], got {counts.min()}…{counts.max()}")
        real = np.arange(d) < counts[:, None]
        x1, y1, x2, y2 = boxes[real].T
        if not np.isfinite(boxes[real]).all() or (x2 < x1).any() or (y2 < y1).any():
            raise LocalisationError("boxes must be finite x1 y1 x2 y2 with x2 ≥ x1 and y2 ≥ y1")
        masks = self.masks
        if masks is not None:
            masks = np.asarray(masks)
            if masks.dtype != bool or masks.ndim != 3 or len(masks) != n:
                raise LocalisationError(f"masks must be (N, H, W) bool with N = {n}, got "
                                        f"{masks.shape} {masks.dtype}")
        for name, value in (("boxes", boxes), ("labels", labels), ("counts", counts), ("masks", masks)):
            object.__setattr__(self, name, value)

    @classmethod
    def from_lists(cls, boxes: Sequence, labels: Sequence, masks: np.ndarray | None = None
                   ) -> Annotations:
        """Pads ragged per-sample boxes (k_i, 4) and labels (k_i,) to (N, D, 4) and (N, D), D the
        most boxes of a sample: the one loop over samples, which ragged input makes unavoidable."""
        if len(boxes) != len(labels):
            raise LocalisationError(f"{len(boxes)} box lists but {len(labels)} label lists")
        counts = np.array([len(b) for b in boxes], np.int64)
        depth = int(counts.max(initial=0))
        padded = np.zeros((len(boxes), depth, 4))
        padded_labels = np.full((len(boxes), depth), -1, np.int64)
        for i, (b, lab) in enumerate(zip(boxes, labels)):
            padded[i, :len(b)] = np.reshape(b, (-1, 4))
            padded_labels[i, :len(b)] = lab
        return cls(padded, padded_labels, counts, masks)

    def __len__(self) -> int:
        return len(self.boxes)

    def target_boxes(self, targets: np.ndarray) -> np.ndarray:
        """(N, D) bool: the slots that hold a real box of the sample's target class."""
        real = np.arange(self.boxes.shape[1]) < self.counts[:, None]
        return real & (self.labels == np.asarray(targets)[:, None])

    def box_region(self, targets: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(N, H, W) bool: the pixels whose centre lies in a box of the target class."""
        height, width = shape
        use = self.target_boxes(targets)[..., None]
        rows = np.arange(height) + 0.5
        cols = np.arange(width) + 0.5
        x1, y1, x2, y2 = (self.boxes[..., k, None] for k in range(4))
        in_rows = (use & (y1 <= rows) & (rows <= y2)).astype(np.float32)  # (N, D, H)
        in_cols = (use & (x1 <= cols) & (cols <= x2)).astype(np.float32)  # (N, D, W)
        return np.matmul(in_rows.transpose(0, 2, 1), in_cols) > 0  # any box covers the pixel

    def region(self, targets: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(N, H, W) bool: the masks if given, else the target class's box union."""
        if self.masks is None:
            return self.box_region(targets, shape)
        if self.masks.shape[1:] != tuple(shape):
            raise LocalisationError(f"masks are {self.masks.shape[1:]} but the CAMs {tuple(shape)}: "
                                    f"masks must be at CAM resolution")
        return self.masks


def _inputs(cams: np.ndarray, annotations: Annotations | None, targets
            ) -> tuple[np.ndarray, Annotations, np.ndarray]:
    cams = _cams(cams)
    if not isinstance(annotations, Annotations):
        raise LocalisationError("this metric needs annotations (camexport.localisation.Annotations)")
    targets = np.asarray(targets)
    if targets.shape != (len(cams),) or not np.issubdtype(targets.dtype, np.integer):
        raise LocalisationError(f"targets must be (N,) = ({len(cams)},) class indices, got "
                                f"{targets.shape} {targets.dtype}")
    if len(annotations) != len(cams):
        raise LocalisationError(f"{len(annotations)} annotated samples for {len(cams)} CAMs")
    return cams, annotations, targets


def _cams(cams: np.ndarray) -> np.ndarray:
    cams = np.asarray(cams, np.float64)
    if cams.ndim != 3 or cams.shape[1] * cams.shape[2] == 0:
        raise LocalisationError(f"cams must be (N, H, W), got shape {cams.shape}")
    if not np.isfinite(cams).all() or (cams < 0).any():
        raise LocalisationError("cams must be finite and ≥ 0 (maps in [0, 1])")
    return cams


def _scored(scores: np.ndarray, region: np.ndarray) -> np.ndarray:
    """NaN for samples whose region has no pixel."""
    empty = ~region.any(axis=(1, 2))
    scores = np.asarray(scores, np.float64)
    scores[empty] = np.nan
    return scores


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels whose centre lies within ``radius`` (Euclidean) of a pixel of ``mask`` (N, H, W):
    row offsets dy with a horizontal half-width isqrt(⌊r²⌋ − dy²), each a running-sum window."""
    limit = math.floor(radius * radius)
    reach = math.isqrt(limit)
    if reach == 0:
        return mask
    height, width = mask.shape[1:]
    # running[..., reach + 1 + c] = pixels of the row left of column c + 1 (flat past both ends)
    running = np.zeros((*mask.shape[:2], width + 2 * reach + 1), np.int32)
    np.cumsum(mask, axis=2, out=running[:, :, reach + 1:reach + 1 + width])
    running[:, :, reach + 1 + width:] = running[:, :, reach + width, None]
    out = np.zeros_like(mask)
    for dy in range(min(reach, height - 1) + 1):
        half = math.isqrt(limit - dy * dy)  # columns c − half … c + half
        right = running[:, :, reach + 1 + half:reach + 1 + half + width]
        near = right > running[:, :, reach - half:reach - half + width]
        out[:, :height - dy] |= near[:, dy:]
        out[:, dy:] |= near[:, :height - dy]
    return out


def _top_inside(cams: np.ndarray, region: np.ndarray, k: np.ndarray) -> np.ndarray:
    """|top-k pixels ∩ region| / k per sample, k (N,) ≥ 1, ties at the k-th value split evenly
    (the expectation over random tie orders): (#{a > v, in S} + (k − #{a > v})·#{a = v, in S} /
    #{a = v}) / k, v the k-th largest value."""
    flat = cams.reshape(len(cams), -1)
    inside = region.reshape(len(region), -1)
    kth = np.take_along_axis(np.sort(flat, axis=1), (flat.shape[1] - k)[:, None], axis=1)
    above, tied = flat > kth, flat == kth
    hits = (above & inside).sum(1) + (k - above.sum(1)) * (tied & inside).sum(1) / tied.sum(1)
    return hits / k


def _foreground(cams: np.ndarray, threshold: float) -> np.ndarray:
    """cam > τ · max(cam) per map: Choe et al.'s binarisation (on floats, not uint8(255·cam))."""
    return cams > threshold * cams.max(axis=(1, 2), keepdims=True)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes (..., 4) x1 y1 x2 y2 in continuous coordinates (no +1); 0 for empty unions."""
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = width * height
    union = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
             + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _components(foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-connected components of every map (N, H, W) in one OpenCV call: the maps stacked with a
    zero row between them. -> image index (M,), box (M, 4) x1 y1 x2 y2, pixel count (M,),
    in label (raster) order."""
    n, height, width = foreground.shape
    stacked = np.zeros((n, height + 1, width), np.uint8)
    stacked[:, :height] = foreground
    _, _, stats, _ = cv2.connectedComponentsWithStats(stacked.reshape(-1, width), connectivity=8)
    left, top, w, h, area = stats[1:].T.astype(np.int64)
    image, top = np.divmod(top, height + 1)
    return image, np.stack([left, top, left + w, top + h], axis=1).astype(np.float64), area


# ---------------------------------------------------------------------------------------------
# The metrics


def pointing_game(cams: np.ndarray, annotations: Annotations, targets: np.ndarray,
                  tolerance: float = POINTING_TOLERANCE) -> np.ndarray:
    """Pointing game (Zhang et al. 2016, "Top-down neural attention by excitation backprop"):
    hit_n = 1 if some p ∈ argmax cam_n has dist(p, S_n) ≤ tolerance, else 0, S_n the region,
    distances between pixel centres in CAM pixels (the paper's 15 px are in image pixels).

    Ties: a hit if *any* maximum is near the region (Quantus' rule). A constant map (all-zero
    included) is a miss, where Quantus counts it a hit whenever the region is non-empty: it
    points nowhere. Quantus has no tolerance (ours with tolerance 0), and returns True, not NaN,
    for an empty region (a NaN written into a bool array). (N,) 1.0 / 0.0 / NaN.
    """
    cams, annotations, targets = _inputs(cams, annotations, targets)
    if not tolerance >= 0:
        raise LocalisationError(f"pointing-game tolerance must be ≥ 0 pixels, got {tolerance}")
    region = annotations.region(targets, cams.shape[1:])
    top = cams.max(axis=(1, 2), keepdims=True)
    peaks = cams == top
    hit = (peaks & _dilate(region, tolerance)).any(axis=(1, 2)) & (top[:, 0, 0] > cams.min(axis=(1, 2)))
    return _scored(hit, region)


def energy_pointing_game(cams: np.ndarray, annotations: Annotations, targets: np.ndarray
                         ) -> np.ndarray:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM): Σ_{p ∈ B} cam(p) / Σ_p cam(p),
    B the union of the target class's boxes (a pixel counted once), always the boxes, even when
    masks are given. With no masks this equals relevance_mass_accuracy.

    The reference code (haofanwang/Score-CAM, utils/energyPointGame.py) fills ``empty[x1:x2,
    y1:y2]``, rows indexed by x: it scores the box mirrored about the diagonal for non-square
    boxes. Here rows are y and columns x. It also takes one box; here all boxes of the class.
    The all-zero map scores 0. (N,) in [0, 1] or NaN.
    """
    cams, annotations, targets = _inputs(cams, annotations, targets)
    boxes = annotations.box_region(targets, cams.shape[1:])
    return _scored(_mass_inside(cams, boxes), boxes)


def relevance_mass_accuracy(cams: np.ndarray, annotations: Annotations, targets: np.ndarray
                            ) -> np.ndarray:
    """Relevance mass accuracy (Arras et al. 2022, "CLEVR-XAI"): R_within / R_total =
    Σ_{p ∈ S} cam(p) / Σ_p cam(p), S the region (mask, else box union). Quantus'
    RelevanceMassAccuracy; the all-zero map scores 0 (Quantus: NaN from 0/0). (N,) or NaN."""
    cams, annotations, targets = _inputs(cams, annotations, targets)
    region = annotations.region(targets, cams.shape[1:])
    return _scored(_mass_inside(cams, region), region)


def _mass_inside(cams: np.ndarray, region: np.ndarray) -> np.ndarray:
    total = cams.sum(axis=(1, 2))
    inside = (cams * region).sum(axis=(1, 2))
    return np.divide(inside, total, out=np.zeros_like(total), where=total > 0)


def relevance_rank_accuracy(cams: np.ndarray, annotations: Annotations, targets: np.ndarray
                            ) -> np.ndarray:
    """Relevance rank accuracy (Arras et al. 2022, "CLEVR-XAI"): |P_top-K ∩ S| / K with
    K = |S|, P_top-K the K pixels of highest CAM, S the region.

    Ties at the K-th value are split evenly (the expected score over random tie orders), so the
    score does not depend on pixel order and a constant map scores |S| / (H·W). Quantus sorts
    with numpy's default (unstable) argsort, so its result on ties depends on the sort; without
    ties the two agree. (N,) in [0, 1] or NaN.
    """
    cams, annotations, targets = _inputs(cams, annotations, targets)
    region = annotations.region(targets, cams.shape[1:])
    size = region.sum(axis=(1, 2))
    return _scored(_top_inside(cams, region, np.maximum(size, 1)), region)


def top_k_intersection(cams: np.ndarray, annotations: Annotations, targets: np.ndarray,
                       k: int = TOP_K) -> np.ndarray:
    """Top-k intersection (Theiner et al. 2021, "Interpretable semantic photo geolocation", as in
    Quantus' TopKIntersection): |P_top-k ∩ S| / k, the k pixels of highest CAM against the
    region S. Ties at the k-th value split evenly, as in relevance_rank_accuracy (Quantus: sort
    order). Quantus' ``concept_influence`` variant (× H·W / |S|) is not offered. (N,) or NaN."""
    cams, annotations, targets = _inputs(cams, annotations, targets)
    size = cams.shape[1] * cams.shape[2]
    if not 1 <= k <= size:
        raise LocalisationError(f"top-k takes 1 ≤ k ≤ H·W = {size} pixels, got {k}")
    region = annotations.region(targets, cams.shape[1:])
    return _scored(_top_inside(cams, region, np.full(len(cams), k)), region)


def iou(cams: np.ndarray, annotations: Annotations, targets: np.ndarray,
        thresholds: Sequence[float] = IOU_THRESHOLDS) -> np.ndarray:
    """IoU of the thresholded CAM with the region: |F_τ ∩ S| / |F_τ ∪ S|, F_τ = {cam > τ·max cam}
    (Choe et al.'s binarisation; τ·1 for maps that reach 1), S the region (mask, else box union).
    The all-zero map has empty F_τ: IoU 0. (N, T), NaN rows for unscored samples."""
    cams, annotations, targets = _inputs(cams, annotations, targets)
    region = annotations.region(targets, cams.shape[1:])
    scores = np.empty((len(cams), len(thresholds)))
    for t, threshold in enumerate(thresholds):
        foreground = _foreground(cams, threshold)
        inter = (foreground & region).sum(axis=(1, 2))
        union = (foreground | region).sum(axis=(1, 2))
        scores[:, t] = np.divide(inter, union, out=np.zeros(len(cams)), where=union > 0)
    return _scored(scores, region)


def max_box_iou(cams: np.ndarray, annotations: Annotations, targets: np.ndarray,
                all_components: bool = False,
                thresholds: Sequence[float] = BOX_CAM_THRESHOLDS) -> np.ndarray:
    """Per-sample table behind MaxBoxAcc (Choe et al. 2020, "Evaluating weakly supervised object
    localization methods right"): IoU_n(τ) = max over the target class's boxes g of
    IoU(box(C), g), C the largest 8-connected component of {cam > τ·max cam} (V2,
    ``all_components``: the best over every component). (N, T), NaN rows for samples with no
    box of their target class; ``aggregate`` gives MaxBoxAcc(δ) = max_τ mean_n [IoU_n(τ) ≥ δ]
    and MaxBoxAccV2 = its mean over δ ∈ {0.3, 0.5, 0.7}.

    Differences from wsolevaluation (clovaai): components by connectedComponentsWithStats,
    the largest by pixel count (ties: first in raster order), where the reference takes
    cv2.findContours' contour of largest polygon area; boxes are exact pixel extents in
    continuous coordinates, IoU without the reference's +1 and its clip of x2 to W − 1; the
    binarisation is on floats, not uint8(255·cam); a map with no foreground has no box (IoU 0,
    the reference scores a box [0, 0, 0, 0]).
    """
    cams, annotations, targets = _inputs(cams, annotations, targets)
    use = annotations.target_boxes(targets)
    scores = np.zeros((len(cams), len(thresholds)))
    for t, threshold in enumerate(thresholds):
        image, boxes, area = _components(_foreground(cams, threshold))
        if not all_components and len(image):
            order = np.lexsort((-area, image))  # by image, largest first, stable: raster order
            first = order[np.r_[True, image[order][1:] != image[order][:-1]]]
            image, boxes = image[first], boxes[first]
        best = np.where(use[image], _box_iou(boxes[:, None], annotations.boxes[image]), 0).max(
            axis=1, initial=0)
        np.maximum.at(scores[:, t], image, best)
    scores[~use.any(axis=1)] = np.nan
    return scores


def gini_sparseness(cams: np.ndarray) -> np.ndarray:
    """Gini index (Chalasani et al. 2020, "Concise explanations of neural networks using
    adversarial training"; Quantus' Sparseness): with a = cam sorted ascending, n = H·W,
    G = Σ_i (2i − n − 1) a_(i) / (n Σ_i a_(i)); 0 for a constant map, (n − 1)/n for one pixel.
    The all-zero map scores 0, as a constant map. Quantus adds 1e-7 to every value of the
    max-normalised map first, which lowers G by a relative n·1e-7 / Σ(a / max a): 1e-5 for one
    pixel of 120, below 1e-6 for maps whose mean exceeds 0.1 of their maximum; the exact index
    here. (N,) in [0, 1)."""
    flat = np.sort(_cams(cams).reshape(len(cams), -1), axis=1)
    n = flat.shape[1]
    total = n * flat.sum(axis=1)
    spread = flat @ (2 * np.arange(1, n + 1) - n - 1)
    return np.divide(spread, total, out=np.zeros_like(total), where=total > 0)


def entropy_complexity(cams: np.ndarray) -> np.ndarray:
    """Entropy complexity (Bhatt et al. 2020, "Evaluating and aggregating feature-based model
    explanations"; Quantus' Complexity): −Σ_p P(p) ln P(p), P = cam / Σ cam, 0·ln 0 = 0. The
    all-zero map is taken as uniform, log(H·W) (Quantus: NaN from 0/0); Quantus adds 1e-12
    inside the log, a difference below 1e-7 at H·W ≤ 10⁵. (N,) in [0, log(H·W)]."""
    flat = _cams(cams).reshape(len(cams), -1)
    total = flat.sum(axis=1, keepdims=True)
    p = np.divide(flat, total, out=np.full_like(flat, 1 / flat.shape[1]), where=total > 0)
    return -(p * np.log(p, out=np.zeros_like(p), where=p > 0)).sum(axis=1)


# ---------------------------------------------------------------------------------------------
# The one table


def _mean(scores: np.ndarray, _=None) -> np.ndarray:
    """Mean over the scored (non-NaN) samples, per column; NaN where none is scored."""
    scored = ~np.isnan(scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scored, scores, 0).sum(axis=0) / scored.sum(axis=0)


def _box_accuracy(ious: np.ndarray, deltas: float | Sequence[float]) -> float:
    """MaxBoxAcc(δ) = max_τ (share of scored samples with IoU(τ) ≥ δ), averaged over deltas."""
    scored = ious[~np.isnan(ious).any(axis=1)]
    if not len(scored):
        return float("nan")
    deltas = np.atleast_1d(deltas)
    return float(np.mean([(scored >= delta).mean(axis=0).max() for delta in deltas]))


@dataclass(frozen=True)
class LocalisationMetric:
    """A metric as users name it. ``compute(cams, annotations, targets, param)`` gives per-sample
    scores, ``reduce(scores, param)`` the dataset's value. ``param``: '' (none), 'pixels' (a
    number ≥ 0), 'count' (an integer ≥ 1), 'thresholds' (numbers in [0, 1)), 'iou' (a number in
    (0, 1]) or 'ious' (a list of those)."""

    name: str
    summary: str
    compute: Callable[[np.ndarray, Annotations | None, np.ndarray | None, object], np.ndarray]
    higher_is_better: bool
    param: str = ""
    default: object = None
    aliases: tuple[str, ...] = ()
    reduce: Callable[[np.ndarray, object], object] = _mean
    needs_annotations: bool = True


METRICS: dict[str, LocalisationMetric] = {m.name: m for m in [
    LocalisationMetric("pointing-game", "1 if the CAM's maximum is within p px of the region",
                       lambda c, a, t, p: pointing_game(c, a, t, p), True, "pixels",
                       POINTING_TOLERANCE, ("PointingGame",)),
    LocalisationMetric("energy-pointing-game", "share of the CAM's sum inside the target's boxes",
                       lambda c, a, t, p: energy_pointing_game(c, a, t), True,
                       aliases=("EnergyPointingGame", "energy-pg")),
    LocalisationMetric("relevance-mass-accuracy", "share of the CAM's sum inside the region",
                       lambda c, a, t, p: relevance_mass_accuracy(c, a, t), True,
                       aliases=("RelevanceMassAccuracy", "rma")),
    LocalisationMetric("relevance-rank-accuracy", "share of the |S| top pixels inside the region S",
                       lambda c, a, t, p: relevance_rank_accuracy(c, a, t), True,
                       aliases=("RelevanceRankAccuracy", "rra")),
    LocalisationMetric("top-k-intersection", "share of the k top pixels inside the region",
                       lambda c, a, t, p: top_k_intersection(c, a, t, p), True, "count", TOP_K,
                       ("TopKIntersection", "top-k")),
    LocalisationMetric("iou", "IoU of {cam > τ·max} with the region, per threshold",
                       lambda c, a, t, p: iou(c, a, t, p), True, "thresholds", IOU_THRESHOLDS),
    LocalisationMetric("maxboxacc", "best over CAM thresholds of the share of largest-component "
                       "boxes with IoU ≥ δ", lambda c, a, t, p: max_box_iou(c, a, t), True, "iou",
                       BOX_IOU, ("MaxBoxAcc",), _box_accuracy),
    LocalisationMetric("maxboxacc-v2", "maxboxacc over all components, averaged over δ",
                       lambda c, a, t, p: max_box_iou(c, a, t, all_components=True), True, "ious",
                       BOX_IOUS_V2, ("MaxBoxAccV2",), _box_accuracy),
    LocalisationMetric("gini", "Gini index of the CAM (sparseness)",
                       lambda c, a, t, p: gini_sparseness(c), True,
                       aliases=("Sparseness", "gini-sparseness"), needs_annotations=False),
    LocalisationMetric("entropy", "entropy of the CAM as a distribution (complexity)",
                       lambda c, a, t, p: entropy_complexity(c), False,
                       aliases=("Complexity", "entropy-complexity"), needs_annotations=False),
]}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "-_ ")


_LOOKUP = {_key(alias): m.name for m in METRICS.values() for alias in (m.name, *m.aliases)}

_RANGES = {  # param kind -> (test, what it takes)
    "pixels": (lambda v: v >= 0, "a distance ≥ 0 in pixels"),
    "count": (lambda v: v >= 1 and float(v).is_integer(), "an integer ≥ 1"),
    "thresholds": (lambda v: 0 <= v < 1, "thresholds in [0, 1)"),
    "iou": (lambda v: 0 < v <= 1, "an IoU in (0, 1]"),
    "ious": (lambda v: 0 < v <= 1, "IoUs in (0, 1]"),
}


def _parse(token: str) -> tuple[LocalisationMetric, object]:
    """'name' or 'name:value[,value...]' -> (metric, parameter; the default if not given)."""
    name, _, text = token.partition(":")
    if _key(name) not in _LOOKUP:
        raise LocalisationError(f"unknown metric {name.strip()!r}; choose from {', '.join(METRICS)}")
    metric = METRICS[_LOOKUP[_key(name)]]
    if not text.strip():
        return metric, metric.default
    if not metric.param:
        raise LocalisationError(f"{metric.name} takes no parameter (got {token.strip()!r})")
    test, takes = _RANGES[metric.param]
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = [float("nan")]
    if not values or not all(test(v) for v in values):
        raise LocalisationError(f"{metric.name} takes {takes}, not {text.strip()!r}")
    values = [int(v) if v.is_integer() and metric.param in ("pixels", "count") else v for v in values]
    if metric.param in ("thresholds", "ious"):
        return metric, tuple(values)
    if len(values) != 1:
        raise LocalisationError(f"{metric.name} takes one value, got {text.strip()!r}")
    return metric, values[0]


def metric_names(spec: str | Sequence[str]) -> list[str]:
    """Canonical names from 'pointing-game:15,iou:0.2,0.5' or a list; the parameter is dropped
    when it is the default; aliases (Quantus' class names), any case, '-' / '_' optional."""
    result = []
    for token in metric_tokens(spec, is_number):
        metric, value = _parse(token)
        if value == metric.default:
            name = metric.name
        else:
            values = value if isinstance(value, tuple) else (value,)
            name = f"{metric.name}:" + ",".join(f"{v:g}" for v in values)
        if name not in result:
            result.append(name)
    return result


def evaluate(name: str, cams: np.ndarray, annotations: Annotations | None = None,
             targets: np.ndarray | None = None) -> np.ndarray:
    """Per-sample scores of metric ``name`` (with an optional ':param'): (N,) or (N, T) float64,
    NaN for samples with no annotation of their target class. Concatenate batches along axis 0
    and pass the result to :func:`aggregate`."""
    metric, param = _parse(name)
    if metric.needs_annotations and (annotations is None or targets is None):
        raise LocalisationError(f"{metric.name} needs annotations and one target class per CAM")
    return metric.compute(cams, annotations, targets, param)


def aggregate(name: str, scores: np.ndarray):
    """The dataset's value of metric ``name`` from its per-sample scores (all batches): the mean
    over scored samples (per threshold for iou), MaxBoxAcc's max over CAM thresholds."""
    metric, param = _parse(name)
    return metric.reduce(np.asarray(scores, np.float64), param)
