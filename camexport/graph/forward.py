"""Forward mode (JVP) over piecewise-linear tails: the tangent of the outputs along a direction
given at a layer. ShapleyCAM's Hessian-vector product uses it: for a tail made of linear and
piecewise-linear ops, d(J^T)/de = 0 almost everywhere, so H_A v = J^T (d2t/dz2) (J v) exactly.

A rule takes ``(b, node, tangents)``, one tangent per input (None where none flows), and returns
one tangent per output. Only ops whose Jacobian is locally constant have a rule, so the product
is exact; a curved op (Sigmoid, Softmax, GELU, LayerNorm, a product of two tangents) raises.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx
from onnx import helper

from camexport.graph.autodiff import GradientError
from camexport.graph.builder import Builder, GraphFacts
from camexport.graph.cut import computed_into
from camexport.graph.rules import NO_GRADIENT, attr, find_rule

JVP_RULES: dict = {}


def jvp(*op_types: str):
    def register(fn):
        for op_type in op_types:
            JVP_RULES[op_type] = fn
        return fn

    return register


def _same_op(b, node, tangents, extra_inputs=True):
    """Apply the node's own (linear) op to the tangent of input 0, other inputs unchanged."""
    inputs = [tangents[0]] + (list(node.input[1:]) if extra_inputs else [])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return [b.op(node.op_type, *inputs, **attrs)]


@jvp("Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
     "GlobalAveragePool", "AveragePool", "Gather", "GatherND", "Slice", "Expand")
def _linear(b, node, tangents):
    """A linear op L in its first input: dY = L(dX) (AveragePool: zero padding, same divisor)."""
    if any(t is not None for t in tangents[1:]):
        raise NotImplementedError(f"{node.op_type} with a tangent on an index/shape input")
    return _same_op(b, node, tangents)[: len(node.output)]


@jvp("ReduceMean", "ReduceSum")
def _reduce(b, node, tangents):
    """Y = Reduce(X): dY = Reduce(dX)."""
    return _same_op(b, node, tangents)


# Element-wise ops with a diagonal Jacobian are self-adjoint: their VJP rule is their JVP rule.
for _op in ("Relu", "Clip", "BatchNormalization"):
    jvp(_op)(find_rule(_op, 20))


@jvp("MaxPool")
def _max_pool(b, node, tangents):
    """Y = max over windows: dY = dX at each window's argmax (first max wins)."""
    x = node.input[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    _, indices = b.op("MaxPool", x, outputs=2, **attrs)
    flat = b.op("Reshape", tangents[0], b.ints([-1]))
    picked = b.op("Gather", flat, b.op("Reshape", indices, b.ints([-1])), axis=0)
    return [b.op("Reshape", picked, b.shape_of(indices))]


@jvp("Conv")
def _conv(b, node, tangents):
    """Y = Conv(X, W) + B: dY = Conv(dX, W) (no bias)."""
    if any(t is not None for t in tangents[1:]):
        raise NotImplementedError("Conv with a tangent on its weight")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return [b.op("Conv", tangents[0], node.input[1], **attrs)]


@jvp("Gemm")
def _gemm(b, node, tangents):
    """Y = alpha op(A) op(B) + beta C, B constant: dY = alpha op(dA) op(B)."""
    if any(t is not None for t in tangents[1:]):
        raise NotImplementedError("Gemm with a tangent on B or C")
    return [b.op("Gemm", tangents[0], node.input[1], alpha=attr(node, "alpha", 1.0),
                 transA=attr(node, "transA", 0), transB=attr(node, "transB", 0))]


@jvp("MatMul")
def _matmul(b, node, tangents):
    """Y = A @ B with one side constant: dY = dA @ B or A @ dB."""
    if tangents[0] is not None and tangents[1] is not None:
        raise NotImplementedError("MatMul of two tangents is curved")
    if tangents[0] is not None:
        return [b.op("MatMul", tangents[0], node.input[1])]
    return [b.op("MatMul", node.input[0], tangents[1])]


@jvp("Mul")
def _mul(b, node, tangents):
    """Y = A B with one side constant: dY = dA B or A dB."""
    if tangents[0] is not None and tangents[1] is not None:
        raise NotImplementedError("Mul of two tangents is curved")
    k = 0 if tangents[0] is not None else 1
    return [b.op("Mul", tangents[k], node.input[1 - k])]


@jvp("Div")
def _div(b, node, tangents):
    """Y = A / B, B without tangent: dY = dA / B."""
    if tangents[1] is not None:
        raise NotImplementedError("Div by a tangent-carrying value is curved")
    return [b.op("Div", tangents[0], node.input[1])]


@jvp("Add", "Sub")
def _add(b, node, tangents):
    """Y = A +- B: dY = dA +- dB (an input without tangent contributes nothing)."""
    a, c = tangents
    if c is None:
        return [b.op("Expand", a, b.shape_of(node.output[0]))]
    other = c if node.op_type == "Add" else b.op("Neg", c)
    return [b.op("Expand", other, b.shape_of(node.output[0])) if a is None else
            b.op("Add", a, other)]


@jvp("Where")
def _where(b, node, tangents):
    """Y = Where(C, A, B): dY = Where(C, dA, dB), a missing tangent being 0."""
    zero = b.const(0, node.output[0])
    a, c = (t if t is not None else zero for t in tangents[1:])
    return [b.op("Expand", b.op("Where", node.input[0], a, c), b.shape_of(node.output[0]))]


@jvp("Concat")
def _concat(b, node, tangents):
    """Y = Concat(X...): dY = Concat(dX...), zeros where an input has no tangent."""
    parts = [t if t is not None else b.zeros_like(x) for t, x in zip(tangents, node.input)]
    return [b.op("Concat", *parts, axis=attr(node, "axis"))]


def linearize(model: onnx.ModelProto, facts: GraphFacts, builder: Builder,
              seeds: Mapping[str, str], output: str) -> str:
    """The tangent of ``output`` given tangents ``seeds`` (value -> tangent name)."""
    tangents = dict(seeds)
    reaches = computed_into(model.graph.node, [output])
    for node in model.graph.node:
        if node.op_type in NO_GRADIENT or not any(o in reaches for o in node.output):
            continue
        incoming = [tangents.get(name) if name else None for name in node.input]
        if all(t is None for t in incoming):
            continue
        rule = JVP_RULES.get(node.op_type)
        if rule is None:
            raise GradientError(
                f"ShapleyCAM needs an exact Hessian-vector product, which camexport computes for "
                f"piecewise-linear tails only; node {node.name!r} ({node.op_type}) is not one. "
                f"Choose a later layer")
        builder.owner = f"{node.name or node.output[0]}/jvp"
        try:
            outs = rule(builder, node, incoming)
        except NotImplementedError as err:
            raise GradientError(f"ShapleyCAM: cannot linearise node {node.name!r} "
                                f"({node.op_type}): {err}") from err
        for name, tangent in zip(node.output, outs):
            if tangent is not None and facts.is_float(name):
                tangents[name] = tangent
    if output not in tangents:
        raise GradientError("the output does not depend on the layer")
    return tangents[output]
