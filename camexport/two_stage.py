"""Two-stage detectors (torchvision Faster R-CNN): the region proposals and the box head.

A two-stage detector picks its proposals by index (per-level top-k, NMS), which has no gradient,
and torchvision detaches them. So the model is split where the indices are chosen:

1. :class:`RPNGraph` (exported): normalisation, backbone + FPN and the RPN head. Its outputs are
   ``objectness`` (B, A) (logits) and ``rpn_deltas`` (B, A, 4) for every anchor of every FPN
   level, flattened in torchvision's order (``concat_box_prediction_layers``: level, then row,
   column, anchor), followed by the FPN feature maps, one output per level (``fpn_<level>``),
   which the second graph will read.
2. :func:`proposals` (numpy) replays ``RegionProposalNetwork`` in eval mode on those outputs:
   the anchors (``AnchorGenerator``), ``BoxCoder.decode``, the per-level top ``pre_nms_top_n``,
   clipping, ``remove_small_boxes``, ``score_thresh``, per-level NMS and ``post_nms_top_n``.
   Everything it needs is in :func:`rpn_settings`, a JSON-serialisable dict for a manifest.
3. :class:`BoxGraph` (exported; step 2): the image and the proposals in, backbone + FPN again,
   MultiScaleRoIAlign, the box head and predictor; out ``box_rows`` (B, P, C, 5): for every
   proposal and class the decoded box clipped to the image and the class probability
   (softmax; 0 for padding), laid out [x1, y1, x2, y2, p], and the FPN levels stacked as pgc's
   ``fasterrcnn_reshape_transform`` (the layer ``backbone``). Proposals are padded to one count
   P per batch (an artifact: the RPN's post_nms_top_n).
   MultiScaleRoIAlign picks each box's FPN level by its size (a data-dependent split that
   exports to no fixed-shape graph), so the graph pools every box on every level and sums the
   levels weighted by a one-hot ``box_levels`` (B, P, L) input that :func:`box_inputs` computes
   with torchvision's LevelMapper rule: the chosen level times 1 plus the others times 0 is the
   chosen level's pooling exactly. The box head is row-wise, so a gradient pass may run the
   graph on the proposals of the explained detections only and get their rows unchanged.
   camexport.graph.rules.roialign differentiates RoiAlign with run-time boxes.
4. :func:`detections` (numpy) replays ``RoIHeads.postprocess_detections`` on one image's rows:
   background dropped, ``score_thresh``, small boxes, class-wise NMS, ``detections_per_img``.

5. :class:`PooledBoxes` (run time): the box graph cut at each pooled level's feature maps. The
   plain forward (the detections, ScoreCAM's masked images) computes the rows from the RPN
   graph's own FPN levels, each proposal pooled on its level only: no second backbone pass and
   a quarter of the pooling (a 320 x 320 image: 1.19 -> 0.54 s). Its padding rows are zero
   (the whole graph's decode :data:`PAD_BOX`); both score 0. :class:`LevelAblation` (AblationCAM
   on the stacked levels) cuts the RPN graph per level too.

The graph runs at a fixed input size: the model's resize (GeneralizedRCNNTransform's
min_size/max_size) and batch padding are not applied, so torchvision's padded size and image
size are both that size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from camexport.detection import (
    BOX,
    STACK,
    TWO_STAGE,
    DetectionError,
    Detections,
    DetectorSpec,
    batch_key,
    nms,
    rename_value,
    stack_levels,
)

#: The first two graph outputs; the FPN levels follow as ``fpn_<level name>``.
OBJECTNESS, DELTAS = "objectness", "rpn_deltas"
#: The box graph's inputs after the image, and its output.
PROPOSALS, LEVELS, BOX_ROWS = "proposals", "box_levels", "box_rows"
#: The mask graph's inputs before the FPN levels, and its output (a Mask R-CNN's masks).
MASK_BOXES, MASK_LEVELS, MASK_LABELS, MASK_PROBS = "mask_boxes", "mask_levels", "mask_labels", "mask_probs"
#: what pads a batch's proposals to one count: a 1 px box pooled with weight 0 on every level
PAD_BOX = (0.0, 0.0, 1.0, 1.0)
#: the value an ablated FPN channel is set to (pgc's AblationLayerFasterRCNN; no minimum rule)
FPN_ABLATION_VALUE = -1000.0
#: ablated copies of an image's FPN levels run at once (at 320x320 with 1,000 proposals a copy's
#: box head input is ~50 MB per pooled level)
ABLATION_COPIES = 4
#: torchvision.ops.batched_nms: on CPU, above this many box coordinates it runs NMS per level
#: (``_batched_nms_vanilla``), at or below it offsets the boxes per level (coordinate trick).
VANILLA_NMS_NUMEL = 4000


# -- settings ---------------------------------------------------------------------------------

def rpn_settings(model) -> dict:
    """What :func:`proposals` needs from a torchvision Faster R-CNN's RPN, testing (eval) values,
    as plain JSON types."""
    rpn = model.rpn
    generator = rpn.anchor_generator
    return {
        "pre_nms_top_n": int(rpn._pre_nms_top_n["testing"]),
        "post_nms_top_n": int(rpn._post_nms_top_n["testing"]),
        "nms_thresh": float(rpn.nms_thresh),
        "score_thresh": float(rpn.score_thresh),
        "min_size": float(rpn.min_size),
        "anchor_sizes": [[int(s) for s in sizes] for sizes in generator.sizes],
        "aspect_ratios": [[float(r) for r in ratios] for ratios in generator.aspect_ratios],
        "box_weights": [float(w) for w in rpn.box_coder.weights],
        "bbox_xform_clip": float(rpn.box_coder.bbox_xform_clip),
    }


# -- the exported module ----------------------------------------------------------------------

def _take_backbone(module, model, size: tuple[int, int]) -> dict:
    """Give ``module`` the model's ``backbone``, its normalisation as buffers ``mean`` and
    ``std`` and the input ``size``; the backbone's features of one zero image (their names and
    sizes)."""
    import torch

    module.backbone = model.backbone
    transform = model.transform
    module.register_buffer("mean", torch.tensor(transform.image_mean).reshape(1, 3, 1, 1))
    module.register_buffer("std", torch.tensor(transform.image_std).reshape(1, 3, 1, 1))
    module.size = tuple(int(s) for s in size)
    with torch.no_grad():
        return module.backbone(torch.zeros(1, 3, *module.size))


def _rpn_graph_class():
    import torch
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    class RPNGraph(torch.nn.Module):
        """Image in [0, 1] (B, 3, H, W) → (objectness (B, A), deltas (B, A, 4), *FPN levels)."""

        def __init__(self, model, size: tuple[int, int]):
            super().__init__()
            self.head = model.rpn.head
            features = _take_backbone(self, model, size)
            self.level_names = tuple(features)
            self.output_names = (OBJECTNESS, DELTAS, *(f"fpn_{n}" for n in self.level_names))
            self.settings = {**rpn_settings(model), "image_size": list(self.size),
                             "levels": list(self.level_names),
                             "feature_sizes": [list(f.shape[-2:]) for f in features.values()]}

        def forward(self, x):
            features = list(self.backbone((x - self.mean) / self.std).values())
            logits, deltas = self.head(features)
            objectness, deltas = concat_box_prediction_layers(logits, deltas)
            batch = x.shape[0]
            return (objectness.reshape(batch, -1), deltas.reshape(batch, -1, BOX), *features)

    return RPNGraph


def rpn_graph(model, size: tuple[int, int]):
    """The exportable :class:`RPNGraph` of a torchvision Faster R-CNN at input ``size`` (H, W);
    its ``settings`` are :func:`rpn_settings` plus the image size and the FPN levels' names and
    sizes."""
    _check(model, size)
    return _rpn_graph_class()(model.eval(), size).eval()


def _check(model, size) -> None:
    """Refuse a model that is no torchvision Faster R-CNN, or a size that is not (H, W)."""
    from torchvision.models.detection import FasterRCNN

    if not isinstance(model, FasterRCNN):
        raise DetectionError(f"{type(model).__name__} is no torchvision Faster R-CNN")
    if len(size) != 2:
        raise DetectionError(f"a detector takes 2-D images; input size {size} has {len(size)} values")


def pool_settings(pool, size: tuple[int, int], pooled, feature_sizes) -> dict:
    """A MultiScaleRoIAlign's levels as plain JSON types (torchvision's ``_setup_scales`` on the
    graph's image size and the ``pooled`` levels' ``feature_sizes``): what :func:`levels_of`
    and the graphs' RoiAlign need."""
    import math

    scales = [2.0 ** round(math.log2(float(h) / float(size[0]))) for h, _ in feature_sizes]
    return {
        "pooled_levels": list(pooled),
        "pool_scales": scales,
        "level_min": int(-math.log2(scales[0])),
        "level_max": int(-math.log2(scales[-1])),
        "canonical_scale": int(pool.canonical_scale),
        "canonical_level": int(pool.canonical_level),
        "output_size": [int(s) for s in pool.output_size],
        "sampling_ratio": int(pool.sampling_ratio),
    }


def box_settings(model, size: tuple[int, int], pooled, feature_sizes) -> dict:
    """What :func:`box_inputs` and :func:`detections` need from a Faster R-CNN's RoIHeads, as
    plain JSON types: the box pooling's :func:`pool_settings` and the eval post-processing
    settings."""
    heads = model.roi_heads
    return {
        **pool_settings(heads.box_roi_pool, size, pooled, feature_sizes),
        "box_weights": [float(w) for w in heads.box_coder.weights],
        "bbox_xform_clip": float(heads.box_coder.bbox_xform_clip),
        "score_thresh": float(heads.score_thresh),
        "nms_thresh": float(heads.nms_thresh),
        "detections_per_img": int(heads.detections_per_img),
        "image_size": [int(s) for s in size],
    }


def _pool_levels(features: dict, rois, weights, names, settings: dict):
    """MultiScaleRoIAlign with the level chosen by one-hot ``weights`` (N, L, 1, 1, 1): every
    box pooled on every level ``names`` and the levels summed, weighted (the chosen level
    times 1 plus the others times 0 is the chosen level's pooling exactly)."""
    from torchvision.ops import roi_align

    pooled = 0
    for level, (name, scale) in enumerate(zip(names, settings["pool_scales"])):
        pooled = pooled + weights[:, level] * roi_align(
            features[name], rois, output_size=settings["output_size"], spatial_scale=scale,
            sampling_ratio=settings["sampling_ratio"], aligned=False)
    return pooled


def _rois(boxes):
    """RoiAlign's (B * P, 5) rois [image index, x1, y1, x2, y2] of boxes (B, P, 4)."""
    import torch

    batch, count = boxes.shape[0], boxes.shape[1]
    flat = boxes.reshape(-1, BOX)
    index = torch.arange(batch, dtype=flat.dtype).reshape(-1, 1, 1).expand(batch, count, 1)
    return torch.cat([index.reshape(-1, 1), flat], dim=1)


def _box_graph_class():
    import torch
    from torchvision.ops import boxes as box_ops

    class BoxGraph(torch.nn.Module):
        """(image in [0, 1] (B, 3, H, W), proposals (B, P, 4), box_levels (B, P, L)) →
        (box_rows (B, P, C, 5), the FPN levels stacked as pgc's fasterrcnn_reshape_transform)."""

        def __init__(self, model, size: tuple[int, int]):
            super().__init__()
            heads = model.roi_heads
            self.box_head, self.box_predictor = heads.box_head, heads.box_predictor
            self.box_coder = heads.box_coder
            features = _take_backbone(self, model, size)
            # MultiScaleRoIAlign pools the backbone's levels that its featmap_names name, in the
            # backbone's order (MobileNet's FPN has '0', '1' and 'pool' of the default '0'-'3')
            pooled = [n for n in features if n in heads.box_roi_pool.featmap_names]
            self.settings = box_settings(model, self.size, pooled,
                                         [tuple(features[n].shape[-2:]) for n in pooled])
            self.pooled = tuple(pooled)
            self.classes = int(heads.box_predictor.cls_score.out_features)
            self.output_names = (BOX_ROWS, STACK)

        def forward(self, x, proposals, box_levels):
            features = self.backbone((x - self.mean) / self.std)
            stack = stack_levels(list(features.values()))
            batch, count = proposals.shape[0], proposals.shape[1]
            flat = proposals.reshape(-1, BOX)
            weights = box_levels.reshape(-1, len(self.pooled), 1, 1, 1)
            pooled = _pool_levels(features, _rois(proposals), weights, self.pooled, self.settings)
            logits, regression = self.box_predictor(self.box_head(pooled))
            boxes = self.box_coder.decode_single(regression.reshape(batch * count, -1), flat)
            boxes = box_ops.clip_boxes_to_image(boxes.reshape(batch * count, -1, BOX), self.size)
            # a padding proposal (on no level) scores 0: below any score threshold
            valid = box_levels.sum(-1).reshape(batch * count, 1, 1)
            scores = torch.softmax(logits, -1).unsqueeze(-1) * valid
            return torch.cat([boxes, scores], dim=-1).reshape(batch, count, -1, BOX + 1), stack

    return BoxGraph


def box_graph(model, size: tuple[int, int]):
    """The exportable :class:`BoxGraph` of a torchvision Faster R-CNN at input ``size`` (H, W);
    its ``settings`` are :func:`box_settings`."""
    _check(model, size)
    return _box_graph_class()(model.eval(), size).eval()


def _mask_graph_class():
    import torch

    class MaskGraph(torch.nn.Module):
        """A Mask R-CNN's mask branch on given boxes: (the pooled FPN levels ``fpn_<name>``
        (B, C, h, w) as the RPN graph outputs them, ``mask_boxes`` (B, D, 4), ``mask_levels``
        (B, D, L) one-hot, ``mask_labels`` (B, D) int64) → ``mask_probs`` (B, D, M, M): the
        sigmoid of each box's label's mask logits (torchvision's ``maskrcnn_inference``, before
        ``paste_masks_in_image``)."""

        def __init__(self, model, size: tuple[int, int], feature_sizes: dict):
            super().__init__()
            heads = model.roi_heads
            self.mask_head, self.mask_predictor = heads.mask_head, heads.mask_predictor
            pooled = [n for n in feature_sizes if n in heads.mask_roi_pool.featmap_names]
            self.pooled = tuple(pooled)
            self.settings = pool_settings(heads.mask_roi_pool, size, pooled,
                                          [feature_sizes[n] for n in pooled])
            with torch.no_grad():  # the masks' side M (28: the predictor upsamples 14 x 14 twice)
                probe = torch.zeros(1, model.backbone.out_channels, *self.settings["output_size"])
                self.settings["resolution"] = int(self.mask_predictor(self.mask_head(probe)).shape[-1])
            self.input_names = (MASK_BOXES, MASK_LEVELS, MASK_LABELS, *(f"fpn_{n}" for n in pooled))
            self.output_names = (MASK_PROBS,)

        def forward(self, boxes, levels, labels, *features):
            batch, count = boxes.shape[0], boxes.shape[1]
            weights = levels.reshape(-1, len(self.pooled), 1, 1, 1)
            pooled = _pool_levels(dict(zip(self.pooled, features)), _rois(boxes), weights, self.pooled,
                                  self.settings)
            logits = self.mask_predictor(self.mask_head(pooled))
            flat = labels.reshape(-1)
            chosen = logits[torch.arange(flat.shape[0]), flat]
            return chosen.sigmoid().reshape(batch, count, *chosen.shape[-2:])

    return MaskGraph


def mask_graph(model, size: tuple[int, int], rpn_settings: dict):
    """The exportable :class:`MaskGraph` of a torchvision Mask R-CNN at input ``size`` (H, W),
    or None for a model without a mask branch; the FPN levels' names and sizes come from its
    :class:`RPNGraph`'s ``rpn_settings``; its ``settings`` are :func:`pool_settings` of the mask
    pooling."""
    heads = model.roi_heads
    if getattr(heads, "mask_head", None) is None or getattr(heads, "mask_predictor", None) is None:
        return None
    feature_sizes = {name: tuple(side)
                     for name, side in zip(rpn_settings["levels"], rpn_settings["feature_sizes"])}
    return _mask_graph_class()(model.eval(), size, feature_sizes).eval()


def levels_of(boxes: np.ndarray, settings: dict) -> np.ndarray:
    """torchvision's LevelMapper in float32: the pooled level (0-based) of each (n, 4) box,
    floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6), clamped."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, BOX)
    side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    with np.errstate(divide="ignore"):
        level = np.floor(np.float32(settings["canonical_level"])
                         + np.log2(side / np.float32(settings["canonical_scale"])) + np.float32(1e-6))
    level = np.clip(level, settings["level_min"], settings["level_max"])
    return level.astype(np.int64) - settings["level_min"]


def box_inputs(proposals: list[np.ndarray], settings: dict, count: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """The box graph's ``proposals`` (B, P, 4) and ``box_levels`` (B, P, L) for one list of
    per-image proposals: padded to ``count`` (default: the most any image has) with
    :data:`PAD_BOX` on no level."""
    return pad_boxes(proposals, [levels_of(boxes, settings) for boxes in proposals],
                     len(settings["pooled_levels"]), count)


def pad_boxes(boxes: list[np.ndarray], levels: list[np.ndarray], level_count: int,
              count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(B, P, 4) boxes and (B, P, L) one-hot level weights of each image's ``boxes[b]`` pooled
    at ``levels[b]`` (a level index per box), padded to ``count`` (default: the most any image
    has) with :data:`PAD_BOX` on no level."""
    count = max([len(b) for b in boxes] + [1]) if count is None else count
    padded = np.tile(np.asarray(PAD_BOX, np.float32), (len(boxes), count, 1))
    weights = np.zeros((len(boxes), count, level_count), np.float32)
    for k, (image, at) in enumerate(zip(boxes, levels)):
        if len(image) > count:
            raise DetectionError(f"image {k} has {len(image)} proposals; the batch holds {count}")
        padded[k, :len(image)] = image
        weights[k, np.arange(len(image)), at] = 1.0
    return padded, weights


def detections(rows: np.ndarray, settings: dict, count: int | None = None) -> Detections:
    """One image's detections from its ``box_rows`` (P, C, 5) (the first ``count`` proposals;
    the rest is padding), as RoIHeads.postprocess_detections: background (class 0) dropped,
    probabilities above ``score_thresh``, boxes with a side under 0.01 px dropped, NMS within
    each class, the best ``detections_per_img``. ``anchors`` holds the flat row index
    proposal x C + class each detection came from."""
    rows = np.asarray(rows)
    rows = rows[:len(rows) if count is None else count]
    classes = rows.shape[1]
    boxes = rows[:, 1:, :BOX].reshape(-1, BOX)
    scores = rows[:, 1:, BOX].reshape(-1)
    flat = (np.arange(len(rows))[:, None] * classes + np.arange(1, classes)[None]).reshape(-1)
    keep = np.flatnonzero(scores > settings["score_thresh"])
    sides = np.minimum(boxes[keep, 2] - boxes[keep, 0], boxes[keep, 3] - boxes[keep, 1])
    keep = keep[sides >= np.float32(1e-2)]
    boxes, scores, flat = boxes[keep], scores[keep], flat[keep]
    labels = flat % classes
    keep = batched_nms(boxes, scores, labels, settings["nms_thresh"])[:settings["detections_per_img"]]
    return Detections(boxes[keep], scores[keep], labels[keep], flat[keep])


def name_inputs(plain, names) -> None:
    """Rename an exported graph's inputs to ``names``, in place."""
    for value, name in zip(plain.graph.input, names):
        rename_value(plain.graph, value.name, name)
        value.name = name


def name_outputs(plain, names) -> None:
    """Rename an exported graph's outputs to ``names`` (an RPNGraph's ``output_names``), in place."""
    for value, name in zip(plain.graph.output, names):
        rename_value(plain.graph, value.name, name)
        value.name = name


# -- the RPN's post-processing, in numpy -------------------------------------------------------

def cell_anchors(sizes, ratios) -> np.ndarray:
    """AnchorGenerator.generate_anchors: zero-centred (len(ratios) * len(sizes), 4) boxes, ratio
    = height / width, in float32 and rounded half to even as torch.round."""
    scales = np.asarray(sizes, np.float32)
    h_ratios = np.sqrt(np.asarray(ratios, np.float32))
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2))


def anchors(settings: dict, image_size) -> list[np.ndarray]:
    """AnchorGenerator.forward, one (h * w * A, 4) float32 array per level: strides are the
    image size // the level's size, each cell's anchors offset by its (x, y) * stride."""
    height, width = (int(s) for s in image_size)
    result = []
    for (rows, cols), sizes, ratios in zip(settings["feature_sizes"], settings["anchor_sizes"],
                                           settings["aspect_ratios"]):
        shift_x = np.arange(cols, dtype=np.int64) * (width // cols)
        shift_y = np.arange(rows, dtype=np.int64) * (height // rows)
        shift_y, shift_x = (a.reshape(-1) for a in np.meshgrid(shift_y, shift_x, indexing="ij"))
        shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=1).astype(np.float32)
        result.append((shifts[:, None, :] + cell_anchors(sizes, ratios)[None]).reshape(-1, BOX))
    return result


def decode(deltas: np.ndarray, boxes: np.ndarray, weights, clip: float) -> np.ndarray:
    """BoxCoder.decode_single in float32: centre moved by (dx, dy) box sizes, sizes scaled by
    exp(min(dw, clip)), exp(min(dh, clip))."""
    deltas = np.asarray(deltas, np.float32).reshape(-1, BOX)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    half = np.float32(0.5)
    ctr_x, ctr_y = boxes[:, 0] + half * widths, boxes[:, 1] + half * heights
    dx, dy, dw, dh = (deltas[:, k] / np.float32(w) for k, w in enumerate(weights))
    dw, dh = np.minimum(dw, np.float32(clip)), np.minimum(dh, np.float32(clip))
    pred_x, pred_y = dx * widths + ctr_x, dy * heights + ctr_y
    half_w, half_h = half * (np.exp(dw) * widths), half * (np.exp(dh) * heights)
    return np.stack([pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h], axis=1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (np.float32(1) / (np.float32(1) + np.exp(-z))).astype(np.float32)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, levels: np.ndarray, threshold: float):
    """torchvision.ops.batched_nms on CPU: indices kept by NMS within each level, best score
    first. Above VANILLA_NMS_NUMEL coordinates NMS runs per level; at or below it, on the boxes
    offset by level x (largest coordinate + 1), as torchvision does (the offset rounds the
    coordinates in float32, which can move an IoU by an ulp)."""
    if not len(boxes):
        return np.zeros(0, np.int64)
    if boxes.size > VANILLA_NMS_NUMEL:
        keep = [np.flatnonzero(levels == level)[nms(boxes[levels == level],
                                                    scores[levels == level], threshold)]
                for level in np.unique(levels)]
        keep = np.concatenate(keep)
        return keep[np.argsort(-scores[keep], kind="stable")]
    offsets = levels.astype(np.float32) * (boxes.max() + np.float32(1))
    return nms(boxes + offsets[:, None], scores, threshold)


def select(objectness: np.ndarray, deltas: np.ndarray, settings: dict, image_size=None):
    """One image's RPN proposals as RegionProposalNetwork.filter_proposals picks them (eval):
    (boxes (P, 4), scores (P,) = sigmoid(objectness), anchor indices (P,)), best score first.

    ``objectness`` (A,) and ``deltas`` (A, 4) are one image's rows of the RPNGraph outputs;
    ``image_size`` (H, W) defaults to ``settings["image_size"]``."""
    image_size = settings["image_size"] if image_size is None else image_size
    height, width = (float(s) for s in image_size)
    per_level = anchors(settings, image_size)
    counts = [len(a) for a in per_level]
    objectness = np.asarray(objectness, np.float32).reshape(-1)
    if objectness.shape[0] != sum(counts):
        raise DetectionError(f"RPN objectness has {objectness.shape[0]} anchors; the settings' "
                             f"feature sizes make {sum(counts)}")
    # per level, the best pre_nms_top_n logits (torch.topk; exact ties: anchor order here)
    picked, start = [], 0
    for count in counts:
        level = objectness[start:start + count]
        picked.append(start + np.argsort(-level, kind="stable")[:settings["pre_nms_top_n"]])
        start += count
    index = np.concatenate(picked)
    levels = np.repeat(np.arange(len(counts)), [len(p) for p in picked])
    boxes = decode(np.asarray(deltas).reshape(-1, BOX)[index], np.concatenate(per_level)[index],
                   settings["box_weights"], settings["bbox_xform_clip"])
    scores = _sigmoid(objectness[index])
    # clip_boxes_to_image, remove_small_boxes, score_thresh (>=, as torchvision)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], np.float32(0), np.float32(width))
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], np.float32(0), np.float32(height))
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    keep = (sides >= settings["min_size"]) & (scores >= settings["score_thresh"])
    boxes, scores, levels, index = boxes[keep], scores[keep], levels[keep], index[keep]
    keep = batched_nms(boxes, scores, levels, settings["nms_thresh"])[:settings["post_nms_top_n"]]
    return boxes[keep], scores[keep], index[keep]


def proposals(objectness: np.ndarray, deltas: np.ndarray, image_size, settings: dict
              ) -> list[np.ndarray]:
    """Each image's proposals (P, 4) x1 y1 x2 y2, from the RPNGraph outputs objectness (B, A)
    and deltas (B, A, 4), as torchvision's RegionProposalNetwork returns them in eval mode."""
    objectness = np.asarray(objectness)
    deltas = np.asarray(deltas)
    batch = objectness.reshape(objectness.shape[0], -1) if objectness.ndim > 1 else objectness[None]
    deltas = deltas.reshape(len(batch), -1, BOX)
    return [select(o, d, settings, image_size)[0] for o, d in zip(batch, deltas)]



# -- build and run integration ------------------------------------------------------------------

#: the key of the RPN graph among an artifact's extra graphs (camexport.artifact.read_extra)
RPN_GRAPH = "rpn"
#: the key of a Mask R-CNN's mask graph among an artifact's extra graphs
MASK_GRAPH = "mask"


def wrap(loaded) -> DetectorSpec:
    """Replace a loaded torchvision Faster R-CNN by its :class:`BoxGraph` at the loaded input
    size (images in [0, 1]: the graphs normalise them themselves), with its :class:`RPNGraph`
    (and a Mask R-CNN's :class:`MaskGraph`) in ``loaded.graphs``; :func:`export` exports them.
    The spec records the graphs' settings (``rpn``, ``box``, and ``mask`` for a Mask R-CNN)."""
    size = tuple(loaded.preprocessing.size)
    model = loaded.module
    rpn, box = rpn_graph(model, size), box_graph(model, size)
    mask = mask_graph(model, size, rpn.settings)
    loaded.module, loaded.graphs = box, {**loaded.graphs, RPN_GRAPH: rpn}
    settings = {"rpn": rpn.settings, "box": box.settings}
    if mask is not None:
        loaded.graphs[MASK_GRAPH] = mask
        settings["mask"] = mask.settings
    loaded.preprocessing.mean, loaded.preprocessing.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    box_ = box.settings
    return DetectorSpec(
        kind=TWO_STAGE, classes=box.classes, level_sizes=(rpn.settings["post_nms_top_n"],),
        image_size=tuple(box_["image_size"]), score_thresh=box_["score_thresh"],
        nms_thresh=box_["nms_thresh"], detections_per_img=box_["detections_per_img"],
        topk_candidates=rpn.settings["pre_nms_top_n"], levels=tuple(rpn.settings["levels"]),
        settings=settings)


def export(loaded):
    """The plain ONNX box graph of a :func:`wrap`-ped model, batch and proposal count free (runs
    pad to P = post_nms_top_n; :class:`ProposalSession` feeds fewer in gradient passes);
    ``loaded.graphs[RPN_GRAPH]`` becomes the exported RPN graph. The box graph is traced on the
    RPN's own proposals of a random image pair."""
    import torch

    from camexport.export import _dynamo

    box, rpn = loaded.module, loaded.graphs[RPN_GRAPH]
    x = torch.rand(2, 3, *box.size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    rpn_plain = _dynamo(rpn, (x,), ({0: batch},))
    name_outputs(rpn_plain, rpn.output_names)
    with torch.no_grad():
        objectness, deltas, *features = rpn(x)
    objectness, deltas = objectness.numpy(), deltas.numpy()
    chosen = proposals(objectness, deltas, box.size, rpn.settings)
    padded, levels_ = box_inputs(chosen, box.settings, rpn.settings["post_nms_top_n"])
    inputs = (x, torch.from_numpy(padded), torch.from_numpy(levels_))
    count = torch.export.Dim("count", min=1, max=1 << 16)
    plain = _dynamo(box, inputs, ({0: batch}, {0: batch, 1: count}, {0: batch, 1: count}))
    name_outputs(plain, box.output_names)
    loaded.graphs = {**loaded.graphs, RPN_GRAPH: rpn_plain}
    mask = loaded.graphs.get(MASK_GRAPH)
    if mask is not None:  # traced on the first proposals of the pair, labelled 1
        levels = [level for name, level in zip(rpn.level_names, features) if name in mask.pooled]
        boxes, weights = pad_boxes([b[:3] for b in chosen], [levels_of(b[:3], mask.settings) for b in chosen],
                                   len(mask.pooled))
        labels = np.ones(boxes.shape[:2], np.int64)
        inputs = (torch.from_numpy(boxes), torch.from_numpy(weights), torch.from_numpy(labels), *levels)
        mask_plain = _dynamo(mask, inputs, ({0: batch, 1: count},) * 3 + (tuple({0: batch} for _ in levels),))
        name_inputs(mask_plain, mask.input_names)
        name_outputs(mask_plain, mask.output_names)
        loaded.graphs[MASK_GRAPH] = mask_plain
    return plain


def level_outputs(spec: DetectorSpec) -> list[str]:
    """The RPN graph's FPN level outputs (``fpn_<level>``, as RPNGraph names them), in order."""
    return [f"fpn_{name}" for name in spec.settings["rpn"]["levels"]]


@dataclass
class RPNRun:
    """One run of the RPN graph on a batch (:meth:`ProposalSource.run`): the batch's key, the
    box graph's proposal inputs, each image's proposals, the RPN outputs and (when asked for)
    the FPN levels."""

    key: tuple
    feeds: dict
    chosen: list
    objectness: np.ndarray
    deltas: np.ndarray
    levels: list | None = None


class ProposalSource:
    """The box graph's ``proposals`` and ``box_levels`` for a batch of images: the RPN graph's
    session, then :func:`proposals` and :func:`box_inputs` (padded to the spec's P). The last
    batch's proposals and full rows are remembered by its bytes: the Explainer runs the box
    graph more than once on one batch (the detections, then the gradients). ``forward``: the
    full rows of a batch (the plain graph's run).

    With ``boxes`` (:class:`PooledBoxes`), the full rows of a batch come from the RPN graph's
    run that chose its proposals: its FPN levels feed the box graph cut at each pooled level,
    each proposal pooled on its own level only, instead of the whole box graph computing the
    backbone again and pooling every proposal on every level (:meth:`full_rows`)."""

    def __init__(self, rpn_session, spec: DetectorSpec, forward, boxes: PooledBoxes | None = None):
        self.session, self.spec, self.forward, self.boxes = rpn_session, spec, forward, boxes
        self.image_name = rpn_session.get_inputs()[0].name
        self.level_outputs = level_outputs(spec)
        #: whether :meth:`full_rows` keeps its batch's FPN levels (``kept_levels``: key, levels)
        self.keep_levels = "mask" in spec.settings
        self.kept_levels: tuple | None = None
        self._last: RPNRun | None = None
        self._rows: tuple | None = None

    @staticmethod
    def key(image: np.ndarray) -> tuple:
        """What identifies a batch (:func:`camexport.detection.batch_key`; hashed once a run)."""
        return batch_key(image)

    def __call__(self, image: np.ndarray, key: tuple) -> dict[str, np.ndarray]:
        """The proposal inputs of ``image`` (its :meth:`key` ``key``)."""
        return self.run(image, key).feeds

    def run(self, image: np.ndarray, key: tuple, levels: bool = False) -> RPNRun:
        """The RPN graph's run on ``image`` and the proposals it gives, remembered for the last
        batch without the FPN levels (with ``levels``, they come with this run only: a batch's
        levels are large, ~90 MB an image at 800 x 1333)."""
        if self._last is not None and self._last.key == key and not levels:
            return self._last
        settings = self.spec.settings
        image = np.ascontiguousarray(image, np.float32)
        wanted = [OBJECTNESS, DELTAS, *(self.level_outputs if levels else ())]
        objectness, deltas, *maps = self.session.run(wanted, {self.image_name: image})
        chosen = proposals(objectness, deltas, settings["rpn"]["image_size"], settings["rpn"])
        padded, weights = box_inputs(chosen, settings["box"], sum(self.spec.level_sizes))
        self._last = RPNRun(key, {PROPOSALS: padded, LEVELS: weights}, chosen, objectness, deltas)
        return RPNRun(key, self._last.feeds, chosen, objectness, deltas, maps or None)

    def levels(self, image: np.ndarray, key: tuple) -> list[np.ndarray]:
        """The FPN levels of ``image`` (its :meth:`key` ``key``; the RPN graph's level outputs):
        those :meth:`full_rows` kept (``keep_levels``: a Mask R-CNN's masks read the levels of
        the batch just detected), or a run of the RPN graph that changes nothing remembered."""
        if self.kept_levels is not None and self.kept_levels[0] == key:
            return self.kept_levels[1]
        image = np.ascontiguousarray(image, np.float32)
        return self.session.run(self.level_outputs, {self.image_name: image})

    def full_rows(self, image: np.ndarray, key: tuple) -> np.ndarray:
        """The box rows (B, P, C, 5) of every proposal of ``image`` from the per-level box
        graphs (``boxes``), remembered; padding rows are zero (the whole box graph's decode
        :data:`PAD_BOX`; both score 0)."""
        ran = self.run(image, key, levels=True)
        rows = self.boxes.batch_rows(ran.levels, ran.chosen, self.spec.row_shape[0])
        self.remember(key, rows)
        if self.keep_levels:
            self.kept_levels = (key, ran.levels)
        return rows

    def remember(self, key: tuple, rows: np.ndarray) -> None:
        self._rows = (key, rows)

    def remembered(self, key: tuple) -> np.ndarray | None:
        """The full box rows of the batch ``key`` if they are the last ones run, else None."""
        return self._rows[1] if self._rows is not None and self._rows[0] == key else None

    def rows(self, image: np.ndarray, key: tuple) -> np.ndarray:
        """The full box rows of ``image`` (every proposal), remembered or from ``forward``."""
        if self.remembered(key) is None:
            self.remember(key, self.forward(image))
        return self._rows[1]


class PooledBoxes:
    """The box graph cut at each pooled level: from one level's feature maps (a RoiAlign node's
    input, identified by its spatial scale, the settings' ``pool_scales``), the proposals and
    the levels' weights to ``box_rows``, the sum over levels rewired to that level's RoiAlign
    (the others weigh 0 there). The rows of proposals pooled from that level, the same as the
    whole box graph's (its box head is row-wise)."""

    def __init__(self, box_plain, spec: DetectorSpec, make_session):
        from camexport.graph.cut import layer_tail

        settings = spec.settings
        self.settings = settings["box"]
        self.names = pooled_features(box_plain, settings["box"])
        #: the RPN level (index in the settings' levels) of each pooled level
        self.pooled = [settings["rpn"]["levels"].index(name) for name in settings["box"]["pooled_levels"]]
        self.shape = spec.row_shape[1:]
        cuts = [layer_tail(_pooled_from(box_plain, self.names, k), [name, PROPOSALS, LEVELS],
                           [BOX_ROWS], rows=False) for k, name in enumerate(self.names)]
        _check_frontiers(cuts)
        self.sessions = [make_session(cut.model) for cut in cuts]

    def rows(self, pooled: int, features: np.ndarray, boxes: list[np.ndarray]) -> list[np.ndarray]:
        """The box rows (p_i, C, 5) of ``boxes[i]`` (p_i, 4), all pooled from pooled level
        ``pooled``, on row i of ``features`` (that level's feature maps)."""
        padded, weights = pad_boxes(boxes, [np.full(len(b), pooled) for b in boxes], len(self.pooled))
        rows = self.sessions[pooled].run([BOX_ROWS], {self.names[pooled]: features,
                                                      PROPOSALS: padded, LEVELS: weights})[0]
        return [rows[k, :len(b)] for k, b in enumerate(boxes)]

    def batch_rows(self, levels: list[np.ndarray], boxes: list[np.ndarray], count: int) -> np.ndarray:
        """(B, count, C, 5): the rows of each image's proposals ``boxes[b]`` on the FPN
        ``levels`` (the RPN graph's, each (B, C_l, h, w)), each pooled from its own level;
        rows past an image's proposals are zero."""
        result = np.zeros((len(boxes), count, *self.shape), np.float32)
        pooled_at = [levels_of(b, self.settings) for b in boxes]
        for k in range(len(self.names)):
            chosen = [np.flatnonzero(at == k) for at in pooled_at]
            if not any(len(c) for c in chosen):
                continue
            ran = self.rows(k, levels[self.pooled[k]], [b[c] for b, c in zip(boxes, chosen)])
            for b, (places, rows) in enumerate(zip(chosen, ran)):
                result[b, places] = rows
        return result


class Masks:
    """A Mask R-CNN's masks of its detections (torchvision's ``maskrcnn_inference``): the mask
    graph's session on an image's FPN levels (the RPN graph's outputs) and its detections'
    boxes and labels, each box pooled on its level (:func:`levels_of` with the mask pooling's
    settings)."""

    def __init__(self, session, spec: DetectorSpec):
        self.session = session
        self.settings = spec.settings["mask"]
        rpn_levels = spec.settings["rpn"]["levels"]
        self.pooled = [rpn_levels.index(name) for name in self.settings["pooled_levels"]]
        self.names = [level_outputs(spec)[at] for at in self.pooled]

    def __call__(self, levels: list[np.ndarray], found: list[Detections]) -> list[np.ndarray]:
        """Each image's (n_i, M, M) mask probabilities of its detections ``found[i]``, on the
        FPN ``levels`` (the RPN graph's, each (B, C_l, h, w))."""
        boxes = [f.boxes for f in found]
        padded, weights = pad_boxes(boxes, [levels_of(b, self.settings) for b in boxes], len(self.names))
        labels = np.zeros(padded.shape[:2], np.int64)
        for k, f in enumerate(found):
            labels[k, :len(f)] = f.labels
        feed = {MASK_BOXES: padded, MASK_LEVELS: weights, MASK_LABELS: labels,
                **{name: levels[at] for name, at in zip(self.names, self.pooled)}}
        probs = self.session.run([MASK_PROBS], feed)[0]
        return [probs[k, :len(f)] for k, f in enumerate(found)]


def _check_frontiers(cuts) -> None:
    """Refuse cuts of the artifact's graphs that read values past the FPN levels."""
    for cut in cuts:
        if cut.frontier:
            raise DetectionError(f"the artifact's graphs read {', '.join(cut.frontier)} past an FPN "
                                 f"level: they cannot run from the levels; rebuild the artifact")


class ProposalSession:
    """A session of a (pruned or augmented) box graph that takes what a one-stage graph takes:
    the proposal inputs are hidden, and each run computes them from its image
    (:class:`ProposalSource`), as torchvision's model does on every forward.

    A run with target weights (a gradient pass) feeds only the proposals whose rows have a
    non-zero weight: the box head is row-wise, so their rows and the gradients are the same, and
    RoIAlign's transpose (a scatter-add over every sample of every box and channel) costs ~1000x
    less than on all P proposals. Its ``box_rows`` output is the full rows of the batch."""

    def __init__(self, inner, source: ProposalSource, image_name: str):
        self.inner, self.source, self.image_name = inner, source, image_name
        self._needs = {i.name for i in inner.get_inputs()}

    def get_inputs(self):
        return [i for i in self.inner.get_inputs() if i.name not in (PROPOSALS, LEVELS)]

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, names, feed, *args):
        from camexport.graph.outputs import TARGET_WEIGHTS

        if not self._needs & {PROPOSALS, LEVELS}:
            return self.inner.run(names, {k: v for k, v in feed.items() if k in self._needs}, *args)
        image = feed[self.image_name]
        key = self.source.key(image)
        weighted = TARGET_WEIGHTS in self._needs
        if not weighted and list(names) == [BOX_ROWS]:
            remembered = self.source.remembered(key)
            if remembered is not None:  # the detections, then the targets' weights: one run
                return [remembered]
            if self.source.boxes is not None:  # the RPN graph's levels, each box on its level
                return [self.source.full_rows(image, key)]
        feed = {**feed, **self.source(image, key)}
        if weighted:
            feed = _weighted_rows_only(feed, TARGET_WEIGHTS)
        outputs = self.inner.run(names, {k: v for k, v in feed.items() if k in self._needs}, *args)
        if BOX_ROWS in names:
            at = list(names).index(BOX_ROWS)
            if weighted:
                outputs[at] = self.source.rows(image, key)
            else:
                self.source.remember(key, outputs[at])
        return outputs


def _weighted_rows_only(feed: dict, weights_name: str) -> dict:
    """``feed`` with each image's proposals, levels and target weights cut down to the proposals
    whose weights are not all zero (at least one slot, padding on no level)."""
    weights = feed[weights_name]
    used = np.abs(weights).reshape(*weights.shape[:2], -1).max(-1) > 0
    kept = [np.flatnonzero(row) for row in used]
    count = max([len(k) for k in kept] + [1])
    batch = len(weights)
    boxes = np.tile(np.asarray(PAD_BOX, np.float32), (batch, count, 1))
    levels_ = np.zeros((batch, count, feed[LEVELS].shape[-1]), np.float32)
    rows = np.zeros((batch, count, *weights.shape[2:]), np.float32)
    for b, k in enumerate(kept):
        boxes[b, :len(k)], levels_[b, :len(k)] = feed[PROPOSALS][b, k], feed[LEVELS][b, k]
        rows[b, :len(k)] = weights[b, k]
    return {**feed, PROPOSALS: boxes, LEVELS: levels_, weights_name: rows}


class LevelAblation:
    """AblationCAM on the stacked FPN levels (the layer ``backbone``), as pgc's
    AblationLayerFasterRCNN: flat channel k of the stack is channel k - offset of the level it
    falls in (levels in the backbone's order, each its own channel count), set to
    :data:`FPN_ABLATION_VALUE` at every position; each ablated copy of the levels gets its own
    proposals (the RPN head runs on the ablated levels, as the model's RPN does after pgc swaps
    the backbone for the ablation layer), then the box head on them.

    Both heads work level by level, which makes most of pgc's work a repeat of the unablated
    image's: the RPN head of an ablated level changes that level's anchors only, and a
    proposal's box row reads the one level it is pooled from. So the graphs are cut per level:

    - the RPN graph from ``fpn_<level>`` to that level's part of ``objectness`` and
      ``rpn_deltas`` (the inputs of the Concat nodes that make them); the other levels' parts
      are the unablated image's;
    - the box graph from one pooled level's feature map to ``box_rows`` (:class:`PooledBoxes`).

    A proposal pooled from an unablated level gets the unablated image's row for its box
    (computed once per image and box: :class:`ImageAblation`); only the proposals pooled from
    the ablated level run the box head on the ablated copy. The rows are the same as running
    every copy through the whole model (the row-wise box head gives each row from its own box
    and level)."""

    def __init__(self, rpn_plain, boxes: PooledBoxes, spec: DetectorSpec, make_session):
        from camexport.graph.cut import layer_tail

        settings = spec.settings
        self.spec, self.boxes = spec, boxes
        names = settings["rpn"]["levels"]
        self.level_outputs = level_outputs(spec)
        pieces = [_level_parts(rpn_plain, output, len(names)) for output in (OBJECTNESS, DELTAS)]
        heads = [layer_tail(rpn_plain, [level], [objectness, deltas], rows=False)
                 for level, objectness, deltas in zip(self.level_outputs, *pieces)]
        _check_frontiers(heads)
        self.heads = [make_session(cut.model) for cut in heads]
        self.head_parts = [tuple(p[k] for p in pieces) for k in range(len(names))]
        counts = [len(a) for a in anchors(settings["rpn"], settings["rpn"]["image_size"])]
        self.anchor_slices = [slice(int(s), int(s + c)) for s, c in zip(np.cumsum([0] + counts), counts)]

    def for_image(self, ran: RPNRun) -> ImageAblation:
        """The ablations of one image: ``ran`` the RPN graph's run on it, with its FPN levels."""
        rows = self.boxes.batch_rows(ran.levels, ran.chosen, len(ran.chosen[0]))
        return ImageAblation(self, [ran.objectness, ran.deltas, *ran.levels], ran.chosen[0], rows[0])


class ImageAblation:
    """:class:`LevelAblation` on one image: its unablated RPN outputs and levels, and the box
    rows of every box pooled from an unablated level met so far (a box's row does not depend
    on the ablation when its level is not the ablated one)."""

    def __init__(self, owner: LevelAblation, outputs: list[np.ndarray], proposals_: np.ndarray,
                 rows: np.ndarray):
        self.owner = owner
        self.objectness, self.deltas = (np.asarray(o, np.float32) for o in outputs[:2])
        self.levels = list(outputs[2:])
        boxes = np.ascontiguousarray(proposals_, np.float32)
        self.known = {box.tobytes(): row for box, row in zip(boxes, rows)}

    def __call__(self, channels: np.ndarray) -> np.ndarray:
        """The box rows (n, P, C, 5) of the image with flat channel ``channels[i]`` ablated in
        copy i (P: the RPN's post_nms_top_n; past each copy's proposals, rows that score 0)."""
        owner = self.owner
        offsets = np.cumsum([0] + [level.shape[1] for level in self.levels])
        channels = np.asarray(channels, np.int64)
        wrong = channels[(channels < 0) | (channels >= offsets[-1])]
        if len(wrong):
            raise DetectionError(f"channel {wrong[0]} is not one of the {offsets[-1]} channels (0 to "
                                 f"{offsets[-1] - 1}) of the stacked FPN levels")
        ablated = np.searchsorted(offsets, channels, side="right") - 1
        result = np.zeros((len(channels), *owner.spec.row_shape), np.float32)
        for level in np.unique(ablated):
            places = np.flatnonzero(ablated == level)
            for start in range(0, len(places), ABLATION_COPIES):
                at = places[start:start + ABLATION_COPIES]
                copies = np.repeat(self.levels[level], len(at), axis=0)
                for row, flat in enumerate(channels[at]):
                    copies[row, flat - offsets[level]] = np.float32(FPN_ABLATION_VALUE)
                found = self._proposals(level, copies)
                result[at] = self._rows(level, copies, found)
        return result

    def _proposals(self, level: int, copies: np.ndarray) -> list[np.ndarray]:
        """Each copy's proposals: the ablated level's part of the RPN outputs from its head,
        the other levels' the image's."""
        owner, settings = self.owner, self.owner.spec.settings
        part = owner.head_parts[level]
        objectness_part, deltas_part = owner.heads[level].run(list(part),
                                                              {owner.level_outputs[level]: copies})
        where = owner.anchor_slices[level]
        objectness = np.repeat(self.objectness.reshape(1, -1), len(copies), axis=0)
        deltas = np.repeat(self.deltas.reshape(1, -1, BOX), len(copies), axis=0)
        objectness[:, where] = objectness_part.reshape(len(copies), -1)
        deltas[:, where] = deltas_part.reshape(len(copies), -1, BOX)
        return proposals(objectness, deltas, settings["rpn"]["image_size"], settings["rpn"])

    def _rows(self, level: int, copies: np.ndarray, found: list[np.ndarray]) -> np.ndarray:
        """(n, P, C, 5): copy i's rows of its proposals ``found[i]`` (``level`` ablated)."""
        owner, settings = self.owner, self.owner.spec.settings
        pooled_at = [levels_of(boxes, settings["box"]) for boxes in found]
        pooled_levels = owner.boxes.pooled
        ablated_pooled = pooled_levels.index(level) if level in pooled_levels else -1
        # boxes on unablated levels: the image's rows, computed once per box
        missing = {}
        for boxes, pooled in zip(found, pooled_at):
            for box, k in zip(np.ascontiguousarray(boxes, np.float32), pooled):
                if k != ablated_pooled and box.tobytes() not in self.known:
                    missing.setdefault(int(k), {})[box.tobytes()] = box
        for k, boxes in missing.items():
            features = self.levels[pooled_levels[k]]
            ran = owner.boxes.rows(k, features, [np.asarray(list(boxes.values()))])[0]
            self.known.update(zip(boxes, ran))
        own = [boxes[pooled == ablated_pooled] for boxes, pooled in zip(found, pooled_at)]
        computed = (owner.boxes.rows(ablated_pooled, copies, own) if ablated_pooled >= 0 and
                    any(len(b) for b in own) else [None] * len(found))
        result = np.zeros((len(found), *owner.spec.row_shape), np.float32)
        for row, (boxes, pooled, mine) in enumerate(zip(found, pooled_at, computed)):
            boxes = np.ascontiguousarray(boxes, np.float32)
            reused = np.flatnonzero(pooled != ablated_pooled)
            if len(reused):
                result[row, reused] = np.stack([self.known[boxes[j].tobytes()] for j in reused])
            if mine is not None and len(mine):
                result[row, np.flatnonzero(pooled == ablated_pooled)] = mine
        return result


def _level_parts(plain, output: str, count: int) -> list[str]:
    """The per-level inputs of the Concat node that ``output`` is made from (through the
    single-input reshapes after it): torchvision's concat_box_prediction_layers."""
    producer = {name: node for node in plain.graph.node for name in node.output}
    node = producer.get(output)
    while node is not None and node.op_type != "Concat":
        node = producer.get(node.input[0])
    if node is None or len(node.input) != count:
        raise DetectionError(f"the RPN graph's {output!r} is not a Concat of its {count} levels' parts: "
                             f"AblationCAM cannot ablate one level; rebuild the artifact")
    return list(node.input)


def _pooled_from(box_plain, pooled_names: list[str], k: int):
    """A copy of the box graph in which the pooled features (the sum of every level's RoiAlign
    weighted by ``box_levels``) are level ``k``'s RoiAlign only: the same rows for boxes on
    that level, without pooling them on the others."""
    import onnx

    from camexport.graph.cut import computed_from

    graph = box_plain.graph
    pools = [next(n for n in graph.node if n.op_type == "RoiAlign" and n.input[0] == name)
             for name in pooled_names]
    reached = [computed_from(graph.node, [pool.output[0]]) for pool in pools]
    common = set.intersection(*reached)
    summed = next(name for node in graph.node for name in node.output if name in common)
    model = onnx.ModelProto()
    model.CopyFrom(box_plain)
    for node in model.graph.node:
        node.input[:] = [pools[k].output[0] if name == summed else name for name in node.input]
    return model


def pooled_features(box_plain, settings: dict) -> list[str]:
    """The names of the feature maps a box graph's RoiAlign nodes read, one per pooled level in
    the settings' order: the nodes come in BoxGraph's loop order, each at its level's
    ``spatial_scale`` (two levels may share a scale: MobileNet's FPN pools '0' and '1' at
    1/32)."""
    from onnx import helper

    nodes = [node for node in box_plain.graph.node if node.op_type == "RoiAlign"]
    scales = [float(next((helper.get_attribute_value(a) for a in node.attribute
                          if a.name == "spatial_scale"), 1.0)) for node in nodes]
    expected = [float(scale) for scale in settings["pool_scales"]]
    if len(nodes) != len(expected) or not np.allclose(scales, expected, rtol=1e-6, atol=0):
        raise DetectionError(f"the box graph pools at scales {scales}, not the settings' {expected}: "
                             f"it was not exported by this camexport; rebuild the artifact")
    return [node.input[0] for node in nodes]


