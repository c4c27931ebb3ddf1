"""The augmented graph's input and output names, and one record per optional graph output.

Every augmented graph has the input ``target_weights`` and the outputs ``score``,
``activation/<layer>`` and ``gradient/<layer>``. Some methods read more, and each such part is
one :class:`GraphOutput` record that knows how to emit itself while the graph is augmented
(:func:`camexport.graph.augment.augment`), which graph outputs are its own, and how to collect
itself from a session's results into :class:`camexport.methods.inputs.CamInputs`:

==================  =============================================  ==========================
record              graph outputs                                  CamInputs field
==================  =============================================  ==========================
INPUT_GRADIENTS     ``gradient/input``                             ``input_gradient``
BIAS_GRADIENTS      ``fullgrad/bias/<k>``, ``fullgrad/gradient/<k>``  ``bias_layers``
GUIDED              ``guided/input``                               ``guided_gradient``
TANGENTS            ``tangent/<layer>``                            ``tangents``
==================  =============================================  ==========================

A method's registry row lists the records it reads (:mod:`camexport.methods.registry`); the
build, the Explainer and ``camexport recompute`` loop over the same records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from camexport.errors import CamexportError
from camexport.graph.builder import Builder, GraphFacts, exporter_record
from camexport.graph.rules import GUIDED_RULES, Rule


class AugmentError(CamexportError, ValueError):
    """A model or layer the augmentation (or a fused head) cannot take, with the fix."""


TARGET_WEIGHTS = "target_weights"
SCORE = "score"
INPUT_GRADIENT = "gradient/input"
GUIDED_GRADIENT = "guided/input"
FULLGRAD_PREFIX = "fullgrad/"


def activation_name(layer: str) -> str:
    return f"activation/{layer}"


def gradient_name(layer: str) -> str:
    return f"gradient/{layer}"


def tangent_name(layer: str) -> str:
    """The output holding J A: the model output's tangent along the layer's own activation."""
    return f"tangent/{layer}"


#: FullGrad's bias layers: "pgc" = the nodes of modules of exactly pgc's bias types (below), as
#: pgc 1.5.7 picks them; "all" = every Conv with a bias and every BatchNormalization, at its
#: pre-activation output (so timm's BatchNormAct2d counts too: FullGrad's paper, every bias)
FULLGRAD_BIASES = ("pgc", "all")


def fullgrad_names(k: int) -> tuple[str, str]:
    """(bias, gradient) output names of the k-th bias layer (FullGrad)."""
    return f"{FULLGRAD_PREFIX}bias/{k}", f"{FULLGRAD_PREFIX}gradient/{k}"


@dataclass
class Augmenting:
    """What a record sees while a graph is augmented: the graph with its score block, the
    builder that new nodes go through, the image input, the layers (label -> tensor), the
    scored value with its cotangent (``weights``), the model output and rule overrides."""

    model: onnx.ModelProto
    facts: GraphFacts
    builder: Builder
    image: str
    layers: Mapping[str, str]
    scored: str
    weights: str
    output: str
    out_info: onnx.ValueInfoProto
    overrides: Mapping[str, Rule] | None = None
    #: values a record computed in wrt() for its emit()
    scratch: dict = field(default_factory=dict)

    def like(self, tensor: str) -> tuple[int, list]:
        """(dtype, symbolic shape) of a graph output shaped like ``tensor``."""
        batch = dim_of(self.out_info, 0)
        shape = [batch if (i == 0 and d is None) else (d if d is not None else f"d{i}")
                 for i, d in enumerate(self.facts.shape(tensor))]
        return self.facts.dtype(tensor), shape


#: (output name, value it copies, dtype, shape) of one emitted graph output
Emitted = tuple[str, str, int, list]


class GraphOutput:
    """An optional part of the augmented graph. ``key`` is its word in the manifest and the
    registry; ``field`` the CamInputs field it fills."""

    key = ""
    field = ""

    def wrt(self, ctx: Augmenting) -> list[str]:
        """Values whose cotangents the main reverse pass (from the score) must also give."""
        return []

    def emit(self, ctx: Augmenting, grads: Mapping[str, str]) -> list[Emitted]:
        raise NotImplementedError

    def owns(self, name: str, layers: Sequence[str]) -> bool:
        """Whether graph output ``name`` belongs to this record (``layers``: the labels)."""
        raise NotImplementedError

    def collect(self, results: Mapping[str, np.ndarray], layers: Sequence[str]):
        """The CamInputs field's value from a run's ``results`` (graph output -> array)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.key


class _InputGradient(GraphOutput):
    """``gradient/input``: d score / d image (FullGrad's input term)."""

    key, field = "input_gradients", "input_gradient"

    def wrt(self, ctx):
        return [ctx.image]

    def emit(self, ctx, grads):
        return [(INPUT_GRADIENT, grads[ctx.image], *ctx.like(ctx.image))]

    def owns(self, name, layers):
        return name == INPUT_GRADIENT

    def collect(self, results, layers):
        return results.get(INPUT_GRADIENT)


class _BiasGradients(GraphOutput):
    """For every Conv with a bias and every BatchNormalization (FullGrad's bias layers), its
    effective bias ``fullgrad/bias/<k>`` and the gradient at its output ``fullgrad/gradient/<k>``.
    ``rule`` picks the layers (:data:`FULLGRAD_BIASES`)."""

    key, field = "bias_gradients", "bias_layers"

    def __init__(self, rule: str = "pgc"):
        if rule not in FULLGRAD_BIASES:
            raise ValueError(f"unknown FullGrad bias rule {rule!r}; choose one of {FULLGRAD_BIASES}")
        self.rule = rule

    def wrt(self, ctx):
        ctx.scratch[self.key] = _bias_layers(ctx.model, ctx.facts, ctx.builder, every=self.rule == "all")
        return [tensor for tensor, _, _ in ctx.scratch[self.key]]

    def emit(self, ctx, grads):
        emitted = []
        for k, (tensor, bias, channels) in enumerate(ctx.scratch[self.key]):
            bias_name, grad_name = fullgrad_names(k)
            emitted += [(bias_name, bias, ctx.facts.dtype(tensor), [channels]),
                        (grad_name, grads[tensor], *ctx.like(tensor))]
        return emitted

    def owns(self, name, layers):
        return name.startswith(FULLGRAD_PREFIX)

    def collect(self, results, layers):
        # a list, possibly empty: a zero bias may be optimised away
        found = []
        while fullgrad_names(len(found))[0] in results:
            bias, grad = fullgrad_names(len(found))
            found.append((results[bias], results[grad]))
        return found


class _Guided(GraphOutput):
    """``guided/input``: the input gradient through guided ReLUs (Guided Backprop)."""

    key, field = "guided", "guided_gradient"

    def emit(self, ctx, grads):
        from camexport.graph.autodiff import differentiate  # it imports graph.cut, which imports us

        guided = differentiate(ctx.model, ctx.facts, ctx.builder, {ctx.scored: ctx.weights}, [ctx.image],
                               overrides={**(ctx.overrides or {}), **GUIDED_RULES})
        return [(GUIDED_GRADIENT, guided[ctx.image], *ctx.like(ctx.image))]

    def owns(self, name, layers):
        return name == GUIDED_GRADIENT

    def collect(self, results, layers):
        return results.get(GUIDED_GRADIENT)


class _Tangents(GraphOutput):
    """``tangent/<layer>`` = J A, the output's tangent along each layer's activation
    (ShapleyCAM's exact Hessian-vector product, for piecewise-linear tails)."""

    key, field = "tangents", "tangents"

    def emit(self, ctx, grads):
        from camexport.graph.forward import linearize  # it imports graph.cut, which imports us

        return [(tangent_name(label), linearize(ctx.model, ctx.facts, ctx.builder, {tensor: tensor},
                                                ctx.output), *ctx.like(ctx.output))
                for label, tensor in ctx.layers.items()]

    def owns(self, name, layers):
        return name in {tangent_name(label) for label in layers}

    def collect(self, results, layers):
        if tangent_name(layers[0]) not in results:
            return None
        return [results[tangent_name(label)] for label in layers]


INPUT_GRADIENTS = _InputGradient()
BIAS_GRADIENTS = _BiasGradients()
GUIDED = _Guided()
TANGENTS = _Tangents()

#: Every optional graph output, in the order augmentation emits them.
GRAPH_OUTPUTS: tuple[GraphOutput, ...] = (INPUT_GRADIENTS, BIAS_GRADIENTS, GUIDED, TANGENTS)


def graph_outputs(keys, fullgrad_biases: str = "pgc") -> tuple[GraphOutput, ...]:
    """The records named by ``keys`` (manifest words), in emission order; FullGrad's bias
    layers chosen by ``fullgrad_biases`` (:data:`FULLGRAD_BIASES`)."""
    keys = set(keys)
    chosen = {BIAS_GRADIENTS.key: _BiasGradients(fullgrad_biases)}
    return tuple(chosen.get(record.key, record) for record in GRAPH_OUTPUTS if record.key in keys)


def _bias_layers(model: onnx.ModelProto, facts: GraphFacts, builder: Builder,
                 every: bool = False) -> list[tuple]:
    """(output tensor, effective bias, channels) of every Conv with a bias and every BatchNormalization,
    in graph order: FullGrad's bias layers once batch-norm is folded into convolutions (a
    folded Conv's bias is exactly pgc's BatchNorm2d effective bias beta - mu gamma / sqrt(var + eps)).
    Those of pgc's bias module types only, unless ``every``."""
    found = []
    for node in model.graph.node:
        if not (every or _pgc_bias_module(node)):
            continue
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


#: the module classes whose biases pgc's FullGrad reads: exactly these types (``type(layer) in``),
#: so subclasses such as timm's BatchNormAct2d and Conv2dSame are not bias layers there
PGC_BIAS_MODULES = ("torch.nn.modules.conv.Conv2d", "torch.nn.modules.batchnorm.BatchNorm2d")


def _pgc_bias_module(node: onnx.NodeProto) -> bool:
    """Whether a node comes from a module pgc's FullGrad counts as a bias layer, by the torch
    exporter's ``pkg.torch.onnx.class_hierarchy`` (the innermost module class before the aten
    op); True for graphs without that record (other exporters)."""
    classes = exporter_record(node, "pkg.torch.onnx.class_hierarchy")
    if classes is None:
        return True
    modules = [c for c in classes if not c.startswith("aten.") and "." in c]
    return not modules or modules[-1] in PGC_BIAS_MODULES


def dim_of(info: onnx.ValueInfoProto, axis: int):
    """Axis ``axis`` of a declared value: its size, its symbol, or "batch" when it has neither."""
    dim = info.type.tensor_type.shape.dim[axis]
    return dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "batch")
