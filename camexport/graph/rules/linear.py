"""Rules of linear algebra, convolution, resizing, pooling and normalisation."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from camexport.graph.rules.table import attr, const_input, each_input, input_at, none_but, rule

# -- linear algebra ----------------------------------------------------------------------

def _swap_last(b, x: str) -> str:
    rank = b.facts.rank(x)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return b.op("Transpose", x, perm=perm)


@rule("MatMul")
def _matmul(b, node, dys):
    """Y = A @ B: dA = dY @ B^T, dB = A^T @ dY (batch axes summed to each shape)."""
    a, m = node.input[0], node.input[1]
    if b.facts.rank(a) < 2 or b.facts.rank(m) < 2:
        raise NotImplementedError("MatMul with a 1-D operand")
    return each_input(b, node, lambda i: b.op("MatMul", dys[0], _swap_last(b, m)) if i == 0
                       else b.op("MatMul", _swap_last(b, a), dys[0]))


@rule("Gemm")
def _gemm(b, node, dys):
    """Y = alpha op(A) op(B) + beta C: dA = alpha dY op(B)^T, dB = alpha op(A)^T dY, dC = beta dY."""
    a, m, dy = node.input[0], node.input[1], dys[0]
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    ta, tb = attr(node, "transA", 0), attr(node, "transB", 0)
    da = db = dc = None
    if b.needs(a):
        da = (b.op("Gemm", m, dy, alpha=alpha, transA=tb, transB=1) if ta else
              b.op("Gemm", dy, m, alpha=alpha, transB=1 - tb))
    if b.needs(m):
        db = (b.op("Gemm", dy, a, alpha=alpha, transA=1, transB=ta) if tb else
              b.op("Gemm", a, dy, alpha=alpha, transA=1 - ta))
    if input_at(node, 2) and b.needs(node.input[2]):
        scaled = dy if beta == 1.0 else b.op("Mul", dy, b.const(beta, node.output[0]))
        dc = b.unbroadcast(scaled, node.input[2], node.output[0])
    return [da, db, dc][: len(node.input)]


# -- convolution, pooling, normalisation ---------------------------------------------------

def explicit_pads(b, node, x: str, kernel: list[int], strides, dilations) -> list[int]:
    """The begin/end pads of a Conv or pool node, resolving auto_pad from static sizes."""
    spatial = b.facts.shape(x)[2:]
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        return list(attr(node, "pads", [0] * (2 * len(kernel))))
    if auto_pad == "VALID":
        return [0] * (2 * len(kernel))
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(large if auto_pad == "SAME_LOWER" else small)
        ends.append(small if auto_pad == "SAME_LOWER" else large)
    return begins + ends


def _transpose_conv(b, node, dy: str, weight: str, kernel: list[int], group: int,
                    pads: list[int] | None = None) -> str:
    """dX of a Conv-like node: ConvTranspose of dY with the node's own geometry (``pads``: its
    explicit pads, by default)."""
    x = node.input[0]
    n = len(kernel)
    strides = list(attr(node, "strides", [1] * n))
    dilations = list(attr(node, "dilations", [1] * n))
    pads = pads or explicit_pads(b, node, x, kernel, strides, dilations)
    in_sizes, out_sizes = _static_sizes(b, node)
    output_padding = [
        size - ((o - 1) * s - pads[i] - pads[i + n] + d * (k - 1) + 1)
        for i, (size, o, s, d, k) in enumerate(zip(in_sizes, out_sizes, strides, dilations, kernel))
    ]
    return b.op("ConvTranspose", dy, weight, strides=strides, dilations=dilations, pads=pads,
                group=group, kernel_shape=kernel, output_padding=output_padding)


def _flipped_conv(b, node, dy: str, weight: str, kernel: list[int], group: int) -> str | None:
    """dX of a stride-1 Conv as a Conv of dY (onnxruntime's Conv is 1.6x faster than its
    ConvTranspose on a 3x3 kernel, 3.5x on a depthwise one): the kernel's input and output
    channels swapped within each group and its taps reversed, pads d(k-1) - p on each side. The
    kernel is rearranged by Reshape/Transpose/Slice of the weight (onnxruntime folds them when
    the weight is an initializer). None where that does not apply (strides above 1, pads beyond
    the kernel's reach)."""
    x = node.input[0]
    n = len(kernel)
    strides = list(attr(node, "strides", [1] * n))
    dilations = list(attr(node, "dilations", [1] * n))
    if any(s != 1 for s in strides):
        return None
    pads = explicit_pads(b, node, x, kernel, strides, dilations)
    flipped_pads = [d * (k - 1) - p for p, d, k in zip(pads, dilations * 2, kernel * 2)]
    shape = b.facts.shape(weight)
    if min(flipped_pads) < 0 or shape is None or any(not isinstance(v, int) for v in shape):
        return None
    out_channels, in_per_group = shape[0], shape[1]
    grouped = b.op("Reshape", weight, b.ints([group, out_channels // group, in_per_group, *kernel]))
    swapped = b.op("Transpose", grouped, perm=[0, 2, 1, *range(3, 3 + n)])
    merged = b.op("Reshape", swapped, b.ints([group * in_per_group, out_channels // group, *kernel]))
    axes = list(range(2, 2 + n))
    reversed_taps = b.op("Slice", merged, b.ints([-1] * n), b.ints([-(2 ** 62)] * n), b.ints(axes),
                         b.ints([-1] * n))
    return b.op("Conv", dy, reversed_taps, strides=strides, dilations=dilations, pads=flipped_pads,
                group=group, kernel_shape=kernel)


@rule("Conv")
def _conv(b, node, dys):
    """Y = Conv(X, W) + B: dX = ConvTranspose(dY, W) with the same strides, pads, dilations; for
    stride 1, the Conv of dY with the rearranged kernel (:func:`_flipped_conv`), which is the
    same sum."""
    weight = node.input[1]
    if b.needs(weight):
        raise NotImplementedError("Conv with a differentiated weight")
    kernel = list(b.facts.shape(weight)[2:])
    group = attr(node, "group", 1)
    dx = _flipped_conv(b, node, dys[0], weight, kernel, group)
    if dx is None:
        dx = _transpose_conv(b, node, dys[0], weight, kernel, group)
    return none_but(dx, node)


@rule("ConvTranspose")
def _conv_transpose(b, node, dys):
    """Y = ConvTranspose(X, W) + B: dX = Conv(dY, W) with the same strides, pads, dilations, group."""
    x, weight = node.input[0], node.input[1]
    if b.needs(weight):
        raise NotImplementedError("ConvTranspose with a differentiated weight")
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "") or attr(node, "output_shape"):
        raise NotImplementedError("ConvTranspose with auto_pad or output_shape; re-export it "
                                  "with explicit pads")
    n = b.facts.rank(x) - 2
    dx = b.op("Conv", dys[0], weight, strides=list(attr(node, "strides", [1] * n)),
              dilations=list(attr(node, "dilations", [1] * n)),
              pads=list(attr(node, "pads", [0] * (2 * n))), group=attr(node, "group", 1),
              kernel_shape=list(b.facts.shape(weight)[2:]))
    return none_but(dx, node)


def resize_matrix(n_in: int, n_out: int, scale: float, mode: str, coordinate: str,
                  nearest_mode: str = "round_prefer_floor") -> np.ndarray:
    """(n_out, n_in) float64 M with Y = M X along one axis, as ONNX Resize (antialias 0) for
    ``mode`` nearest or linear; ``scale`` = n_out / n_in unless the node gives scales."""
    i = np.arange(n_out, dtype=np.float64)
    single = np.zeros(n_out)
    x = {"half_pixel": (i + 0.5) / scale - 0.5,
         "pytorch_half_pixel": (i + 0.5) / scale - 0.5 if n_out > 1 else single,
         "align_corners": i * (n_in - 1) / max(n_out - 1, 1) if n_out > 1 else single,
         "asymmetric": i / scale}.get(coordinate)
    if x is None or mode not in ("nearest", "linear"):
        raise NotImplementedError(f"Resize with mode {mode!r}, coordinate_transformation_mode "
                                  f"{coordinate!r}; nearest and linear with half_pixel, "
                                  f"pytorch_half_pixel, align_corners or asymmetric are supported")
    m, rows = np.zeros((n_out, n_in)), np.arange(n_out)
    if mode == "nearest":
        half = x % 1 == 0.5
        pick = {"round_prefer_floor": np.where(half, np.floor(x), np.round(x)),
                "round_prefer_ceil": np.where(half, np.ceil(x), np.round(x)),
                "floor": np.floor(x), "ceil": np.ceil(x)}[nearest_mode]
        m[rows, np.clip(pick, 0, n_in - 1).astype(int)] = 1
        return m
    x = np.clip(x, 0, n_in - 1)
    low = np.floor(x).astype(int)
    np.add.at(m, (rows, low), 1 - (x - low))
    np.add.at(m, (rows, np.minimum(low + 1, n_in - 1)), x - low)
    return m


@rule("Resize", since=11)
def _resize(b, node, dys):
    """Y = Resize(X) is linear along each resized axis a (Y = M_a X, M from resize_matrix):
    dX = M_a^T dY on each axis, as a MatMul on the last axis (Transpose around it)."""
    x, y = node.input[0], node.output[0]
    if attr(node, "antialias", 0) or attr(node, "axes") is not None:
        raise NotImplementedError("Resize with antialias or axes")
    shape_in, shape_out = b.facts.shape(x), b.facts.shape(y)
    if None in shape_in[1:] or None in shape_out[1:]:
        raise NotImplementedError("Resize needs static sizes")
    scales = const_input(b, node, 2, "scales")
    if scales is None or not scales.size:
        scales = [1.0] + [o / i for i, o in zip(shape_in[1:], shape_out[1:])]
    mode = (attr(node, "mode", "nearest"), attr(node, "coordinate_transformation_mode", "half_pixel"),
            attr(node, "nearest_mode", "round_prefer_floor"))
    grad, rank = dys[0], len(shape_in)
    for axis in range(1, rank):
        m = resize_matrix(shape_in[axis], shape_out[axis], float(scales[axis]), *mode)
        if m.shape[0] == m.shape[1] and np.array_equal(m, np.eye(len(m))):
            continue
        swap = list(range(rank))
        swap[axis], swap[-1] = swap[-1], swap[axis]
        grad = grad if axis == rank - 1 else b.op("Transpose", grad, perm=swap)
        grad = b.op("MatMul", grad, b.const(m, x))
        grad = grad if axis == rank - 1 else b.op("Transpose", grad, perm=swap)
    return none_but(grad, node)


def _static_sizes(b, node) -> tuple[list[int], list[int]]:
    """The spatial sizes of a node's first input and output, which must be static."""
    in_sizes, out_sizes = b.facts.shape(node.input[0])[2:], b.facts.shape(node.output[0])[2:]
    if None in in_sizes or None in out_sizes:
        raise NotImplementedError("spatial sizes must be static (only the batch may vary)")
    return list(in_sizes), list(out_sizes)


@rule("AveragePool")
def _average_pool(b, node, dys):
    """Y = window sum / divisor: dX = ConvTranspose(dY / divisor, ones), 1 / divisor read off the
    node itself (count_include_pad, ceil_mode) as AveragePool(ones) / (window sum of ones)."""
    x = node.input[0]
    kernel = list(attr(node, "kernel_shape"))
    n, channels = len(kernel), b.facts.static_dim(x, 1)
    strides = list(attr(node, "strides", [1] * n))
    dilations = list(attr(node, "dilations", [1] * n))
    pads = explicit_pads(b, node, x, kernel, strides, dilations)
    for i, (size, out) in enumerate(zip(*_static_sizes(b, node))):
        # ceil_mode: the last window may overhang the end pad; the overhang counts as more end pad
        pads[n + i] += max(0, (out - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1
                           - size - pads[i] - pads[n + i])
    dtype = helper.tensor_dtype_to_np_dtype(b.facts.dtype(x))
    plane = b.array(np.ones([1, 1, *b.facts.shape(x)[2:]], dtype=dtype))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    count = b.op("Conv", plane, b.array(np.ones([1, 1, *kernel], dtype=dtype)), kernel_shape=kernel,
                 strides=strides, dilations=dilations, pads=pads)
    dy = b.op("Mul", dys[0], b.op("Div", b.op("AveragePool", plane, **attrs), count))
    ones = b.array(np.ones([channels, 1, *kernel], dtype=dtype))
    return [_transpose_conv(b, node, dy, ones, kernel, channels, pads)]


@rule("MaxPool", since=12)
def _max_pool(b, node, dys):
    """Y = max over each window: dX = ScatterAdd(zeros, argmax indices, dY) (first max wins)."""
    x = node.input[0]
    if attr(node, "storage_order", 0):
        raise NotImplementedError("MaxPool with storage_order=1")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    _, indices = b.op("MaxPool", x, outputs=2, **attrs)
    flat = b.ints([-1])
    zeros = b.op("ConstantOfShape", b.op("Reshape", b.op("Size", x), flat),
                 value=onnx.numpy_helper.from_array(
                     np.zeros(1, helper.tensor_dtype_to_np_dtype(b.facts.dtype(x)))))
    scattered = b.op("ScatterElements", zeros, b.op("Reshape", indices, flat),
                     b.op("Reshape", dys[0], flat), axis=0, reduction="add")
    return [b.op("Reshape", scattered, b.shape_of(x))]


@rule("GlobalAveragePool")
def _global_average_pool(b, node, dys):
    """Y = mean over space: dX = dY / (H W), broadcast to the shape of X."""
    x = node.input[0]
    space = range(2, b.facts.rank(x))
    count = float(np.prod([b.facts.static_dim(x, i) for i in space]))
    return [b.spread(b.op("Div", dys[0], b.const(count, x)), x, space)]


def _reduce_axes(b, node) -> list[int]:
    x = node.input[0]
    axes = attr(node, "axes")
    if axes is None and input_at(node, 1):
        axes = const_input(b, node, 1, "axes").tolist()
    rank = b.facts.rank(x)
    if not axes:
        return [] if attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(a % rank for a in axes)


@rule("ReduceSum", "ReduceMean")
def _reduce_sum_mean(b, node, dys):
    """Y = Sum|Mean over axes: dX = dY (/ n) broadcast to the shape of X, dropped axes restored."""
    x, dy = node.input[0], dys[0]
    axes = _reduce_axes(b, node)
    if not axes:
        return none_but(dy, node)
    if not attr(node, "keepdims", 1):
        dy = b.unsqueeze(dy, axes)
    if node.op_type == "ReduceMean":
        count = float(np.prod([b.facts.static_dim(x, a) for a in axes]))
        dy = b.op("Div", dy, b.const(count, x))
    return none_but(b.spread(dy, x, axes), node)


@rule("ReduceL2", "ReduceSumSquare")
def _reduce_l2(b, node, dys):
    """Y = sqrt(Sum X^2) | Sum X^2 over axes: dX = X dY / Y (0 where Y = 0, as torch's norm) | 2 X dY."""
    x, y, dy = node.input[0], node.output[0], dys[0]
    axes = _reduce_axes(b, node)
    if not axes:
        raise NotImplementedError(f"{node.op_type} with noop_with_empty_axes and no axes")
    if not attr(node, "keepdims", 1):
        dy, y = b.unsqueeze(dy, axes), b.unsqueeze(y, axes)
    if node.op_type == "ReduceSumSquare":
        return none_but(b.op("Mul", b.op("Mul", x, b.const(2.0, x)), dy), node)
    zero = b.const(0.0, x)
    ratio = b.op("Where", b.op("Equal", y, zero), zero, b.op("Div", dy, y))
    return none_but(b.op("Mul", x, ratio), node)


@rule("BatchNormalization")
def _batch_norm(b, node, dys):
    """Y = (X - mean) scale / sqrt(var + eps) + bias (inference): dX = dY scale / sqrt(var + eps)."""
    x, scale, var = node.input[0], node.input[1], node.input[4]
    if attr(node, "training_mode", 0):
        raise NotImplementedError("BatchNormalization in training mode")
    eps = attr(node, "epsilon", 1e-5)
    factor = b.op("Div", scale, b.op("Sqrt", b.op("Add", var, b.const(eps, var))))
    factor = b.unsqueeze(factor, list(range(1, b.facts.rank(x) - 1)))
    return none_but(b.op("Mul", dys[0], factor), node)


def _normalised_gradient(b, x: str, g: str, axes: list[int], eps: float) -> str:
    """dX of Y = Xhat with Xhat = (X - mu) / sigma over ``axes``, for g = dL/dXhat:
    (g - mean(g) - Xhat mean(g Xhat)) / sigma."""
    centred = b.op("Sub", x, b.reduce("ReduceMean", x, axes))
    variance = b.reduce("ReduceMean", b.op("Mul", centred, centred), axes)
    inv_sigma = b.op("Reciprocal", b.op("Sqrt", b.op("Add", variance, b.const(eps, x))))
    xhat = b.op("Mul", centred, inv_sigma)
    mean_g = b.reduce("ReduceMean", g, axes)
    mean_gx = b.reduce("ReduceMean", b.op("Mul", g, xhat), axes)
    inner = b.op("Sub", b.op("Sub", g, mean_g), b.op("Mul", xhat, mean_gx))
    return b.op("Mul", inner, inv_sigma)


@rule("LayerNormalization", since=17)
def _layer_norm(b, node, dys):
    """Y = Xhat S + B, Xhat = (X - mu) / sigma over the trailing axes: g = dY S."""
    x, scale = node.input[0], node.input[1]
    rank = b.facts.rank(x)
    axes = list(range(attr(node, "axis", -1) % rank, rank))
    g = b.op("Mul", dys[0], scale)
    return none_but(_normalised_gradient(b, x, g, axes, attr(node, "epsilon", 1e-5)), node)


@rule("InstanceNormalization", since=6)
def _instance_norm(b, node, dys):
    """Y = Xhat S_c + B_c, Xhat normalised over the spatial axes of each (n, c) (torch's
    GroupNorm exports as one on (N, groups, -1)): g = dY S_c."""
    x, scale = node.input[0], node.input[1]
    rank = b.facts.rank(x)
    axes = list(range(2, rank))
    g = b.op("Mul", dys[0], b.unsqueeze(scale, list(range(1, rank - 1))))
    return none_but(_normalised_gradient(b, x, g, axes, attr(node, "epsilon", 1e-5)), node)
