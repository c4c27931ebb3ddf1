"""Rules of shape and data movement: reshapes, transposes, concatenation, slicing, gathering, padding."""

from __future__ import annotations

import numpy as np

from camexport.graph.rules.table import attr, const_input, none_but, rule

# -- shape and data movement ---------------------------------------------------------------

@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b, node, dys):
    """Y = X viewed with another shape: dX = Reshape(dY, shape(X))."""
    return none_but(b.op("Reshape", dys[0], b.shape_of(node.input[0])), node)


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
    return none_but(b.op("Concat", *parts, axis=attr(node, "axis", 0)), node)


@rule("Slice", since=10)
def _slice(b, node, dys):
    """Y = X[start:end:step] per axis (step > 0): dX = dY with zeros interleaved and padded."""
    x = node.input[0]
    rank = b.facts.rank(x)
    starts = const_input(b, node, 1, "starts").tolist()
    ends = const_input(b, node, 2, "ends").tolist()
    axes = const_input(b, node, 3, "axes")
    axes = list(range(len(starts))) if axes is None else axes.tolist()
    steps = const_input(b, node, 4, "steps")
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
    return none_but(grad, node)


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
    pads = const_input(b, node, 1, "pads").tolist()
    rank = b.facts.rank(x)
    axes = const_input(b, node, 3, "axes")
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
        return none_but(dys[0], node)
    grad = b.op("Slice", dys[0], b.ints(starts), b.ints(ends), b.ints(sliced))
    return none_but(grad, node)
