"""AblationCAM's tail with rank-1 updates: one run computes the outputs of many ablated copies.

Every copy AblationCAM runs differs from the layer's tensor A (one image) in one channel c, set
to a value v: A' = A + (v - A[c]) e_c. Where the tail reads A through a linear op with constant
weights W along the channel axis (the q/k/v projection of a ViT block after its norm1), the
product of a copy is the product of A plus a rank-1 correction:

    A' W = A W + (v - A[..., c]) ⊗ W[c, :]

so the tail computes A W once per run and never the product of a copy. :func:`ablation_tail`
rewrites a layer tail (:func:`camexport.graph.cut.layer_tail`) into a graph whose inputs are

- the layer tensor of the one image, batch 1, unablated;
- ``ablated_channels`` (n,) int64 and ``ablated_values`` (n,), one row per copy;
- the tail's other inputs (values computed before the layer, :class:`~camexport.graph.cut.LayerTail`
  ``frontier``) for the same image, batch 1: they are expanded to n rows in the graph, after the
  row Slices (:mod:`camexport.graph.prune_rows`) that read them, so a ViT's residual stream is
  copied for its class-token row only;

and whose output holds one row per copy. Two tables:

- :data:`LINEAR`, the readers of A that start the rank-1 form: MatMul with a constant right
  operand and Gemm with constant B (the channel axis A's last), a 1 x 1 Conv with stride 1
  and one group (NCHW: Y' = Y + (v - A[:, c]) W[:, c]);
- :data:`CARRY`, the ops the form goes through part by part (:class:`Form`: base, delta =
  v - A[c], each copy's weight rows): a constant bias Add (on the base only), Transpose,
  Reshape that regroups trailing axes, Slice and Squeeze. On a ViT the q/k/v product goes
  through its bias, the head split and the q/k/v Slices this way, so only q (the class
  token's row) and k are materialised per copy (base + delta * rows), where a reader not in
  the table (the attention's q k^T) needs them; the attention's P v, a MatMul whose right
  operand is a form, is P base + (P delta) rows (:func:`_product`).

Any other reader of A (a residual Add, a LayerNormalization...) reads the ablated copies,
built in the graph as Where(channel == c, v, A). A tail in which no reader of A is linear (a
CNN's ReLU or pooling, a ViT layer whose next op is a norm) gains nothing:
:func:`ablation_tail` returns None and the caller runs the copies through the plain tail.

Round-off: the corrected product sums the same terms in another order; float32 outputs differ
from the plain tail's by a few ulps of the largest term (|v W[c]|, v ≈ min A - 1e7).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from camexport.graph.builder import Builder, GraphFacts

log = logging.getLogger(__name__)

#: the fast tail's inputs: channel c (int64) and value v of each copy, one row per copy
ABLATED_CHANNELS = "ablated_channels"
ABLATED_VALUES = "ablated_values"
#: the symbolic size of their one axis (the number of copies)
COPIES = "copies"


class _AblationBuilder(Builder):
    kind = "ablate"


def _attr(node: onnx.NodeProto, name: str, default=None):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def _per_copy(builder: Builder, name: str, rank: int) -> str:
    """(n,) -> (n, 1, ..., 1) of rank ``rank``."""
    return builder.op("Reshape", name, builder.ints([-1] + [1] * (rank - 1)))


def _last_axis_rows(builder: Builder, weight: str, columns: int, rank: int) -> str:
    """Rows c of the constant W (D, N), as (n, 1, ..., 1, N) of rank ``rank``."""
    rows = builder.op("Gather", weight, ABLATED_CHANNELS, axis=0)
    return builder.op("Reshape", rows, builder.ints([-1] + [1] * (rank - 2) + [columns]))


LinearRule = Callable[[Builder, onnx.NodeProto, str, int], tuple[str, str] | None]
#: readers of A that are linear along the ablated axis with constant weights, by op type:
#: rule(builder, node, A, axis) emits the node on A (batch 1) and each copy's weight rows,
#: returning (base, rows) for :func:`_corrected`, or None: the rule does not apply (the node
#: reads the copies)
LINEAR: dict[str, LinearRule] = {}


def _registrar(table: dict):
    """A decorator factory: ``@registrar(op_type)`` puts the function in ``table``."""

    def for_op(op_type: str):
        def register(fn):
            table[op_type] = fn
            return fn
        return register
    return for_op


linear = _registrar(LINEAR)


@linear("MatMul")
def _matmul(builder, node, tensor, axis):
    """Y = A W, W constant (D, N), A's last axis: Y' = A W + (v - A[..., c]) ⊗ W[c, :]."""
    weight = builder.facts.constant(node.input[1])
    rank = builder.facts.rank(tensor)
    if node.input[0] != tensor or node.input[1] == tensor or weight is None or weight.ndim != 2 \
            or rank < 2 or axis != rank - 1:
        return None
    base = builder.op("MatMul", tensor, node.input[1])
    return base, _last_axis_rows(builder, node.input[1], weight.shape[1], rank)


@linear("Gemm")
def _gemm(builder, node, tensor, axis):
    """Y = alpha A B' + beta C, B constant: Y' = Y + (v - A[:, c]) ⊗ alpha B'[c, :]."""
    weight = builder.facts.constant(node.input[1])
    if node.input[0] != tensor or tensor in node.input[1:] or weight is None or _attr(node, "transA", 0) \
            or axis != 1:
        return None
    alpha, name = _attr(node, "alpha", 1.0), node.input[1]
    weight = weight.T if _attr(node, "transB", 0) else weight
    if _attr(node, "transB", 0) or alpha != 1.0:
        name = builder.array(np.ascontiguousarray(weight * np.asarray(alpha, weight.dtype), weight.dtype))
    base = builder.op("Gemm", *node.input, **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    return base, _last_axis_rows(builder, name, weight.shape[1], 2)


@linear("Conv")
def _conv(builder, node, tensor, axis):
    """Y = conv(A, W) + b, 1 x 1 kernel, stride 1, no padding, one group, channel axis 1:
    Y' = Y + (v - A[:, c]) W[:, c] (each output channel o adds W[o, c] (v - A[:, c]))."""
    weight = builder.facts.constant(node.input[1])
    rank = builder.facts.rank(tensor)
    if node.input[0] != tensor or tensor in node.input[1:] or weight is None or axis != 1 \
            or any(d != 1 for d in weight.shape[2:]) or _attr(node, "group", 1) != 1 \
            or any(s != 1 for s in _attr(node, "strides", []) or []) \
            or any(p != 0 for p in _attr(node, "pads", []) or []):
        return None
    rows = builder.op("Gather", node.input[1], ABLATED_CHANNELS, axis=1)  # (O, n, 1, ...)
    rows = builder.op("Transpose", rows, perm=[1, 0, *range(2, rank)])  # (n, O, 1, ...)
    base = builder.op("Conv", *node.input, **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    return base, rows


# -- the copies of a product, carried through layout ops ----------------------------------------
@dataclass
class Form:
    """A value of every copy held as base + delta * rows (broadcast), never materialised:
    ``base`` the value of A (the copies' axis of size 1), ``delta`` v - A[c] (1 on the axes
    the weights make), ``rows`` each copy's weights (1 on the axes A's positions make).
    ``shapes`` holds the three static shapes (None: the number of copies), ``batch`` the
    copies' axis."""

    base: str
    delta: str
    rows: str
    shapes: tuple[tuple, tuple, tuple]
    batch: int = 0

    @property
    def parts(self) -> tuple[str, str, str]:
        return self.base, self.delta, self.rows


Carry = Callable[[Builder, onnx.NodeProto, Form], Form | None]
#: layout ops (and a constant bias) that a Form goes through part by part, by op type:
#: carry(builder, node, form) -> the Form of the node's output, or None (the node reads the
#: materialised copies). Each op then runs on the parts' few rows instead of n whole copies.
CARRY: dict[str, Carry] = {}


carry = _registrar(CARRY)


def _constant_inputs(builder: Builder, node: onnx.NodeProto) -> list[np.ndarray] | None:
    values = [builder.facts.constant(name) if name else None for name in node.input[1:]]
    return None if any(v is None for v, name in zip(values, node.input[1:]) if name) else values


@carry("Add")
def _carry_add(builder, node, form):
    """Y = X + C, C a constant that does not grow X (a bias): base + C."""
    others = [name for name in node.input if name != node.input[0]]
    constant = builder.facts.constant(others[0]) if len(others) == 1 else None
    full = builder.facts.shape(node.output[0])
    if constant is None or constant.ndim > len(full) or builder.facts.shape(node.input[0]) != full:
        return None
    aligned = form.shapes[0][len(full) - constant.ndim:]
    if any(c not in (1, d) for c, d in zip(constant.shape, aligned)):
        return None
    return Form(builder.op("Add", form.base, others[0]), form.delta, form.rows, form.shapes, form.batch)


@carry("Transpose")
def _carry_transpose(builder, node, form):
    """Y = X permuted: each part permuted."""
    perm = _attr(node, "perm") or list(reversed(range(len(form.shapes[0]))))
    parts = [builder.op("Transpose", part, perm=list(perm)) for part in form.parts]
    shapes = tuple(tuple(shape[k] for k in perm) for shape in form.shapes)
    return Form(*parts, shapes, list(perm).index(form.batch))


@carry("Squeeze")
def _carry_squeeze(builder, node, form):
    """Y = X without size-1 axes (constant): each part without them."""
    rank = len(form.shapes[0])
    given = builder.facts.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    axes = _attr(node, "axes") or (None if given is None else list(given.reshape(-1)))
    if not axes:
        return None
    axes = sorted(int(a) % rank for a in axes)
    if form.batch in axes or any(shape[a] != 1 for shape in form.shapes for a in axes):
        return None
    parts = [builder.op("Squeeze", part, builder.ints(axes)) for part in form.parts]
    shapes = tuple(tuple(d for k, d in enumerate(shape) if k not in axes) for shape in form.shapes)
    return Form(*parts, shapes, form.batch - sum(a < form.batch for a in axes))


@carry("Slice")
def _carry_slice(builder, node, form):
    """Y = X[starts:ends:steps] on constant axes other than the copies': each part sliced on
    the axes where it is not broadcast."""
    constants = _constant_inputs(builder, node)
    if constants is None:
        return None
    starts, ends = (c.reshape(-1) for c in constants[:2])
    rank = len(form.shapes[0])
    given = [c.reshape(-1) if c is not None else None for c in constants[2:]] + [None, None]
    axes = [int(a) % rank for a in (given[0] if given[0] is not None else range(len(starts)))]
    steps = given[1] if given[1] is not None else [1] * len(axes)
    full = builder.facts.shape(node.input[0])
    if form.batch in axes or any(full[a] is None for a in axes):
        return None
    parts, shapes = [], []
    for part, shape in zip(form.parts, form.shapes):
        kept = [k for k, a in enumerate(axes) if shape[a] == full[a]]
        if not kept:
            parts.append(part)
            shapes.append(shape)
            continue
        parts.append(builder.op("Slice", part, *(builder.ints([int(v[k]) for k in kept])
                                                 for v in (starts, ends, axes, steps))))
        sliced = list(shape)
        for k in kept:
            bounds = slice(int(starts[k]), int(ends[k]), int(steps[k])).indices(shape[axes[k]])
            sliced[axes[k]] = len(range(*bounds))
        shapes.append(tuple(sliced))
    return Form(*parts, tuple(shapes), form.batch)


@carry("Reshape")
def _carry_reshape(builder, node, form):
    """Y = reshape(X, constant shape) that keeps the leading axes (the copies' among them) and
    regroups the rest: each part regrouped where it is whole, all ones where broadcast."""
    before, after = builder.facts.shape(node.input[0]), builder.facts.shape(node.output[0])
    if builder.facts.constant(node.input[1]) is None:
        return None
    keep = 0
    while keep < min(len(before), len(after)) and before[keep] == after[keep]:
        keep += 1
    while keep > form.batch and None not in before[keep:] and None not in after[keep:] and \
            np.prod(before[keep:]) != np.prod(after[keep:]):
        keep -= 1
    if keep <= form.batch or None in before[keep:] or None in after[keep:] or \
            np.prod(before[keep:]) != np.prod(after[keep:]):
        return None
    parts, shapes = [], []
    for part, shape in zip(form.parts, form.shapes):
        if tuple(shape[keep:]) == tuple(before[keep:]):
            rest = tuple(after[keep:])
        elif all(d == 1 for d in shape[keep:]):
            rest = (1,) * (len(after) - keep)
        else:
            return None
        target = (*shape[:keep], *rest)
        parts.append(builder.op("Reshape", part, builder.ints([-1 if d is None else d for d in target])))
        shapes.append(target)
    return Form(*parts, tuple(shapes), form.batch)


def _start_form(builder: Builder, tensor: str, axis: int, rank: int, base: str, rows: str,
                out: str) -> Form:
    """The Form of a linear node's output ``out``: ``base`` its value on A, ``rows`` each
    copy's weights (1 on A's position axes), delta = v - A[c] (1 on the weights' axis)."""
    swap = list(range(rank))
    swap[0], swap[axis] = axis, 0
    column = builder.op("Transpose", builder.op("Gather", tensor, ABLATED_CHANNELS, axis=axis), perm=swap)
    delta = builder.op("Sub", _per_copy(builder, ABLATED_VALUES, rank), column)
    full = builder.facts.shape(out)
    shapes = (tuple(1 if k == 0 else d for k, d in enumerate(full)),
              tuple(1 if k == axis else d for k, d in enumerate(full)),
              tuple(d if k in (0, axis) else 1 for k, d in enumerate(full)))
    return Form(base, delta, rows, shapes)


def _product(builder: Builder, node: onnx.NodeProto, form: Form) -> str | None:
    """Y = X F, F a Form whose delta is one column and rows one row on the last two axes (a
    ViT's attention P V): X F = X base + (X delta) rows, so F is never materialised; None
    where the shapes do not allow it."""
    rank = len(form.shapes[0])
    if builder.facts.rank(node.input[0]) != rank or rank < 3 or form.batch >= rank - 2 \
            or form.shapes[1][-1] != 1 or form.shapes[2][-2] != 1:
        return None
    left = builder.op("MatMul", node.input[0], form.base)
    right = builder.op("Mul", builder.op("MatMul", node.input[0], form.delta), form.rows)
    return builder.op("Add", left, right, name=node.output[0])


def _materialise(builder: Builder, form: Form, name: str) -> str:
    """The copies themselves: base + delta * rows, as value ``name``."""
    return builder.op("Add", form.base, builder.op("Mul", form.delta, form.rows), name=name)


def _slice_keeps_rows(facts: GraphFacts, node: onnx.NodeProto) -> bool:
    """A Slice with constant axes that do not include the batch axis 0."""
    if node.op_type != "Slice" or len(node.input) < 4 or not node.input[3]:
        return False
    axes = facts.constant(node.input[3])
    rank = len(facts.shape_or_none(node.input[0]) or ())
    return axes is not None and rank > 0 and all(int(a) % rank != 0 for a in axes.reshape(-1))


def ablation_tail(tail: onnx.ModelProto, tensor: str, axis: int) -> onnx.ModelProto | None:
    """The rank-1 rewrite of ``tail`` (see the module docstring) for ablating axis ``axis`` of
    its input ``tensor``; None when no reader of ``tensor`` is linear along that axis (or the
    graph has subgraphs): then nothing is gained."""
    graph = tail.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for a in node.attribute):
        return None
    facts = GraphFacts(tail)
    shape = facts.shape_or_none(tensor)
    if shape is None or not shape or shape[axis % len(shape)] is None:
        return None
    rank, axis = len(shape), axis % len(shape)
    channels = shape[axis]
    taken = {name for node in graph.node for name in [node.name, *node.input, *node.output]}
    taken |= {t.name for t in graph.initializer} | {v.name for v in graph.input}
    builder = _AblationBuilder(facts, taken)
    frontier = [v.name for v in graph.input if v.name != tensor]
    top: list[onnx.NodeProto] = []  # nodes that read graph inputs and constants only
    expand_shapes: dict[int, str] = {}
    copied: dict[str, str] = {}

    def on_top(emit: Callable[[], str]) -> str:
        kept = builder.nodes[:]
        builder.nodes.clear()
        found = emit()
        top.extend(builder.nodes)
        builder.nodes[:] = kept
        return found

    def expand(name: str, rank: int, out: str | None = None) -> str:
        """``name`` (1, ...) repeated for every copy: Expand to (n, 1, ..., 1)."""
        if rank not in expand_shapes:
            expand_shapes[rank] = on_top(lambda: builder.op(
                "Concat", builder.op("Shape", ABLATED_CHANNELS), builder.ints([1] * (rank - 1)), axis=0))
        return builder.op("Expand", name, expand_shapes[rank], name=out)

    ablated = None
    nodes, fast, forms = [], 0, {}
    for node in graph.node:
        builder.owner = node.name or node.output[0]
        formed = [name for name in node.input if name in forms]
        if formed:
            rule = CARRY.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            found = rule(builder, node, forms[formed[0]]) if rule and formed == [node.input[0]] else None
            if found is not None:
                forms[node.output[0]] = found
                nodes.extend(builder.nodes)
                builder.nodes.clear()
                continue
            if node.op_type == "MatMul" and formed == [node.input[1]] and node.input[0] != node.input[1] \
                    and not ({tensor, *frontier} & {node.input[0]}) \
                    and _product(builder, node, forms[formed[0]]) is not None:
                nodes.extend(builder.nodes)
                builder.nodes.clear()
                continue
            builder.nodes.clear()
            builder.nodes.clear()
            for name in formed:
                form = forms.pop(name)
                if form is not None:  # None: materialised before
                    _materialise(builder, form, name)
                    forms[name] = None
            forms = {k: v for k, v in forms.items() if v is not None}
            nodes.extend(builder.nodes)
            builder.nodes.clear()
        if tensor in node.input:
            rule = LINEAR.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            found = rule(builder, node, tensor, axis) if rule is not None else None
            if found is not None:
                forms[node.output[0]] = _start_form(builder, tensor, axis, rank, *found, node.output[0])
                nodes.extend(builder.nodes)
                builder.nodes.clear()
                fast += 1
                continue
            builder.nodes.clear()
            if ablated is None:  # the copies themselves: Where(channel == c, v, A)
                builder.owner = "copies"
                positions = np.arange(channels, dtype=np.int64).reshape(
                    [channels if k == axis else 1 for k in range(rank)])
                ablated = on_top(lambda positions=positions: builder.op(
                    "Where", builder.op("Equal", builder.array(positions),
                                        _per_copy(builder, ABLATED_CHANNELS, rank)),
                    _per_copy(builder, ABLATED_VALUES, rank), tensor))
            node = _renamed_input(node, tensor, ablated)
        read = [name for name in frontier if name in node.input]
        if read and read == [node.input[0]] and _slice_keeps_rows(facts, node):
            new = _copy(node)
            new.output[0] = builder.fresh(f"{builder.owner}/one")
            nodes.append(new)  # the rows read, then repeated for every copy
            expand(new.output[0], facts.rank(node.output[0]), out=node.output[0])
            nodes.extend(builder.nodes)
            builder.nodes.clear()
            continue
        for name in read:
            if name not in copied:
                builder.owner = f"{name}/copies"
                copied[name] = on_top(lambda name=name: expand(name, facts.rank(name)))
            node = _renamed_input(node, name, copied[name])
        nodes.append(node)
    for output in graph.output:
        if output.name in forms:
            _materialise(builder, forms[output.name], output.name)
    nodes.extend(builder.nodes)
    if not fast:
        log.debug("no reader of %s is linear along axis %d: no rank-1 tail", tensor, axis)
        return None
    elem = facts.dtype(tensor)
    inputs = [*graph.input,
              helper.make_tensor_value_info(ABLATED_CHANNELS, onnx.TensorProto.INT64, [COPIES]),
              helper.make_tensor_value_info(ABLATED_VALUES, elem, [COPIES])]
    used = {name for node in [*top, *nodes] for name in node.input}
    result = helper.make_model(
        helper.make_graph([*top, *nodes], f"{graph.name}/ablate", inputs, list(graph.output),
                          [t for t in [*graph.initializer, *builder.initializers] if t.name in used]),
        opset_imports=tail.opset_import, ir_version=tail.ir_version)
    result.functions.extend(tail.functions)
    onnx.checker.check_model(result)
    return result


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    new = onnx.NodeProto()
    new.CopyFrom(node)
    return new


def _renamed_input(node: onnx.NodeProto, old: str, new_name: str) -> onnx.NodeProto:
    new = _copy(node)
    for k, name in enumerate(new.input):
        if name and name == old:
            new.input[k] = new_name
    return new
