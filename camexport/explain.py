"""The Python API a pytorch-grad-cam user recognises, on top of an artifact.

    explainer = Explainer("artifacts/resnet50")
    result = explainer(x, targets=None, methods=["gradcam", "scorecam"])
    result.cams["gradcam"]  # (B, H, W) float32 in [0, 1]

    several = explainer.explain_targets(x, [[281, 285], [1, 2]], methods=["gradcam"])
    several.cams["gradcam"]  # (B, K, H, W): K targets per image, one forward pass

``x`` is a preprocessed batch (B, 3, H, W) float32. Targets: None (each image's top class),
ints, or target objects from :mod:`camexport.targets`, one per image. ``methods`` holds method
names or configured method objects (``AblationCAM(ratio_channels_to_ablate=0.5)``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from camexport.build import PLAIN_FILE, read_artifact
from camexport.detection import DetectionError, Detections, DetectorSpec, bind, postprocess
from camexport.graph.augment import (
    GUIDED_GRADIENT,
    INPUT_GRADIENT,
    TARGET_WEIGHTS,
    activation_name,
    fullgrad_names,
    gradient_name,
    tangent_name,
)
from camexport.graph.builder import _without_weights
from camexport.methods import METHODS, canonical_methods, method
from camexport.methods.base import CamInputs, to_channel_first
from camexport.methods.core import Method
from camexport.runtime import PROVIDERS, require, session
from camexport.targets import TargetError, as_target, as_targets, target_list, target_weights

#: pytorch-grad-cam's aug_smooth passes, in its order: (flip along W, factor) (reference §2.8).
AUG_PASSES = [(False, 0.9), (False, 1.0), (False, 1.1), (True, 0.9), (True, 1.0), (True, 1.1)]


#: Sessions of pruned or split graphs an Explainer keeps (each holds its own copy of the weights).
SESSIONS = 3


@dataclass
class Explanation:
    cams: dict[str, np.ndarray]
    outputs: np.ndarray
    targets: list


@dataclass
class TargetsExplanation:
    """K targets per image: ``cams[name]`` is (B, K, H, W) float32 (Guided Backprop
    (B, K, H, W, C)); ``targets[b][k]`` is the resolved target of image b, slot k."""

    cams: dict[str, np.ndarray]
    outputs: np.ndarray
    targets: list[list]


# -- the graph cut at target_weights -------------------------------------------------------
def target_dependent(model: onnx.ModelProto, source: str = TARGET_WEIGHTS) -> set[str]:
    """Every value of the graph computed from ``source`` (default ``target_weights``; nodes are
    topologically sorted)."""
    dependent = {source}
    for node in model.graph.node:
        if any(name in dependent for name in node.input if name):
            dependent.update(node.output)
    return dependent


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
    info = _value_info(_without_weights(model))
    batch = info[image].type.tensor_type.shape.dim[0].dim_param
    if not batch:
        return None

    dependent = target_dependent(model)
    positions = {node.output[k] for node in graph.node for op, k in POSITION_OUTPUTS
                 if node.op_type == op and len(node.output) > k}
    outputs = [o.name for o in graph.output]
    tail_outputs = [name for name in outputs if name in dependent]
    tail_nodes, frontier = _walk_tail(graph, TARGET_WEIGHTS, tail_outputs, dependent,
                                      lambda name: name not in positions and _batch_major(info, name, batch))
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
    """Every value's inferred type by name (inputs and outputs included)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    return {v.name: v for v in [*inferred.value_info, *inferred.input, *inferred.output]}


def _batch_major(info: dict, name: str, batch: str) -> bool:
    value = info.get(name)
    dims = value.type.tensor_type.shape.dim if value is not None else ()
    return len(dims) > 0 and dims[0].dim_param == batch


def _walk_tail(graph: onnx.GraphProto, source: str, outputs: Sequence[str], dependent: set[str],
               batch_major) -> tuple[list[int], list[str]]:
    """The nodes (graph order) computing ``outputs`` from the value ``source``, and their
    *frontier*: the batch-major values they read that are not computed from ``source`` (fed
    from a run before, one row per row of ``source``). Values that are not batch-major (shapes,
    constants) are recomputed from what they come from."""
    initializers = {t.name for t in graph.initializer}
    producer = {out: k for k, node in enumerate(graph.node) for out in node.output}
    nodes, frontier, seen = set(), [], set()
    pending = list(outputs)
    while pending:
        name = pending.pop()
        if not name or name in seen or name == source or name in initializers:
            continue
        seen.add(name)
        if name in dependent or (name in producer and not batch_major(name)):
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


def layer_tail(plain: onnx.ModelProto, tensor: str, output: str) -> LayerTail:
    """:class:`LayerTail` of ``plain`` (a graph with a symbolic batch axis) from value ``tensor``
    to ``output``."""
    graph = plain.graph
    info = _value_info(plain)
    image = graph.input[0].name
    batch = info[image].type.tensor_type.shape.dim[0].dim_param
    nodes, frontier = _walk_tail(graph, tensor, [output], target_dependent(plain, tensor),
                                 lambda name: bool(batch) and _batch_major(info, name, batch))
    declared = {o.name: o for o in graph.output}
    tail = _submodel(plain, nodes, [info[tensor]] + [info[n] for n in frontier],
                     [declared.get(output) or info[output]], "layer-tail")
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


def _method_objects(methods) -> dict[str, Method]:
    """Names (aliases accepted) or configured method objects, by canonical name."""
    if isinstance(methods, (str, Method)):
        methods = [methods]
    found: dict[str, Method] = {}
    for entry in methods:
        if isinstance(entry, Method):
            found.setdefault(entry.name, entry)
        else:
            for name in canonical_methods(entry):
                found.setdefault(name, method(name))
    return found


def _columns(targets_per_image, batch: int) -> list[list]:
    """B lists of K targets -> K lists (one per slot) of B targets."""
    rows = [list(t) if isinstance(t, (list, tuple)) else None for t in targets_per_image]
    if len(rows) != batch:
        raise TargetError(f"{len(rows)} target lists for {batch} images: give one list per image")
    if any(r is None for r in rows):
        raise TargetError("targets_per_image holds one list (or tuple) of targets per image")
    counts = {len(r) for r in rows}
    if len(counts) != 1 or 0 in counts:
        raise TargetError(f"every image needs the same number (> 0) of targets; got "
                          f"{[len(r) for r in rows]}")
    return [list(column) for column in zip(*rows)]


class Explainer:
    """Runs an artifact's augmented graph and computes CAM methods from its outputs.

    Each call runs only the part of the graph its methods read (:func:`prune`): GradCAM on an
    artifact also built for FullGrad and Guided Backprop does not compute their input gradients.
    """

    def __init__(self, artifact: str | Path, provider: str = "cpu", batch_size: int = 64):
        self.path = Path(artifact)
        model, self.manifest = read_artifact(self.path)
        self.provider = provider
        self.batch_size = batch_size
        require(provider)
        stored = {t.name for t in model.graph.initializer}
        self.input_name = next(i.name for i in model.graph.input if i.name not in stored)
        self.output_name = self.manifest["score"]["output"]
        self.score_function = self.manifest["score"]["function"]
        self.layers = self.manifest["layers"]
        output = next(o for o in model.graph.output if o.name == self.output_name)
        #: the model output per sample: (K,) for classifiers and embeddings, (K, H, W) for
        #: segmentation, (A, 4 + K) rows per anchor for detectors; ``classes`` is K
        self.output_shape = tuple(d.dim_value for d in output.type.tensor_type.shape.dim[1:])
        #: a detector artifact's post-processing (camexport.detection), else None
        self.detection = (DetectorSpec.from_dict(self.manifest["detection"])
                          if "detection" in self.manifest else None)
        self.classes = self.detection.classes if self.detection else self.output_shape[0]
        self.graph_outputs = tuple(o.name for o in model.graph.output)
        dependent = target_dependent(model)
        #: graph outputs that depend on the target (gradients, score)
        self.target_outputs = [name for name in self.graph_outputs if name in dependent]
        self._plain = None
        self._tails: dict[int, object] = {}
        #: (layer, image, values) of the last tail() call that read values from before the layer
        self._frontier = None
        # one session per output set in use, made on first use and bounded: each session holds
        # its own copy of the weights and a memory arena at its peak size
        self._pruned = _Sessions()
        self._splits = _Sessions()

    def release(self) -> None:
        """Drop every session made so far (each holds its own copy of the weights); the next
        call makes what it needs again."""
        self._pruned.clear()
        self._splits.clear()
        self._tails.clear()
        self._frontier = None
        self._plain = None

    @property
    def session(self):
        """The session of the whole augmented graph."""
        return self._graph(self.graph_outputs)

    @property
    def provider_name(self) -> str:
        """The onnxruntime execution provider every session of this explainer runs on."""
        return PROVIDERS[self.provider]

    # -- model runs --------------------------------------------------------------------
    def _plain_model(self) -> onnx.ModelProto:
        directory = self.path if self.path.is_dir() else self.path.parent
        return onnx.load(str(directory / PLAIN_FILE))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Model outputs of the plain graph, in batches."""
        if self._plain is None:
            self._plain = session(self._plain_model(), self.provider)
        return np.concatenate([
            self._plain.run([self.output_name], {self.input_name: x[i:i + self.batch_size]})[0]
            for i in range(0, len(x), self.batch_size)])

    def tail(self, layer: int, tensors: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """Model outputs computed from layer ``layer``'s tensors (the model after the layer only).
        Where the model after the layer also reads values computed before it (a residual stream
        bypassing a ViT block's norm1), they are computed from ``image`` (1, C, H, W), the image
        the tensors come from, and repeated for every row, as pgc recomputes them from the
        repeated image."""
        if layer not in self._tails:
            cut = layer_tail(self._plain_model(), self.layers[layer]["tensor"], self.output_name)
            self._tails[layer] = (cut, session(cut.model, self.provider),
                                  cut.before and session(cut.before, self.provider))
        cut, run, before = self._tails[layer]
        tensor = run.get_inputs()[0].name
        extra = {}
        if cut.frontier:
            if image is None:
                raise ValueError(
                    f"the model after layer {self.layers[layer]['name']!r} also reads values "
                    f"computed before it ({', '.join(cut.frontier[:3])}), e.g. a residual stream: "
                    f"give the image the tensors come from, tail(layer, tensors, image)")
            image = np.ascontiguousarray(image, np.float32)
            if image.shape[0] != 1:
                raise ValueError(f"tail(layer, tensors, image) takes one image (1, ...); got {image.shape}")
            remembered = self._frontier
            if remembered and remembered[0] == layer and np.array_equal(remembered[1], image):
                extra = remembered[2]  # AblationCAM asks again for each chunk of one image
            else:
                computed = [n for n in cut.frontier if n != self.input_name]
                extra = dict(zip(computed, before.run(computed, {self.input_name: image}))) if computed else {}
                extra.update({n: image for n in cut.frontier if n == self.input_name})
                self._frontier = (layer, image.copy(), extra)
        parts = []
        for i in range(0, len(tensors), self.batch_size):
            chunk = tensors[i:i + self.batch_size]
            feed = {tensor: chunk, **{n: np.repeat(v, len(chunk), axis=0) for n, v in extra.items()}}
            parts.append(run.run([self.output_name], feed)[0])
        return np.concatenate(parts)

    def outputs_for(self, needs=None) -> tuple[str, ...]:
        """The graph outputs that methods with these ``needs`` (registry.MethodInfo.needs) read;
        None: every output."""
        if needs is None:
            return self.graph_outputs
        labels = [layer["name"] for layer in self.layers]
        wanted = {self.output_name, *(activation_name(label) for label in labels)}
        if "gradients" in needs:
            wanted |= {gradient_name(label) for label in labels}
        if "tangents" in needs:
            wanted |= {tangent_name(label) for label in labels}
        if "input_gradients" in needs:
            wanted.add(INPUT_GRADIENT)
        if "guided" in needs:
            wanted.add(GUIDED_GRADIENT)
        prefix = fullgrad_names(0)[0].split("/")[0] + "/"
        return tuple(name for name in self.graph_outputs if name in wanted
                     or ("bias_gradients" in needs and name.startswith(prefix)))

    def _graph(self, outputs: tuple[str, ...]):
        if outputs not in self._pruned:
            model, _ = read_artifact(self.path)
            self._pruned[outputs] = session(prune(model, outputs), self.provider)
        return self._pruned[outputs]

    def _check_weights(self, x: np.ndarray, weights: np.ndarray) -> np.ndarray:
        weights = np.asarray(weights, np.float32)
        if weights.shape != (len(x), *self.output_shape):
            raise TargetError(f"target weights of shape {weights.shape} for {len(x)} images and "
                              f"outputs of shape {self.output_shape}: expected "
                              f"{(len(x), *self.output_shape)}")
        return weights

    def _run(self, x: np.ndarray, weights: np.ndarray, outputs: tuple[str, ...] | None = None):
        """The graph's ``outputs`` (default all) for inputs ``x`` and ``target_weights`` rows."""
        outputs = outputs or self.graph_outputs
        run = self._graph(outputs)
        feed = {self.input_name: x, TARGET_WEIGHTS: self._check_weights(x, weights)}
        feed = {i.name: feed[i.name] for i in run.get_inputs()}
        return dict(zip(outputs, run.run(list(outputs), feed)))

    def run_graph(self, x: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the augmented graph for inputs ``x`` and ``target_weights`` rows (B, K);
        an all-zero row means that image's top class."""
        return self._run(x, weights)

    def _split_graph(self, outputs: tuple[str, ...] | None = None):
        """(split, head session, tail session) for ``outputs``, built on first use; split None:
        no cut."""
        outputs = outputs or self.graph_outputs
        if outputs not in self._splits:
            model, _ = read_artifact(self.path)
            split = split_by_targets(model, outputs)
            self._splits[outputs] = (None, None, None) if split is None else (
                split, session(split.head, self.provider), session(split.tail, self.provider))
        return self._splits[outputs]

    def _tail_gradients(self, cut: tuple, head: dict[str, np.ndarray],
                        weights: np.ndarray) -> dict[str, np.ndarray]:
        """The tail's outputs for target rows ``weights`` (K, B, *output) on one head run:
        each output as (K, B, ...). Explicit rows only (an all-zero row gives zero gradients)."""
        split, _, tail = cut
        slots, batch = weights.shape[:2]
        per_run = max(1, self.batch_size // max(batch, 1))
        parts: dict[str, list] = {name: [] for name in split.tail_outputs}
        for start in range(0, slots, per_run):
            chunk = weights[start:start + per_run]
            feed = {name: np.concatenate([head[name]] * len(chunk)) for name in split.frontier}
            feed[TARGET_WEIGHTS] = np.ascontiguousarray(chunk.reshape(-1, *chunk.shape[2:]), np.float32)
            ran = dict(zip(split.tail_outputs, tail.run(split.tail_outputs, feed)))
            _zero_rows(ran, ~_rows_any(feed[TARGET_WEIGHTS]), split.tail_outputs)
            for name, value in ran.items():
                parts[name].append(value.reshape(len(chunk), batch, *value.shape[1:]))
        return {name: np.concatenate(values) for name, values in parts.items()}

    # -- explanation ---------------------------------------------------------------------
    def detect(self, x: np.ndarray, outputs: np.ndarray | None = None) -> list[Detections]:
        """A detector artifact's detections per image (torchvision's post-processing of the
        graph's rows, :func:`camexport.detection.postprocess`); ``outputs``: rows already run."""
        if self.detection is None:
            raise DetectionError(f"{self.path} is not a detector artifact (built from a torchvision "
                                 f"RetinaNet or FCOS)")
        outputs = self.forward(np.ascontiguousarray(x, np.float32)) if outputs is None else outputs
        return [postprocess(rows, self.detection) for rows in outputs]

    def inputs(self, x: np.ndarray, targets=None, needs=None, free: bool = False) -> CamInputs:
        """Run the graph once (twice for targets that need the outputs first) and gather what
        methods read; ``needs`` (registry.MethodInfo.needs) restricts the run to what methods
        with those needs read (default: every output). ``free``: only methods that ignore
        targets will read the result, so a model with no top class needs none."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        targets = bind(targets, self.detection)
        if self.score_function != "logit":
            raise ValueError("explain needs an artifact built with --score logit")
        outputs = self.outputs_for(needs)
        dependent = [name for name in outputs if name in self.target_outputs]
        zeros = np.zeros((len(x), *self.output_shape), np.float32)
        if targets is None:
            results = self._run(x, zeros, outputs)  # all-zero rows: each image's top class
        else:
            as_targets(targets, zeros)  # count and range checks before any run
            raw = target_list(targets, len(x))
            known = [None if t is None else as_target(t) for t in raw]
            model_outputs = None
            if dependent and any(t is not None and not getattr(t, "linear", False) for t in known):
                model_outputs = self.forward(x)
            explicit = np.array([t is not None for t in known])
            weights = zeros.copy()
            if explicit.any() and dependent:
                weights[explicit] = target_weights(
                    [t for t in known if t is not None],
                    None if model_outputs is None else model_outputs[explicit], self.output_shape)
            results = self._run(x, weights, outputs)
            _zero_rows(results, explicit & ~_rows_any(weights), dependent)
        resolved = ([None] * len(x) if free and targets is None and len(self.output_shape) > 1
                    else as_targets(targets, results[self.output_name]))
        gradients = tuple(gradient_name(layer["name"]) for layer in self.layers)

        def backward(layer: int, rows: np.ndarray) -> np.ndarray:
            spec = self.layers[layer]
            rows = np.asarray(rows, np.float32)
            again = self._run(x, rows, gradients)
            _zero_rows(again, ~_rows_any(rows), gradients)
            return to_channel_first(again[gradient_name(spec["name"])], spec["layout"])

        return self._cam_inputs(x, results, resolved, backward, needs=needs)

    def _cam_inputs(self, x, results: dict[str, np.ndarray], resolved: list, backward,
                    forward=None, tail=None, needs=None) -> CamInputs:
        raw = [results[activation_name(layer["name"])] for layer in self.layers]
        layouts = [layer["layout"] for layer in self.layers]
        extras = {}
        if INPUT_GRADIENT in results:
            extras["input_gradient"] = results[INPUT_GRADIENT]
        if GUIDED_GRADIENT in results:
            extras["guided_gradient"] = results[GUIDED_GRADIENT]
        bias_layers = []
        while fullgrad_names(len(bias_layers))[0] in results:
            bias, grad = fullgrad_names(len(bias_layers))
            bias_layers.append((results[bias], results[grad]))
        if INPUT_GRADIENT in results:  # FullGrad artifacts; a zero bias may be optimised away
            extras["bias_layers"] = bias_layers
        if tangent_name(self.layers[0]["name"]) in results:
            extras["tangents"] = [results[tangent_name(layer["name"])] for layer in self.layers]
        gradients = [results.get(gradient_name(layer["name"])) for layer in self.layers]
        return CamInputs(
            x=x, outputs=results[self.output_name], targets=resolved, extras=extras,
            activations=[to_channel_first(a, lay) for a, lay in zip(raw, layouts)],
            gradients=[None if g is None else to_channel_first(g, lay)
                       for g, lay in zip(gradients, layouts)],
            raw_activations=raw, layouts=layouts, forward=forward or self.forward,
            tail=_for_images(tail or self.tail, x), backward=backward,
            rerun=lambda batch, targets: self.inputs(batch, targets, needs))

    def _free(self, implementations: dict[str, Method]) -> bool:
        return not any(getattr(impl, "uses_targets", True) for impl in implementations.values())

    def _retargeted(self, impl, inputs: CamInputs, targets, rerun=None) -> CamInputs:
        """The inputs for a method that picks its own targets from the outputs (FinerCAM)."""
        retarget = getattr(impl, "retarget", None)
        if retarget is None:
            return inputs
        chosen = retarget(inputs.outputs, targets)
        return inputs if chosen is targets else (rerun or inputs.rerun)(inputs.x, chosen)

    def __call__(self, x: np.ndarray, targets=None, methods: str | Sequence = ("gradcam",),
                 eigen_smooth: bool = False, aug_smooth: bool = False) -> Explanation:
        implementations = _method_objects(methods)
        needs = _needs(implementations)
        free = self._free(implementations)
        if not aug_smooth:
            inputs = self.inputs(x, targets, needs, free)
            cams = {name: impl(self._retargeted(impl, inputs, targets), eigen_smooth)
                    for name, impl in implementations.items()}
            return Explanation(cams, inputs.outputs, inputs.targets)
        total = {name: None for name in implementations}
        unvaried = None
        for flip, factor in AUG_PASSES:
            varied = np.asarray(x, np.float32)
            varied = varied[..., ::-1] if flip else varied
            varied = varied * np.float32(factor) if factor != 1.0 else varied
            inputs = self.inputs(np.ascontiguousarray(varied), targets, needs, free)
            if not flip and factor == 1.0:
                unvaried = inputs
            for name, impl in implementations.items():
                cam = impl(self._retargeted(impl, inputs, targets), eigen_smooth)
                cam = cam[..., ::-1] if flip else cam
                total[name] = cam if total[name] is None else total[name] + cam
        cams = {name: (value / len(AUG_PASSES)).astype(np.float32) for name, value in total.items()}
        return Explanation(cams, unvaried.outputs, unvaried.targets)

    def explain_targets(self, x: np.ndarray, targets_per_image: Sequence[Sequence],
                        methods: str | Sequence = ("gradcam",),
                        eigen_smooth: bool = False) -> TargetsExplanation:
        """CAMs of K targets per image, ``cams[name]`` (B, K, H, W), equal to K calls of the
        explainer with one target per image, without recomputing the forward pass.

        ``targets_per_image`` holds, for each of the B images, a list of K targets (None: that
        image's top class, ints, target objects). The graph is cut at ``target_weights``
        (:func:`split_by_targets`): the head (forward, activations) runs once on the B images,
        the tail (score block and reverse pass) on the frontier values repeated for the K·B
        (target, image) rows. Methods that ignore targets (EigenCAM, KPCA-CAM, FEM, DFF) run
        once; ScoreCAM, AblationCAM and SESS share their model runs across slots (memoised for
        the call). Fallback: when the tail depends on the image itself (a graph whose batch
        axis is static, or with control flow), the whole graph runs once per slot, forward
        included.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.score_function != "logit":
            raise ValueError("explain_targets needs an artifact built with --score logit")
        columns = _columns(bind(targets_per_image, self.detection), len(x))
        implementations = _method_objects(methods)
        needs = _needs(implementations)
        outputs = self.outputs_for(needs)
        # ScoreCAM's masked images and AblationCAM's ablated maps are the same for every slot
        forward, tail = _Memo(self.forward), _Memo(self.tail)
        rerun = None
        cut = (None,)
        if any(name in self.target_outputs for name in outputs):
            cut = self._split_graph(outputs)
        if cut[0] is not None:
            split, head_session, _ = cut
            head = dict(zip(split.head_outputs, head_session.run(split.head_outputs,
                                                                 {self.input_name: x})))
            model_outputs = head[self.output_name]
            resolved = [as_targets(column, model_outputs) for column in columns]
            weights = np.stack([target_weights(column, model_outputs, self.output_shape)
                                for column in resolved])
            ran = self._tail_gradients(cut, head, weights)
            backward = self._head_backward(cut, head)
            per_slot = [self._cam_inputs(x, {**head, **{n: v[k] for n, v in ran.items()}},
                                         resolved[k], backward, forward, tail, needs)
                        for k in range(len(columns))]

            def rerun(_x, chosen):
                targets = as_targets(chosen, model_outputs)
                rows = target_weights(targets, model_outputs, self.output_shape)[None]
                again = self._tail_gradients(cut, head, rows)
                return self._cam_inputs(x, {**head, **{n: v[0] for n, v in again.items()}},
                                        targets, backward, forward, tail, needs)
        elif not any(name in self.target_outputs for name in outputs):  # one run serves all
            once = self._run(x, np.zeros((len(x), *self.output_shape), np.float32), outputs)
            per_slot = [self._cam_inputs(x, once, as_targets(column, once[self.output_name]),
                                         None, forward, tail, needs) for column in columns]
        else:
            per_slot = []
            for column in columns:
                inputs = self.inputs(x, column, needs)
                inputs.forward, inputs.tail = forward, tail
                per_slot.append(inputs)
        cams = {}
        for name, impl in implementations.items():
            if not getattr(impl, "uses_targets", True):
                single = impl(per_slot[0], eigen_smooth)
                cams[name] = np.repeat(single[:, None], len(columns), axis=1)
                continue
            maps = [impl(self._retargeted(impl, inputs, column, rerun), eigen_smooth)
                    for inputs, column in zip(per_slot, columns)]
            cams[name] = np.stack(maps, axis=1)
        targets = [[per_slot[k].targets[b] for k in range(len(columns))] for b in range(len(x))]
        return TargetsExplanation(cams, per_slot[0].outputs, targets)

    def _head_backward(self, cut: tuple, head: dict[str, np.ndarray]):
        def backward(layer: int, rows: np.ndarray) -> np.ndarray:
            spec = self.layers[layer]
            again = self._tail_gradients(cut, head, np.asarray(rows, np.float32)[None])
            return to_channel_first(again[gradient_name(spec["name"])][0], spec["layout"])
        return backward


class _Sessions(OrderedDict):
    """The SESSIONS most recently used sessions (or session tuples), keyed by output set."""

    def __getitem__(self, key):
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > SESSIONS:
            self.popitem(last=False)


def _needs(implementations: dict[str, Method]) -> frozenset[str] | None:
    """What the graph must provide for these methods; None (everything) for a method the
    registry does not describe."""
    needs: set[str] = set()
    for impl in implementations.values():
        info = METHODS.get(impl.name)
        if info is None or type(impl) is not info.implementation:
            return None
        needs |= info.needs
    return frozenset(needs)


def _for_images(tail, x: np.ndarray):
    """``tail(layer, tensors, b)``: the model after a layer on tensors that come from image b of
    the batch ``x`` (b None: tensors of no one image)."""
    return lambda layer, tensors, b=None: tail(layer, tensors, None if b is None else x[b:b + 1])


class _Memo:
    """A model-running callable that remembers its results by the bytes of its arguments."""

    def __init__(self, function):
        self.function, self.results = function, {}

    def __call__(self, *args):
        key = tuple((a.shape, a.dtype.str, hashlib.blake2b(np.ascontiguousarray(a).tobytes(),
                                                           digest_size=16).digest())
                    if isinstance(a, np.ndarray) else a for a in args)
        if key not in self.results:
            self.results[key] = self.function(*args)
        return self.results[key]


def _rows_any(weights: np.ndarray) -> np.ndarray:
    """Which rows (first axis) hold a non-zero weight."""
    return weights.reshape(len(weights), -1).any(axis=1)


def _zero_rows(results: dict[str, np.ndarray], rows: np.ndarray, names: Sequence[str]) -> None:
    """Zero the target-dependent outputs of ``rows`` (in place)."""
    if not rows.any():
        return
    for name in names:
        if name in results:
            results[name] = results[name].copy()
            results[name][rows] = 0
