"""Augment a plain ONNX graph into a CAM-augmented one (ONNX in, ONNX out).

Added to the graph, and nothing else changed:

- input ``target_weights``, shaped like the chosen model output; for a (batch, classes) output an
  all-zero row means "this image's top class" (pytorch-grad-cam's default target);
- output ``score`` (batch,): ``score_b = sum_k target_weights_bk * f(output_bk)``, with ``f``
  fixed at build time (:data:`SCORE_FUNCTIONS`);
- outputs ``activation/<layer>`` and ``gradient/<layer>`` for each layer: the layer's tensor and
  d(sum_b score_b)/d(tensor), from a reverse-mode subgraph over the tail only.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import onnx
from onnx import helper

from camexport.artifact import set_manifest
from camexport.graph.autodiff import differentiate
from camexport.graph.builder import Builder, GraphFacts
from camexport.graph.outputs import (
    SCORE,
    TARGET_WEIGHTS,
    AugmentError,
    Augmenting,
    GraphOutput,
    activation_name,
    dim_of,
    gradient_name,
)
from camexport.graph.rules import Rule

#: Score functions f applied to the model output before weighting, by the name users type.
SCORE_FUNCTIONS = ("logit", "softmax", "log_softmax")

#: The opset camexport emits into when a model is older (rules use opset >= 13 forms).
MIN_OPSET = 17


def upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert a model older than :data:`MIN_OPSET` so every rule's op forms are available."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= MIN_OPSET:
        return model
    return onnx.version_converter.convert_version(model, MIN_OPSET)


def augment(
    model: onnx.ModelProto,
    layers: Mapping[str, str],
    score: str = "logit",
    output: str | None = None,
    manifest: Mapping | None = None,
    extras: Sequence[GraphOutput] = (),
    overrides: Mapping[str, Rule] | None = None,
    forward_only: Collection[str] = (),
) -> onnx.ModelProto:
    """Return a copy of ``model`` with the score block, layer activations and their gradients.

    ``layers`` maps a layer label (what the user typed) to the tensor it names in the graph.
    ``extras``: the optional graph outputs that the methods need (records of
    :mod:`camexport.graph.outputs`: input and bias gradients for FullGrad, the guided input
    gradient, ShapleyCAM's tangents), each emitting itself. ``overrides`` replaces gradient
    rules by op type, e.g.
    :data:`~camexport.graph.rules.MAXPOOL_WITHOUT_INDICES` for runtimes without MaxPool's Indices.
    Layers labelled in ``forward_only`` get their activations only, no gradient (a detector's
    stacked FPN levels, which do not lead to the score).
    """
    if score not in SCORE_FUNCTIONS:
        raise AugmentError(f"unknown score function {score!r}; choose one of {SCORE_FUNCTIONS}")
    result = onnx.ModelProto()
    result.CopyFrom(upgrade_opset(model))
    graph = result.graph
    outputs = [o.name for o in graph.output]
    output = output or outputs[0]
    if output not in outputs:
        raise AugmentError(f"model has no output {output!r}; outputs are {outputs}")
    for reserved in (TARGET_WEIGHTS, SCORE):
        if reserved in outputs or reserved in [i.name for i in graph.input]:
            raise AugmentError(f"model already has a value named {reserved!r}; is it augmented?")

    out_info = next(o for o in graph.output if o.name == output)
    taken = {v for node in graph.node for v in (*node.input, *node.output)}
    taken |= {i.name for i in graph.input} | {t.name for t in graph.initializer}
    scored, weights = _score_block(result, output, out_info, score, taken)
    # differentiate through the score function too: facts must know its values
    facts = GraphFacts(result)
    builder = Builder(facts, taken)
    image = graph.input[0].name
    ctx = Augmenting(result, facts, builder, image, layers, scored, weights, output, out_info, overrides)
    extra = [tensor for record in extras for tensor in record.wrt(ctx)]
    differentiated = [tensor for label, tensor in layers.items() if label not in forward_only]
    tensors = list(dict.fromkeys([*differentiated, *extra]))
    labels = {tensor: label for label, tensor in layers.items()}
    grads = differentiate(result, facts, builder, {scored: weights}, tensors, labels=labels,
                          overrides=overrides) if tensors else {}
    named = [entry for record in extras for entry in record.emit(ctx, grads)]
    graph.node.extend(builder.nodes)
    graph.initializer.extend(builder.initializers)

    graph.output.append(helper.make_tensor_value_info(SCORE, facts.dtype(output),
                                                      [dim_of(out_info, 0)]))
    _add_outputs(graph, ctx, grads, forward_only, named)
    if manifest is not None:
        set_manifest(result, manifest)
    onnx.checker.check_model(result)
    return result


def _add_outputs(graph: onnx.GraphProto, ctx: Augmenting, grads: Mapping[str, str],
                 forward_only: Collection[str], named: list) -> None:
    """``activation/<layer>``, ``gradient/<layer>`` and the records' outputs, each an Identity
    of the value it exposes."""
    pairs = []
    for label, tensor in ctx.layers.items():
        pairs.append((activation_name(label), tensor, *ctx.like(tensor)))
        if label not in forward_only:
            pairs.append((gradient_name(label), grads[tensor], *ctx.like(tensor)))
    for name, source, dtype, shape in [*pairs, *named]:
        graph.node.append(helper.make_node("Identity", [source], [name], name=f"{name}/output"))
        graph.output.append(helper.make_tensor_value_info(name, dtype, shape))


def _score_block(model: onnx.ModelProto, output: str, out_info: onnx.ValueInfoProto, score: str,
                 taken: set[str]) -> tuple[str, str]:
    """Add the input ``target_weights`` and ``score = sum(target_weights * f(output))`` to
    ``model`` (in place); returns (f(output), the effective weights) by name."""
    graph = model.graph
    weights_info = onnx.ValueInfoProto()
    weights_info.CopyFrom(out_info)
    weights_info.name = TARGET_WEIGHTS
    del weights_info.metadata_props[:]
    graph.input.append(weights_info)
    facts = GraphFacts(model)
    builder = Builder(facts, taken)
    builder.owner = SCORE
    rank = facts.rank(output)
    scored = output
    if score == "softmax":
        scored = builder.op("Softmax", output, axis=-1)
    elif score == "log_softmax":
        scored = builder.op("LogSoftmax", output, axis=-1)
    weights = _argmax_when_zero(builder, output, rank) if rank == 2 else TARGET_WEIGHTS
    weighted = builder.op("Mul", scored, weights)
    builder.reduce("ReduceSum", weighted, list(range(1, rank)), keepdims=False, name=SCORE)
    graph.node.extend(builder.nodes)
    graph.initializer.extend(builder.initializers)
    return scored, weights


def _argmax_when_zero(builder: Builder, output: str, rank: int) -> str:
    """target_weights, with each all-zero row replaced by the one-hot of that row's argmax
    (first index on ties), as pytorch-grad-cam's default target."""
    total = builder.reduce("ReduceSum", builder.op("Abs", TARGET_WEIGHTS), [1], keepdims=True)
    empty = builder.op("Equal", total, builder.const(0, output))
    top = builder.op("ArgMax", output, axis=1, keepdims=1, select_last_index=0)
    classes = builder.facts.static_dim(output, 1)
    onehot = builder.op("Cast", builder.op("Equal", builder.ints(range(classes)), top),
                        to=builder.facts.dtype(output))
    return builder.op("Where", empty, onehot, TARGET_WEIGHTS)
