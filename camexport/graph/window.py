"""Windowed tails: a sparse target's reverse pass computed on the window its support spans.

A pruned tail (:mod:`camexport.graph.sparse`) still runs dense over a level: a YOLO anchor's
class score reaches a 5 x 5 window of its 80 x 80 neck output through the Detect branch's three
convolutions, yet each backward Conv, and each element-wise factor of its SiLUs, runs over all
6,400 positions. :func:`window_tail` rewrites the tail so that these values are computed on
windows: static-size crops of the spatial frame (the trailing axes), whose origins are inputs
of the graph, fed per run from the target's support (:meth:`Windowed.feeds`). One windowed
graph serves every anchor of a level.

Each windowed value has a geometry: its frame (the full trailing sizes) and an interval per
axis, ``start * scale + offset`` to ``+ span``, where ``start`` is the support start of the
*entry* it comes from (a tracked value with a small support box, cut by a Slice where a
convolution first reads it). Its window is the interval's size capped at the frame, placed at
the interval's start clipped into the frame: the window then holds the value's whole support
(by induction from the entry's), and the value is zero in it outside the support, as in the
whole tail.

- a stride-1 Conv (pads p, reach r: the kernel's extent less one, dilated) moves the interval
  by p - r and widens it by r; it reads the range of its input window that its output window
  needs, cut and zero-padded to it (zeros outside the input's window are its zeros, outside
  the frame the Conv's own padding), then convolves with no padding;
- a ConvTranspose (a strided Conv's backward; stride s, begin pad p) maps ``[a, a + n)`` to
  ``[a s - p, (a + n - 1) s + r + 1 - p)``: it runs on the input window with no padding and
  its result is cut and zero-padded to the output window;
- element-wise ops, and Slice, Split and Concat along other axes than the frame's, run on the
  windows; windows of one entry that differ are each placed on their hull first; a value that
  does not come from the target (a SiLU's sigmoid from the Conv output the head gave) is cut
  to the window where it is read, and so is the element-wise chain that made it in the tail;
- where any other op (or a graph output) reads a windowed value, it is padded back to its
  frame first.

The result equals the pruned tail's up to the float round-off of a convolution summed over a
different extent (onnxruntime's kernels pick their blocking by size).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from camexport.graph.builder import GraphFacts
from camexport.graph.cut import computed_into
from camexport.graph.sparse import _ZERO_PRESERVING, Box, _empty

#: element-wise ops of values that do not come from the target, computed on windows on demand
_ELEMENTWISE = frozenset({*_ZERO_PRESERVING, "Sigmoid", "Exp", "Log", "Reciprocal", "Softplus",
                          "HardSigmoid", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
#: a convolution's input support must cover at most this share of its frame to be windowed
MOST = 0.25


@dataclass(frozen=True)
class Geometry:
    """Where a windowed value lies in its ``frame``: the interval ``start * scale + offset``,
    ``span`` long, per trailing axis, ``start`` being the support start of value ``entry``."""

    entry: str
    frame: tuple[int, ...]
    scale: tuple[int, ...]
    offset: tuple[int, ...]
    span: tuple[int, ...]

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(min(s, f) for s, f in zip(self.span, self.frame))

    def origin(self, starts: Mapping[str, tuple[int, ...]]) -> np.ndarray:
        return np.array([min(max(s * k + o, 0), f - w) for s, k, o, f, w in
                         zip(starts[self.entry], self.scale, self.offset, self.frame, self.size)], np.int64)

    def hull(self, other: Geometry) -> Geometry | None:
        if (self.entry, self.frame, self.scale) != (other.entry, other.frame, other.scale):
            return None
        low = tuple(min(a, b) for a, b in zip(self.offset, other.offset))
        high = tuple(max(a + s, b + t)
                     for a, s, b, t in zip(self.offset, self.span, other.offset, other.span))
        return Geometry(self.entry, self.frame, self.scale, low, tuple(h - lo for lo, h in zip(low, high)))


@dataclass(frozen=True)
class _Range:
    """A range of positions per trailing axis: ``origin(geometry) * times + plus``, ``length``."""

    geometry: Geometry
    times: tuple[int, ...]
    plus: tuple[int, ...]
    length: tuple[int, ...]

    def at(self, starts) -> tuple[np.ndarray, np.ndarray]:
        origin = self.geometry.origin(starts) * np.array(self.times) + np.array(self.plus)
        return origin, np.array(self.length)


def _window(geometry: Geometry) -> _Range:
    rank = len(geometry.frame)
    return _Range(geometry, (1,) * rank, (0,) * rank, geometry.size)


@dataclass
class Windowed:
    """A windowed tail: ``model`` (the tail's inputs, plus int64 window inputs), the values it
    enters windows at (``sizes``: each with its window's size) and what feeds its inputs
    (:meth:`feeds`, from the supports of one target)."""

    model: onnx.ModelProto
    sizes: dict[str, tuple[int, ...]]
    _cuts: list  # (starts, ends, geometry): a full value cut to a window
    _places: list  # (prefix, from range, to range, rank): a range cut and padded to another

    def feeds(self, support: Mapping[str, Box]) -> dict[str, np.ndarray]:
        """The window inputs for the supports of one run's target (``sparse._Walk.support``)."""
        starts = {name: tuple(lo for lo, _ in support[name][-len(size):])
                  for name, size in self.sizes.items()}
        feed = {}
        for start, end, geometry in self._cuts:
            origin = geometry.origin(starts)
            feed[start], feed[end] = origin, origin + np.array(geometry.size, np.int64)
        for prefix, source, target, rank in self._places:
            (have, length), (want, size) = source.at(starts), target.at(starts)
            cut_lo = np.clip(want - have, 0, length)
            cut_hi = np.clip(want + size - have, cut_lo, length)
            before = np.minimum(np.maximum(have - want, 0), size)
            after = size - before - (cut_hi - cut_lo)
            lead = np.zeros(rank - len(have), np.int64)
            feed[f"{prefix}/starts"] = cut_lo.astype(np.int64)
            feed[f"{prefix}/ends"] = cut_hi.astype(np.int64)
            feed[f"{prefix}/pads"] = np.concatenate([lead, before, lead, after]).astype(np.int64)
        return feed

    def fits(self, support: Mapping[str, Box]) -> bool:
        """Whether this graph serves a target of supports ``support`` (of the same pruned tail):
        each entry's support is a box no larger than its window."""
        for name, size in self.sizes.items():
            box = support.get(name)
            if box is None or _empty(box) or any(hi - lo > w for (lo, hi), w in zip(box[-len(size):], size)):
                return False
        return True


def _int(name: str, size: int):
    return helper.make_tensor_value_info(name, TensorProto.INT64, [size])


def window_tail(model: onnx.ModelProto, support: Mapping[str, Box], facts: GraphFacts | None = None,
                most: float = MOST) -> Windowed | None:
    """``model`` (a pruned tail) with its target-dependent convolutions on windows, for the
    supports ``support`` of one target (the module's docstring); None: no convolution reads a
    value whose support is small enough, or the model's opset has no Pad with input pads (< 11)."""
    facts = facts or GraphFacts(model)
    if facts.opset < 11:
        return None
    return _Rewrite(model, support, facts, most).result()


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Rewrite:
    def __init__(self, model, support, facts: GraphFacts, most: float):
        self.model, self.support, self.facts, self.most = model, support, facts, most
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list = []
        self.initializers: list = []
        self.geometry: dict[str, Geometry] = {}  # value -> geometry of its window
        self.window: dict[str, str] = {}  # value -> the name of its window
        self.full: set[str] = set()  # windowed values whose full value is produced
        self.windows: dict[tuple, str] = {}  # (untracked value, geometry) -> its window
        self.placed: dict[tuple, str] = {}  # (value, geometry) -> its window placed on geometry's
        self.cuts: dict[Geometry, tuple[str, str]] = {}
        self.places: list = []
        self.sizes: dict[str, tuple[int, ...]] = {}
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.axes: dict[int, str] = {}
        self.windowed_convolutions = 0
        self._count = 0

    # -- names and small values ---------------------------------------------------------
    def _name(self, stem: str) -> str:
        self._count += 1
        return f"window/{self._count}/{stem}"

    def _axes(self, rank: int) -> str:
        if rank not in self.axes:
            name = self._name("axes")
            self.initializers.append(numpy_helper.from_array(np.arange(-rank, 0, dtype=np.int64), name))
            self.axes[rank] = name
        return self.axes[rank]

    def _cut(self, value: str, geometry: Geometry, out: str) -> None:
        """``out`` = full ``value`` cut to ``geometry``'s window."""
        if geometry not in self.cuts:
            start, end = self._name("starts"), self._name("ends")
            self.inputs += [_int(start, len(geometry.frame)), _int(end, len(geometry.frame))]
            self.cuts[geometry] = (start, end)
        start, end = self.cuts[geometry]
        self.nodes.append(helper.make_node("Slice", [value, start, end, self._axes(len(geometry.frame))],
                                           [out], name=f"{out}/cut"))

    def _place(self, value: str, source: _Range, target: _Range, rank: int) -> str:
        """``value`` (holding ``source``'s range, zero outside it) on ``target``'s range."""
        prefix = self._name("place")
        spatial = len(source.length)
        self.inputs += [_int(f"{prefix}/starts", spatial), _int(f"{prefix}/ends", spatial),
                        _int(f"{prefix}/pads", 2 * rank)]
        self.places.append((prefix, source, target, rank))
        self.nodes += [
            helper.make_node("Slice", [value, f"{prefix}/starts", f"{prefix}/ends", self._axes(spatial)],
                             [f"{prefix}/cut"], name=f"{prefix}/cut"),
            helper.make_node("Pad", [f"{prefix}/cut", f"{prefix}/pads"], [f"{prefix}/placed"],
                             name=f"{prefix}/pad")]
        return f"{prefix}/placed"

    def _rank(self, name: str) -> int:
        return len(self.facts.shape(name))

    def _frame(self, name: str, rank: int) -> tuple[int, ...] | None:
        shape = self.facts.shape_or_none(name)
        if shape is None or len(shape) < rank + 1 or any(d is None for d in shape[-rank:]):
            return None
        return tuple(int(d) for d in shape[-rank:])

    # -- windowed values -----------------------------------------------------------------
    def _entry(self, name: str, rank: int) -> Geometry | None:
        """The window of tracked value ``name`` as an entry, or None: not worth one."""
        box, frame = self.support.get(name), self._frame(name, rank)
        if box is None or frame is None or _empty(box):
            return None
        size = tuple(hi - lo for lo, hi in box[-rank:])
        if np.prod(size) > self.most * np.prod(frame):
            return None
        geometry = Geometry(name, frame, (1,) * rank, (0,) * rank, size)
        self.sizes[name] = size
        self._set(name, geometry, f"{name}/window")
        self._cut(name, geometry, self.window[name])
        self.full.add(name)  # the entry's full value stays computed
        return geometry

    def _set(self, name: str, geometry: Geometry, window: str) -> None:
        self.geometry[name], self.window[name] = geometry, window

    def _on(self, name: str, geometry: Geometry) -> str:
        """The window of windowed value ``name`` placed on ``geometry``'s (a hull of its own)."""
        if self.geometry[name] == geometry:
            return self.window[name]
        key = (name, geometry)
        if key not in self.placed:
            self.placed[key] = self._place(self.window[name], _window(self.geometry[name]), _window(geometry),
                                           self._rank(name))
        return self.placed[key]

    def _full(self, name: str) -> str:
        """The full value of ``name`` (a windowed value padded back where it is first needed)."""
        if name in self.geometry and name not in self.full:
            geometry = self.geometry[name]
            rank = len(geometry.frame)
            whole = _Range(geometry, (0,) * rank, (0,) * rank, geometry.frame)
            placed = self._place(self.window[name], _window(geometry), whole, self._rank(name))
            self.nodes.append(helper.make_node("Identity", [placed], [name], name=f"{name}/fill"))
            self.full.add(name)
        return name

    def _fits(self, name: str, geometry: Geometry) -> str | None:
        """How a value that does not come from the target meets ``geometry``'s window:
        "as is" (it broadcasts over the window), "cut", or None: it cannot."""
        shape = self.facts.shape_or_none(name)
        rank = len(geometry.frame)
        if shape is None:
            return None
        trailing = tuple(shape[-rank:]) if len(shape) >= rank else tuple(shape)
        if all(d == 1 for d in trailing):
            return "as is"
        return "cut" if len(shape) >= rank and trailing == geometry.frame else None

    def _window_of(self, name: str, geometry: Geometry) -> str:
        """A value that does not come from the target (``_fits`` it) on ``geometry``'s window,
        or as is where it broadcasts over the window."""
        if self._fits(name, geometry) != "cut":
            return name
        key = (name, geometry)
        if key not in self.windows:
            node = self.producer.get(name)
            out = self._name("value")
            if (node is not None and node.op_type in _ELEMENTWISE and len(node.output) == 1
                    and all(not i or self._fits(i, geometry) for i in node.input)):
                parts = [self._window_of(i, geometry) if i else i for i in node.input]
                made = helper.make_node(node.op_type, parts, [out], name=out, domain=node.domain)
                made.attribute.extend(node.attribute)
                self.nodes.append(made)
            else:
                self._cut(name, geometry, out)
            self.windows[key] = out
        return self.windows[key]

    # -- rules ---------------------------------------------------------------------------
    def _convolution(self, node) -> bool:
        x, ins = node.input[0], list(node.input)
        weight = self.facts.shape_or_none(ins[1])
        if len(ins) > 2 and ins[2] or ins[1] in self.support or weight is None or None in weight:
            return False
        rank = len(weight) - 2
        attrs = _attributes(node)
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID") or "output_shape" in attrs:
            return False
        strides = list(attrs.get("strides", [1] * rank))
        transposed = node.op_type == "ConvTranspose"
        frame = self._frame(node.output[0], rank)
        if frame is None or (not transposed and any(s != 1 for s in strides)):
            return False
        if x in self.geometry and len(self.geometry[x].frame) != rank:
            return False
        before = self.geometry.get(x) or self._entry(x, rank)
        if before is None:
            return False
        pads = list(attrs.get("pads", [0] * 2 * rank))[:rank]
        reach = [(k - 1) * d for k, d in zip(weight[2:], attrs.get("dilations", [1] * rank))]
        made = helper.make_node(node.op_type, [self.window[x], *ins[1:]], [self._name("convolved")],
                                name=self._name(node.name or node.op_type))
        made.attribute.extend(a for a in node.attribute
                              if a.name not in ("pads", "auto_pad", "output_padding"))
        out = f"{node.output[0]}/window"
        if transposed:
            after = Geometry(before.entry, frame, tuple(k * s for k, s in zip(before.scale, strides)),
                             tuple(o * s - p for o, s, p in zip(before.offset, strides, pads)),
                             tuple((n - 1) * s + r + 1 for n, s, r in zip(before.span, strides, reach)))
            self.nodes.append(made)
            result = _Range(before, tuple(strides), tuple(-p for p in pads),
                            tuple((n - 1) * s + r + 1 for n, s, r in zip(before.size, strides, reach)))
            placed = self._place(made.output[0], result, _window(after), self._rank(node.output[0]))
            self.nodes.append(helper.make_node("Identity", [placed], [out], name=f"{out}/name"))
        else:
            after = Geometry(before.entry, frame, before.scale,
                             tuple(o + p - r for o, p, r in zip(before.offset, pads, reach)),
                             tuple(n + r for n, r in zip(before.span, reach)))
            need = _Range(after, (1,) * rank, tuple(-p for p in pads),
                          tuple(n + r for n, r in zip(after.size, reach)))
            made.input[0] = self._place(self.window[x], _window(before), need, self._rank(x))
            made.output[0] = out
            self.nodes.append(made)
        self._set(node.output[0], after, out)
        self.windowed_convolutions += 1
        return True

    def _common(self, names: list[str]) -> Geometry | None:
        """The hull of the geometries of windowed values ``names`` (None: none, or apart)."""
        geometry = None
        for name in names:
            other = self.geometry[name]
            geometry = other if geometry is None else geometry.hull(other)
            if geometry is None:
                return None
        return geometry

    def _spatial_axes_untouched(self, node, rank: int, geometry: Geometry) -> bool:
        """Whether a Slice, Split or Concat of a value of ``rank`` axes leaves the frame's alone."""
        frame_axes = set(range(rank - len(geometry.frame), rank))
        if node.op_type == "Slice":
            axes = self.facts.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if axes is None:
                return False
            if any(node.input[k] in self.support for k in range(1, len(node.input)) if node.input[k]):
                return False
            return not ({int(a) % rank for a in axes.reshape(-1)} & frame_axes)
        axis = _attributes(node).get("axis", 0)
        return int(axis) % rank not in frame_axes

    def _layout(self, node) -> bool:
        """Slice, Split or Concat along axes other than the frame's, of windowed values."""
        data = [node.input[0]] if node.op_type in ("Slice", "Split") else list(node.input)
        if not all(name in self.geometry for name in data):
            return False
        geometry = self._common(data)
        if geometry is None or not self._spatial_axes_untouched(node, self._rank(data[0]), geometry):
            return False
        if node.op_type == "Split" and len(node.input) > 1 and node.input[1] in self.support:
            return False
        parts = [self._on(name, geometry) for name in data] + list(node.input[len(data):])
        outs = [f"{name}/window" for name in node.output]
        made = helper.make_node(node.op_type, parts, outs, name=self._name(node.name or node.op_type))
        made.attribute.extend(node.attribute)
        self.nodes.append(made)
        for name, window in zip(node.output, outs):
            self._set(name, geometry, window)
        return True

    def _elementwise(self, node) -> bool:
        ins = list(node.input)
        windowed = [i for i in ins if i in self.geometry]
        if not windowed or len(node.output) != 1:
            return False
        op, tracked = node.op_type, [i for i in ins if i and i in self.support]
        if op in _ZERO_PRESERVING:
            ok = len(tracked) == 1
        elif op in ("Mul", "Div"):
            ok = op == "Mul" or tracked == [ins[0]]
        else:  # Add, Sub, Sum: every term windowed
            ok = op in ("Add", "Sub", "Sum") and all(i in self.geometry for i in ins)
        if not ok or any(i not in self.geometry for i in tracked):
            return False
        geometry = self._common(windowed)
        if geometry is None or any(i and i not in self.geometry and not self._fits(i, geometry) for i in ins):
            return False
        parts = [self._on(i, geometry) if i in self.geometry else self._window_of(i, geometry) if i else i
                 for i in ins]
        out = f"{node.output[0]}/window"
        made = helper.make_node(op, parts, [out], name=self._name(node.name or op), domain=node.domain)
        made.attribute.extend(node.attribute)
        self.nodes.append(made)
        self._set(node.output[0], geometry, out)
        return True

    # -- the walk -------------------------------------------------------------------------
    def result(self) -> Windowed | None:
        graph = self.model.graph
        for node in graph.node:
            done = False
            if node.op_type in ("Conv", "ConvTranspose") and node.input[0] in self.support:
                done = self._convolution(node)
            elif node.op_type in ("Slice", "Split", "Concat"):
                done = self._layout(node)
            elif node.op_type in _ELEMENTWISE or node.op_type == "Sum":
                done = self._elementwise(node)
            if not done:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                del copy.input[:]
                copy.input.extend(self._full(i) if i in self.geometry else i for i in node.input)
                self.nodes.append(copy)
        if not self.windowed_convolutions:
            return None
        for output in graph.output:
            self._full(output.name)
        needed = computed_into(self.nodes, [o.name for o in graph.output])
        nodes = [node for node in self.nodes if any(name in needed for name in node.output)]
        used = {i for node in nodes for i in node.input}
        rewritten = helper.make_graph(
            nodes, graph.name, [*[i for i in graph.input if i.name in used],
                                *[i for i in self.inputs if i.name in used]],
            list(graph.output),
            [*[t for t in graph.initializer if t.name in used],
             *[t for t in self.initializers if t.name in used]])
        model = helper.make_model(rewritten, opset_imports=self.model.opset_import,
                                  ir_version=self.model.ir_version)
        model.functions.extend(self.model.functions)
        cuts = [(start, end, geometry) for geometry, (start, end) in self.cuts.items() if start in used]
        places = [p for p in self.places if f"{p[0]}/pads" in used]
        entries = {g.entry for *_, g in cuts} | {r.geometry.entry for p in places for r in p[1:3]}
        return Windowed(model, {e: s for e, s in self.sizes.items() if e in entries}, cuts, places)

