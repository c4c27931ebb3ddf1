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

import json
from collections.abc import Collection, Mapping

import numpy as np
import onnx
from onnx import helper

from camexport.graph.autodiff import differentiate
from camexport.graph.builder import Builder, GraphFacts
from camexport.graph.forward import linearize
from camexport.graph.rules import GUIDED_RULES, Rule

TARGET_WEIGHTS = "target_weights"
SCORE = "score"

#: Score functions f applied to the model output before weighting, by the name users type.
SCORE_FUNCTIONS = ("logit", "softmax", "log_softmax")

MANIFEST_KEY = "camexport.manifest"

#: The opset camexport emits into when a model is older (rules use opset >= 13 forms).
MIN_OPSET = 17


INPUT_GRADIENT = "gradient/input"


def tangent_name(layer: str) -> str:
    """The output holding J A: the model output's tangent along the layer's own activation."""
    return f"tangent/{layer}"



GUIDED_GRADIENT = "guided/input"


def fullgrad_names(k: int) -> tuple[str, str]:
    """(bias, gradient) output names of the k-th bias layer (FullGrad)."""
    return f"fullgrad/bias/{k}", f"fullgrad/gradient/{k}"


def activation_name(layer: str) -> str:
    return f"activation/{layer}"


def gradient_name(layer: str) -> str:
    return f"gradient/{layer}"


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
    input_gradient: bool = False,
    bias_gradients: bool = False,
    guided: bool = False,
    tangents: bool = False,
    overrides: Mapping[str, Rule] | None = None,
    forward_only: Collection[str] = (),
) -> onnx.ModelProto:
    """Return a copy of ``model`` with the score block, layer activations and their gradients.

    ``layers`` maps a layer label (what the user typed) to the tensor it names in the graph.
    Optional, for the methods that need them: ``input_gradient`` adds ``gradient/input``;
    ``bias_gradients`` adds, for every Conv with a bias and every BatchNormalization (FullGrad's
    bias layers), ``fullgrad/bias/<k>`` (its effective bias) and ``fullgrad/gradient/<k>`` (the
    gradient w.r.t. its output); ``guided`` adds ``guided/input``, the input gradient through
    guided ReLUs (Guided Backprop); ``tangents`` adds ``tangent/<layer>`` = J A, the output's
    tangent along each layer's activation (ShapleyCAM's exact Hessian-vector product, for
    piecewise-linear tails). ``overrides`` replaces gradient rules by op type, e.g.
    :data:`~camexport.graph.rules.MAXPOOL_WITHOUT_INDICES` for runtimes without MaxPool's Indices.
    Layers labelled in ``forward_only`` get their activations only, no gradient (a detector's
    stacked FPN levels, which do not lead to the score).
    """
    if score not in SCORE_FUNCTIONS:
        raise ValueError(f"unknown score function {score!r}; choose one of {SCORE_FUNCTIONS}")
    result = onnx.ModelProto()
    result.CopyFrom(upgrade_opset(model))
    graph = result.graph
    outputs = [o.name for o in graph.output]
    output = output or outputs[0]
    if output not in outputs:
        raise ValueError(f"model has no output {output!r}; outputs are {outputs}")
    for reserved in (TARGET_WEIGHTS, SCORE):
        if reserved in outputs or reserved in [i.name for i in graph.input]:
            raise ValueError(f"model already has a value named {reserved!r}; is it augmented?")

    facts = GraphFacts(result)
    out_info = next(o for o in graph.output if o.name == output)
    weights_info = onnx.ValueInfoProto()
    weights_info.CopyFrom(out_info)
    weights_info.name = TARGET_WEIGHTS
    del weights_info.metadata_props[:]
    graph.input.append(weights_info)

    taken = {v for node in graph.node for v in (*node.input, *node.output)}
    taken |= {i.name for i in graph.input} | {t.name for t in graph.initializer}
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
    score_nodes = builder.nodes
    graph.node.extend(score_nodes)
    graph.initializer.extend(builder.initializers)

    # differentiate through the score function too: facts must know its values
    facts = GraphFacts(result)
    builder = Builder(facts, taken)
    image = graph.input[0].name
    biases = _bias_layers(result, facts, builder) if bias_gradients else []
    extra = ([image] if input_gradient else []) + [tensor for tensor, _, _ in biases]
    differentiated = [tensor for label, tensor in layers.items() if label not in forward_only]
    tensors = list(dict.fromkeys([*differentiated, *extra]))
    labels = {tensor: label for label, tensor in layers.items()}
    grads = differentiate(result, facts, builder, {scored: weights}, tensors, labels=labels,
                          overrides=overrides) if tensors else {}
    def like(tensor):
        return facts.dtype(tensor), _symbolic_shape(facts, tensor, out_info)

    named = [(INPUT_GRADIENT, grads[image], *like(image))] if input_gradient else []
    for k, (tensor, bias, channels) in enumerate(biases):
        bias_name, grad_name = fullgrad_names(k)
        named += [(bias_name, bias, facts.dtype(tensor), [channels]),
                  (grad_name, grads[tensor], *like(tensor))]
    if guided:
        guided_grads = differentiate(result, facts, builder, {scored: weights}, [image],
                                     overrides={**(overrides or {}), **GUIDED_RULES})
        named.append((GUIDED_GRADIENT, guided_grads[image], *like(image)))
    if tangents:
        for label, tensor in layers.items():
            tangent = linearize(result, facts, builder, {tensor: tensor}, output)
            named.append((tangent_name(label), tangent, *like(output)))
    graph.node.extend(builder.nodes)
    graph.initializer.extend(builder.initializers)

    graph.output.append(helper.make_tensor_value_info(SCORE, facts.dtype(output),
                                                      [_dim(out_info, 0)]))
    for label, tensor in layers.items():
        pairs = [(activation_name(label), tensor)]
        if label not in forward_only:
            pairs.append((gradient_name(label), grads[tensor]))
        for name, source in pairs:
            graph.node.append(helper.make_node("Identity", [source], [name], name=f"{name}/output"))
            graph.output.append(helper.make_tensor_value_info(
                name, facts.dtype(tensor), _symbolic_shape(facts, tensor, out_info)))
    for name, source, dtype, shape in named:
        graph.node.append(helper.make_node("Identity", [source], [name], name=f"{name}/output"))
        graph.output.append(helper.make_tensor_value_info(name, dtype, shape))
    if manifest is not None:
        set_manifest(result, manifest)
    onnx.checker.check_model(result)
    return result


def _bias_layers(model: onnx.ModelProto, facts: GraphFacts, builder: Builder) -> list[tuple]:
    """(output tensor, effective bias, channels) of every Conv with a bias and every BatchNormalization,
    in graph order: FullGrad's bias layers once batch-norm is folded into convolutions (a
    folded Conv's bias is exactly pgc's BatchNorm2d effective bias beta - mu gamma / sqrt(var + eps))."""
    found = []
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2]:
            if facts.constant(node.input[2]) is None:
                continue
            found.append((node.output[0], node.input[2], facts.shape(node.input[2])[0]))
        elif node.op_type == "BatchNormalization":
            scale, beta, mean, var = (facts.constant(n) for n in node.input[1:5])
            if any(v is None for v in (scale, beta, mean, var)):
                continue
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            effective = beta - mean * scale / np.sqrt(var + np.float32(eps))
            found.append((node.output[0], builder.array(effective.astype(beta.dtype)), len(beta)))
    return found


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


def _dim(info: onnx.ValueInfoProto, axis: int):
    dim = info.type.tensor_type.shape.dim[axis]
    return dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "batch")


def _symbolic_shape(facts: GraphFacts, tensor: str, out_info: onnx.ValueInfoProto) -> list:
    batch = _dim(out_info, 0)
    return [batch if (i == 0 and d is None) else (d if d is not None else f"d{i}")
            for i, d in enumerate(facts.shape(tensor))]


def set_manifest(model: onnx.ModelProto, manifest: Mapping) -> None:
    """Store the manifest (JSON) in the model's ``metadata_props``, replacing any earlier one."""
    kept = [p for p in model.metadata_props if p.key != MANIFEST_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = MANIFEST_KEY, json.dumps(manifest, sort_keys=True)


def get_manifest(model: onnx.ModelProto) -> dict | None:
    for prop in model.metadata_props:
        if prop.key == MANIFEST_KEY:
            return json.loads(prop.value)
    return None
