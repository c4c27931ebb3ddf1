"""Row pruning: a graph computes only the rows of its tensors that are read.

A ViT's head reads the class token alone (``Gather`` index 0 on the token axis), yet the graph
computes the last block for every token. After the attention every op of a block is row-wise
(LayerNormalization over the last axis, the MLP's MatMuls, Gelu, residual Adds), and the
attention's output rows need only the same query rows. :func:`prune_rows` pushes "only these
rows are read" backwards through such ops and slices as early as it can, so the graph computes
only the rows its outputs depend on. AblationCAM's tail (:func:`camexport.graph.cut.layer_tail`)
runs hundreds of copies of the last block: there it saves most of the work.

A *need* is what a reader reads of a value: :class:`Rows`, a contiguous range of one axis, or
None, the whole value. One walk in reverse topological order gives each value the hull of its
readers' needs; the rule of the value's producer (one table, :data:`RULES`, keyed by op type)
then says what its outputs hold (those rows, or the whole) and what it needs of each input:

- *sinks* start a need: Gather with constant indices, Slice with constant bounds (step 1);
- *row-wise* ops carry it: elementwise ops with broadcasting (an input broadcast along the axis
  is read whole), LayerNormalization / Softmax / reductions over other axes, MatMul and Gemm
  (rows of the left operand, columns of the right one), Transpose, Concat on another axis,
  Squeeze/Unsqueeze, Reshape with a constant shape that keeps the axis.

Attention needs no rule of its own: MatMul(Q, Kᵀ), Softmax over the keys and MatMul(P, V) carry
the query rows to Q, and K and V, right operands, are read whole. Any other op (Shape, a
Reshape whose shape is computed, a custom-domain op...) or a rule that does not apply reads its
inputs whole: the need stops there, and the graph is left as it is from there up. Graph outputs
are read whole, so the model's outputs keep their shapes and values: every row is computed by
the same ops from the same values, though a MatMul on fewer rows may block its sums differently
(float32 round-off: 2e-7 relative on a ViT's logits). A graph with subgraphs is returned as is.

The rewrite feeds every node exactly the rows its plan reads: where a value holds more (a graph
input, a value computed whole for another reader), a Slice named ``<node>/rows/<k>`` is
inserted; Gather indices, Slice bounds and Reshape shapes are re-based on the rows kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper

from camexport.graph.builder import Builder, GraphFacts

log = logging.getLogger(__name__)


class Rows(NamedTuple):
    """Rows ``start:stop`` of axis ``axis`` (non-negative, of the value's own rank)."""

    axis: int
    start: int
    stop: int


Need = Rows | None  # None: the whole value


class _Stop(Exception):
    """A rule does not apply to this node: it reads its inputs whole."""


@dataclass
class Plan:
    """What a node's outputs hold and what it reads of each input; ``patch`` re-bases the node's
    constants on the rows it is fed: patch(builder, node, reads, produces) edits ``node``."""

    produces: Need
    reads: list[Need]
    patch: Callable | None = None


Rule = Callable[[GraphFacts, onnx.NodeProto, Need], Plan]
RULES: dict[str, Rule] = {}


def rule(*op_types: str):
    def register(fn: Rule) -> Rule:
        for op_type in op_types:
            RULES[op_type] = fn
        return fn
    return register


class _RowBuilder(Builder):
    kind = "rows"


# -- helpers ---------------------------------------------------------------------------------
def _attr(node: onnx.NodeProto, name: str, default=None):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def _shape(facts: GraphFacts, name: str) -> tuple:
    shape = facts.shape_or_none(name)
    if shape is None:
        raise _Stop(f"no shape for {name!r}")
    return shape


def _constant(facts: GraphFacts, name: str) -> np.ndarray:
    value = facts.constant(name) if name else None
    if value is None:
        raise _Stop(f"{name!r} is not a constant")
    return value


def _ints(facts: GraphFacts, node: onnx.NodeProto, attribute: str, position: int) -> list[int] | None:
    """An int list given as attribute (older opsets) or constant input ``position``; None: absent."""
    if len(node.input) > position and node.input[position]:
        return [int(v) for v in _constant(facts, node.input[position]).reshape(-1)]
    found = _attr(node, attribute)
    return None if found is None else [int(v) for v in found]


def _aligned(facts: GraphFacts, name: str, rank: int, rows: Rows) -> Need:
    """The need on input ``name`` of a broadcasting op whose output (rank ``rank``) needs
    ``rows``: the aligned axis, or None where the input is broadcast along it."""
    if not name:
        return None
    shape = _shape(facts, name)
    axis = rows.axis - (rank - len(shape))
    if axis < 0 or shape[axis] == 1:
        return None
    if shape[axis] is None:
        raise _Stop(f"{name!r} may be broadcast along axis {axis}")
    return Rows(axis, rows.start, rows.stop)


def _moved(rows: Rows, axis: int) -> Rows:
    return Rows(axis, rows.start, rows.stop)


def _row_wise(rows: Need) -> Rows:
    if rows is None:
        raise _Stop("the whole output is read")
    return rows


# -- rules -----------------------------------------------------------------------------------
ELEMENTWISE = (
    "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Relu", "LeakyRelu", "Elu", "Selu", "Celu",
    "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "Gelu", "Erf",
    "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Cast", "Identity", "Not", "IsNaN", "IsInf",
    "ThresholdedRelu", "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean",
    "Where", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
    "PRelu", "Clip", "Dropout",
)


@rule(*ELEMENTWISE)
def _elementwise(facts, node, rows):
    """Y = f(X1, X2, ...), broadcasting: Y[rows] = f(X1[rows], ...) on each input's aligned axis."""
    rows = _row_wise(rows)
    rank = len(_shape(facts, node.output[0]))
    return Plan(rows, [_aligned(facts, name, rank, rows) for name in node.input])


@rule("LayerNormalization")
def _layer_norm(facts, node, rows):
    """Normalises axes axis..rank-1: row-wise on an axis before them (scale, bias broadcast)."""
    rows = _row_wise(rows)
    rank = len(_shape(facts, node.input[0]))
    if rows.axis >= _attr(node, "axis", -1) % rank:
        raise _Stop("rows on a normalised axis")
    return _elementwise(facts, node, rows)


@rule("Softmax", "LogSoftmax", "Hardmax")
def _softmax(facts, node, rows):
    """Softmax over ``axis`` (opset < 13: over axis..rank-1): row-wise on any other axis."""
    rows = _row_wise(rows)
    rank = len(_shape(facts, node.input[0]))
    axis = _attr(node, "axis", -1 if facts.opset >= 13 else 1) % rank
    if rows.axis == axis or (facts.opset < 13 and rows.axis > axis):
        raise _Stop("rows on the softmax axis")
    return Plan(rows, [rows])


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
      "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
def _reduce(facts, node, rows):
    """Y = reduce(X, axes): row-wise on an axis that is not reduced (kept dims or not)."""
    rows = _row_wise(rows)
    rank = len(_shape(facts, node.input[0]))
    axes = _ints(facts, node, "axes", 1)
    if not axes:
        raise _Stop("reduces every axis (or none, noop_with_empty_axes)")
    axes = {a % rank for a in axes}
    kept = list(range(rank)) if _attr(node, "keepdims", 1) else [a for a in range(rank) if a not in axes]
    if kept[rows.axis] in axes:
        raise _Stop("rows on a reduced axis")
    return Plan(rows, [_moved(rows, kept[rows.axis]), None])


@rule("MatMul")
def _matmul(facts, node, rows):
    """Y = A B: rows of Y are rows of A (B whole), columns of Y columns of B (A whole), batch
    axes both operands' aligned batch axes."""
    rows = _row_wise(rows)
    a, b = (_shape(facts, name) for name in node.input)
    rank = len(_shape(facts, node.output[0]))
    if len(a) < 2 or len(b) < 2:
        raise _Stop("a vector operand")
    if rows.axis == rank - 2:
        return Plan(rows, [_moved(rows, len(a) - 2), None])
    if rows.axis == rank - 1:
        return Plan(rows, [None, _moved(rows, len(b) - 1)])
    return Plan(rows, [_aligned(facts, name, rank, rows) for name in node.input])


@rule("Gemm")
def _gemm(facts, node, rows):
    """Y = alpha A' B' + beta C (A' = A or Aᵀ): rows from A', columns from B', C broadcast."""
    rows = _row_wise(rows)
    if rows.axis == 0:
        reads = [_moved(rows, 1 if _attr(node, "transA", 0) else 0), None]
    else:
        reads = [None, _moved(rows, 0 if _attr(node, "transB", 0) else 1)]
    if len(node.input) > 2:
        reads.append(_aligned(facts, node.input[2], 2, rows))
    return Plan(rows, reads)


@rule("Transpose")
def _transpose(facts, node, rows):
    """Y = X permuted: output axis k is input axis perm[k]."""
    rows = _row_wise(rows)
    perm = _attr(node, "perm") or list(reversed(range(len(_shape(facts, node.input[0])))))
    return Plan(rows, [_moved(rows, perm[rows.axis])])


@rule("Concat")
def _concat(facts, node, rows):
    """Y = concat(X1, X2, ...; axis): row-wise on any other axis."""
    rows = _row_wise(rows)
    if rows.axis == _attr(node, "axis") % len(_shape(facts, node.output[0])):
        raise _Stop("rows on the concatenated axis")
    return Plan(rows, [rows for _ in node.input])


@rule("Squeeze", "Unsqueeze")
def _squeeze(facts, node, rows):
    """Axes removed (Squeeze) or inserted (Unsqueeze): the rows' axis is renumbered."""
    rows = _row_wise(rows)
    before, after = _shape(facts, node.input[0]), _shape(facts, node.output[0])
    axes = _ints(facts, node, "axes", 1)
    if node.op_type == "Squeeze":
        squeezed = {a % len(before) for a in axes} if axes else {k for k, d in enumerate(before) if d == 1}
        kept = [k for k in range(len(before)) if k not in squeezed]
        return Plan(rows, [_moved(rows, kept[rows.axis]), None])
    inserted = {a % len(after) for a in axes}
    if rows.axis in inserted:
        raise _Stop("rows on an inserted axis")
    return Plan(rows, [_moved(rows, rows.axis - sum(a < rows.axis for a in inserted)), None])


@rule("Reshape")
def _reshape(facts, node, rows):
    """Y = reshape(X, constant shape): row-wise when the axis survives whole: input axis k and
    output axis j of the same size n, and the same static size from there to the end (then
    element (p, i, s) of X is element (p, i, s) of Y); the shape's entry j becomes the number
    of rows kept (-1 stays, inferred)."""
    rows = _row_wise(rows)
    before, after = _shape(facts, node.input[0]), _shape(facts, node.output[0])
    target = _constant(facts, node.input[1]).reshape(-1)
    size, tail = after[rows.axis], after[rows.axis:]
    if None in tail:
        raise _Stop("a symbolic size after the rows' axis")
    matches = [k for k, d in enumerate(before) if d == size and None not in before[k:]
               and np.prod(before[k:]) == np.prod(tail)]
    if not matches or (target[rows.axis] == 0 and matches[0] != rows.axis):
        raise _Stop("the reshape mixes the rows' axis with others")
    if target[rows.axis] not in (size, -1, 0):
        raise _Stop("unexpected target shape entry")

    def patch(builder, node, reads, produces):
        shape = target.copy()
        if shape[produces.axis] == size:
            shape[produces.axis] = produces.stop - produces.start
        node.input[1] = builder.array(shape)
    return Plan(rows, [_moved(rows, matches[0]), None], patch)


@rule("Gather")
def _gather(facts, node, rows):
    """Y = X[..., indices, ...] on ``axis``: reads rows min..max of the indices (a sink; the
    indices are re-based), or carries rows on an axis the indices do not make."""
    data = _shape(facts, node.input[0])
    axis = _attr(node, "axis", 0) % len(data)
    indices = _constant(facts, node.input[1])
    if rows is not None and (rows.axis < axis or rows.axis >= axis + indices.ndim):
        moved = rows.axis if rows.axis < axis else rows.axis - indices.ndim + 1
        return Plan(rows, [_moved(rows, moved), None])
    if data[axis] is None or indices.size == 0:
        raise _Stop("unknown axis size")
    flat = np.where(indices < 0, indices + data[axis], indices)

    def patch(builder, node, reads, produces):
        if reads[0] is not None and reads[0].start:
            node.input[1] = builder.array((flat - reads[0].start).astype(indices.dtype))
    return Plan(None, [Rows(axis, int(flat.min()), int(flat.max()) + 1), None], patch)


@rule("Slice")
def _slice(facts, node, rows):
    """Y = X[starts:ends:steps] on ``axes`` (constants): rows of a sliced axis (step 1) are
    rows start+i of X (a sink when the whole output is read; the bounds are re-based), rows of
    another axis pass through."""
    data = _shape(facts, node.input[0])
    starts, ends = (_constant(facts, name).reshape(-1) for name in node.input[1:3])
    axes = _ints(facts, node, "", 3) or list(range(len(starts)))
    axes = [a % len(data) for a in axes]
    steps = _ints(facts, node, "", 4) or [1] * len(axes)
    if rows is not None and rows.axis not in axes:
        return Plan(rows, [rows, *[None] * (len(node.input) - 1)])
    candidates = [k for k, a in enumerate(axes) if steps[k] == 1 and data[a] is not None
                  and (rows is None or a == rows.axis)]
    if not candidates:
        raise _Stop("no static axis sliced with step 1")
    k = candidates[0]
    dim = data[axes[k]]
    low, high = (int(np.clip(v + dim if v < 0 else v, 0, dim)) for v in (starts[k], ends[k]))
    if rows is not None:
        low, high = low + rows.start, min(low + rows.stop, high)
    if high <= low:
        raise _Stop("an empty slice")

    def patch(builder, node, reads, produces):
        offset = reads[0].start if reads[0] is not None else 0
        new_starts, new_ends = starts.copy(), ends.copy()
        new_starts[k], new_ends[k] = low - offset, high - offset
        node.input[1] = builder.array(new_starts)
        node.input[2] = builder.array(new_ends)
    return Plan(rows, [Rows(axes[k], low, high), *[None] * (len(node.input) - 1)], patch)


# -- the pass --------------------------------------------------------------------------------
def _hull(first: Need, second: Need) -> Need:
    if first is None or second is None or first.axis != second.axis:
        return None
    return Rows(first.axis, min(first.start, second.start), max(first.stop, second.stop))


def _whole(facts: GraphFacts, name: str, need: Need) -> Need:
    """``need``, or None when it covers the whole axis."""
    if need is None:
        return None
    shape = facts.shape_or_none(name)
    if shape is not None and need.start <= 0 and need.stop == shape[need.axis]:
        return None
    return need


def plan_rows(model: onnx.ModelProto, facts: GraphFacts | None = None) -> list[Plan]:
    """Each node's :class:`Plan` (graph order), from one walk in reverse topological order."""
    graph = model.graph
    facts = facts or GraphFacts(model)
    needs: dict[str, Need] = {o.name: None for o in graph.output}
    plans: list[Plan] = [None] * len(graph.node)
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        wanted = [needs[name] for name in node.output if name in needs]
        rows = wanted[0] if wanted and all(w == wanted[0] for w in wanted) else None
        plan = None
        found = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if found is not None and wanted:
            try:
                plan = found(facts, node, rows)
            except _Stop as stop:
                log.debug("rows stop at %s (%s): %s", node.name, node.op_type, stop)
        if plan is None:
            plan = Plan(None, [None] * len(node.input))
        plan.reads = [_whole(facts, name, need) if name else None
                      for name, need in zip(node.input, plan.reads)]
        plans[index] = plan
        for name, need in zip(node.input, plan.reads):
            if name:
                needs[name] = _whole(facts, name, _hull(needs[name], need)) if name in needs else need
    return plans


def prune_rows(model: onnx.ModelProto, keep: Collection[str] = ()) -> onnx.ModelProto:
    """``model`` computing only the rows of its tensors that its outputs depend on (see the
    module docstring); ``model`` itself when nothing can be pruned. Values named in ``keep``
    are read whole, as graph outputs are (a CAM layer whose every token is explained)."""
    extra = [name for name in dict.fromkeys(keep) if name not in {o.name for o in model.graph.output}]
    if extra:
        facts = GraphFacts(model)
        widened = onnx.ModelProto()
        widened.CopyFrom(model)
        widened.graph.output.extend(
            helper.make_tensor_value_info(name, facts.dtype(name), facts.shape(name)) for name in extra)
        pruned = prune_rows(widened)
        if pruned is widened:
            return model
        for _ in extra:
            pruned.graph.output.pop()
        return pruned
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for a in node.attribute):
        return model
    facts = GraphFacts(model)
    plans = plan_rows(model, facts)
    if all(plan.produces is None for plan in plans):
        return model  # sinks alone: their own Gather/Slice already reads what they need
    taken = {name for node in graph.node for name in [node.name, *node.input, *node.output]}
    taken |= {t.name for t in graph.initializer} | {v.name for v in graph.input}
    builder = _RowBuilder(facts, taken)
    holds: dict[str, Need] = {}
    sliced: dict[tuple[str, Rows], str] = {}
    nodes = []
    for node, plan in zip(graph.node, plans):
        builder.owner = node.name or node.output[0]
        new = onnx.NodeProto()
        new.CopyFrom(node)
        reads = plan.reads
        if plan.produces is None:  # a sink (or a node read whole) reads what its inputs hold
            reads = [holds.get(name) for name in node.input]
        for k, (name, need) in enumerate(zip(node.input, reads)):
            held = holds.get(name)
            if need is None or need == held:
                continue
            if (name, need) not in sliced:
                offset = held.start if held is not None else 0
                sliced[name, need] = builder.op(
                    "Slice", name, builder.ints([need.start - offset]),
                    builder.ints([need.stop - offset]), builder.ints([need.axis]))
            new.input[k] = sliced[name, need]
        if plan.patch is not None and any(need is not None for need in reads):
            plan.patch(builder, new, reads, plan.produces)
        nodes.extend(builder.nodes)
        builder.nodes.clear()
        nodes.append(new)
        for name in node.output:
            holds[name] = plan.produces
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    del result.graph.initializer[:]
    result.graph.initializer.extend(t for t in [*graph.initializer, *builder.initializers]
                                    if t.name in used)
    kept = [v for v in graph.value_info if holds.get(v.name) is None]
    del result.graph.value_info[:]
    result.graph.value_info.extend(kept)
    onnx.checker.check_model(result)
    return result
