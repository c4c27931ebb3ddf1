"""Two-stage detectors (torchvision Faster R-CNN), step 1: the region proposals.

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
3. (Later) a second graph takes the image and the proposals and runs MultiScaleRoIAlign + the box
   head (camexport.graph.rules.roialign differentiates RoiAlign with run-time boxes).

The graph runs at a fixed input size: the model's resize (GeneralizedRCNNTransform's
min_size/max_size) and batch padding are not applied, so torchvision's padded size and image
size are both that size.
"""

from __future__ import annotations

import numpy as np

from camexport.detection import BOX, DetectionError, nms

#: The first two graph outputs; the FPN levels follow as ``fpn_<level name>``.
OBJECTNESS, DELTAS = "objectness", "rpn_deltas"
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

def _rpn_graph_class():
    import torch
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    class RPNGraph(torch.nn.Module):
        """Image in [0, 1] (B, 3, H, W) → (objectness (B, A), deltas (B, A, 4), *FPN levels)."""

        def __init__(self, model, size: tuple[int, int]):
            super().__init__()
            self.backbone, self.head = model.backbone, model.rpn.head
            transform = model.transform
            self.register_buffer("mean", torch.tensor(transform.image_mean).reshape(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(transform.image_std).reshape(1, 3, 1, 1))
            self.size = tuple(int(s) for s in size)
            with torch.no_grad():
                features = self.backbone(torch.zeros(1, 3, *self.size))
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
    from torchvision.models.detection import FasterRCNN

    if not isinstance(model, FasterRCNN):
        raise DetectionError(f"{type(model).__name__} is no torchvision Faster R-CNN")
    if len(size) != 2:
        raise DetectionError(f"a detector takes 2-D images; input size {size} has {len(size)} values")
    return _rpn_graph_class()(model.eval(), size).eval()


def name_outputs(plain, names) -> None:
    """Rename an exported graph's outputs to ``names`` (an RPNGraph's ``output_names``), in place."""
    for output, name in zip(plain.graph.output, names):
        old = output.name
        for node in plain.graph.node:
            node.output[:] = [name if o == old else o for o in node.output]
            node.input[:] = [name if i == old else i for i in node.input]
        output.name = name


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

