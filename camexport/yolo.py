"""Ultralytics YOLO (v8, YOLO11; detect) ONNX exports as camexport detectors.

``model.export(format="onnx")`` writes one output ``output0`` (B, 4 + K, A): per anchor the box
centre and size (x y w h, in letterboxed input pixels) and K class scores (already sigmoid).
:func:`detector_graph` turns such a graph into a camexport detector graph (ultralytics is not
needed, and never imported):

- the batch axis becomes free (exports are made at batch 1: Reshape shapes whose first value is
  that 1 get 0, "copy the input's batch");
- ``detections`` (B, A, 4 + K) = [x1, y1, x2, y2, score_0 … score_{K-1}], with Ultralytics'
  own ``xywh2xyxy`` (xy -/+ wh / 2), the layout of :mod:`camexport.detection`;
- ``fpn_stack``: the neck outputs (the tensors the Detect head's Conv branches read: P3, P4, P5)
  stacked as :func:`camexport.detection.stack_levels` does (|level| resized bilinearly to the
  coarsest level, concatenated on channels), the layer ``neck`` for EigenCAM.

:func:`postprocess` replays ``ultralytics.utils.nms.non_max_suppression`` in numpy with the
predictor's settings (:data:`ULTRALYTICS_NMS`), which the manifest records. Images are
letterboxed as Ultralytics' ``LetterBox`` does (:func:`camexport.data.letterbox`; the manifest's
preprocessing says ``"resize": "letterbox"``).
"""

from __future__ import annotations

import ast
import copy
import logging
import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from camexport.detection import (
    BOX,
    DETECTIONS,
    PROTOS,
    STACK,
    DetectionError,
    Detections,
    DetectorSpec,
    nms,
    rename_value,
)
from camexport.load import Preprocessing

log = logging.getLogger(__name__)

KIND = "yolo"
#: Ultralytics 8.4.190's predictor settings (cfg/default.yaml: conf 0.25 for predict, iou 0.7,
#: max_det 300, agnostic_nms False) and non_max_suppression's own (max_nms 30000: candidates
#: kept before NMS; max_wh 7680: the per-class box offset of its class-aware NMS).
ULTRALYTICS_NMS = {"conf": 0.25, "iou": 0.7, "max_det": 300, "max_nms": 30000, "max_wh": 7680,
                   "agnostic": False}
#: Ultralytics' LetterBox padding value (grey 114 of 255).
PAD_VALUE = 114
_MODULE = re.compile(r"^/model\.(\d+)/")


@dataclass
class LetterboxPreprocessing(Preprocessing):
    """Ultralytics' preprocessing: letterbox (keep the aspect, pad with 114), /255, RGB, no
    mean or std."""

    pad_value: int = PAD_VALUE

    def as_dict(self) -> dict:
        return {**super().as_dict(), "resize": "letterbox", "pad_value": self.pad_value}


#: Ultralytics tasks read as detectors: a segment model's rows carry its mask coefficients and
#: its graph the mask prototypes (camexport.detection.PROTOS), a pose model's rows its keypoints
DETECTOR_TASKS = ("detect", "segment", "pose")


def is_yolo(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is an Ultralytics detect, segment or pose export (its metadata says so)."""
    meta = {p.key: p.value for p in model.metadata_props}
    return meta.get("author") == "Ultralytics" and meta.get("task") in DETECTOR_TASKS


def _refuse_unsupported(meta: dict, model: onnx.ModelProto) -> None:
    if meta.get("end2end", "False") == "True" or "'nms': True" in meta.get("args", ""):
        raise DetectionError("this Ultralytics export has NMS inside the graph (end2end or nms=True): "
                             "its outputs are selected boxes, with no per-anchor rows to explain. "
                             "Export again with model.export(format='onnx', nms=False) (YOLOv8/YOLO11)")
    task = meta.get("task")
    wanted = 2 if task == "segment" else 1
    if len(model.graph.output) != wanted:
        raise DetectionError(f"an Ultralytics {task} export has {wanted} output(s) (rows (B, 4 + classes "
                             f"[+ extra], anchors){', mask prototypes' if wanted == 2 else ''}); this one "
                             f"has {len(model.graph.output)}")


def task_settings(task: str, extra: int, kpt_shape=None, protos=None) -> dict | None:
    """The spec's ``settings`` of an Ultralytics model whose rows hold ``extra`` values of the
    task's own after the class scores: a segment model's mask coefficients and prototype size,
    a pose model's keypoint shape (K, 2 or 3); None for detect."""
    if task == "detect":
        return None
    if task == "segment":
        return {"task": task, "mask_channels": extra, "proto_size": [int(s) for s in protos]}
    if task == "pose":
        shape = [int(s) for s in kpt_shape]
        if shape[0] * shape[1] != extra:
            raise DetectionError(f"this Ultralytics pose model's rows hold {extra} keypoint values, not "
                                 f"kpt_shape {shape[0]}x{shape[1]}")
        return {"task": task, "keypoint_shape": shape}
    raise DetectionError(f"Ultralytics {task} models are not detectors camexport reads")


def _constant(graph: onnx.GraphProto, name: str) -> onnx.TensorProto | None:
    """The tensor of an initializer or Constant node named ``name`` (None if neither)."""
    for tensor in graph.initializer:
        if tensor.name == name:
            return tensor
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return next((a.t for a in node.attribute if a.name == "value"), None)
    return None


def _free_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose batch axis is free: input and output dim 0 symbolic, constant Reshape shapes
    that start with the exported batch of 1 start with 0 (copy the input's dim) instead."""
    free = onnx.ModelProto()
    free.CopyFrom(model)
    graph = free.graph
    image, output = graph.input[0], graph.output[0]
    if image.type.tensor_type.shape.dim[0].dim_value != 1:
        return free
    for value in (image, output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del graph.value_info[:]
    for node in graph.node:
        tensor = _constant(graph, node.input[1]) if node.op_type == "Reshape" else None
        if tensor is None:
            continue
        shape = numpy_helper.to_array(tensor)
        if shape.ndim == 1 and len(shape) > 1 and shape[0] == 1:
            shape = shape.copy()
            shape[0] = 0
            tensor.CopyFrom(numpy_helper.from_array(shape, tensor.name))
    return free


def _shape_values(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    """The values of the tensors computed from constants and Shape outputs alone (the shape
    arithmetic of torch's exporter: ``chunk``'s split points), with the input's batch axis at
    ``batch``."""
    sized = onnx.ModelProto()
    sized.CopyFrom(model)
    sized.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    shapes = _static_shapes(sized)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        args = [values.get(name) for name in node.input if name]
        if node.op_type == "Constant" and "value" in attrs:
            values[node.output[0]] = numpy_helper.to_array(attrs["value"])
        elif node.op_type == "Shape":
            shape = shapes.get(node.input[0])
            if shape is not None and None not in shape:
                values[node.output[0]] = np.asarray(shape, np.int64)[attrs.get("start", 0):attrs.get("end")]
        elif node.op_type in _SHAPE_OPS and args and all(a is not None for a in args):
            values[node.output[0]] = np.asarray(_SHAPE_OPS[node.op_type](*args, **attrs))
    return values


def _divide(a, b):
    return a / b if np.issubdtype(np.result_type(a, b), np.floating) else np.trunc(a / b).astype(a.dtype)


def _slice(data, starts, ends, axes=None, steps=None):
    index = [slice(None)] * data.ndim
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for axis, start, end, step in zip(axes, starts, ends, steps):
        index[axis] = slice(int(start), int(end), int(step))
    return data[tuple(index)]


#: Shape arithmetic that :func:`_fold_shapes` evaluates (numpy, ONNX semantics).
_SHAPE_OPS = {
    "Gather": lambda data, indices, axis=0: np.take(data, indices, axis=axis),
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _divide,
    "Concat": lambda *parts, axis: np.concatenate([np.atleast_1d(p) for p in parts], axis=axis),
    "Unsqueeze": lambda data, axes: np.expand_dims(data, tuple(int(a) for a in axes)),
    "Squeeze": lambda data, axes=None: np.squeeze(data, None if axes is None else tuple(map(int, axes))),
    "Slice": _slice,
    "Cast": lambda data, to: data.astype(helper.tensor_dtype_to_np_dtype(to)),
}


def _fold_shapes(model: onnx.ModelProto) -> None:
    """Replace shape arithmetic whose value does not depend on the batch size by constants, in
    place (gradient rules need constant Slice starts and Reshape shapes); dead nodes go."""
    one, two = _shape_values(model, 1), _shape_values(model, 2)
    graph = model.graph
    known = {t.name for t in graph.initializer}
    folded = {}
    for node in graph.node:
        for name in node.input:
            if (name and name not in known and name in one and name in two
                    and one[name].shape == two[name].shape and np.array_equal(one[name], two[name])):
                folded[name] = f"{name}/folded"
        node.input[:] = [folded.get(name, name) for name in node.input]
    for name, new in folded.items():
        graph.initializer.append(numpy_helper.from_array(np.asarray(one[name]), new))
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):  # graph order is topological: consumers come later
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = {name for node in graph.node for name in node.input}
    alive = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(alive)


def neck_outputs(model: onnx.ModelProto) -> list[str]:
    """The tensors the Detect head's Conv branches read (the last ``/model.N/`` module's Conv
    inputs made outside it), in graph order (P3, P4, P5)."""
    indices = [int(m.group(1)) for n in model.graph.node if (m := _MODULE.match(n.name))]
    if not indices:
        raise DetectionError("cannot find the Detect head: no node is named /model.N/… (Ultralytics' "
                             "ONNX export names them so; export with model.export(format='onnx'))")
    head = f"/model.{max(indices)}/"
    made_inside = {o for n in model.graph.node if n.name.startswith(head) for o in n.output}
    found = []
    for node in model.graph.node:
        if node.name.startswith(head) and node.op_type == "Conv":
            value = node.input[0]
            if value not in made_inside and value not in found:
                found.append(value)
    if not found:
        raise DetectionError(f"the Detect head {head} reads no feature map through a Conv")
    return found


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]
    return {v.name: tuple(d.dim_value if d.HasField("dim_value") else None
                          for d in v.type.tensor_type.shape.dim) for v in values}


def _append_heads(model: onnx.ModelProto, levels: list[str], shapes: dict, classes: int) -> None:
    """``detections`` (xywh -> xyxy rows, the ``classes`` scores, then a segment or pose model's
    own columns) and ``fpn_stack`` (the neck levels stacked), in place, replacing ``output0`` as
    the graph's outputs (a segment model's prototypes ``output1`` stay, renamed :data:`PROTOS`)."""
    graph = model.graph
    raw = graph.output[0].name
    columns = shapes[raw][1]
    protos = graph.output[1] if len(graph.output) > 1 else None

    def const(name, values, dtype=np.int64):
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype), f"yolo/{name}"))
        return f"yolo/{name}"

    def node(op, inputs, name, **attrs):
        graph.node.append(helper.make_node(op, inputs, [name], name=f"{name}/{op}", **attrs))
        return name

    rows = node("Transpose", [raw], "yolo/rows", perm=[0, 2, 1])
    axis = const("axis", [2])

    def part(name, start, stop):
        return node("Slice", [rows, const(f"{name}_start", [start]), const(f"{name}_stop", [stop]), axis],
                    f"yolo/{name}")

    centre, size, scores = part("xy", 0, 2), part("wh", 2, BOX), part("scores", BOX, columns)
    half = node("Div", [size, const("two", 2.0, np.float32)], "yolo/half_wh")  # xywh2xyxy: wh / 2
    top_left = node("Sub", [centre, half], "yolo/x1y1")
    bottom_right = node("Add", [centre, half], "yolo/x2y2")
    node("Concat", [top_left, bottom_right, scores], DETECTIONS, axis=2)  # scores and extra columns
    coarsest = min(levels, key=lambda v: shapes[v][2] * shapes[v][3])
    hw = const("stack_hw", shapes[coarsest][2:])
    empty = const("empty", [], np.float32)
    resized = []
    for k, level in enumerate(levels):
        magnitude = node("Abs", [level], f"yolo/stack/{k}/abs")
        batch_channels = node("Shape", [magnitude], f"yolo/stack/{k}/nc", start=0, end=2)
        sizes = node("Concat", [batch_channels, hw], f"yolo/stack/{k}/sizes", axis=0)
        # torch's bilinear, align_corners False, no antialias (pgc's reshape transform)
        resized.append(node("Resize", [magnitude, empty, empty, sizes], f"yolo/stack/{k}/resized",
                            mode="linear", coordinate_transformation_mode="half_pixel"))
    node("Concat", resized, STACK, axis=1)
    channels = sum(shapes[v][1] for v in levels)
    del graph.output[:]
    float32 = onnx.TensorProto.FLOAT
    graph.output.extend([
        helper.make_tensor_value_info(DETECTIONS, float32, ["batch", shapes[raw][2], columns]),
        helper.make_tensor_value_info(STACK, float32, ["batch", channels, *shapes[coarsest][2:]])])
    if protos is not None:
        rename_value(graph, protos.name, PROTOS)
        shape = ["batch", *shapes[protos.name][1:]]
        graph.output.append(helper.make_tensor_value_info(PROTOS, float32, shape))


def detector_graph(model: onnx.ModelProto,
                   size: tuple[int, int] | None = None) -> tuple[onnx.ModelProto, DetectorSpec]:
    """The camexport detector graph of an Ultralytics detect export and its spec. ``size``:
    the input size asked for (needed only when the export's height and width are free)."""
    from camexport.export import pin_input_shape

    meta = {p.key: p.value for p in model.metadata_props}
    _refuse_unsupported(meta, model)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    exported = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[2:])
    if None in exported:
        if size is None:
            raise DetectionError("this Ultralytics export has free height and width (dynamic=True): "
                                 "pass --input-size H W (multiples of its stride, 32)")
        exported = tuple(size)
    elif size is not None and tuple(size) != exported:
        raise DetectionError(f"this Ultralytics export takes {exported[0]}x{exported[1]} images "
                             f"(imgsz at export), not {size[0]}x{size[1]}: leave --input-size out, "
                             f"or export again with model.export(format='onnx', imgsz={list(size)})")
    graph = _free_batch(pin_input_shape(model, exported))
    _fold_shapes(graph)
    levels = neck_outputs(graph)
    shapes = _static_shapes(graph)
    raw = shapes[graph.graph.output[0].name]
    if len(raw) != 3 or raw[1] is None or raw[1] <= BOX or raw[2] is None:
        raise DetectionError(f"the export's output {graph.graph.output[0].name} is {raw}; a detect "
                             f"model's is (batch, 4 + classes, anchors)")
    task = meta.get("task", "detect")
    classes = raw[1] - BOX if task == "detect" else len(ast.literal_eval(meta.get("names", "{}")))
    protos = shapes[graph.graph.output[1].name][2:] if task == "segment" else None
    kpt_shape = ast.literal_eval(meta["kpt_shape"]) if task == "pose" else None
    extra = raw[1] - BOX - classes
    settings = task_settings(task, extra, kpt_shape, protos)
    _append_heads(graph, levels, shapes, classes)
    onnx.checker.check_model(graph)
    return graph, yolo_spec(classes, raw[2], exported, levels, extra, settings)


def yolo_spec(classes: int, anchors: int, size, levels, extra: int = 0, settings: dict | None = None
              ) -> DetectorSpec:
    """The spec of an Ultralytics detector graph: its rows (anchors, 4 + ``classes`` +
    ``extra``), Ultralytics' predictor settings (:data:`ULTRALYTICS_NMS`), the neck ``levels``
    and the task's :func:`task_settings`."""
    nms_ = ULTRALYTICS_NMS
    return DetectorSpec(kind=KIND, classes=int(classes), level_sizes=(int(anchors),),
                        image_size=tuple(int(s) for s in size), score_thresh=nms_["conf"],
                        nms_thresh=nms_["iou"], detections_per_img=nms_["max_det"],
                        topk_candidates=nms_["max_nms"], levels=tuple(levels),
                        class_offset=float(nms_["max_wh"]), agnostic=nms_["agnostic"], extra=int(extra),
                        settings=settings)


def wrap(loaded, default_size: tuple[int, int]) -> DetectorSpec | None:
    """Replace a loaded Ultralytics detect export by its detector graph (see the module
    docstring) and its preprocessing by the letterbox; the spec, or None for any other ONNX.
    ``default_size``: the preprocessing size when no --input-size was given."""
    if loaded.onnx_model is None or not is_yolo(loaded.onnx_model):
        return None
    asked = tuple(loaded.preprocessing.size)
    graph, spec = detector_graph(loaded.onnx_model, None if asked == tuple(default_size) else asked)
    if asked != spec.image_size:
        log.info("Ultralytics export: input size %s (as exported)", "x".join(map(str, spec.image_size)))
    loaded.onnx_model = graph
    loaded.preprocessing = LetterboxPreprocessing(size=spec.image_size, mean=(0.0, 0.0, 0.0),
                                                  std=(1.0, 1.0, 1.0))
    return spec


# -- post-processing (Ultralytics' non_max_suppression, in numpy) -----------------------------

def postprocess(rows: np.ndarray, spec: DetectorSpec) -> Detections:
    """One image's detections from its rows (A, 4 + K) as ``non_max_suppression`` with
    multi_label False: each anchor's best class, kept when its score > ``score_thresh``; the
    best ``topk_candidates`` (max_nms); NMS (IoU > ``nms_thresh`` dropped) on the boxes offset
    by label x ``class_offset`` (class-aware; 0 when ``agnostic``); the best
    ``detections_per_img``."""
    labels = np.argmax(rows[:, BOX:BOX + spec.classes], axis=1)
    scores = rows[np.arange(len(rows)), BOX + labels]
    anchors = np.flatnonzero(scores > spec.score_thresh)
    if len(anchors) > spec.topk_candidates:
        anchors = anchors[np.argsort(-scores[anchors], kind="stable")[:spec.topk_candidates]]
    boxes, labels, scores = rows[anchors, :BOX], labels[anchors], scores[anchors]
    offset = np.float32(0 if spec.agnostic else spec.class_offset)
    shifted = boxes + (labels.astype(np.float32) * offset)[:, None]
    keep = nms(shifted, scores, spec.nms_thresh, spec.detections_per_img)
    return Detections(boxes[keep], scores[keep], labels[keep], anchors[keep])


def instance_masks(coefficients: np.ndarray, protos: np.ndarray, boxes: np.ndarray,
                   image_size) -> np.ndarray:
    """(n, h, w) uint8 0/1: a segment model's masks of n detections at the prototypes'
    resolution, as Ultralytics' ``process_mask(..., upsample=False)``: the mask coefficients
    (n, M) times the prototypes (M, h, w), above 0 (sigmoid above 0.5), cropped to each box
    (x1 y1 x2 y2 in input pixels of ``image_size`` (H, W), scaled to the prototypes: the
    pixels whose index c satisfies x1 <= c < x2, likewise rows)."""
    channels, height, width = protos.shape
    logits = (np.asarray(coefficients, np.float32) @ protos.reshape(channels, -1)).reshape(-1, height, width)
    ratios = np.asarray([width / image_size[1], height / image_size[0]] * 2, np.float32)
    scaled = np.asarray(boxes, np.float32).reshape(-1, BOX) * ratios
    columns, rows = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    inside_x = (columns >= scaled[:, 0:1]) & (columns < scaled[:, 2:3])
    inside_y = (rows >= scaled[:, 1:2]) & (rows < scaled[:, 3:4])
    return ((logits > 0) & inside_y[:, :, None] & inside_x[:, None, :]).astype(np.uint8)


# -- Ultralytics models (a .pt checkpoint or a yaml), exported by camexport itself ------------

#: Ultralytics' default image size (cfg/default.yaml imgsz) for the models camexport exports
DEFAULT_SIZE = {"detect": 640, "segment": 640, "pose": 640, "classify": 224}


def ultralytics_task(module) -> str | None:
    """'detect', 'classify' (or another Ultralytics task name) for an Ultralytics model module
    (``DetectionModel``, ``ClassificationModel``, ...), None for any other module."""
    if not type(module).__module__.startswith("ultralytics.") or not hasattr(module, "save"):
        return None
    head = type(module.model[-1]).__name__
    return {"Detect": "detect", "Classify": "classify", "Segment": "segment", "Pose": "pose",
            "OBB": "obb"}.get(head, head)


def check_task(task: str, where: str) -> None:
    """Refuse Ultralytics tasks camexport cannot export yet, naming the ones it can."""
    if task not in DEFAULT_SIZE:
        raise DetectionError(f"{where} is an Ultralytics {task} model; camexport exports detect, "
                             f"segment, pose and classify models from PyTorch (OBB heads are not yet "
                             f"supported)")


def _layers(graph, x):
    """Ultralytics' ``_predict_once`` up to its head: the head's inputs."""
    saved = []
    for index in range(len(graph.model) - 1):  # by index: a slice would rename the layers
        module = graph.model[index]
        if module.f != -1:
            x = saved[module.f] if isinstance(module.f, int) else [x if j == -1 else saved[j]
                                                                   for j in module.f]
        x = module(x)
        saved.append(x if module.i in graph.save else None)
    head = graph.model[-1].f
    if isinstance(head, int):
        return x if head == -1 else saved[head]
    return [x if j == -1 else saved[j] for j in head]


def _module_graph_classes():
    import torch

    from camexport.detection import stack_levels

    class YoloGraph(torch.nn.Module):
        """An Ultralytics DetectionModel as a camexport detector graph: image in [0, 1]
        (B, 3, H, W) → (detections (B, A, 4 + K [+ extra]) xyxy + sigmoid scores (a segment
        model's mask coefficients, a pose model's decoded keypoints after them), fpn_stack[, a
        segment model's mask prototypes]). Its layers
        keep Ultralytics' names (``model.N``, as in Ultralytics' own ONNX exports). The Detect
        head's anchors are computed once at ``size``, so the batch axis exports free."""

        def __init__(self, model, size: tuple[int, int]):
            super().__init__()
            from ultralytics.utils.tal import make_anchors

            model = copy.deepcopy(model).float().eval()
            self.model, self.save = model.model, set(model.save)
            head = self.model[-1]
            if getattr(head, "end2end", False):
                raise DetectionError("this Ultralytics model has an end-to-end (NMS-free) head: its "
                                     "outputs are selected boxes, with no per-anchor rows to explain")
            self.size = tuple(int(s) for s in size)
            with torch.no_grad():
                levels = _layers(self, torch.zeros(1, 3, *self.size))
            anchors, strides = (a.transpose(0, 1) for a in make_anchors(levels, head.stride, 0.5))
            self.register_buffer("anchors", anchors.unsqueeze(0))
            self.register_buffer("strides", strides)
            self.necks = tuple(int(i) for i in head.f)
            self.task = ultralytics_task(model)
            kpt_shape, protos = getattr(head, "kpt_shape", None), None
            if self.task == "segment":
                with torch.no_grad():
                    protos = head.proto(levels[0]).shape[-2:]
            extra = {"segment": getattr(head, "nm", 0), "pose": getattr(head, "nk", 0)}.get(self.task, 0)
            settings = task_settings(self.task, extra, kpt_shape, protos)
            self.spec = yolo_spec(head.nc, anchors.shape[-1], self.size,
                                  [f"model.{i}" for i in self.necks], extra, settings)

        def forward(self, x):
            head = self.model[-1]
            levels = _layers(self, x)
            raw = head.forward_head(levels, **head.one2many)
            box = head.decode_bboxes(head.dfl(raw["boxes"]), self.anchors) * self.strides
            centre, size = box[:, :2], box[:, 2:]
            half = size / 2  # Ultralytics' xywh2xyxy, as the ONNX path rewrites it
            columns = [centre - half, centre + half, raw["scores"].sigmoid()]
            if self.task == "segment":
                columns.append(raw["mask_coefficient"])
            elif self.task == "pose":
                columns.append(self._keypoints(head, raw["kpts"]))
            rows = torch.cat(columns, 1).transpose(1, 2)
            if self.task == "segment":
                return rows, stack_levels(levels), head.proto(levels[0])
            return rows, stack_levels(levels)

        def _keypoints(self, head, kpts):
            """Ultralytics' Pose.kpts_decode (its export branch) on this graph's anchors:
            (B, K x D, A) pixel x, y (and the sigmoid of the visibility)."""
            batch, (count, dims) = kpts.shape[0], head.kpt_shape
            y = kpts.view(batch, count, dims, -1)
            xy = (y[:, :, :2] * 2.0 + (self.anchors[0] - 0.5)) * self.strides
            if dims == 3:
                xy = torch.cat((xy, y[:, :, 2:3].sigmoid()), 2)
            return xy.view(batch, count * dims, -1)

    class YoloClassifier(torch.nn.Module):
        """An Ultralytics ClassificationModel returning its logits (B, K) (its Classify head
        returns probabilities and logits in eval): a classifier like any other."""

        def __init__(self, model):
            super().__init__()
            model = copy.deepcopy(model).float().eval()
            self.model, self.save = model.model, set(model.save)

        def forward(self, x):
            return self.model[-1](_layers(self, x))[1]

    return YoloGraph, YoloClassifier


def wrap_module(loaded) -> DetectorSpec | None:
    """Replace a loaded Ultralytics detect model by its :class:`YoloGraph` at the loaded size
    (the letterbox preprocessing), a classify model by its logits; the detector spec, or None
    for a classifier or any other module."""
    task = ultralytics_task(loaded.module)
    if task is None:
        return None
    check_task(task, loaded.source)
    graph_class, classifier_class = _module_graph_classes()
    size = tuple(loaded.preprocessing.size)
    if task == "classify":
        loaded.module = classifier_class(loaded.module).eval()
        return None
    stride = int(max(loaded.module.stride))
    if len(size) != 2 or any(s % stride for s in size):
        raise DetectionError(f"an Ultralytics {task} model takes images whose sides are multiples of "
                             f"its stride {stride}; --input-size {'x'.join(map(str, size))} is not: "
                             f"pass e.g. --input-size {DEFAULT_SIZE['detect']} {DEFAULT_SIZE['detect']}")
    graph = graph_class(loaded.module, size).eval()
    loaded.module = graph
    loaded.preprocessing = LetterboxPreprocessing(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return graph.spec


def spread_random_scores(model, x: np.ndarray, class_std: float = 0.1, class_bias: float = -3.0) -> None:
    """Make a random-weight Ultralytics detect model (built from its yaml) give usable
    detections, in place, for tests and benchmarks (no trained weights are reachable here).

    A random YOLO's activations shrink about tenfold per block (1e-10 at the neck) and its prior
    class bias (about -10) gives every anchor the same score: ties everywhere. So the class
    branches' last convolutions get weights N(0, ``class_std``) and bias ``class_bias`` (scores
    spread over 0.1-0.9), the box branches' DFL logits a bias falling with the bin (box sides of
    a few strides rather than 7.5), and the batch-norm statistics are those of the images ``x``
    (B, 3, H, W) letterboxed in [0, 1] (activations of unit scale at every depth)."""
    import torch

    detect = model.model[-1]
    with torch.no_grad():
        for branch in detect.cv3:
            branch[-1].weight.normal_(0, class_std)
            branch[-1].bias.fill_(class_bias)
        for branch in detect.cv2:
            branch[-1].weight.mul_(0.2)
            branch[-1].bias.copy_(-0.5 * torch.arange(detect.reg_max).repeat(4))
        for norm in model.modules():
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.momentum = None
                norm.reset_running_stats()
        model.train()
        model(torch.tensor(x))
        model.eval()
