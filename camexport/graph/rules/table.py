"""The one table of reverse-mode (VJP) rules, keyed by op type and opset, and the helpers rules share.

A rule takes ``(b, node, dys)``: the builder, the primal node and one cotangent name per node
output (None where nothing flows back), and returns exactly one cotangent per node input (None
where nothing flows, or where ``b.needs(input)`` is false). Rules only emit default-domain ONNX
ops through the builder; shape bookkeeping lives in the builder's helpers. Each rule's docstring
is its formula. Cotangents of weights (initializers) are never built: camexport differentiates
activations only.
"""

from __future__ import annotations

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


def input_at(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i and node.input[i] else ""


def const_input(b: Builder, node: onnx.NodeProto, i: int, what: str) -> np.ndarray | None:
    name = input_at(node, i)
    if not name:
        return None
    value = b.facts.constant(name)
    if value is None:
        raise NotImplementedError(f"{node.op_type} needs a constant {what} (input {name!r})")
    return value


def none_but(first, node) -> list:
    return [first] + [None] * (len(node.input) - 1)


def each_input(b, node, make) -> list:
    """Cotangent of each needed input: ``make(i)`` shaped like the output, then unbroadcast."""
    y = node.output[0]
    return [b.unbroadcast(make(i), name, y) if b.needs(name) else None
            for i, name in enumerate(node.input)]
