"""Sparse targets: a split's tail pruned to the part of the reverse pass a target reaches.

A detector's target weights one anchor of thousands (one box's class score), yet the reverse
pass runs dense over every level of the head: YOLO's cotangent is sliced per level (the
backward of the Concat of its three levels' rows), and two of the three slices are zero, so
their heads' backward and the neck's backward from them compute zeros that are then added to
the gradients. :func:`prune_zeros` finds those values ahead of the run, from the *support* of
the target weights (the box of indices, per axis, outside which the weights are zero), and
removes what computes them.

One walk in graph order gives each value computed from the source its support: a box (one
``(start, stop)`` per axis, empty when it is zero everywhere) or None, nonzero anywhere. The
rules are exact for the ops a reverse pass is made of:

- zero-preserving element-wise ops keep the box (Neg, Abs, Relu, ...); a product (Mul, a
  numerator of Div, MatMul, Conv without bias...) is zero where any tracked factor is; a sum
  (Add, Sub, Sum, Where of two tracked values) is nonzero on the hull of its terms' boxes;
- Transpose permutes the box, Slice cuts it (and re-bases it), Pad with zeros shifts it,
  Concat places its inputs' boxes along the axis;
- any other op is zero where its data inputs all are (Reshape, Resize, Conv, ReduceSum...)
  when it is linear in them, and nonzero anywhere otherwise.

Then a sum with a zero term is rewritten to its other terms (Add(x, 0) -> Identity(x), an exact
rewrite), graph outputs that are zero are dropped (the caller fills their zeros), and what no
output reads any more goes. A value that is zero but read by an op that is not linear in it
(Exp(0) is 1) is still computed: the result is the unpruned graph's, value for value.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from camexport.graph.builder import GraphFacts
from camexport.graph.cut import computed_from, computed_into

Box = tuple[tuple[int, int], ...]
#: the stop of an axis whose size is not static (the batch axis): read as "to the end"
END = 1 << 62

#: element-wise ops with f(0) = 0: their output is zero where their input is
_ZERO_PRESERVING = frozenset({"Identity", "Neg", "Abs", "Relu", "Sign", "Sqrt", "Tanh", "Erf",
                              "Sin", "Asin", "Atan", "Sinh", "LeakyRelu", "Cast"})
#: ops zero wherever any one tracked input is (products); Conv, ConvTranspose and Gemm only
#: without a bias (checked below)
_PRODUCTS = frozenset({"Mul", "And", "MatMul", "Einsum", "Conv", "ConvTranspose", "Gemm"})
#: ops linear in their data input (input 0): zero output for a zero input
_LINEAR = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Tile", "Resize",
                     "Upsample", "ReduceSum", "ReduceMean", "GlobalAveragePool", "AveragePool",
                     "Gather", "GatherElements", "GatherND", "Split", "DepthToSpace",
                     "SpaceToDepth", "Slice", "Pad", "Transpose", "MaxPool", "CumSum"})
#: ops whose removal makes a pruned tail worth its own session
HEAVY = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"})


@dataclass
class Pruned:
    """A tail with what a sparse target leaves at zero removed: ``model`` computes the tail's
    other outputs; ``zeros`` maps each output left out (zero everywhere) to its shape (None
    on the batch axis); ``removed``: how many nodes of ``HEAVY`` ops went."""

    model: onnx.ModelProto
    zeros: dict[str, tuple]
    removed: int


def support_of(weights: np.ndarray) -> Box:
    """The box (per axis after the first, the rows' axis) outside which ``weights`` is zero;
    empty when it is zero everywhere."""
    nonzero = np.asarray(weights) != 0  # once (np.nonzero itself is 6x slower here)
    box = []
    for axis in range(1, nonzero.ndim):
        seen = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(nonzero.ndim) if a != axis)))
        box.append((int(seen[0]), int(seen[-1]) + 1) if len(seen) else (0, 0))
    return ((0, END), *box)


def _empty(box: Box | None) -> bool:
    return box is not None and any(lo >= hi for lo, hi in box)


def _hull(boxes: Sequence[Box]) -> Box | None:
    boxes = [b for b in boxes if not _empty(b)]
    if any(b is None for b in boxes):
        return None
    if not boxes:
        return None
    return tuple((min(b[k][0] for b in boxes), max(b[k][1] for b in boxes)) for k in range(len(boxes[0])))


def _meet(boxes: Sequence[Box]) -> Box | None:
    known = [b for b in boxes if b is not None]
    if not known:
        return None
    return tuple((max(b[k][0] for b in known), min(b[k][1] for b in known)) for k in range(len(known[0])))


class _Walk:
    """The support of every value computed from the source (graph order)."""

    def __init__(self, model: onnx.ModelProto, source: str, box: Box, facts: GraphFacts | None = None,
                 nodes: Sequence[onnx.NodeProto] | None = None, zeros: dict | None = None):
        """``nodes``: the model's nodes that read a value computed from ``source``, in graph
        order, where the caller knows them; ``zeros``: a dict the empty boxes of values are
        kept in (both for one tail walked for many boxes)."""
        self.facts = facts or GraphFacts(model)
        self._zeros = {} if zeros is None else zeros
        self.support: dict[str, Box | None] = {source: box}
        for node in model.graph.node if nodes is None else nodes:
            if any(name in self.support for name in node.input if name):
                try:
                    outs = self._rule(node)
                except (KeyError, ValueError, TypeError, IndexError):
                    outs = [None] * len(node.output)
                for name, out in zip(node.output, outs):
                    self.support[name] = out

    # helpers -------------------------------------------------------------------------------
    def _shape(self, name: str) -> tuple:
        return self.facts.shape(name)

    def _dims(self, name: str) -> tuple[int, ...]:
        return tuple(END if d is None else int(d) for d in self._shape(name))

    def _zero(self, name: str) -> Box:
        """The empty box of value ``name``: zero everywhere."""
        box = self._zeros.get(name)
        if box is None:
            box = self._zeros[name] = tuple((0, 0) for _ in self._shape(name))
        return box

    def _tracked(self, name: str) -> bool:
        return bool(name) and name in self.support

    def _aligned(self, name: str, out: str) -> Box | None:
        """The support of input ``name`` in the frame of broadcast output ``out``."""
        box = self.support[name]
        if box is None:
            return box
        if _empty(box):
            return self._zero(out)
        dims, out_dims = self._dims(name), self._dims(out)
        lead = len(out_dims) - len(dims)
        aligned = [(0, d) for d in out_dims[:lead]]
        for (lo, hi), d, od in zip(box, dims, out_dims[lead:]):
            aligned.append((0, od) if d == 1 and od != 1 else (lo, hi))
        return tuple(aligned)

    def _ints(self, node: onnx.NodeProto, position: int | None, attribute: str):
        """An int list given as constant input ``position`` or as attribute; None: absent."""
        if position is not None and len(node.input) > position and node.input[position]:
            value = self.facts.constant(node.input[position])
            if value is None:
                raise ValueError("not a constant")
            return [int(v) for v in value.reshape(-1)]
        found = next((a for a in node.attribute if a.name == attribute), None)
        return None if found is None else [int(v) for v in helper.get_attribute_value(found)]

    # rules -------------------------------------------------------------------------------
    def _rule(self, node: onnx.NodeProto) -> list[Box | None]:
        op, ins, out = node.op_type, list(node.input), node.output[0]
        tracked = [name for name in ins if self._tracked(name)]
        empty = [name for name in tracked if _empty(self.support[name])]
        if op in _ZERO_PRESERVING:
            return [self.support[ins[0]]]
        if empty and len(empty) == len(tracked) and self._zero_for_zero(op, ins, tracked):
            return [self._zero(name) for name in node.output]  # the common case, made short
        if op in ("Mul", "And"):
            return [_meet([self._aligned(name, out) for name in tracked])]
        if op == "Div":
            return [self._aligned(ins[0], out) if tracked == [ins[0]] else None]
        if op in ("Conv", "ConvTranspose") and tracked == [ins[0]] and not (len(ins) > 2 and ins[2]):
            return [self._conv(node)]
        if op == "Reshape" and tracked == [ins[0]]:
            return [self._reshape(node)]
        if op in ("ReduceSum", "ReduceMean") and tracked == [ins[0]]:
            return [self._reduce(node)]
        if op in _PRODUCTS:
            biased = op in ("Conv", "ConvTranspose") and len(ins) > 2 and ins[2]
            biased = biased or (op == "Gemm" and len(ins) > 2 and ins[2])
            return [self._zero(out) if empty and not biased else None]
        if op in ("Add", "Sub", "Sum") or (op == "Where" and not self._tracked(ins[0])):
            terms = ins if op != "Where" else ins[1:]
            if any(not self._tracked(name) for name in terms):
                return [None]
            boxes = [self._aligned(name, out) for name in terms]
            return [self._zero(out) if all(_empty(b) for b in boxes) else _hull(boxes)]
        if op == "Transpose":
            box = self.support[ins[0]]
            perm = self._ints(node, None, "perm") or list(range(len(box or ())))[::-1]
            return [box if box is None else tuple(box[p] for p in perm)]
        if op == "Slice" and tracked == [ins[0]]:
            return [self._slice(node)]
        if op == "Pad" and tracked == [ins[0]]:
            return [self._pad(node)]
        if op == "Concat":
            return [self._concat(node)]
        if op in _LINEAR and tracked == [ins[0]] and empty:
            return [self._zero(name) for name in node.output]
        return [None] * len(node.output)

    @staticmethod
    def _zero_for_zero(op: str, ins: list[str], tracked: list[str]) -> bool:
        """Whether ``op`` gives zero when every tracked input is (the rules below, in short)."""
        if op in ("Mul", "And"):
            return True
        if op == "Div" or op in _LINEAR:
            return tracked == [ins[0]]
        if op in ("Add", "Sub", "Sum"):
            return len(tracked) == sum(1 for name in ins if name)
        return op in _PRODUCTS and not (op in ("Conv", "ConvTranspose", "Gemm") and len(ins) > 2 and ins[2])

    def _slice(self, node) -> Box | None:
        box = self.support[node.input[0]]
        if box is None or _empty(box):
            return box
        dims = self._dims(node.input[0])
        starts, ends = self._ints(node, 1, "starts"), self._ints(node, 2, "ends")
        axes = self._ints(node, 3, "axes") or list(range(len(starts)))
        steps = self._ints(node, 4, "steps") or [1] * len(axes)
        result = list(box)
        for start, end, axis, step in zip(starts, ends, axes, steps):
            axis %= len(dims)
            dim = dims[axis]
            if step != 1 or dim == END:
                return None
            lo, hi = (min(max(v + dim if v < 0 else v, 0), dim) for v in (start, end))
            result[axis] = (max(box[axis][0], lo) - lo, max(min(box[axis][1], hi) - lo, 0))
        return tuple(result)

    def _pad(self, node) -> Box | None:
        box = self.support[node.input[0]]
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        if mode != b"constant":
            return None
        if len(node.input) > 2 and node.input[2]:
            value = self.facts.constant(node.input[2])
            if value is None or np.any(value != 0):
                return None
        if box is None or _empty(box):
            return box
        pads = self._ints(node, 1, "pads")
        rank = len(box)
        axes = self._ints(node, 3, "axes") or list(range(rank))
        result = list(box)
        for k, axis in enumerate(axes):
            begin = pads[k]
            result[axis % rank] = (box[axis % rank][0] + begin, box[axis % rank][1] + begin)
        return tuple(result)

    def _conv(self, node) -> Box | None:
        """Conv (stride 1: an output position is nonzero where its window meets the input's
        box) or ConvTranspose (a strided Conv's backward: input position i reaches the outputs
        i * stride + tap * dilation - pad_begin, tap < kernel)."""
        box = self.support[node.input[0]]
        if box is None or _empty(box):
            return box if box is None else self._zero(node.output[0])
        kernel = self._dims(node.input[1])[2:]
        spatial = len(kernel)
        strides = self._ints(node, None, "strides") or [1] * spatial
        dilations = self._ints(node, None, "dilations") or [1] * spatial
        pads = self._ints(node, None, "pads") or [0] * (2 * spatial)
        auto = next((a.s for a in node.attribute if a.name == "auto_pad"), b"NOTSET")
        transposed = node.op_type == "ConvTranspose"
        if auto not in (b"NOTSET", b"VALID") or any(a.name == "output_shape" for a in node.attribute):
            return None
        if not transposed and any(s != 1 for s in strides):
            return None
        out = self._dims(node.output[0])
        result = [box[0], (0, out[1])]
        for k in range(spatial):
            lo, hi = box[2 + k]
            reach = (kernel[k] - 1) * dilations[k]
            if transposed:
                lo, hi = lo * strides[k] - pads[k], (hi - 1) * strides[k] + reach + 1 - pads[k]
            else:
                lo, hi = lo + pads[k] - reach, hi + pads[k]
            result.append((max(lo, 0), min(hi, out[2 + k])))
        return tuple(result)

    def _reduce(self, node) -> Box | None:
        box = self.support[node.input[0]]
        if box is None or _empty(box):
            return box if box is None else self._zero(node.output[0])
        axes = self._ints(node, 1, "axes")
        keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        if axes is None or not keep:
            return None
        axes = {a % len(box) for a in axes}
        return tuple((0, 1) if k in axes else b for k, b in enumerate(box))

    def _reshape(self, node) -> Box | None:
        """The box's hull in each group of axes that the reshape merges or splits (a superset
        of the support where a group is cut partway)."""
        box = self.support[node.input[0]]
        out_shape = self._shape(node.output[0])
        if box is None or _empty(box):
            return box if box is None else self._zero(node.output[0])
        ins, outs = list(self._shape(node.input[0])), list(out_shape)
        if ins[:1] == [None] and outs[:1] == [None]:  # the batch axis, unchanged
            result, box, ins, outs = [box[0]], box[1:], ins[1:], outs[1:]
        else:
            result = []
        if None in ins or None in outs or int(np.prod(ins)) != int(np.prod(outs)):
            return None
        i = j = 0
        while i < len(ins) or j < len(outs):
            gi, gj = [i] if i < len(ins) else [], [j] if j < len(outs) else []
            size_in = ins[i] if gi else 1
            size_out = outs[j] if gj else 1
            i, j = i + 1, j + 1
            while size_in != size_out:
                if size_in < size_out:
                    if i >= len(ins):
                        return None
                    size_in, i = size_in * ins[i], i + 1
                    gi.append(i - 1)
                else:
                    if j >= len(outs):
                        return None
                    size_out, j = size_out * outs[j], j + 1
                    gj.append(j - 1)
            # the group's box as a range of flat positions (its hull), cut into the out axes
            low = sum(box[k][0] * int(np.prod(ins[k + 1:gi[-1] + 1])) for k in gi)
            high = sum((box[k][1] - 1) * int(np.prod(ins[k + 1:gi[-1] + 1])) for k in gi) + 1
            for n, k in enumerate(gj):
                inner = int(np.prod(outs[k + 1:gj[-1] + 1]))
                first, last = low // inner, (high - 1) // inner
                if first != last:
                    result.append((first, last + 1))
                    result.extend((0, outs[m]) for m in gj[n + 1:])
                    break
                result.append((first, first + 1))
                low, high = low - first * inner, high - first * inner
        return tuple(result)

    def _concat(self, node) -> Box | None:
        axis = next(a.i for a in node.attribute if a.name == "axis")
        rank = len(self._shape(node.output[0]))
        axis %= rank
        boxes, offset = [], 0
        for name in node.input:
            dims = self._dims(name)
            if dims[axis] == END:
                return None
            box = self.support.get(name) if self._tracked(name) else tuple((0, d) for d in dims)
            if box is None:
                return None
            if not _empty(box):
                shifted = list(box)
                shifted[axis] = (box[axis][0] + offset, box[axis][1] + offset)
                boxes.append(tuple(shifted))
            offset += dims[axis]
        return _hull(boxes) if boxes else self._zero(node.output[0])


def prune_zeros(model: onnx.ModelProto, source: str, box: Box,
                facts: GraphFacts | None = None) -> Pruned:
    """``model`` without what stays zero when input ``source`` is zero outside ``box``
    (:func:`support_of`); see the module's docstring."""
    return _pruned(model, _Walk(model, source, box, facts))


def _zeros(walk: _Walk) -> frozenset[str]:
    return frozenset(name for name, b in walk.support.items() if _empty(b))


def _pruned(model: onnx.ModelProto, walk: _Walk) -> Pruned:
    """``model`` without the values ``walk`` found zero (:func:`prune_zeros`)."""
    zero = set(_zeros(walk))
    graph = model.graph
    nodes = []
    for node in graph.node:
        nodes.append(_absorbed(walk, node, zero) or node)
    zero = {name for name in zero if name not in {o.name for o in graph.output}
            or _known_past_batch(walk.facts.shape_or_none(name))}
    outputs = [o for o in graph.output if o.name not in zero]
    needed = computed_into(nodes, [o.name for o in outputs])
    kept = [node for node in nodes if any(name in needed for name in node.output)]
    removed = sum(1 for node in graph.node if node.op_type in HEAVY) - sum(
        1 for node in kept if node.op_type in HEAVY)
    pruned = helper.make_graph(
        kept, graph.name, [i for i in graph.input if i.name in needed], outputs,
        [t for t in graph.initializer if t.name in needed])
    result = helper.make_model(pruned, opset_imports=model.opset_import, ir_version=model.ir_version)
    result.functions.extend(model.functions)
    zeros = {o.name: walk.facts.shape(o.name) for o in graph.output if o.name in zero}
    return Pruned(result, zeros, removed)


def _known_past_batch(shape) -> bool:
    return shape is not None and all(d is not None for d in shape[1:])


def _absorbed(walk: _Walk, node: onnx.NodeProto, zero: set[str]) -> onnx.NodeProto | None:
    """``node`` rewritten without its zero terms (a sum), or None: unchanged."""
    if node.op_type not in ("Add", "Sub", "Sum") or not any(name in zero for name in node.input):
        return None
    if node.output[0] in zero:
        return None  # zero itself: removed with its readers' rewrites
    out_shape = walk.facts.shape_or_none(node.output[0])
    rest = [name for name in node.input if name not in zero]
    if out_shape is None or any(walk.facts.shape_or_none(name) != out_shape for name in rest):
        return None  # a term broadcast by the zero one: keep the sum
    if node.op_type == "Sub" and node.input[0] in zero:
        return helper.make_node("Neg", rest, list(node.output), name=f"{node.name}/sparse")
    if len(rest) == 1:
        return helper.make_node("Identity", rest, list(node.output), name=f"{node.name}/sparse")
    return helper.make_node("Sum", rest, list(node.output), name=f"{node.name}/sparse")


class SparseTails:
    """One split's tail as sessions: the whole tail (``whole``) and its pruned variants
    (:func:`prune_zeros`), made on first use and chosen per run from the support of the target
    weights: a YOLO box's class score runs the backward of its own level's head only, on the
    window of the level its receptive field covers (:mod:`camexport.graph.window`). Variants
    are keyed by what they keep (and by their windows' sizes), so the anchors of one level share
    one, each fed its own window origins; at most ``limit`` are made (each is a session), then
    the whole tail serves. A tail that slices no target-dependent value has nothing to prune (a
    classifier's): it is never analysed."""

    def __init__(self, tail: onnx.ModelProto, source: str, make, limit: int = 8, boxes: int = 4096):
        self.tail, self.source, self._make, self._limit, self._most = tail, source, make, limit, boxes
        self.whole = make(tail)
        #: what :meth:`variant` answers when no pruned variant serves
        self._whole = (self.whole, [o.name for o in tail.graph.output], {}, {})
        dependent = computed_from(tail.graph.node, [source])
        self.useful = any(node.op_type in ("Slice", "Split") and node.input[0] in dependent
                          for node in tail.graph.node)
        self._facts: GraphFacts | None = None
        self._reading = [node for node in tail.graph.node if any(name in dependent for name in node.input)]
        self._zero_boxes: dict = {}
        self._pruned: OrderedDict = OrderedDict()  # zero values -> (Pruned, variant key)
        self._keys: OrderedDict = OrderedDict()  # box -> (variant key, window feeds)
        self._variants: dict = {}  # key -> (session or None, outputs, zeros, Windowed or None)
        self._windowed: dict = {}  # pruned variant's key -> the keys of its windowed ones
        # (pruned key, its Conv inputs' support sizes) that no window serves, the latest ``boxes``
        self._unwindowed: OrderedDict = OrderedDict()

    def variant(self, weights: np.ndarray) -> tuple:
        """(session or None: no run, its output names, {zero output: shape}, extra feeds: the
        window origins) for these target weights (rows first): a pruned variant, or the whole
        tail."""
        if not self.useful:
            return self._whole
        box = support_of(weights)
        if box not in self._keys:
            self._keys[box] = self._variant_key(box)
            if len(self._keys) > self._most:
                self._keys.popitem(last=False)
        self._keys.move_to_end(box)
        key, feeds = self._keys[box]
        if key not in self._variants:
            return self._whole
        return (*self._variants[key][:3], feeds)

    def _variant_key(self, box: Box) -> tuple:
        """(the key of the variant for ``box``, made here if there is room (None: none helps),
        its window feeds for ``box``)."""
        from camexport.graph.window import window_tail  # it reads this module's rules

        self._facts = self._facts or GraphFacts(self.tail)
        walk = _Walk(self.tail, self.source, box, self._facts, self._reading, self._zero_boxes)
        zero = _zeros(walk)
        if zero not in self._pruned:  # the boxes of one level's anchors prune alike
            pruned = _pruned(self.tail, walk)
            graph = pruned.model.graph
            self._pruned[zero] = (pruned, (tuple(node.name or node.output[0] for node in graph.node),
                                           tuple(pruned.zeros)))
            if len(self._pruned) > self._limit:
                self._pruned.popitem(last=False)
        pruned, base = self._pruned[zero]
        if not pruned.removed and pruned.model.graph.output:
            return None, {}
        support, outputs = walk.support, [o.name for o in pruned.model.graph.output]
        for key in self._windowed.get(base, ()):  # a windowed variant whose windows hold this box's
            if self._variants[key][3].fits(support):
                return key, self._variants[key][3].feeds(support)
        sizes = (base, tuple(None if not self._tracked(support, node.input[0]) else
                             tuple(hi - lo for lo, hi in support[node.input[0]][2:])
                             for node in pruned.model.graph.node
                             if node.op_type in ("Conv", "ConvTranspose")))
        if outputs and sizes not in self._unwindowed and len(self._variants) < self._limit:
            windowed = window_tail(pruned.model, support, self._facts)
            if windowed is not None:
                key = (*base, len(self._windowed.get(base, ())))
                self._variants[key] = (self._make(windowed.model), outputs, pruned.zeros, windowed)
                self._windowed.setdefault(base, []).append(key)
                return key, windowed.feeds(support)
            self._unwindowed[sizes] = None
            if len(self._unwindowed) > self._most:
                self._unwindowed.popitem(last=False)
        if base not in self._variants and len(self._variants) < self._limit:
            made = self._make(pruned.model) if outputs else None
            self._variants[base] = (made, outputs, pruned.zeros, None)
        return base, {}

    @staticmethod
    def _tracked(support: dict, name: str) -> bool:
        box = support.get(name)
        return box is not None and not _empty(box)
