"""Rules of element-wise ops: unary activations and arithmetic, and broadcasting binaries."""

from __future__ import annotations

import math

import numpy as np

from camexport.graph.rules.table import attr, const_input, each_input, input_at, none_but, rule

# -- element-wise unary ------------------------------------------------------------------

@rule("Identity", "Dropout")
def _identity(b, node, dys):
    """Y = X: dX = dY (Dropout is exported in inference mode)."""
    return none_but(dys[0], node)


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
    p = float(np.asarray(const_input(b, node, 1, "exponent")).reshape(-1)[0])
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
        if input_at(node, i):
            test = b.op(op_type, x, node.input[i])
            inside = test if inside is None else b.op("And", inside, test)
    if inside is None:
        return none_but(dys[0], node)
    return none_but(b.op("Where", inside, dys[0], b.const(0, x)), node)


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


@rule("Add", "Sum")
def _add(b, node, dys):
    """Y = A + B (+ ...): dA = dY, dB = dY (each summed to its own shape)."""
    return each_input(b, node, lambda i: dys[0])


@rule("Sub")
def _sub(b, node, dys):
    """Y = A - B: dA = dY, dB = -dY."""
    return each_input(b, node, lambda i: dys[0] if i == 0 else b.op("Neg", dys[0]))


@rule("Mul")
def _mul(b, node, dys):
    """Y = A B: dA = dY B, dB = dY A."""
    return each_input(b, node, lambda i: b.op("Mul", dys[0], node.input[1 - i]))


@rule("Div")
def _div(b, node, dys):
    """Y = A / B: dA = dY / B, dB = -dY Y / B."""
    d, y = node.input[1], node.output[0]
    return each_input(b, node, lambda i: b.op("Div", dys[0], d) if i == 0 else
                       b.op("Neg", b.op("Div", b.op("Mul", dys[0], y), d)))


@rule("Mean")
def _mean(b, node, dys):
    """Y = (A + B + ...) / n: each dI = dY / n."""
    share = b.op("Div", dys[0], b.const(len(node.input), node.output[0]))
    return each_input(b, node, lambda i: share)


@rule("Where")
def _where(b, node, dys):
    """Y = Where(C, A, B): dA = Where(C, dY, 0), dB = Where(C, 0, dY)."""
    cond, zero = node.input[0], b.const(0, node.output[0])
    grads = each_input(b, node, lambda i: b.op(
        "Where", cond, dys[0], zero) if i == 1 else b.op("Where", cond, zero, dys[0]))
    return [None, *grads[1:]]


@rule("Expand")
def _expand(b, node, dys):
    """Y = Expand(X, shape): dX = dY summed over the broadcast axes."""
    return [b.unbroadcast(dys[0], node.input[0], node.output[0]), None]
