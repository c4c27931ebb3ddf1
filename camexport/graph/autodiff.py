"""The reverse-mode driver: prune to the tail, walk it backwards, accumulate fan-out.

Only values that both depend on a differentiated tensor and reach a seed are differentiated
(the *tail*); weights never receive a cotangent. Each node's rule comes from
:mod:`camexport.graph.rules` (or an override table, e.g. guided ReLU); the driver itself has
no special cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from camexport.errors import CamexportError
from camexport.graph.builder import Builder, GraphFacts
from camexport.graph.cut import computed_from, computed_into
from camexport.graph.rules import NO_GRADIENT, REFUSED, Rule, find_rule


class GradientError(CamexportError):
    """A node on the differentiated path could not be differentiated."""


def _differentiable(node: onnx.NodeProto) -> bool:
    return node.op_type not in NO_GRADIENT


def differentiate(
    model: onnx.ModelProto,
    facts: GraphFacts,
    builder: Builder,
    seeds: Mapping[str, str],
    wrt: Sequence[str],
    overrides: Mapping[str, Rule] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Emit (into ``builder``) the cotangents of ``wrt`` given cotangents ``seeds``.

    ``seeds`` maps primal values to the names of their cotangents. Returns a map from each
    value of ``wrt`` to the name of its cotangent. ``labels`` names each ``wrt`` value for
    error messages (the layer the user asked for).
    """
    nodes = list(model.graph.node)
    labels = dict(labels or {})
    overrides = dict(overrides or {})

    active = (computed_from(nodes, wrt, _differentiable, facts.is_float)
              & computed_into(nodes, seeds, _differentiable, facts.is_float))
    missing = [w for w in wrt if w not in active]
    if missing:
        names = ", ".join(labels.get(w, w) for w in missing)
        raise GradientError(f"the target score does not depend on layer(s) {names}")
    builder.active = active

    contributions: dict[str, list[str]] = {value: [grad] for value, grad in seeds.items()}
    for node in reversed(nodes):
        if not any(o in active for o in node.output) or node.op_type in NO_GRADIENT:
            continue
        dys = [_total(builder, contributions.get(o)) for o in node.output]
        if all(dy is None for dy in dys):
            continue
        rule = overrides.get(node.op_type) or find_rule(node.op_type, facts.opset, node.domain)
        if rule is None:
            raise GradientError(_missing_rule_message(node, facts, nodes, wrt, labels))
        builder.owner = node.name or node.output[0]
        try:
            grads = rule(builder, node, dys)
        except (NotImplementedError, KeyError, ValueError) as err:
            raise GradientError(
                f"cannot differentiate node {node.name!r} ({node.op_type}, opset {facts.opset}): "
                f"{err}") from err
        if len(grads) != len(node.input):
            raise GradientError(f"rule for {node.op_type} returned {len(grads)} cotangents "
                                f"for {len(node.input)} inputs (node {node.name!r})")
        for name, grad in zip(node.input, grads):
            if grad is not None and name in active:
                contributions.setdefault(name, []).append(grad)
    return {w: _total(builder, contributions[w]) for w in wrt}


def _total(builder: Builder, grads: list[str] | None) -> str | None:
    """The sum of the cotangent contributions of one value (fan-out accumulated by Add)."""
    if not grads:
        return None
    total = grads[0]
    builder.owner = "accumulate"
    for grad in grads[1:]:
        total = builder.op("Add", total, grad)
    grads[:] = [total]
    return total


def _missing_rule_message(node, facts, nodes, wrt, labels) -> str:
    needing = [labels.get(w, w) for w in wrt
               if set(node.input) & computed_from(nodes, [w], _differentiable, facts.is_float)]
    why = REFUSED.get(node.op_type, "no gradient rule is registered for this op")
    return (f"cannot differentiate node {node.name!r}: op {node.op_type!r} "
            f"(domain {node.domain or 'ai.onnx'!r}, opset {facts.opset}) lies between layer(s) "
            f"{', '.join(needing)} and the score: {why}. Choose a later layer, or add a rule "
            f"in camexport/graph/rules/")
