"""Find the tensor that a module path (``layer4.2``, ``blocks[-1].norm1``) names in a graph.

Two sources, in order: torch's dynamo exporter records each node's module path in the node
metadata ``pkg.torch.onnx.name_scopes``; torch's legacy exporter names nodes
``/layer4/layer4.2/conv1/Conv``. A module's output is the float value its nodes produce and
something outside the module consumes. ONNX tensor names are accepted as layers too.
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from dataclasses import dataclass

import onnx

from camexport.errors import CamexportError
from camexport.graph.builder import GraphFacts, exporter_record
from camexport.graph.cut import computed_from, computed_into

SCOPE_KEY = "pkg.torch.onnx.name_scopes"


class LayerError(CamexportError, ValueError):
    """A layer name that does not resolve to exactly one tensor."""


@dataclass(frozen=True)
class Candidate:
    module: str
    tensors: tuple[str, ...]


def _node_modules(node: onnx.NodeProto) -> list[str]:
    """Module paths enclosing ``node``, outermost first."""
    scopes = exporter_record(node, SCOPE_KEY)
    if scopes is not None:
        return [s for s in scopes[:-1] if s]
    if node.name.startswith("/"):
        parts = node.name.strip("/").split("/")[:-1]
        # legacy names repeat the path cumulatively ("/layer4/layer4.2/conv1/Conv")
        paths, prefix = [], ""
        for part in parts:
            prefix = part if (not prefix or part.startswith(prefix + ".")) else f"{prefix}.{part}"
            paths.append(prefix)
        return paths
    return []


def _scopes(nodes: list[onnx.NodeProto], consumers: dict[str, list[int]]) -> list[list[str]]:
    """Each node's enclosing module paths. A node the exporter left without any record of them
    (the Split of a ``chunk`` after onnxscript's rewrites) belongs to the modules that enclose both all its
    producers and all its consumers: inside a C2f block's ``chunk`` it is that block's, so the
    block hands one tensor to the rest of the graph, not its first convolution's output too."""
    scopes = [_node_modules(node) for node in nodes]
    producer = {value: k for k, node in enumerate(nodes) for value in node.output}
    for k, node in enumerate(nodes):
        # only a node with no record at all: one at the top level records its (empty) scope
        if scopes[k] or exporter_record(node, SCOPE_KEY) is not None or node.name.startswith("/"):
            continue
        sources = [producer[v] for v in node.input if v in producer]
        sinks = [c for v in node.output for c in consumers.get(v, ())]
        if not sources or not sinks:
            continue
        common = set.intersection(*(set(scopes[j]) for j in [*sources, *sinks]))
        scopes[k] = [path for path in scopes[sources[0]] if path in common]
    return scopes


def module_outputs(model: onnx.ModelProto, facts: GraphFacts | None = None) -> dict[str, Candidate]:
    """Every module path in the graph, with the float tensors it hands to the rest of the graph."""
    facts = facts or GraphFacts(model)
    members: dict[str, set[int]] = defaultdict(set)
    nodes = list(model.graph.node)
    consumers: dict[str, list[int]] = defaultdict(list)
    for k, node in enumerate(nodes):
        for name in node.input:
            consumers[name].append(k)
    for k, paths in enumerate(_scopes(nodes, consumers)):
        for path in paths:
            members[path].add(k)
    graph_outputs = {o.name for o in model.graph.output}
    result = {}
    for path, inside in members.items():
        exits = []
        for k in sorted(inside):
            for value in nodes[k].output:
                if not facts.is_float(value):
                    continue
                if value in graph_outputs or any(c not in inside for c in consumers[value]):
                    exits.append(value)
        if exits:
            result[path] = Candidate(path, tuple(exits))
    return result


_TOKEN = re.compile(r"\[(-?\d+)\]|\.?([^.\[\]]+)")


def normalise(layer: str, paths: list[str]) -> str:
    """Resolve pytorch-grad-cam style indexing (``layer4[-1]``, ``features[-1]``) against known
    module paths. ``paths`` come in execution (or registration) order: numbered children are
    indexed by number, named ones (DenseNet's ``features``) by that order, as ``nn.Sequential``
    indexing would."""
    if "[" not in layer:
        return layer
    prefix = ""
    for index, name in _TOKEN.findall(layer):
        if name:
            prefix = f"{prefix}.{name}" if prefix else name
            continue
        children = list(dict.fromkeys(
            p[len(prefix) + 1:].split(".")[0] for p in paths if p.startswith(prefix + ".")))
        if all(c.isdigit() for c in children):
            children.sort(key=int)
        if not children:
            raise LayerError(f"{prefix!r} has no children to index in {layer!r}: run `camexport "
                             f"inspect MODEL` to list every layer, and index one that has children")
        try:
            child = children[int(index)]
        except IndexError:
            raise LayerError(f"index [{index}] is out of range for {prefix!r} "
                             f"({len(children)} children) in {layer!r}: index from 0 to "
                             f"{len(children) - 1} (or -1 for the last)") from None
        prefix = f"{prefix}.{child}"
    return prefix


#: The layer name that asks for :func:`pick_layer` (`camexport build` without --layer).
AUTO_LAYER = "<auto>"


def _spatial(shape) -> bool:
    """A rank-4 feature map with more than one channel and H, W > 1 (NCHW, or NHWC as
    :func:`camexport.layout.infer_layout` reads it)."""
    from camexport.layout import infer_layout

    if shape is None or len(shape) != 4:
        return False
    layout = infer_layout(shape)
    channels = shape[3] if layout["kind"] == "NHWC" else shape[1]
    return all(d is not None and d > 1 for d in (channels, *layout["grid"]))


def pick_layer(model: onnx.ModelProto, facts: GraphFacts | None = None,
               output: str | None = None) -> str:
    """The default target layer, as OpenVINO XAI picks it: the last spatial feature map (rank 4,
    C, H, W > 1) in graph order that depends on the image and reaches ``output`` (default: the
    first output); for a classifier, the map that global pooling or flatten consumes."""
    facts = facts or GraphFacts(model)
    nodes = list(model.graph.node)
    output = output or model.graph.output[0].name
    weights = {t.name for t in model.graph.initializer}
    image = next(i.name for i in model.graph.input if i.name not in weights)
    depends = computed_from(nodes, [image], keep=facts.is_float)
    reaches = computed_into(nodes, [output])
    outputs = {o.name for o in model.graph.output}
    found = [v for node in nodes for v in node.output
             if v in depends and v in reaches and v not in outputs
             and _spatial(facts.shape_or_none(v))]
    if not found:
        raise LayerError(f"no spatial feature map (rank 4, H and W > 1) leads to output "
                         f"{output!r}; pass --layer with a tensor name (`camexport inspect MODEL` "
                         f"lists them)")
    return found[-1]


def has_map(shape, input_size: tuple | None = None) -> bool:
    """Whether a layer of ``shape`` gives a CAM: a feature map (rank 4 NCHW/NHWC, H and W > 1;
    rank 5 volumes) or tokens on a patch grid; a vector (rank 2: logits, pooled features) or a
    1 x 1 map does not."""
    from camexport.layout import infer_layout

    if shape is None:
        return False
    layout = infer_layout(tuple(shape), input_size)
    grid = layout.get("grid")
    return layout["kind"] == "NCDHW" or (grid is not None and all(d is None or d > 1 for d in grid))


def map_layers(model: onnx.ModelProto, facts: GraphFacts | None = None,
               input_size: tuple | None = None) -> list[str]:
    """Module paths whose one output tensor gives a CAM (:func:`has_map`), in graph order."""
    facts = facts or GraphFacts(model)
    order = {v: k for k, node in enumerate(model.graph.node) for v in node.output}
    found = [(order.get(c.tensors[0], -1), path) for path, c in module_outputs(model, facts).items()
             if len(c.tensors) == 1 and has_map(facts.shape_or_none(c.tensors[0]), input_size)]
    return [path for _, path in sorted(found)]


def check_map(model: onnx.ModelProto, layer: str, tensor: str, facts: GraphFacts | None = None,
              input_size: tuple | None = None, shown: int = 8) -> None:
    """A LayerError when the resolved layer ``tensor`` gives no spatial map, listing the layers
    that do (the last ``shown``: those nearest the output)."""
    facts = facts or GraphFacts(model)
    shape = facts.shape_or_none(tensor)
    if has_map(shape, input_size):
        return
    text = "unknown" if shape is None else "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"
    candidates = map_layers(model, facts, input_size)
    listed = (f"layers with a spatial map, nearest the output last: {', '.join(candidates[-shown:])}"
              if candidates else "this model has no module with a spatial map: pass an ONNX tensor name")
    raise LayerError(f"--layer {layer} ({tensor}, shape {text}) has no spatial map to explain (a CAM "
                     f"needs (N, C, H, W) features with H, W > 1, a volume or patch tokens): pass "
                     f"one of the {listed} (`camexport inspect MODEL` lists every layer with its shape)")


def resolve(model: onnx.ModelProto, layer: str, facts: GraphFacts | None = None,
            aliases: dict[str, str] | None = None) -> tuple[str, str]:
    """(label, tensor) for ``layer``: a module path (pgc indexing such as ``layer4[-1]`` is
    resolved, and the label is the plain path ``layer4.2``), an ONNX tensor name, one of
    ``aliases`` (label -> tensor, e.g. a detector's stacked FPN levels), or
    :data:`AUTO_LAYER` (:func:`pick_layer`, labelled by its tensor name)."""
    facts = facts or GraphFacts(model)
    if aliases and layer in aliases:
        return layer, aliases[layer]
    if layer == AUTO_LAYER:
        tensor = pick_layer(model, facts)
        return tensor, tensor
    modules = module_outputs(model, facts)
    produced = {v for node in model.graph.node for v in node.output if facts.is_float(v)}
    path = normalise(layer, list(modules))
    if path in modules:
        tensors = modules[path].tensors
        if len(tensors) == 1:
            return path, tensors[0]
        raise LayerError(
            f"module {path!r} hands {len(tensors)} tensors to the rest of the graph (called more "
            f"than once, or returns several): {', '.join(tensors)}. Pass one tensor name as --layer")
    if layer in produced or layer in {i.name for i in model.graph.input}:
        return layer, layer
    close = difflib.get_close_matches(layer, list(modules) + sorted(produced), n=6, cutoff=0.5)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    raise LayerError(f"no layer named {layer!r} in this model.{hint} "
                     f"Run `camexport inspect MODEL` to list every layer.")
