"""Fused CAM heads: the CAM method itself appended to the augmented graph (ONNX in, ONNX out).

For each fused method ``m`` and layer ``l`` the graph gains the output ``cam/<m>/<l>``, (B, H, W)
at the size of the model input: the method's raw map M_l from ``activation/<l>`` and
``gradient/<l>``, then pytorch-grad-cam's chain (reference §2.3) for that layer alone,
``n(R(n(relu(M_l))))``; with several layers also ``cam/<m>`` = ``n(mean_l R(n(relu(M_l))))``, what
pgc (and :class:`camexport.explain.Explainer`) returns for all the layers together. ``n`` is the
per-image min-max with eps 1e-7 added after subtracting the min; ``R`` is ONNX ``Resize``
(mode linear, half_pixel, no antialias), OpenCV's INTER_LINEAR. With ``uint8`` the heads are
``round(255 * cam)`` as uint8 instead of float32 in [0, 1].

Only default-domain ONNX ops are emitted (MatMul, Reduce*, Resize, ArgMax, Where, ...), so one
``session.run`` on any runtime gives the model's outputs and ready heatmaps.

EigenCAM has no SVD in ONNX. Per image, Y (h w x C) is the activation with each channel centred
over space, as the reference's P(A) (§2.7); its first right-singular vector v is the top
eigenvector of the smaller Gram matrix (Y Y^T or Y^T Y), found by a fixed number of repeated
squarings K <- K K / max|K K| (a power method whose power doubles each step: ``2**squarings``),
then one column of the result. The map is p = Y v. The reference applies no sign fix (Q9): its
sign is whatever numpy's LAPACK returns, which no rule reproduces (about half of random
matrices go either way). The fused head fixes it: **v is turned so that sum_c v_c >= 0**, the
map then rises where the channels fire together above their spatial means.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from camexport.graph.builder import Builder, GraphFacts
from camexport.graph.outputs import AugmentError, activation_name, gradient_name

# the numpy methods' own constants: a head and its method cannot drift apart
from camexport.methods.gradient import GRADCAM_PP_EPS, XGRADCAM_EPS
from camexport.methods.pipeline import NORM_EPS

#: Guards 0/0 in the power method for an all-zero (or NaN-only) activation; ours, far below
#: any float32 value a non-zero Gram matrix holds.
TINY = 1e-30
#: Default repeated squarings of the EigenCAM power method (power 2**12 = 4096), see
#: docs/fused-heads.md for the measured error per count.
EIGEN_SQUARINGS = 12

SPATIAL = (2, 3)
#: Emitted nodes are ``<head>/head/<k>`` with metadata ``camexport.head_of``.
HEAD_KIND = "head"


def cam_name(method: str, layer: str | None = None) -> str:
    """The output name of a fused head: ``cam/<method>/<layer>``, or ``cam/<method>`` for the
    mean over all layers."""
    return f"cam/{method}" if layer is None else f"cam/{method}/{layer}"


@dataclass
class LayerValues:
    """One layer's tensors inside the graph, channel first (B, C, h, w), float32."""

    acts: str
    grads: str | None
    channels: int
    height: int
    width: int
    squarings: int = EIGEN_SQUARINGS


# raw maps M (B, h, w), one function per method ------------------------------------------------

def gradcam_head(b: Builder, v: LayerValues) -> str:
    """GradCAM: M = sum_c mean_s(G) A."""
    weights = b.reduce("ReduceMean", v.grads, SPATIAL, keepdims=True)
    return _channel_sum(b, b.op("Mul", weights, v.acts))


def hirescam_head(b: Builder, v: LayerValues) -> str:
    """HiResCAM: M = sum_c G A."""
    return _channel_sum(b, b.op("Mul", v.grads, v.acts))


def gradcam_elementwise_head(b: Builder, v: LayerValues) -> str:
    """GradCAMElementWise: M = sum_c relu(G A)."""
    return _channel_sum(b, b.op("Relu", b.op("Mul", v.grads, v.acts)))


def gradcam_plus_plus_head(b: Builder, v: LayerValues) -> str:
    """GradCAM++ as pgc: alpha = G^2 / (2 G^2 + S G^3 + 1e-6), 0 where G = 0, S = sum_s A;
    w = sum_s relu(G) alpha; M = sum_c w A."""
    g2 = b.op("Mul", v.grads, v.grads)
    g3 = b.op("Mul", g2, v.grads)
    sums = b.reduce("ReduceSum", v.acts, SPATIAL, keepdims=True)
    denominator = b.op("Add", b.op("Add", b.op("Add", g2, g2), b.op("Mul", sums, g3)),
                       _f32(b, GRADCAM_PP_EPS))
    alpha = b.op("Where", b.op("Equal", v.grads, _f32(b, 0.0)), _f32(b, 0.0),
                 b.op("Div", g2, denominator))
    weights = b.reduce("ReduceSum", b.op("Mul", b.op("Relu", v.grads), alpha), SPATIAL)
    return _channel_sum(b, b.op("Mul", weights, v.acts))


def xgradcam_head(b: Builder, v: LayerValues) -> str:
    """XGradCAM: w = sum_s G A / (sum_s A + 1e-7); M = sum_c w A."""
    sums = b.reduce("ReduceSum", v.acts, SPATIAL, keepdims=True)
    ratio = b.op("Div", b.op("Mul", v.grads, v.acts), b.op("Add", sums, _f32(b, XGRADCAM_EPS)))
    return _channel_sum(b, b.op("Mul", b.reduce("ReduceSum", ratio, SPATIAL), v.acts))


def layercam_head(b: Builder, v: LayerValues) -> str:
    """LayerCAM: M = sum_c relu(G) A."""
    return _channel_sum(b, b.op("Mul", b.op("Relu", v.grads), v.acts))


def eigencam_head(b: Builder, v: LayerValues) -> str:
    """EigenCAM: M = Y v, v the first right-singular vector of the centred Y (h w x C), by
    repeated squaring of the smaller Gram matrix; sign such that sum_c v_c >= 0."""
    positions = v.height * v.width
    clean = b.op("Where", b.op("IsNaN", v.acts), _f32(b, 0.0), v.acts)
    rows = b.op("Transpose", b.op("Reshape", clean, b.ints([0, v.channels, positions])),
                perm=[0, 2, 1])
    rows = b.op("Sub", rows, b.reduce("ReduceMean", rows, [1], keepdims=True))
    columns = b.op("Transpose", rows, perm=[0, 2, 1])
    on_positions = positions <= v.channels
    if on_positions:  # Y Y^T: its top eigenvector u gives v along Y^T u
        vector = _top_eigenvector(b, b.op("MatMul", rows, columns), positions, v.squarings)
        vector = b.op("MatMul", columns, vector)
    else:  # Y^T Y: its top eigenvector is v
        vector = _top_eigenvector(b, b.op("MatMul", columns, rows), v.channels, v.squarings)
    total = b.reduce("ReduceSum", vector, [1], keepdims=True)
    sign = b.op("Where", b.op("Less", total, _f32(b, 0.0)), _f32(b, -1.0), _f32(b, 1.0))
    norm = b.op("Sqrt", b.reduce("ReduceSum", b.op("Mul", vector, vector), [1], keepdims=True))
    unit = b.op("Div", b.op("Mul", vector, sign), b.op("Add", norm, _f32(b, TINY)))
    projection = b.op("MatMul", rows, unit)  # (B, h w, 1)
    return b.op("Reshape", projection, b.ints([0, v.height, v.width]))


def _top_eigenvector(b: Builder, gram: str, size: int, squarings: int) -> str:
    """A multiple (B, size, 1) of the top eigenvector e of symmetric PSD (B, size, size) ``gram``:
    K <- K K / max|K K|, ``squarings`` times, then the column of K with the largest diagonal
    entry (K is then close to lambda e e^T, and that column is its most reliable multiple of e)."""
    power = _normalised(b, gram)
    for _ in range(squarings):
        power = _normalised(b, b.op("MatMul", power, power))
    diagonal = b.reduce("ReduceSum", b.op("Mul", power, b.array(np.eye(size, dtype=np.float32))),
                        [2], keepdims=False)
    pick = b.op("Cast", b.op("Equal", b.ints(range(size)),
                             b.op("ArgMax", diagonal, axis=1, keepdims=1)), to=TensorProto.FLOAT)
    return b.op("MatMul", power, b.unsqueeze(pick, [2]))


#: A fused head: the raw map M (B, h, w) of one layer's values, emitted through the builder.
#: Each method's registry row (camexport.methods.registry) points at its head.
Head = Callable[[Builder, LayerValues], str]


# shared pieces -----------------------------------------------------------------------------

def _f32(b: Builder, value: float) -> str:
    return b.array(np.array(value, dtype=np.float32))


def _channel_sum(b: Builder, elements: str) -> str:
    return b.reduce("ReduceSum", elements, [1], keepdims=False)


def _normalised(b: Builder, matrix: str) -> str:
    """matrix / max|matrix| per image (B, n, n): keeps the repeated squares in float32 range."""
    peak = b.reduce("ReduceMax", b.op("Abs", matrix), [1, 2], keepdims=True)
    return b.op("Div", matrix, b.op("Add", peak, _f32(b, TINY)))


def _min_max(b: Builder, maps: str) -> str:
    """n(X) per image over (H, W) of (B, H, W): (X - min) / (max(X - min) + 1e-7)."""
    shifted = b.op("Sub", maps, b.reduce("ReduceMin", maps, [1, 2]))
    return b.op("Div", shifted, b.op("Add", b.reduce("ReduceMax", shifted, [1, 2]),
                                     _f32(b, NORM_EPS)))


def _resize(b: Builder, maps: str, size: str) -> str:
    """(B, h, w) to (B, H, W), ``size`` the int64 [H, W]: bilinear, half-pixel, no antialias."""
    planes = b.unsqueeze(maps, [1])
    sizes = b.op("Concat", b.op("Slice", b.shape_of(planes), b.ints([0]), b.ints([2])), size, axis=0)
    resized = b.op("Resize", planes, "", "", sizes, mode="linear",
                   coordinate_transformation_mode="half_pixel")
    return b.op("Squeeze", resized, b.ints([1]))


def _channel_first(b: Builder, tensor: str, layout: Mapping, label: str) -> tuple[str, int, int, int]:
    """A layer tensor as float32 (B, C, h, w) and its static (C, h, w), as pgc's reshape
    transforms make it (camexport.methods.pipeline.to_channel_first)."""
    shape = b.facts.shape(tensor)
    kind = layout.get("kind")
    if b.facts.dtype(tensor) != TensorProto.FLOAT:
        tensor = b.op("Cast", tensor, to=TensorProto.FLOAT)
    if kind == "NCHW":
        channels, height, width = shape[1:]
    elif kind == "NHWC":
        height, width, channels = shape[1:]
        tensor = b.op("Transpose", tensor, perm=[0, 3, 1, 2])
    elif kind == "tokens" and layout.get("grid"):
        (height, width), prefix, channels = layout["grid"], layout["prefix_tokens"], shape[2]
        if prefix:
            tensor = b.op("Slice", tensor, b.ints([prefix]), b.ints([2**62]), b.ints([1]))
        tensor = b.op("Transpose", b.op("Reshape", tensor, b.ints([-1, height, width, channels])),
                      perm=[0, 3, 1, 2])
    else:
        raise AugmentError(f"layer {label!r} has layout {dict(layout)}: fused heads support NCHW, "
                         f"NHWC and token layers with a square grid")
    if None in (channels, height, width):
        raise AugmentError(f"layer {label!r} has shape {shape}: fused heads need static C, h and w")
    return tensor, channels, height, width


def is_head_node(node: onnx.NodeProto) -> bool:
    """Whether ``node`` was emitted by :func:`fuse` (its metadata says which head it serves)."""
    return any(p.key == f"camexport.{HEAD_KIND}_of" for p in node.metadata_props)


def fuse(
    model: onnx.ModelProto,
    layers: Sequence[Mapping],
    methods: Sequence[str],
    uint8: bool = False,
    squarings: int = EIGEN_SQUARINGS,
    image_layout: str = "NCHW",
) -> tuple[onnx.ModelProto, dict]:
    """A copy of the augmented ``model`` with fused CAM heads for ``methods`` on ``layers``
    (the manifest's layer records), and the manifest entry describing them."""
    from camexport.methods.registry import FUSABLE  # the registry imports our heads

    unknown = [m for m in methods if m not in FUSABLE]
    if unknown:
        raise AugmentError(f"cannot fuse {unknown}; fusable methods: {', '.join(FUSABLE)}")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    facts = GraphFacts(result)
    taken = {v for node in graph.node for v in (*node.input, *node.output)}
    taken |= {i.name for i in graph.input} | {t.name for t in graph.initializer}
    builder = Builder(facts, taken)
    builder.kind = HEAD_KIND
    image = graph.input[0].name
    builder.owner = "cam"
    first = 2 if image_layout == "NCHW" else 1
    size = builder.op("Slice", builder.shape_of(image), builder.ints([first]), builder.ints([first + 2]))

    with_gradients = any(method != "eigencam" for method in methods)
    values = [_layer_values(builder, layer, with_gradients, squarings) for layer in layers]
    heads = {}
    for method in methods:
        per_layer = []
        for layer, value in zip(layers, values):
            builder.owner = cam_name(method, layer["name"])
            raw = FUSABLE[method](builder, value)
            per_layer.append(_resize(builder, _min_max(builder, builder.op("Relu", raw)), size))
            heads[cam_name(method, layer["name"])] = _min_max(builder, per_layer[-1])
        if len(per_layer) > 1:
            builder.owner = cam_name(method)
            stacked = builder.op("Concat", *(builder.unsqueeze(q, [1]) for q in per_layer), axis=1)
            mean = builder.reduce("ReduceMean", builder.op("Relu", stacked), [1], keepdims=False)
            heads[cam_name(method)] = _min_max(builder, mean)

    if uint8:
        heads = {name: _as_uint8(builder, name, source) for name, source in heads.items()}
    _emit(result, builder, heads, uint8)
    entry = {"methods": list(methods), "outputs": list(heads), "dtype": "uint8" if uint8 else "float32",
             "eigen_squarings": squarings if "eigencam" in methods else None,
             "eigen_sign": "sum_c v_c >= 0" if "eigencam" in methods else None}
    return result, entry


def _layer_values(builder: Builder, layer: Mapping, with_gradients: bool, squarings: int) -> LayerValues:
    """One layer's activation (and gradient) channel first, with its sizes."""
    label = layer["name"]
    builder.owner = f"cam/{label}"
    acts, channels, height, width = _channel_first(builder, activation_name(label), layer["layout"], label)
    grads = None
    if with_gradients:
        grads, *_ = _channel_first(builder, gradient_name(label), layer["layout"], label)
    return LayerValues(acts, grads, channels, height, width, squarings)


def _as_uint8(builder: Builder, name: str, source: str) -> str:
    """round(255 * cam) as uint8."""
    builder.owner = name
    scaled = builder.op("Round", builder.op("Mul", source, _f32(builder, 255.0)))
    return builder.op("Cast", builder.op("Clip", scaled, _f32(builder, 0.0), _f32(builder, 255.0)),
                      to=TensorProto.UINT8)


def _emit(result: onnx.ModelProto, builder: Builder, heads: dict[str, str], uint8: bool) -> None:
    """Append the builder's nodes and the heads as graph outputs (B, height, width); check."""
    graph = result.graph
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    batch = batch.dim_param or (batch.dim_value or "batch")
    graph.node.extend(builder.nodes)
    for name, source in heads.items():
        node = helper.make_node("Identity", [source], [name], name=f"{name}/output")
        entry = node.metadata_props.add()
        entry.key, entry.value = f"camexport.{builder.kind}_of", name
        graph.node.append(node)
        graph.output.append(helper.make_tensor_value_info(
            name, TensorProto.UINT8 if uint8 else TensorProto.FLOAT, [batch, "height", "width"]))
    graph.initializer.extend(builder.initializers)
    onnx.checker.check_model(result)
