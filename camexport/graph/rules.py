"""Reverse-mode (VJP) rules, one per ONNX op, in one table.

A rule takes ``(b, node, dys)``: the builder, the primal node and one cotangent name per node
output (None where nothing flows back), and returns exactly one cotangent per node input (None
where nothing flows, or where ``b.needs(input)`` is false). Rules only emit default-domain ONNX
ops through the builder; shape bookkeeping lives in the builder's helpers. Each rule's docstring
is its formula. Cotangents of weights (initializers) are never built: camexport differentiates
activations only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from camexport.graph.builder import Builder

Rule = Callable[[Builder, onnx.NodeProto, list], list]

#: op type -> [(first opset, rule)], newest last.
RULES: dict[str, list[tuple[int, Rule]]] = {}

#: Ops whose outputs carry no gradient (integer/boolean results, shapes, piecewise constants).
NO_GRADIENT = frozenset({
    "Shape", "Size", "ConstantOfShape", "Range", "NonZero", "Constant", "EyeLike",
    "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or", "Xor",
    "ArgMax", "ArgMin", "Floor", "Ceil", "Round", "Sign", "IsNaN", "IsInf",
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
})

#: Ops we refuse to differentiate, with the reason given to the user.
REFUSED = {
    "If": "control flow is not differentiated; export the model without data-dependent branches",
    "Loop": "control flow is not differentiated; unroll the loop at export",
    "Scan": "control flow is not differentiated; unroll the scan at export",
}


def rule(*op_types: str, since: int = 1):
    """Register a rule for ``op_types`` from opset ``since`` on."""

    def register(fn: Rule) -> Rule:
        for op_type in op_types:
            RULES.setdefault(op_type, []).append((since, fn))
            RULES[op_type].sort(key=lambda entry: entry[0])
        return fn

    return register


def find_rule(op_type: str, opset: int, domain: str = "") -> Rule | None:
    if domain not in ("", "ai.onnx"):
        return None
    chosen = None
    for since, fn in RULES.get(op_type, []):
        if since <= opset:
            chosen = fn
    return chosen


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i and node.input[i] else ""


def _const_input(b: Builder, node: onnx.NodeProto, i: int, what: str) -> np.ndarray | None:
    name = _input(node, i)
    if not name:
        return None
    value = b.facts.constant(name)
    if value is None:
        raise NotImplementedError(f"{node.op_type} needs a constant {what} (input {name!r})")
    return value


def _none_but(first, node) -> list:
    return [first] + [None] * (len(node.input) - 1)


# -- element-wise unary ------------------------------------------------------------------

@rule("Identity", "Dropout")
def _identity(b, node, dys):
    """Y = X: dX = dY (Dropout is exported in inference mode)."""
    return _none_but(dys[0], node)


@rule("Cast")
def _cast(b, node, dys):
    """Y = Cast(X): dX = Cast(dY, to=type(X))."""
    return [b.op("Cast", dys[0], to=b.facts.dtype(node.input[0]))]


@rule("Relu")
def _relu(b, node, dys):
    """Y = Relu(X): dX = Where(X > 0, dY, 0)."""
    x = node.input[0]
    return [b.op("Where", b.op("Greater", x, b.const(0, x)), dys[0], b.const(0, x))]


@rule("LeakyRelu")
def _leaky_relu(b, node, dys):
    """Y = LeakyRelu(X): dX = Where(X > 0, dY, alpha dY)."""
    x, alpha = node.input[0], attr(node, "alpha", 0.01)
    scaled = b.op("Mul", dys[0], b.const(alpha, x))
    return [b.op("Where", b.op("Greater", x, b.const(0, x)), dys[0], scaled)]


@rule("Sigmoid")
def _sigmoid(b, node, dys):
    """Y = Sigmoid(X): dX = dY Y (1 - Y) = dY E / (1 + E)^2, E = exp(-|X|), from X: onnxruntime's
    float32 Sigmoid is exact to ~1e-7 absolute only, so Y (1 - Y) loses every digit where Y or
    1 - Y is below that (a segmentation map's background)."""
    x = node.input[0]
    e = b.op("Exp", b.op("Neg", b.op("Abs", x)))
    denominator = b.op("Add", b.const(1, x), e)
    return [b.op("Mul", dys[0], b.op("Div", e, b.op("Mul", denominator, denominator)))]


@rule("Tanh")
def _tanh(b, node, dys):
    """Y = Tanh(X): dX = dY (1 - Y^2)."""
    y = node.output[0]
    return [b.op("Mul", dys[0], b.op("Sub", b.const(1, y), b.op("Mul", y, y)))]


@rule("Exp")
def _exp(b, node, dys):
    """Y = Exp(X): dX = dY Y."""
    return [b.op("Mul", dys[0], node.output[0])]


@rule("Log")
def _log(b, node, dys):
    """Y = Log(X): dX = dY / X."""
    return [b.op("Div", dys[0], node.input[0])]


@rule("Sqrt")
def _sqrt(b, node, dys):
    """Y = Sqrt(X): dX = dY / (2 Y)."""
    y = node.output[0]
    return [b.op("Div", dys[0], b.op("Mul", y, b.const(2, y)))]


@rule("Neg")
def _neg(b, node, dys):
    """Y = -X: dX = -dY."""
    return [b.op("Neg", dys[0])]


@rule("Abs")
def _abs(b, node, dys):
    """Y = |X|: dX = dY Sign(X)."""
    return [b.op("Mul", dys[0], b.op("Sign", node.input[0]))]


@rule("Reciprocal")
def _reciprocal(b, node, dys):
    """Y = 1 / X: dX = -dY Y^2."""
    y = node.output[0]
    return [b.op("Neg", b.op("Mul", dys[0], b.op("Mul", y, y)))]


@rule("Erf")
def _erf(b, node, dys):
    """Y = Erf(X): dX = dY 2/sqrt(pi) exp(-X^2)."""
    x = node.input[0]
    bell = b.op("Exp", b.op("Neg", b.op("Mul", x, x)))
    return [b.op("Mul", dys[0], b.op("Mul", bell, b.const(2 / math.sqrt(math.pi), x)))]


@rule("Softplus")
def _softplus(b, node, dys):
    """Y = log(1 + exp(X)): dX = dY Sigmoid(X)."""
    return [b.op("Mul", dys[0], b.op("Sigmoid", node.input[0]))]


@rule("Pow")
def _pow(b, node, dys):
    """Y = X^p, p constant: dX = dY p X^(p-1)."""
    x = node.input[0]
    if b.needs(node.input[1]):
        raise NotImplementedError("Pow with a differentiated exponent")
    p = float(np.asarray(_const_input(b, node, 1, "exponent")).reshape(-1)[0])
    slope = b.op("Mul", b.const(p, x), b.op("Pow", x, b.const(p - 1, x)))
    return [b.op("Mul", dys[0], slope), None]


@rule("HardSigmoid")
def _hard_sigmoid(b, node, dys):
    """Y = clip(a X + c, 0, 1): dX = Where(0 < a X + c < 1, a dY, 0)."""
    x = node.input[0]
    alpha, beta = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
    linear = b.op("Add", b.op("Mul", x, b.const(alpha, x)), b.const(beta, x))
    inside = b.op("And", b.op("Greater", linear, b.const(0, x)), b.op("Less", linear, b.const(1, x)))
    return [b.op("Where", inside, b.op("Mul", dys[0], b.const(alpha, x)), b.const(0, x))]


@rule("HardSwish")
def _hard_swish(b, node, dys):
    """Y = X HardSigmoid(X): dX = dY * (0 if X < -3, X/3 + 1/2 if X <= 3, else 1), as torch."""
    x = node.input[0]
    middle = b.op("Add", b.op("Mul", x, b.const(1 / 3, x)), b.const(0.5, x))
    upper = b.op("Where", b.op("LessOrEqual", x, b.const(3, x)), middle, b.const(1, x))
    slope = b.op("Where", b.op("Less", x, b.const(-3, x)), b.const(0, x), upper)
    return [b.op("Mul", dys[0], slope)]


@rule("Clip", since=11)
def _clip(b, node, dys):
    """Y = Clip(X, lo, hi): dX = Where(lo < X < hi, dY, 0) (strict, as torch's hardtanh)."""
    x, inside = node.input[0], None
    for i, op_type in ((1, "Greater"), (2, "Less")):
        if _input(node, i):
            test = b.op(op_type, x, node.input[i])
            inside = test if inside is None else b.op("And", inside, test)
    if inside is None:
        return _none_but(dys[0], node)
    return _none_but(b.op("Where", inside, dys[0], b.const(0, x)), node)


@rule("Gelu", since=20)
def _gelu(b, node, dys):
    """Y = X Phi(X): dX = dY (Phi(X) + X phi(X)); tanh form differentiated exactly."""
    x = node.input[0]
    if attr(node, "approximate", "none") == "tanh":
        k = math.sqrt(2 / math.pi)
        x2 = b.op("Mul", x, x)
        inner = b.op("Mul", b.const(k, x), b.op("Add", x, b.op("Mul", b.const(0.044715, x),
                                                               b.op("Mul", x2, x))))
        t = b.op("Tanh", inner)
        dinner = b.op("Mul", b.const(k, x), b.op("Add", b.const(1, x),
                                                 b.op("Mul", b.const(3 * 0.044715, x), x2)))
        half_x = b.op("Mul", b.const(0.5, x), x)
        term = b.op("Mul", half_x, b.op("Mul", b.op("Sub", b.const(1, x), b.op("Mul", t, t)),
                                        dinner))
        slope = b.op("Add", b.op("Mul", b.const(0.5, x), b.op("Add", b.const(1, x), t)), term)
    else:
        cdf = b.op("Mul", b.const(0.5, x), b.op("Add", b.const(1, x), b.op(
            "Erf", b.op("Mul", x, b.const(1 / math.sqrt(2), x)))))
        pdf = b.op("Mul", b.const(1 / math.sqrt(2 * math.pi), x), b.op(
            "Exp", b.op("Mul", b.op("Mul", x, x), b.const(-0.5, x))))
        slope = b.op("Add", cdf, b.op("Mul", x, pdf))
    return [b.op("Mul", dys[0], slope)]


@rule("Softmax", since=13)
def _softmax(b, node, dys):
    """Y = Softmax(X, axis): dX = Y (dY - Sum_axis(dY Y))."""
    y, axis = node.output[0], attr(node, "axis", -1)
    inner = b.reduce("ReduceSum", b.op("Mul", dys[0], y), [axis], keepdims=True)
    return [b.op("Mul", y, b.op("Sub", dys[0], inner))]


@rule("LogSoftmax", since=13)
def _log_softmax(b, node, dys):
    """Y = LogSoftmax(X, axis): dX = dY - exp(Y) Sum_axis(dY)."""
    y, axis = node.output[0], attr(node, "axis", -1)
    total = b.reduce("ReduceSum", dys[0], [axis], keepdims=True)
    return [b.op("Sub", dys[0], b.op("Mul", b.op("Exp", y), total))]


# -- element-wise binary (broadcasting) ------------------------------------------------

def _each_input(b, node, make) -> list:
    """Cotangent of each needed input: ``make(i)`` shaped like the output, then unbroadcast."""
    y = node.output[0]
    return [b.unbroadcast(make(i), name, y) if b.needs(name) else None
            for i, name in enumerate(node.input)]


@rule("Add", "Sum")
def _add(b, node, dys):
    """Y = A + B (+ ...): dA = dY, dB = dY (each summed to its own shape)."""
    return _each_input(b, node, lambda i: dys[0])


@rule("Sub")
def _sub(b, node, dys):
    """Y = A - B: dA = dY, dB = -dY."""
    return _each_input(b, node, lambda i: dys[0] if i == 0 else b.op("Neg", dys[0]))


@rule("Mul")
def _mul(b, node, dys):
    """Y = A B: dA = dY B, dB = dY A."""
    return _each_input(b, node, lambda i: b.op("Mul", dys[0], node.input[1 - i]))


@rule("Div")
def _div(b, node, dys):
    """Y = A / B: dA = dY / B, dB = -dY Y / B."""
    d, y = node.input[1], node.output[0]
    return _each_input(b, node, lambda i: b.op("Div", dys[0], d) if i == 0 else
                       b.op("Neg", b.op("Div", b.op("Mul", dys[0], y), d)))


@rule("Mean")
def _mean(b, node, dys):
    """Y = (A + B + ...) / n: each dI = dY / n."""
    share = b.op("Div", dys[0], b.const(len(node.input), node.output[0]))
    return _each_input(b, node, lambda i: share)


@rule("Where")
def _where(b, node, dys):
    """Y = Where(C, A, B): dA = Where(C, dY, 0), dB = Where(C, 0, dY)."""
    cond, zero = node.input[0], b.const(0, node.output[0])
    grads = _each_input(b, node, lambda i: b.op(
        "Where", cond, dys[0], zero) if i == 1 else b.op("Where", cond, zero, dys[0]))
    return [None, *grads[1:]]


@rule("Expand")
def _expand(b, node, dys):
    """Y = Expand(X, shape): dX = dY summed over the broadcast axes."""
    return [b.unbroadcast(dys[0], node.input[0], node.output[0]), None]


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
    return _each_input(b, node, lambda i: b.op("MatMul", dys[0], _swap_last(b, m)) if i == 0
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
    if _input(node, 2) and b.needs(node.input[2]):
        scaled = dy if beta == 1.0 else b.op("Mul", dy, b.const(beta, node.output[0]))
        dc = b.unbroadcast(scaled, node.input[2], node.output[0])
    return [da, db, dc][: len(node.input)]


# -- convolution, pooling, normalisation ---------------------------------------------------

def _explicit_pads(b, node, x: str, kernel: list[int], strides, dilations) -> list[int]:
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


def _transpose_conv(b, node, dy: str, weight: str, kernel: list[int], group: int) -> str:
    """dX of a Conv-like node: ConvTranspose of dY with the node's own geometry."""
    x, y = node.input[0], node.output[0]
    n = len(kernel)
    strides = list(attr(node, "strides", [1] * n))
    dilations = list(attr(node, "dilations", [1] * n))
    pads = _explicit_pads(b, node, x, kernel, strides, dilations)
    in_sizes, out_sizes = b.facts.shape(x)[2:], b.facts.shape(y)[2:]
    if None in in_sizes or None in out_sizes:
        raise NotImplementedError("spatial sizes must be static (only the batch may vary)")
    output_padding = [
        size - ((o - 1) * s - pads[i] - pads[i + n] + d * (k - 1) + 1)
        for i, (size, o, s, d, k) in enumerate(zip(in_sizes, out_sizes, strides, dilations, kernel))
    ]
    return b.op("ConvTranspose", dy, weight, strides=strides, dilations=dilations, pads=pads,
                group=group, kernel_shape=kernel, output_padding=output_padding)


@rule("Conv")
def _conv(b, node, dys):
    """Y = Conv(X, W) + B: dX = ConvTranspose(dY, W) with the same strides, pads, dilations."""
    weight = node.input[1]
    if b.needs(weight):
        raise NotImplementedError("Conv with a differentiated weight")
    kernel = list(b.facts.shape(weight)[2:])
    dx = _transpose_conv(b, node, dys[0], weight, kernel, attr(node, "group", 1))
    return _none_but(dx, node)


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
    return _none_but(dx, node)


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
    scales = _const_input(b, node, 2, "scales")
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
    return _none_but(grad, node)


@rule("AveragePool")
def _average_pool(b, node, dys):
    """Y = mean over each window: dX = ConvTranspose(dY / count, ones), count per window."""
    x = node.input[0]
    if attr(node, "ceil_mode", 0):
        raise NotImplementedError("AveragePool with ceil_mode=1")
    kernel = list(attr(node, "kernel_shape"))
    channels = b.facts.static_dim(x, 1)
    dtype = helper.tensor_dtype_to_np_dtype(b.facts.dtype(x))
    ones = b.array(np.ones([channels, 1, *kernel], dtype=dtype))
    pads = attr(node, "pads", [0] * (2 * len(kernel)))
    if attr(node, "count_include_pad", 0) or not any(pads):
        dy = b.op("Div", dys[0], b.const(float(np.prod(kernel)), x))
    else:
        plane = b.array(np.ones([1, 1, *b.facts.shape(x)[2:]], dtype=dtype))
        share = b.op("AveragePool", plane, kernel_shape=kernel, count_include_pad=1, pads=pads,
                     strides=list(attr(node, "strides", [1] * len(kernel))))
        dy = b.op("Div", dys[0], b.op("Mul", share, b.const(float(np.prod(kernel)), x)))
    return [_transpose_conv(b, node, dy, ones, kernel, channels)]


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
    """Y = mean over space: dX = Expand(dY / (H W), shape(X))."""
    x = node.input[0]
    count = float(np.prod([b.facts.static_dim(x, i) for i in range(2, b.facts.rank(x))]))
    return [b.op("Expand", b.op("Div", dys[0], b.const(count, x)), b.shape_of(x))]


def _reduce_axes(b, node) -> list[int]:
    x = node.input[0]
    axes = attr(node, "axes")
    if axes is None and _input(node, 1):
        axes = _const_input(b, node, 1, "axes").tolist()
    rank = b.facts.rank(x)
    if not axes:
        return [] if attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(a % rank for a in axes)


@rule("ReduceSum", "ReduceMean")
def _reduce_sum_mean(b, node, dys):
    """Y = Sum|Mean over axes: dX = Expand(dY (/ n), shape(X)), dropped axes restored."""
    x, dy = node.input[0], dys[0]
    axes = _reduce_axes(b, node)
    if not axes:
        return _none_but(dy, node)
    if not attr(node, "keepdims", 1):
        dy = b.unsqueeze(dy, axes)
    if node.op_type == "ReduceMean":
        count = float(np.prod([b.facts.static_dim(x, a) for a in axes]))
        dy = b.op("Div", dy, b.const(count, x))
    return _none_but(b.op("Expand", dy, b.shape_of(x)), node)


@rule("BatchNormalization")
def _batch_norm(b, node, dys):
    """Y = (X - mean) scale / sqrt(var + eps) + bias (inference): dX = dY scale / sqrt(var + eps)."""
    x, scale, var = node.input[0], node.input[1], node.input[4]
    if attr(node, "training_mode", 0):
        raise NotImplementedError("BatchNormalization in training mode")
    eps = attr(node, "epsilon", 1e-5)
    factor = b.op("Div", scale, b.op("Sqrt", b.op("Add", var, b.const(eps, var))))
    factor = b.unsqueeze(factor, list(range(1, b.facts.rank(x) - 1)))
    return _none_but(b.op("Mul", dys[0], factor), node)


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
    return _none_but(_normalised_gradient(b, x, g, axes, attr(node, "epsilon", 1e-5)), node)


@rule("InstanceNormalization", since=6)
def _instance_norm(b, node, dys):
    """Y = Xhat S_c + B_c, Xhat normalised over the spatial axes of each (n, c) (torch's
    GroupNorm exports as one on (N, groups, -1)): g = dY S_c."""
    x, scale = node.input[0], node.input[1]
    rank = b.facts.rank(x)
    axes = list(range(2, rank))
    g = b.op("Mul", dys[0], b.unsqueeze(scale, list(range(1, rank - 1))))
    return _none_but(_normalised_gradient(b, x, g, axes, attr(node, "epsilon", 1e-5)), node)


# -- shape and data movement ---------------------------------------------------------------

@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b, node, dys):
    """Y = X viewed with another shape: dX = Reshape(dY, shape(X))."""
    return _none_but(b.op("Reshape", dys[0], b.shape_of(node.input[0])), node)


@rule("Transpose")
def _transpose(b, node, dys):
    """Y = Transpose(X, perm): dX = Transpose(dY, inverse(perm))."""
    perm = attr(node, "perm") or list(reversed(range(b.facts.rank(node.input[0]))))
    return [b.op("Transpose", dys[0], perm=[int(i) for i in np.argsort(perm)])]


@rule("Concat")
def _concat(b, node, dys):
    """Y = Concat(X1, X2, ..., axis): dXi = Slice(dY) over Xi's span of the axis."""
    axis = attr(node, "axis") % b.facts.rank(node.output[0])
    grads, start = [], 0
    for name in node.input:
        size = b.facts.static_dim(name, axis)
        grads.append(b.op("Slice", dys[0], b.ints([start]), b.ints([start + size]), b.ints([axis]))
                     if b.needs(name) else None)
        start += size
    return grads


@rule("Split", since=13)
def _split(b, node, dys):
    """Y1, Y2, ... = Split(X, axis): dX = Concat(dY1, dY2, ...), zeros for unused parts."""
    parts = [dy if dy is not None else b.zeros_like(out) for dy, out in zip(dys, node.output)]
    return _none_but(b.op("Concat", *parts, axis=attr(node, "axis", 0)), node)


@rule("Slice", since=10)
def _slice(b, node, dys):
    """Y = X[start:end:step] per axis (step > 0): dX = dY with zeros interleaved and padded."""
    x = node.input[0]
    rank = b.facts.rank(x)
    starts = _const_input(b, node, 1, "starts").tolist()
    ends = _const_input(b, node, 2, "ends").tolist()
    axes = _const_input(b, node, 3, "axes")
    axes = list(range(len(starts))) if axes is None else axes.tolist()
    steps = _const_input(b, node, 4, "steps")
    steps = [1] * len(starts) if steps is None else steps.tolist()
    grad, out_shape = dys[0], list(b.facts.shape(node.output[0]))
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= rank
        size = b.facts.static_dim(x, axis)
        if step <= 0:
            raise NotImplementedError("Slice with a negative step")
        first = range(size)[slice(start, end, step)]
        count = len(first)
        begin = first[0] if count else 0
        if step > 1 and count:
            grad = _interleave_zeros(b, grad, out_shape, axis, step)
            out_shape[axis] = count * step
        extent = out_shape[axis]
        pads = [0] * (2 * rank)
        pads[axis], pads[rank + axis] = begin, max(0, size - begin - extent)
        grad = b.op("Pad", grad, b.ints(pads))
        if begin + extent > size:
            grad = b.op("Slice", grad, b.ints([0]), b.ints([size]), b.ints([axis]))
        out_shape[axis] = size
    return _none_but(grad, node)


def _interleave_zeros(b, grad: str, shape: list, axis: int, step: int) -> str:
    """Put step-1 zeros after each element of ``grad`` along ``axis``."""
    rank = len(shape)
    grad = b.unsqueeze(grad, [axis + 1])
    pads = [0] * (2 * (rank + 1))
    pads[rank + 1 + axis + 1] = step - 1
    grad = b.op("Pad", grad, b.ints(pads))
    target = [d if d is not None else -1 for d in shape]
    if target.count(-1) > 1:
        raise NotImplementedError("strided Slice with more than one dynamic axis")
    target[axis] = shape[axis] * step
    return b.op("Reshape", grad, b.ints(target))


@rule("Gather", since=13)
def _gather(b, node, dys):
    """Y = Gather(X, idx, axis): dX = ScatterND-add of dY into zeros at idx along axis
    (repeated indices sum); a constant scalar index is a plain Pad."""
    x, index = node.input[0], node.input[1]
    rank = b.facts.rank(x)
    axis = attr(node, "axis", 0) % rank
    constant = b.facts.constant(index)
    if constant is not None and constant.ndim == 0:
        size = b.facts.static_dim(x, axis)
        position = int(constant) % size
        pads = [0] * (2 * rank)
        pads[axis], pads[rank + axis] = position, size - position - 1
        return [b.op("Pad", b.unsqueeze(dys[0], [axis]), b.ints(pads)), None]
    index_rank = b.facts.rank(index)
    to_front = [axis] + [i for i in range(rank) if i != axis]
    dy_front = list(range(axis, axis + index_rank)) + [
        i for i in range(rank + index_rank - 1) if not axis <= i < axis + index_rank]
    dy = b.op("Transpose", dys[0], perm=dy_front) if dy_front != sorted(dy_front) else dys[0]
    x_shape = b.shape_of(x)
    if constant is None:
        length = b.op("Gather", x_shape, b.ints([axis]))
        index = b.op("Where", b.op("Less", index, b.array(np.zeros((), np.int64))),
                     b.op("Add", index, length), index)
    else:
        index = b.array(constant.astype(np.int64) % b.facts.static_dim(x, axis))
    rows = b.op("Reshape", index, b.ints([-1]))
    grad = b.scatter_add_rows(b.op("Gather", x_shape, b.ints(to_front)), rows, dy, x)
    if to_front != sorted(to_front):
        grad = b.op("Transpose", grad, perm=[int(i) for i in np.argsort(to_front)])
    return [grad, None]


@rule("GatherND", since=12)
def _gather_nd(b, node, dys):
    """Y = GatherND(X, idx), batch_dims 0: dX = dY added back at the rows idx names (repeats sum)."""
    if attr(node, "batch_dims", 0):
        raise NotImplementedError("GatherND with batch_dims > 0")
    x, index = node.input[0], node.input[1]
    depth = b.facts.static_dim(index, -1)
    dims = b.facts.shape(x)
    strides = [int(np.prod(dims[j + 1:depth])) for j in range(depth)]
    if None in dims[1:depth]:
        raise NotImplementedError("GatherND over more than one dynamic axis")
    sizes = b.op("Slice", b.shape_of(x), b.ints([0]), b.ints([depth]))
    index = b.op("Where", b.op("Less", index, b.array(np.zeros((), np.int64))),
                 b.op("Add", index, sizes), index)
    rows = b.reduce("ReduceSum", b.op("Mul", index, b.ints(strides)), [-1], keepdims=False)
    front = b.op("Concat", b.reduce("ReduceProd", sizes, [0], keepdims=True),
                 b.op("Slice", b.shape_of(x), b.ints([depth]), b.ints([2**62])), axis=0)
    updates = b.op("Reshape", dys[0], b.op("Concat", b.ints([-1]), b.op(
        "Slice", b.shape_of(x), b.ints([depth]), b.ints([2**62])), axis=0))
    grad = b.scatter_add_rows(front, b.op("Reshape", rows, b.ints([-1])), updates, x)
    return [b.op("Reshape", grad, b.shape_of(x)), None]


@rule("Pad", since=11)
def _pad(b, node, dys):
    """Y = Pad(X, pads), constant mode: dX = Slice(dY) back to X's span."""
    x = node.input[0]
    if attr(node, "mode", "constant") != "constant":
        raise NotImplementedError(f"Pad in {attr(node, 'mode')!r} mode")
    pads = _const_input(b, node, 1, "pads").tolist()
    rank = b.facts.rank(x)
    axes = _const_input(b, node, 3, "axes")
    axes = list(range(rank)) if axes is None else [a % rank for a in axes.tolist()]
    n = len(axes)
    starts, ends, sliced = [], [], []
    for k, axis in enumerate(axes):
        begin, end = pads[k], pads[k + n]
        if begin < 0 or end < 0:
            raise NotImplementedError("Pad with negative pads")
        if begin or end:
            starts.append(begin)
            ends.append(begin + b.facts.static_dim(x, axis))
            sliced.append(axis)
    if not sliced:
        return _none_but(dys[0], node)
    grad = b.op("Slice", dys[0], b.ints(starts), b.ints(ends), b.ints(sliced))
    return _none_but(grad, node)


# -- named exceptions: rule tables that replace the standard ones ---------------------------

def _guided_relu(b, node, dys):
    """Guided ReLU (Springenberg et al. 2015): dX = Where(X > 0 and dY > 0, dY, 0)."""
    x, dy = node.input[0], dys[0]
    zero = b.const(0, x)
    passes = b.op("And", b.op("Greater", x, zero), b.op("Greater", dy, zero))
    return [b.op("Where", passes, dy, zero)]


#: Guided Backprop: every Relu node (functional ReLUs included, unlike pgc; reference Q25).
GUIDED_RULES = {"Relu": _guided_relu}


def _max_pool_by_comparison(b, node, dys):
    """Y = max over each window, without MaxPool's Indices output (TensorRT has none):
    P_k = X at window offset k (X padded with -inf), first_k = (P_k == Y) and no earlier offset
    matched (row-major, so ties go to the first max, as torch and the Indices rule);
    dX = ConvTranspose(Where(first_k, dY, 0) stacked over k, one-hot kernels, group = C)."""
    x, y = node.input[0], node.output[0]
    kernel = list(attr(node, "kernel_shape"))
    n, (channels, *sizes), (_, *outs) = len(kernel), b.facts.shape(x)[1:], b.facts.shape(y)[1:]
    strides = list(attr(node, "strides", [1] * n))
    dilations = list(attr(node, "dilations", [1] * n))
    pads = _explicit_pads(b, node, x, kernel, strides, dilations)
    ends = [(o - 1) * s + (k - 1) * d + 1 - size - p  # ceil_mode windows may overhang
            for o, s, k, d, size, p in zip(outs, strides, kernel, dilations, sizes, pads)]
    padded = b.op("Pad", x, b.ints([0, 0, *pads[:n], 0, 0, *[max(e, 0) for e in ends]]),
                  b.const(-np.inf, x))
    offsets = list(np.ndindex(*kernel))
    patches = [b.unsqueeze(b.op("Slice", padded, b.ints([o * d for o, d in zip(at, dilations)]),
                                b.ints([o * d + (m - 1) * s + 1 for o, d, m, s in
                                        zip(at, dilations, outs, strides)]),
                                b.ints(range(2, 2 + n)), b.ints(strides)), [2]) for at in offsets]
    hits = b.op("Equal", b.op("Concat", *patches, axis=2), b.unsqueeze(y, [2]))
    count = b.op("CumSum", b.op("Cast", hits, to=b.facts.dtype(x)), b.array(np.array(2, np.int64)))
    first = b.op("And", hits, b.op("Equal", count, b.const(1, x)))
    masked = b.op("Where", first, b.unsqueeze(dys[0], [2]), b.const(0, x))
    stacked = b.op("Reshape", masked, b.ints([0, channels * len(offsets), *outs]))
    onehot = np.zeros([channels * len(offsets), 1, *kernel],
                      dtype=helper.tensor_dtype_to_np_dtype(b.facts.dtype(x)))
    for k, at in enumerate(offsets):
        onehot[k::len(offsets), 0][(slice(None), *at)] = 1
    canvas = b.op("ConvTranspose", stacked, b.array(onehot), strides=strides, dilations=dilations,
                  group=channels, kernel_shape=kernel)  # covers the padded X up to the last window
    if min(ends) < 0:
        canvas = b.op("Pad", canvas, b.ints([0] * (n + 2) + [0, 0, *[max(-e, 0) for e in ends]]))
    return [b.op("Slice", canvas, b.ints(pads[:n]), b.ints([p + size for p, size in zip(pads, sizes)]),
                 b.ints(range(2, 2 + n)))]


#: MaxPool differentiated without its Indices output, for runtimes that lack it (TensorRT);
#: exact like the default rule, ties included. Opt in with ``augment(..., overrides=...)``.
MAXPOOL_WITHOUT_INDICES = {"MaxPool": _max_pool_by_comparison}
