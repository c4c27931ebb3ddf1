"""Object detection: torchvision's one-stage detectors (RetinaNet, FCOS) as differentiable graphs.

A detector's post-processing (score threshold, top-k, non-maximum suppression) selects boxes by
index: it has no gradient, and pgc's backward pass flows only through the selected boxes' scores
and coordinates. So the graph is split at the head outputs. :class:`DetectorGraph` is what is
exported: normalisation, backbone, FPN and head, then, for every anchor, the decoded box clipped
to the image and the class scores, one output ``detections`` (B, A, 4 + K) laid out
[x1, y1, x2, y2, score_0 … score_{K-1}]; its second output is the FPN levels stacked as pgc's
``fasterrcnn_reshape_transform`` does (the layer ``backbone``). :func:`postprocess` replays
torchvision's ``postprocess_detections`` on those rows in numpy. The target
:class:`FasterRCNNBoxScoreTarget` is a function of the rows, so its gradient (IoU + score of
the matched detection, through the chain rule) enters the graph as ``target_weights``.

Two-stage detectors (torchvision Faster R-CNN) are split where their proposals are chosen
(camexport.two_stage): their rows are per proposal and class (P, C, 5), and the same target and
post-processing hooks read them through the spec (``flat_rows``, ``score_column``). Mask R-CNN
and Keypoint R-CNN are refused.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np

from camexport.errors import CamexportError
from camexport.targets import TargetError

#: The spec kind of a two-stage detector (camexport.two_stage).
TWO_STAGE = "fasterrcnn"
#: The layer name of the stacked FPN levels (pgc's tutorial: target_layers=[model.backbone]).
STACK_LAYER = "backbone"
#: The graph outputs of a detector artifact.
DETECTIONS, STACK = "detections", "fpn_stack"
#: an Ultralytics segment model's mask prototypes (B, M, H / 4, W / 4), a detector graph output
PROTOS = "yolo_protos"
BOX = 4


class DetectionError(CamexportError, ValueError):
    """A detector camexport cannot export, or a detection request that does not fit."""


@dataclass(frozen=True)
class DetectorSpec:
    """What post-processing needs, recorded in the manifest under ``detection``."""

    kind: str
    classes: int
    level_sizes: tuple[int, ...]
    image_size: tuple[int, int]
    score_thresh: float
    nms_thresh: float
    detections_per_img: int
    topk_candidates: int
    levels: tuple[str, ...] = field(default=())
    #: Ultralytics YOLO (kind "yolo", camexport.yolo) only: NMS is class-aware by offsetting
    #: boxes by label x class_offset (its max_wh), or class-agnostic
    class_offset: float = 0.0
    agnostic: bool = False
    #: a two-stage detector (kind "fasterrcnn", camexport.two_stage): its RPN, box (and mask)
    #: settings ({"rpn": ..., "box": ...}); level_sizes is then (proposals per image,). An
    #: Ultralytics segment or pose model: camexport.yolo.task_settings
    settings: dict | None = None
    #: columns of a row after the class scores: an Ultralytics segment model's mask
    #: coefficients, a pose model's keypoints (x, y[, visibility]) x K
    extra: int = 0

    @property
    def two_stage(self) -> bool:
        return self.kind == TWO_STAGE

    @property
    def row_shape(self) -> tuple[int, ...]:
        """One image's rows: (anchors, 4 + K), or (proposals, C, 5) for a two-stage detector."""
        count = sum(self.level_sizes)
        return (count, self.classes, BOX + 1) if self.two_stage else (count, BOX + self.classes + self.extra)

    def flat_rows(self, rows: np.ndarray) -> np.ndarray:
        """One image's rows as (n, columns), n indexed by Detections.anchors."""
        return rows.reshape(-1, rows.shape[-1]) if self.two_stage else rows

    def score_column(self, label: int) -> int:
        """The column of a flat row that holds the score of class ``label``."""
        return BOX if self.two_stage else BOX + label

    def as_dict(self) -> dict:
        record = {**asdict(self), "layout": "x1 y1 x2 y2 score_0 ... score_K-1 per anchor" + (
            f", then {self.extra} {(self.settings or {}).get('task')} values" if self.extra else "")}
        if self.two_stage:
            record["layout"] = "x1 y1 x2 y2 probability per proposal and class (P, C, 5)"
        if self.kind == "yolo":
            record["postprocess"] = ("ultralytics non_max_suppression: best class per anchor, score > "
                                     "score_thresh, best topk_candidates (max_nms), NMS on boxes + "
                                     "label x class_offset (max_wh), IoU > nms_thresh dropped, best "
                                     "detections_per_img (max_det)")
        return record

    @classmethod
    def from_dict(cls, record: dict) -> DetectorSpec:
        names = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in record.items() if k in names}
        for key in ("level_sizes", "image_size", "levels"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)


# -- the exported module --------------------------------------------------------------------

def detector_kind(module) -> str | None:
    """'retinanet' or 'fcos' for a torchvision one-stage detector, 'fasterrcnn' for a Faster
    R-CNN and a Mask R-CNN (its boxes: camexport.two_stage.wrap leaves the mask head out);
    raises for Keypoint R-CNN and SSD; None for anything else."""
    import torch

    if not isinstance(module, torch.nn.Module):
        return None
    from torchvision.models import detection
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.ssd import SSD

    if isinstance(module, detection.RetinaNet):
        return "retinanet"
    if isinstance(module, detection.FCOS):
        return "fcos"
    if isinstance(module, detection.KeypointRCNN):
        raise DetectionError(
            f"{type(module).__name__} is not supported yet (its keypoint head): build the Faster "
            f"R-CNN it extends (torchvision fasterrcnn_resnet50_fpn[_v2], "
            f"fasterrcnn_mobilenet_v3_large_fpn) or a one-stage detector (retinanet_resnet50_fpn)")
    if isinstance(module, detection.FasterRCNN):
        return TWO_STAGE
    if isinstance(module, GeneralizedRCNN):
        raise DetectionError(f"{type(module).__name__} is a two-stage detector camexport does not "
                             f"know; torchvision's Faster R-CNN and one-stage detectors are supported")
    if isinstance(module, SSD):
        raise DetectionError("SSD detectors are not supported yet; use retinanet_resnet50_fpn or "
                             "fcos_resnet50_fpn")
    return None


def stack_levels(features) -> object:
    """pgc's fasterrcnn_reshape_transform generalised to any level names: |level| resized
    bilinearly (align_corners False, no antialias) to the last (coarsest) level's size, then
    concatenated on channels."""
    import torch

    size = features[-1].shape[-2:]
    return torch.cat([torch.nn.functional.interpolate(torch.abs(f), size, mode="bilinear")
                      for f in features], dim=1)


def _detector_graph_class():
    import torch

    class DetectorGraph(torch.nn.Module):
        """Image in [0, 1] (B, 3, H, W) → (detections (B, A, 4 + K), stacked FPN levels)."""

        def __init__(self, model, size: tuple[int, int]):
            super().__init__()
            self.kind = detector_kind(model)
            self.backbone, self.head, self.box_coder = model.backbone, model.head, model.box_coder
            transform = model.transform
            self.register_buffer("mean", torch.tensor(transform.image_mean).reshape(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(transform.image_std).reshape(1, 3, 1, 1))
            self.size = tuple(int(s) for s in size)
            with torch.no_grad():
                example = torch.zeros(1, 3, *self.size)
                features = self.backbone((example - self.mean) / self.std)
                self.level_names = tuple(features)
                features = list(features.values())
                from torchvision.models.detection.image_list import ImageList

                anchors = model.anchor_generator(ImageList(example, [self.size]), features)[0]
                outputs = self.head(features)
            self.register_buffer("anchors", anchors)
            self.classes = int(outputs["cls_logits"].shape[-1])
            per_anchor = anchors.shape[0] // sum(f.shape[-2] * f.shape[-1] for f in features)
            self.spec = DetectorSpec(
                kind=self.kind, classes=self.classes,
                level_sizes=tuple(int(f.shape[-2] * f.shape[-1] * per_anchor) for f in features),
                image_size=self.size, score_thresh=float(model.score_thresh),
                nms_thresh=float(model.nms_thresh), detections_per_img=int(model.detections_per_img),
                topk_candidates=int(model.topk_candidates), levels=self.level_names)

        def forward(self, x):
            features = list(self.backbone((x - self.mean) / self.std).values())
            out = self.head(features)
            batch = x.shape[0]
            if self.kind == "retinanet":
                scores = torch.sigmoid(out["cls_logits"])
                codes = out["bbox_regression"].reshape(-1, BOX)
                anchors = self.anchors.repeat(batch, 1)
                boxes = self.box_coder.decode_single(codes, anchors).reshape(batch, -1, BOX)
            else:
                scores = torch.sqrt(torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"]))
                boxes = self.box_coder.decode(out["bbox_regression"], self.anchors[None])
            height, width = self.size
            x1, y1, x2, y2 = boxes.unbind(-1)
            boxes = torch.stack([x1.clamp(0, width), y1.clamp(0, height),
                                 x2.clamp(0, width), y2.clamp(0, height)], dim=-1)
            return torch.cat([boxes, scores], dim=-1), stack_levels(features)

    return DetectorGraph


def detector_graph(model, size: tuple[int, int]):
    """The exportable :class:`DetectorGraph` of a torchvision RetinaNet/FCOS at input ``size``.
    The graph runs at ``size`` itself: the model's own resize (GeneralizedRCNNTransform's
    min_size/max_size) is not applied; the run pipeline resizes images to ``size``."""
    if len(size) != 2:
        raise DetectionError(f"a detector takes 2-D images; --input-size {size} has {len(size)} values")
    return _detector_graph_class()(model.eval(), size).eval()


# -- post-processing (torchvision's postprocess_detections, in numpy) -----------------------

@dataclass
class Detections:
    """One image's detections, best score first: boxes (n, 4) x1 y1 x2 y2, scores (n,),
    labels (n,), and the anchor (row of the graph output) each came from; for a Mask R-CNN,
    ``box_masks`` (n, M, M): each detection's mask probabilities in its box's frame (torchvision's
    before ``paste_masks_in_image``; :func:`paste_masks` puts them in the image); for an
    Ultralytics segment model, ``masks`` (n, h, w) uint8 0/1 at its prototypes' resolution in
    the image frame (camexport.yolo.instance_masks); for a pose model, ``keypoints`` (n, K, D):
    x, y in input pixels (and the visibility, sigmoid), as Ultralytics decodes them."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    anchors: np.ndarray
    box_masks: np.ndarray | None = None
    masks: np.ndarray | None = None
    keypoints: np.ndarray | None = None

    def select(self, keep: np.ndarray) -> Detections:
        """The detections ``keep`` (a bool or index array) picks, with their masks and keypoints."""
        def pick(values):
            return None if values is None else values[keep]

        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep], self.anchors[keep],
                          pick(self.box_masks), pick(self.masks), pick(self.keypoints))

    def image_masks(self, size: tuple[int, int]) -> np.ndarray | None:
        """(n, H, W) float32 masks in an image of ``size``: a Mask R-CNN's pasted
        (:func:`paste_masks`), a segment model's resized bilinearly; None without masks."""
        import cv2

        if self.box_masks is not None:
            return paste_masks(self.box_masks, self.boxes, size)
        if self.masks is None:
            return None
        shape = (int(size[1]), int(size[0]))
        resized = [cv2.resize(m.astype(np.float32), shape, interpolation=cv2.INTER_LINEAR)
                   for m in self.masks]
        return np.stack(resized) if resized else np.zeros((0, *size), np.float32)

    def __len__(self) -> int:
        return len(self.scores)


def paste_masks(masks: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, H, W) float32: each (M, M) mask of ``masks`` in the box frame of ``boxes[i]`` pasted
    into an image of ``size`` (H, W), zero outside its box, as torchvision's
    ``paste_masks_in_image`` (padding 1): the mask padded with zeros to M + 2, its box scaled
    by (M + 2) / M about the centre and truncated to integers, the mask resized bilinearly
    (half-pixel centres, no antialiasing) to the box's w + 1 by h + 1 pixels and clipped to the
    image."""
    import cv2

    masks = np.asarray(masks, np.float32)
    height, width = (int(s) for s in size)
    pasted = np.zeros((len(masks), height, width), np.float32)
    if not len(masks):
        return pasted
    side = masks.shape[-1]
    scale = np.float32((side + 2) / side)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    half = (boxes[:, 2:] - boxes[:, :2]) * np.float32(0.5) * scale
    centre = (boxes[:, 2:] + boxes[:, :2]) * np.float32(0.5)
    expanded = np.concatenate([centre - half, centre + half], axis=1).astype(np.int64)  # truncates
    for k, (mask, (x0, y0, x1, y1)) in enumerate(zip(masks, expanded)):
        w, h = max(int(x1 - x0 + 1), 1), max(int(y1 - y0 + 1), 1)
        resized = cv2.resize(np.pad(mask, 1), (w, h), interpolation=cv2.INTER_LINEAR)
        left, right, top, bottom = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
        if right > left and bottom > top:
            pasted[k, top:bottom, left:right] = resized[top - y0:bottom - y0, left - x0:right - x0]
    return pasted


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU (len(a), len(b)) as torchvision.ops.box_iou computes it."""
    a, b = np.asarray(a, np.float32).reshape(-1, 4), np.asarray(b, np.float32).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area_a[:, None] + area_b[None, :] - inter)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, limit: int | None = None,
        block: int = 64) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first: a box is dropped when
    its IoU with a kept, better box exceeds ``threshold`` (torchvision.ops.nms; IoU in float32
    as :func:`box_iou`). ``limit``: stop once that many are kept (the first ``limit`` of the
    whole result).

    Blocked: the best ``block`` boxes still alive are decided among themselves from their IoU
    matrix (a Python step per box, no array call), then the boxes after them are compared with
    the block's kept boxes in one matrix; the same boxes as comparing one kept box at a time
    with every later one (300 kept of 3,000: 5 ms -> 1 ms)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    sides = np.asarray(boxes, np.float32).reshape(-1, 4)[order].T.copy()
    area = (sides[2] - sides[0]) * (sides[3] - sides[1])
    keep, alive = [], np.arange(len(order))
    while len(alive) and (limit is None or len(keep) < limit):
        first, alive = alive[:block], alive[block:]
        overlapping = ~(_iou_sorted(sides, area, first, first) <= threshold)  # NaN IoU drops
        dropped, chosen = np.zeros(len(first), bool), []
        for position in range(len(first)):
            if dropped[position]:
                continue
            chosen.append(position)
            if limit is not None and len(keep) + len(chosen) >= limit:
                break
            dropped |= overlapping[position]
        kept = first[chosen]
        keep.extend(order[kept])
        if len(alive) and len(kept):
            alive = alive[np.all(_iou_sorted(sides, area, kept, alive) <= threshold, axis=0)]
    return np.asarray(keep, np.int64)


def _iou_sorted(sides: np.ndarray, area: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """IoU (len(rows), len(columns)) of boxes given by their sides (4, n) and areas, with the
    float32 operations of :func:`box_iou` in the same order."""
    x0, y0, x1, y1 = sides
    width = np.minimum(x1[rows, None], x1[columns]) - np.maximum(x0[rows, None], x0[columns])
    height = np.minimum(y1[rows, None], y1[columns]) - np.maximum(y0[rows, None], y0[columns])
    inter = np.maximum(width, 0) * np.maximum(height, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area[rows, None] + area[columns] - inter)


def batched_nms(boxes, scores, labels, threshold: float) -> np.ndarray:
    """NMS within each label, the kept indices sorted by decreasing score."""
    keep = [np.flatnonzero(labels == label)[nms(boxes[labels == label], scores[labels == label], threshold)]
            for label in np.unique(labels)]
    keep = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    return keep[np.argsort(-scores[keep], kind="stable")]


def postprocess(rows: np.ndarray, spec: DetectorSpec) -> Detections:
    """One image's detections from its graph output (A, 4 + K), as torchvision's
    postprocess_detections: per level, scores above ``score_thresh``, the best
    ``topk_candidates``; then class-wise NMS and the best ``detections_per_img``. Ultralytics
    YOLO rows (kind "yolo") are post-processed as Ultralytics does (camexport.yolo.postprocess)."""
    rows = np.asarray(rows)
    if rows.shape != spec.row_shape:
        raise DetectionError(f"detector output rows {rows.shape} do not match the manifest's "
                             f"{spec.row_shape}")
    last = _LAST_POSTPROCESS
    if last and last[0] is spec and same_batch(last[1], rows):
        return copy.copy(last[2])
    found = _postprocess(rows, spec)
    _LAST_POSTPROCESS[:] = [spec, rows.copy(), copy.copy(found)]
    return found


#: [spec, rows, detections] of the last post-processing: the same rows come back within one
#: explanation (camexport run's detections, then the target matching them, FasterRCNNBoxScoreTarget)
_LAST_POSTPROCESS: list = []


def _postprocess(rows: np.ndarray, spec: DetectorSpec) -> Detections:
    if spec.two_stage:
        from camexport import two_stage

        return two_stage.detections(rows, spec.settings["box"])
    if spec.kind == "yolo":
        from camexport import yolo

        return yolo.postprocess(rows, spec)
    picked = []
    start = 0
    for size in spec.level_sizes:
        scores = rows[start:start + size, BOX:].reshape(-1)
        index = np.flatnonzero(scores > spec.score_thresh)
        index = index[np.argsort(-scores[index], kind="stable")[:spec.topk_candidates]]
        picked.append(start * spec.classes + index)
        start += size
    flat = np.concatenate(picked)
    anchors, labels = flat // spec.classes, flat % spec.classes
    boxes = rows[anchors, :BOX]
    scores = rows[anchors, BOX + labels]
    keep = batched_nms(boxes, scores, labels, spec.nms_thresh)[:spec.detections_per_img]
    return Detections(boxes[keep], scores[keep], labels[keep], anchors[keep])


# -- the target ---------------------------------------------------------------------------

#: box coordinates (px) this close count as equal in the IoU's gradient: the same detection
#: computed twice in float32 (the torch model's boxes as references for the graph's, as in pgc's
#: tutorial through camexport.compat) differs by round-off, measured up to 9e-3 px on a random
#: ResNet-50 Faster R-CNN
BOX_TIE = 1e-2


def _iou_gradient(ref: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The gradient in ``box`` of its IoU with the constant ``ref`` (float64). Where a
    coordinate of ``box`` equals ``ref``'s (within BOX_TIE px), max/min pass half the gradient to
    each side, as torch's maximum/minimum do on exact ties (so a detection explained against its
    own box, as in pgc's tutorial, gets no gradient through its IoU, which is 1 and maximal
    there). Without the tolerance, a reference 1e-4 px off the box would get the full one-sided
    gradient, about 1 / width per px: the map would hang on float round-off."""
    ref, box = np.asarray(ref, np.float64), np.asarray(box, np.float64)
    if (np.abs(box - ref) <= BOX_TIE).all():
        return np.zeros(BOX)  # the same box: torch's half-gradients cancel exactly (IoU 1)

    def side(mine, theirs, larger):  # d max(mine, theirs)/d mine, or min with larger False
        return np.where(np.abs(mine - theirs) <= BOX_TIE, 0.5, np.float64((mine > theirs) == larger))

    dl = side(box[:2], ref[:2], True)     # lt = max(box, ref) on x1, y1
    dr = side(box[2:], ref[2:], False)    # rb = min(box, ref) on x2, y2
    lt, rb = np.maximum(box[:2], ref[:2]), np.minimum(box[2:], ref[2:])
    w, h = rb - lt
    positive = np.float64(rb - lt >= 0)   # clamp(min=0) passes the gradient at 0
    w, h = max(w, 0.0), max(h, 0.0)
    # gradients of the overlap's width and height, and of the box's own width and height
    gw = np.array([-dl[0], 0, dr[0], 0]) * positive[0]
    gh = np.array([0, -dl[1], 0, dr[1]]) * positive[1]
    bw, bh = box[2] - box[0], box[3] - box[1]
    gbw, gbh = np.array([-1.0, 0, 1, 0]), np.array([0, -1.0, 0, 1])
    inter = w * h
    union = (ref[2] - ref[0]) * (ref[3] - ref[1]) + bw * bh - inter
    g_inter = h * gw + w * gh
    g_union = bh * gbw + bw * gbh - g_inter
    return g_inter / union - inter * g_union / union**2


@dataclass(frozen=True, eq=False)
class FasterRCNNBoxScoreTarget:
    """pgc's FasterRCNNBoxScoreTarget (reference §4, Q27) on a detector artifact's rows: for each
    reference (box, label), the detection of best IoU with the box (the first on ties); when that
    IoU exceeds ``iou_threshold`` and its label is ``label``, add IoU + its score. The gradient
    flows, as in pgc, through the matched detections' scores and box coordinates; the
    selection (threshold, top-k, NMS, matching) is held fixed. ``spec`` is filled in by the
    Explainer from the artifact's manifest."""

    labels: tuple
    bounding_boxes: np.ndarray
    iou_threshold: float = 0.5
    spec: DetectorSpec | None = None
    linear = False

    def __post_init__(self):
        labels = tuple(int(v) for v in np.asarray(self.labels).reshape(-1))
        boxes = np.asarray(self.bounding_boxes, np.float32).reshape(-1, BOX)
        if len(labels) != len(boxes):
            raise TargetError(f"FasterRCNNBoxScoreTarget has {len(labels)} labels for {len(boxes)} "
                              f"boxes; give one label per box")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "bounding_boxes", boxes)

    def for_detector(self, spec: DetectorSpec) -> FasterRCNNBoxScoreTarget:
        return self if self.spec == spec else FasterRCNNBoxScoreTarget(
            self.labels, self.bounding_boxes, self.iou_threshold, spec)

    def _spec(self) -> DetectorSpec:
        if self.spec is None:
            raise TargetError("FasterRCNNBoxScoreTarget works on a detector artifact (built from a "
                              "torchvision RetinaNet or FCOS); this model has no detection manifest")
        return self.spec

    def matches(self, rows: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """(detection anchor, label, reference box) of each reference that scores, on one
        image's rows."""
        found = postprocess(rows, self._spec())
        if not len(found):
            return []
        ious = box_iou(self.bounding_boxes, found.boxes)
        result = []
        for k, label in enumerate(self.labels):
            best = int(np.argmax(ious[k]))
            if ious[k, best] > self.iou_threshold and found.labels[best] == label:
                result.append((int(found.anchors[best]), label, self.bounding_boxes[k]))
        return result

    def values(self, z):
        spec = self._spec()
        z = np.asarray(z)
        per_image = len(spec.row_shape)
        batch = z.reshape(-1, *z.shape[-per_image:])
        totals = []
        for rows in batch:
            total = np.float32(0)
            flat = spec.flat_rows(rows)
            for anchor, label, ref in self.matches(rows):
                iou = box_iou(ref, flat[anchor, :BOX])[0, 0]
                total = np.float32(total + np.float32(iou + flat[anchor, spec.score_column(label)]))
            totals.append(total)
        values = np.asarray(totals, np.float32)
        return values.reshape(z.shape[:-per_image]) if z.ndim > per_image else values[0]

    def cotangent(self, z):
        spec = self._spec()
        out = np.zeros(z.shape, np.float64)
        flat, rows = spec.flat_rows(out), spec.flat_rows(np.asarray(z))
        for anchor, label, ref in self.matches(z):
            flat[anchor, :BOX] += _iou_gradient(ref, rows[anchor, :BOX])
            flat[anchor, spec.score_column(label)] += 1.0
        return out


def bind(targets, spec: DetectorSpec | None):
    """Targets with the detector's spec filled in (for_detector); anything else unchanged."""
    if spec is None or targets is None:
        return targets

    def one(target):
        return target.for_detector(spec) if hasattr(target, "for_detector") else target

    if isinstance(targets, (list, tuple)):
        return [bind(t, spec) if isinstance(t, (list, tuple)) else one(t) for t in targets]
    return one(targets)


def detection_targets(found: Detections, threshold: float, category: int | None = None,
                      iou_threshold: float = 0.5, spec: DetectorSpec | None = None):
    """pgc's tutorial target for one image: its own detections scoring at least ``threshold``
    (of class ``category`` if given) as the reference boxes."""
    keep = explained(found, threshold, category)
    return FasterRCNNBoxScoreTarget(found.labels[keep], found.boxes[keep], iou_threshold, spec)


def explained(found: Detections, threshold: float, category: int | None = None) -> np.ndarray:
    """Which of ``found`` :func:`detection_targets` explains: a bool per detection."""
    keep = found.scores >= threshold
    if category is not None:
        keep &= found.labels == category
    return keep


# -- build integration ----------------------------------------------------------------------

def wrap(loaded) -> DetectorSpec | None:
    """Replace a loaded torchvision RetinaNet/FCOS by its :class:`DetectorGraph` at the
    loaded input size (a Faster R-CNN by its box graph, with its RPN graph in ``loaded.graphs``:
    camexport.two_stage) (images in [0, 1]: the graph normalises them itself), an Ultralytics
    YOLO ONNX export or model by its detector graph (camexport.yolo; a YOLO classify model by
    its logits); the spec, or None for a model that is not a detector."""
    if loaded.onnx_model is not None:
        from camexport import yolo
        from camexport.load import Preprocessing

        return yolo.wrap(loaded, Preprocessing().size)
    if loaded.module is None:
        return None
    from camexport import yolo

    if yolo.ultralytics_task(loaded.module):
        return yolo.wrap_module(loaded)
    kind = detector_kind(loaded.module)
    if not kind:
        return None
    if kind == TWO_STAGE:
        from camexport import two_stage

        return two_stage.wrap(loaded)
    graph = detector_graph(loaded.module, tuple(loaded.preprocessing.size))
    loaded.module = graph
    loaded.preprocessing.mean, loaded.preprocessing.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return graph.spec


#: The stacked levels' layer name of an Ultralytics YOLO: its neck outputs (P3, P4, P5).
NECK_LAYER = "neck"


def stack_layer(spec: DetectorSpec) -> str:
    """What a detector's stacked levels are called as a layer: ``neck`` for a YOLO, else
    ``backbone`` (pgc's tutorial: target_layers=[model.backbone])."""
    return NECK_LAYER if spec.kind == "yolo" else STACK_LAYER


def layer_aliases(spec: DetectorSpec | None) -> dict[str, str]:
    """Layer names that are no module of the model: a detector's ``backbone`` (a YOLO's
    ``neck``) is its stacked FPN levels (graph output ``fpn_stack``)."""
    return {stack_layer(spec): STACK} if spec else {}


def name_outputs(plain) -> None:
    """Name a detector graph's outputs ``detections`` and ``fpn_stack`` (and an Ultralytics
    segment model's prototypes, :data:`PROTOS`), in place."""
    for output, name in zip(plain.graph.output, (DETECTIONS, STACK, PROTOS)):
        rename_value(plain.graph, output.name, name)
        output.name = name


def rename_value(graph, old: str, new: str) -> None:
    """Rename the value ``old`` of an ONNX graph to ``new`` wherever a node makes or reads it,
    in place (the graph's inputs and outputs are the caller's to rename)."""
    for node in graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]


def same_batch(kept: np.ndarray, image: np.ndarray) -> bool:
    """Whether ``image`` is the batch ``kept`` (the same array, or equal values): cheaper than
    :func:`batch_key` where the batch at hand is kept anyway."""
    return kept is image or (kept.shape == image.shape and kept.dtype == image.dtype
                             and np.array_equal(kept, image))


def batch_key(image: np.ndarray) -> tuple:
    """What identifies a batch of images: its shape and a digest of its bytes."""
    import hashlib

    return image.shape, hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


#: Methods that work on the stacked FPN levels: they read its activations only (pgc's stacked
#: levels are a dict with no gradient hook, and are no tensor of the model to ablate).
STACK_METHODS = ("eigencam", "kpcacam", "fem", "scorecam")
#: ... and on a two-stage detector's stack, AblationCAM: as pgc's AblationLayerFasterRCNN, it
#: ablates the FPN levels themselves (camexport.two_stage.LevelAblation)
TWO_STAGE_STACK_METHODS = (*STACK_METHODS, "ablationcam")


def check_layers(resolved, methods, spec: DetectorSpec | None = None) -> None:
    """Refuse methods the ``backbone`` stack cannot serve, naming the ones that can."""
    stacked = [label for label, tensor in resolved if tensor == STACK]
    if stacked:
        served = TWO_STAGE_STACK_METHODS if spec is not None and spec.two_stage else STACK_METHODS
        wrong = [m for m in methods if m not in served]
        if wrong and stacked[0] == NECK_LAYER:
            raise DetectionError(
                f"layer {NECK_LAYER!r} is the YOLO neck outputs stacked as pgc's fasterrcnn_reshape_"
                f"transform does, which no gradient or ablation reaches: {', '.join(wrong)} cannot use "
                f"it. Use {', '.join(STACK_METHODS)} on it, or give one neck output (the Detect head's "
                f"inputs, e.g. model.15, model.18, model.21 for YOLOv8) for gradient methods")
        if wrong:
            raise DetectionError(
                f"layer {STACK_LAYER!r} is the FPN levels stacked as pgc's fasterrcnn_reshape_transform "
                f"does, which no gradient{'' if served is TWO_STAGE_STACK_METHODS else ' or ablation'} "
                f"reaches (pgc fails there too): {', '.join(wrong)} "
                f"cannot use it. Use {', '.join(served)} on it, or give a tensor layer such as "
                f"backbone.body.layer4 or backbone.fpn.layer_blocks.2 for gradient methods")
