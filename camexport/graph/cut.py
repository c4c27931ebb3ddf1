"""Graph surgery on ONNX models: closures over the dataflow, pruning, and cuts.

- :func:`computed_from` / :func:`computed_into`: the one "depends on X" / "reaches Y" closure
  that the reverse-mode driver, the forward linearisation, layer location and the cuts share;
- :func:`prune`: the model computing only some outputs;
- :func:`split_by_targets`: the augmented graph cut at ``target_weights`` into a head (forward,
  activations) and a tail (score block and reverse pass), for K targets on one forward;
- :func:`layer_tail`: the model from one layer's tensor to its output, with the values from
  before the layer that the rest still reads (AblationCAM).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import onnx
from onnx import helper

from camexport.graph.builder import without_weights
from camexport.graph.outputs import TARGET_WEIGHTS
from camexport.graph.prune_rows import prune_rows


def computed_from(nodes: Iterable[onnx.NodeProto], sources: Iterable[str],
                  through: Callable[[onnx.NodeProto], bool] = lambda node: True,
                  keep: Callable[[str], bool] = lambda value: True) -> set[str]:
    """``sources`` and every value computed from them (``nodes`` in topological order), going
    only through nodes that ``through`` accepts and values that ``keep`` accepts."""
    found = set(sources)
    for node in nodes:
        if through(node) and any(name in found for name in node.input if name):
            found.update(name for name in node.output if name and keep(name))
    return found


def computed_into(nodes: Sequence[onnx.NodeProto], sinks: Iterable[str],
                  through: Callable[[onnx.NodeProto], bool] = lambda node: True,
                  keep: Callable[[str], bool] = lambda value: True) -> set[str]:
    """``sinks`` and every value they are computed from (``nodes`` in topological order), going
    only through nodes that ``through`` accepts and values that ``keep`` accepts."""
    found = set(sinks)
    for node in reversed(nodes):
        if through(node) and any(name in found for name in node.output):
            found.update(name for name in node.input if name and keep(name))
    return found


def target_dependent(model: onnx.ModelProto, source: str = TARGET_WEIGHTS) -> set[str]:
    """Every value of the graph computed from ``source`` (default ``target_weights``)."""
    return computed_from(model.graph.node, [source])


#: Outputs whose values encode positions in the whole batch (MaxPool's flattened indices count
#: across images), so they cannot be repeated for more rows: the tail recomputes them.
POSITION_OUTPUTS = (("MaxPool", 1),)


@dataclass
class TargetSplit:
    """The augmented graph cut in two. The *head* computes everything that does not depend on
    ``target_weights`` (model outputs, activations, tangents); the *tail* is the score block and
    the reverse-mode subgraph. They meet at the *frontier*: the batch-major head values the
    tail reads (layer tensors, ReLU masks, pooling inputs...). Values the tail reads that are
    not batch-major (shapes, constants) are recomputed in the tail from where they come from."""

    head: onnx.ModelProto
    tail: onnx.ModelProto
    frontier: list[str]

    @property
    def head_outputs(self) -> list[str]:
        return [o.name for o in self.head.graph.output]

    @property
    def tail_outputs(self) -> list[str]:
        return [o.name for o in self.tail.graph.output]


def _ancestors(graph: onnx.GraphProto, names) -> list[int]:
    """Indices (in graph order) of the nodes that the values ``names`` are computed from."""
    producer = {out: k for k, node in enumerate(graph.node) for out in node.output}
    found, pending, seen = set(), list(names), set()
    while pending:
        name = pending.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        found.add(producer[name])
        pending.extend(graph.node[producer[name]].input)
    return sorted(found)


def prune(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """The model computing only ``outputs`` (onnxruntime runs every node of a graph, whatever
    is fetched): e.g. GradCAM alone from an artifact also built for FullGrad and Guided Backprop."""
    graph = model.graph
    nodes = _ancestors(graph, outputs)
    used = {name for k in nodes for name in graph.node[k].input} | set(outputs)
    declared = {o.name: o for o in graph.output}
    return _submodel(model, nodes, [i for i in graph.input if i.name in used],
                     [declared[name] for name in outputs], "pruned")


def split_by_targets(model: onnx.ModelProto, outputs: Sequence[str] | None = None) -> TargetSplit | None:
    """The :class:`TargetSplit` of an augmented graph (for its ``outputs`` only, default all),
    or None when the tail would need the image itself (a static batch axis, a graph with
    subgraphs): then the cut saves nothing."""
    if outputs is not None:
        model = prune(model, outputs)
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for a in node.attribute):
        return None
    image = next(i.name for i in graph.input if i.name != TARGET_WEIGHTS)
    info = _value_info(model)
    batch = info[image].type.tensor_type.shape.dim[0].dim_param
    if not batch:
        return None

    dependent = target_dependent(model)
    positions = {node.output[k] for node in graph.node for op, k in POSITION_OUTPUTS
                 if node.op_type == op and len(node.output) > k}
    outputs = [o.name for o in graph.output]
    tail_outputs = [name for name in outputs if name in dependent]
    def batch_major(name):
        return name not in positions and _batch_major(info, name, batch)

    tail_nodes, frontier = _walk_tail(graph, [TARGET_WEIGHTS], tail_outputs, dependent, batch_major)
    again = _recomputable(graph, frontier, batch_major)
    if again:
        tail_nodes, frontier = _walk_tail(graph, [TARGET_WEIGHTS], tail_outputs, dependent, batch_major,
                                          lambda node: node.output[0] in again)
    if frontier == [image] or not frontier:
        return None
    head_outputs = list(dict.fromkeys([n for n in outputs if n not in dependent] + frontier))
    declared = {o.name: o for o in graph.output}
    head = _submodel(model, _ancestors(graph, head_outputs), [info[image]],
                     [declared.get(n) or info[n] for n in head_outputs], "head")
    inputs = [info[TARGET_WEIGHTS]] + [info[n] for n in frontier]
    tail = _submodel(model, tail_nodes, inputs, [declared[n] for n in tail_outputs], "tail")
    return TargetSplit(head, tail, frontier)


def _value_info(model: onnx.ModelProto) -> dict:
    """Every value's inferred type by name (inputs and outputs included), the image's batch
    symbol carried through the ops that keep the batch axis where ONNX inference gives a new
    symbol (:func:`_carry_batch`)."""
    inferred = onnx.shape_inference.infer_shapes(without_weights(model), data_prop=True).graph
    info = {v.name: v for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    _carry_batch(model, info)
    return info


#: ops whose output keeps the batch axis of a batch-major input of its rank (element-wise)
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Sum", "Mean"}


def _carry_batch(model: onnx.ModelProto, info: dict) -> None:
    """Rename, in ``info``, the symbols ONNX inference makes up for a batch axis it cannot name
    (``unk__N``) back to the image's batch symbol, where the op keeps the batch axis: Resize
    with scale 1 on axis 0 (ONNX cannot multiply a symbol by 1: an Upsample in a YOLO neck
    made every value after it lose the batch, and a split's tail then recomputed the whole neck
    from its backbone outputs), Concat on another axis and element-wise ops of batch-major
    inputs of the output's rank. Values sharing a renamed symbol are renamed with it."""
    graph = model.graph
    if not graph.input:
        return
    image = info.get(graph.input[0].name)
    dims = image.type.tensor_type.shape.dim if image is not None else ()
    batch = dims[0].dim_param if len(dims) else ""
    if not batch:
        return
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})

    def first(name):
        value = info.get(name)
        shape = value.type.tensor_type.shape.dim if value is not None else ()
        return (shape[0].dim_param if len(shape) and shape[0].HasField("dim_param") else None), len(shape)

    renamed = {}
    for node in graph.node:
        if not node.output or not node.input:
            continue
        symbol, rank = first(node.output[0])
        if symbol is None or symbol == batch or not symbol.startswith("unk__") or symbol in renamed:
            continue
        keeps = False
        if node.op_type == "Resize" and len(node.input) > 2 and node.input[2] in constants:
            scales = onnx.numpy_helper.to_array(constants[node.input[2]])
            keeps = len(scales) > 0 and float(scales[0]) == 1.0 and first(node.input[0])[0] == batch
        elif node.op_type == "Concat":
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            keeps = axis % max(rank, 1) != 0 and all(first(i)[0] == batch for i in node.input if i)
        elif node.op_type in _ELEMENTWISE:
            keeps = any(first(i) == (batch, rank) for i in node.input if i)
        if keeps:
            renamed[symbol] = batch
            for value in info.values():
                for dim in value.type.tensor_type.shape.dim[:1]:
                    if dim.HasField("dim_param") and dim.dim_param == symbol:
                        dim.dim_param = batch


def _batch_major(info: dict, name: str, batch: str) -> bool:
    value = info.get(name)
    dims = value.type.tensor_type.shape.dim if value is not None else ()
    return len(dims) > 0 and dims[0].dim_param == batch


#: element-wise ops that a split's tail computes again from their inputs rather than read from
#: the head: the factors of the reverse pass (a SiLU's sigmoid and its derivative: Sigmoid,
#: Abs, Neg, Exp, Div...). Read from the head, each would be one more output of the size of a
#: layer, and would keep onnxruntime from fusing the forward's activations (Conv + SiLU runs
#: as Conv + QuickGelu): YOLOv8n's head ran 1.25x its plain forward with them as outputs.
RECOMPUTED = frozenset({
    "Abs", "Neg", "Exp", "Log", "Sigmoid", "Tanh", "Relu", "Sqrt", "Reciprocal", "Erf", "Sign",
    "Not", "Cast", "Clip", "HardSigmoid", "HardSwish", "LeakyRelu", "Softplus",
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Greater", "GreaterOrEqual", "Less", "LessOrEqual",
    "Equal", "Max", "Min", "And", "Or"})


def _recomputable(graph: onnx.GraphProto, frontier: Sequence[str], batch_major, depth: int = 8) -> set[str]:
    """The values of the ``frontier`` (and the values between) that element-wise ops
    (:data:`RECOMPUTED`) make from the rest of the frontier and constants, within ``depth``
    ops: the tail computes them again instead of reading them. A chain that needs any other
    value (a residual stream's sum needs the stream before it) stays read from the head."""
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {t.name for t in graph.initializer}
    kept = {name for name in frontier
            if name not in producer or producer[name].op_type not in RECOMPUTED}
    memo: dict[str, bool] = {}

    def can(name: str, level: int) -> bool:
        if name in kept or name in initializers:
            return True
        if name not in memo:
            node = producer.get(name)
            if node is None:  # the image
                memo[name] = False
            elif not batch_major(name):  # shapes and constants: the walk computes them anyway
                memo[name] = True
            else:
                memo[name] = (level <= depth and node.op_type in RECOMPUTED
                              and all(can(i, level + 1) for i in node.input if i))
        return memo[name]

    for name in frontier:
        if name not in kept:
            can(name, 0)
    return {name for name, ok in memo.items() if ok and batch_major(name)}


def _walk_tail(graph: onnx.GraphProto, sources: Iterable[str], outputs: Sequence[str], dependent: set[str],
               batch_major, recompute=lambda node: False) -> tuple[list[int], list[str]]:
    """The nodes (graph order) computing ``outputs`` from the values ``sources``, and their
    *frontier*: the batch-major values they read that are not computed from ``sources`` (fed
    from a run before, one row per row of the sources). Values that are not batch-major
    (shapes, constants), and those made by a node that ``recompute`` accepts, are computed
    again from what they come from."""
    sources = set(sources)
    initializers = {t.name for t in graph.initializer}
    producer = {out: k for k, node in enumerate(graph.node) for out in node.output}
    nodes, frontier, seen = set(), [], set()
    pending = list(outputs)
    while pending:
        name = pending.pop()
        if not name or name in seen or name in sources or name in initializers:
            continue
        seen.add(name)
        if name in dependent or (name in producer and (not batch_major(name)
                                                        or recompute(graph.node[producer[name]]))):
            nodes.add(producer[name])
            pending.extend(graph.node[producer[name]].input)
        else:
            frontier.append(name)
    return sorted(nodes), frontier


@dataclass
class LayerTail:
    """The model from one layer's tensor to its output, as a graph whose inputs are the layer
    tensor and the ``frontier``: values computed before the layer that the rest of the model
    still reads (a residual stream around a ViT block's norm1, the image's shape...)."""

    model: onnx.ModelProto
    frontier: list[str]
    #: the plain model computing the frontier from the image; None when the frontier is empty
    before: onnx.ModelProto | None


def layer_tail(plain: onnx.ModelProto, tensor: str | Sequence[str], output: str | Sequence[str],
               rows: bool = True) -> LayerTail:
    """:class:`LayerTail` of ``plain`` (a graph with a symbolic batch axis) from value ``tensor``
    (or several: a two-stage detector's FPN levels) to ``output`` (or several); with ``rows``,
    computing only the rows the output reads (:func:`camexport.graph.prune_rows.prune_rows`: a
    ViT's last block for its class token)."""
    graph = plain.graph
    info = _value_info(plain)
    image = graph.input[0].name
    batch = info[image].type.tensor_type.shape.dim[0].dim_param
    tensors = [tensor] if isinstance(tensor, str) else list(tensor)
    outputs = [output] if isinstance(output, str) else list(output)
    nodes, frontier = _walk_tail(graph, tensors, outputs, computed_from(graph.node, tensors),
                                 lambda name: bool(batch) and _batch_major(info, name, batch))
    declared = {o.name: o for o in graph.output}
    tail = _submodel(plain, nodes, [info[t] for t in tensors] + [info[n] for n in frontier],
                     [declared.get(o) or info[o] for o in outputs], "layer-tail")
    if rows:
        tail = prune_rows(tail)
    before = None
    computed = [n for n in frontier if n != image]
    if computed:
        before = _submodel(plain, _ancestors(graph, computed), [info[image]],
                           [info[n] for n in computed], "before-layer")
    return LayerTail(tail, frontier, before)


def _submodel(model: onnx.ModelProto, nodes: list[int], inputs: list, outputs: list,
              name: str) -> onnx.ModelProto:
    chosen = [model.graph.node[k] for k in nodes]
    used = {value for node in chosen for value in node.input}
    graph = helper.make_graph(chosen, f"{model.graph.name}/{name}", inputs, outputs,
                              [t for t in model.graph.initializer if t.name in used])
    result = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    result.functions.extend(model.functions)
    return result


def without_output_copies(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each graph output that is an Identity of an inner value made that value
    itself (its producer writes the output's name): onnxruntime removes Identity nodes except
    those that make graph outputs, and copies the value there (an artifact's ``activation/<l>``
    and ``gradient/<l>``: 0.18 ms of EfficientNet-Lite0's 8-image GradCAM run). The same values
    under the same output names; ``model`` itself is left as it is. Kept as they are: Identities
    of graph inputs, initializers or other outputs, a value that two outputs copy (the first
    takes its name), and graphs with subgraphs (a subgraph may read the value by its name)."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for a in node.attribute):
        return model
    outputs = {o.name for o in graph.output}
    fixed = outputs | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    produced = {value for node in graph.node for value in node.output}
    renamed: dict[str, str] = {}
    dropped = set()
    for k, node in enumerate(graph.node):
        if (node.op_type == "Identity" and node.output[0] in outputs and node.input[0] in produced
                and node.input[0] not in fixed and node.input[0] not in renamed):
            renamed[node.input[0]] = node.output[0]
            dropped.add(k)
    if not renamed:
        return model
    result = onnx.ModelProto()
    result.CopyFrom(model)
    kept = [node for k, node in enumerate(result.graph.node) if k not in dropped]
    for node in kept:
        node.input[:] = [renamed.get(value, value) for value in node.input]
        node.output[:] = [renamed.get(value, value) for value in node.output]
    del result.graph.node[:]
    result.graph.node.extend(kept)
    infos = [info for info in result.graph.value_info if info.name not in renamed]
    del result.graph.value_info[:]
    result.graph.value_info.extend(infos)
    return result
