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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camexport.artifact import read_artifact, read_plain
from camexport.detection import Detections, same_batch
from camexport.errors import CamexportError
from camexport.graph.ablate import ABLATED_CHANNELS, ABLATED_VALUES, ablation_tail
from camexport.graph.cut import layer_tail, prune, split_by_targets, target_dependent
from camexport.graph.outputs import TARGET_WEIGHTS, activation_name, gradient_name, graph_outputs
from camexport.graph.sparse import SparseTails
from camexport.methods import METHODS, canonical_methods
from camexport.methods.base import Method
from camexport.methods.inputs import CamInputs, ablated_copies, channel_axis
from camexport.methods.pipeline import to_channel_first
from camexport.methods.registry import method_objects, needs_of
from camexport.runtime import PROVIDERS, check_graph, require, session
from camexport.targets import TargetError, as_target, as_targets, target_list, target_weights
from camexport.tasks import task_for
from camexport.tuning import BatchTuner

#: pytorch-grad-cam's aug_smooth passes, in its order: (flip along W, factor) (reference §2.8).
AUG_PASSES = [(False, 0.9), (False, 1.0), (False, 1.1), (True, 0.9), (True, 1.0), (True, 1.1)]


#: AblationCAM's rank-1 tail runs ``batch_size`` x this many ablated channels per run (its
#: per-copy work is small: a larger run amortises the layer's product, computed once per run)
ABLATION_RUN = 4

#: Sessions of pruned or split graphs an Explainer keeps (each holds its own copy of the weights).
SESSIONS = 3


class ExplainError(CamexportError, ValueError):
    """An artifact or call the Explainer cannot serve, with what to change."""


@dataclass
class Explanation:
    """CAMs (``cams[name]`` (B, H, W)), the model outputs, the resolved targets, and the
    CamInputs the CAMs were computed from (activations, gradients; without aug_smooth, those of
    the images as given)."""

    cams: dict[str, np.ndarray]
    outputs: np.ndarray
    targets: list
    inputs: CamInputs | None = None


@dataclass
class TargetsExplanation:
    """K targets per image: ``cams[name]`` is (B, K, H, W) float32 (Guided Backprop
    (B, K, H, W, C)); ``targets[b][k]`` is the resolved target of image b, slot k."""

    cams: dict[str, np.ndarray]
    outputs: np.ndarray
    targets: list[list]


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
        check_graph(model, provider)
        stored = {t.name for t in model.graph.initializer}
        self.input_name = next(i.name for i in model.graph.input if i.name not in stored)
        self.output_name = self.manifest["score"]["output"]
        self.score_function = self.manifest["score"]["function"]
        self.layers = self.manifest["layers"]
        output = next(o for o in model.graph.output if o.name == self.output_name)
        #: the model output per sample: (K,) for classifiers and embeddings, (K, H, W) for
        #: segmentation, (A, 4 + K) rows per anchor for detectors; ``classes`` is K
        self.output_shape = tuple(d.dim_value for d in output.type.tensor_type.shape.dim[1:])
        #: what this kind of model changes (camexport.tasks): classes, targets, detections
        self.task = task_for(self.manifest, self.output_shape)
        self.output_shape = self.task.output_shape  # a two-stage detector's P is free in the graph
        #: a detector artifact's post-processing (camexport.detection), else None
        self.detection = self.task.detection
        self.classes = self.task.classes
        #: the optional graph outputs the artifact was built with (camexport.graph.outputs)
        built = canonical_methods(self.manifest.get("methods") or ["gradcam"])
        self.extras = graph_outputs(set().union(*(METHODS[m].graph_needs for m in built)))
        self.graph_outputs = tuple(o.name for o in model.graph.output)
        dependent = target_dependent(model)
        #: graph outputs that depend on the target (gradients, score)
        self.target_outputs = [name for name in self.graph_outputs if name in dependent]
        self._plain = None
        self._forward_batches = BatchTuner(batch_size)
        self._tails: dict[int, object] = {}
        #: (layer, channel axis) -> session of the rank-1 ablation tail, None: not applicable
        self._ablation: dict[tuple[int, int], object] = {}
        #: (layer, image, values) of the last tail() call that read values from before the layer
        self._frontier = None
        # one session per output set in use, made on first use and bounded: each session holds
        # its own copy of the weights and a memory arena at its peak size
        self._pruned = _Sessions()
        self._splits = _Sessions()
        #: (batch key, output set, head outputs) of a detect(methods=...) run of the split
        #: graph's head, for the explanation of the same batch that follows it (used once)
        self._head_memo: tuple | None = None

    def release(self) -> None:
        """Drop every session made so far (each holds its own copy of the weights); the next
        call makes what it needs again."""
        self._pruned.clear()
        self._splits.clear()
        self._tails.clear()
        self._ablation.clear()
        self._frontier = None
        self._head_memo = None
        self._plain = None
        self.task.release()

    @property
    def session(self):
        """The session of the whole augmented graph."""
        return self._graph(self.graph_outputs)

    @property
    def provider_name(self) -> str:
        """The onnxruntime execution provider every session of this explainer runs on."""
        return PROVIDERS[self.provider]

    # -- model runs --------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        """Model outputs of the plain graph, in batches of at most ``batch_size`` images, the
        size picked by measurement (:class:`camexport.tuning.BatchTuner`)."""
        if self._plain is None:
            self._plain = self._session(read_plain(self.path, self.manifest))
        return self._forward_batches.run(
            x, lambda chunk: self._plain.run([self.output_name], {self.input_name: chunk})[0])

    def tail(self, layer: int, tensors: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """Model outputs computed from layer ``layer``'s tensors (the model after the layer only).
        Where the model after the layer also reads values computed before it (a residual stream
        bypassing a ViT block's norm1), they are computed from ``image`` (1, C, H, W), the image
        the tensors come from, and repeated for every row, as pgc recomputes them from the
        repeated image."""
        run = self._tail(layer)[1]
        tensor = run.get_inputs()[0].name
        extra = self._before(layer, image)
        parts = []
        for i in range(0, len(tensors), self.batch_size):
            chunk = tensors[i:i + self.batch_size]
            feed = {tensor: chunk, **{n: np.repeat(v, len(chunk), axis=0) for n, v in extra.items()}}
            parts.append(run.run([self.output_name], feed)[0])
        return np.concatenate(parts)

    def ablate(self, layer: int, tensor: np.ndarray, channels: np.ndarray, values: np.ndarray,
               image: np.ndarray | None = None) -> np.ndarray:
        """Model outputs of ``tensor`` (1, ...), layer ``layer``'s tensor of one image, with
        channel ``channels[i]`` set to ``values[i]`` at every position: one row per i.
        Where the model after the layer reads it through a linear op (a ViT's norm1 -> q/k/v
        projection) each batch of channels is one run of the rank-1 tail
        (:func:`camexport.graph.ablate.ablation_tail`, which also repeats the values from
        before the layer only where they are read); otherwise the ablated copies run through
        :meth:`tail`. ``image`` as for :meth:`tail`."""
        own = self.task.ablate(self, layer, channels, values, image)
        if own is not None:  # a two-stage detector's FPN levels (pgc's AblationLayerFasterRCNN)
            return own
        axis = channel_axis(self.layers[layer]["layout"], tensor.ndim)
        run = self._ablation_tail(layer, axis)
        if run is None:
            return self.tail(layer, ablated_copies(tensor, axis, channels, values), image)
        feed = {name: np.ascontiguousarray(value) for name, value in self._before(layer, image).items()}
        feed[self.layers[layer]["tensor"]] = np.ascontiguousarray(tensor)
        channels = np.asarray(channels, np.int64)
        values = np.asarray(values, tensor.dtype)
        step = self.batch_size * ABLATION_RUN
        return np.concatenate([
            run.run([self.output_name], {**feed, ABLATED_CHANNELS: channels[i:i + step],
                                         ABLATED_VALUES: values[i:i + step]})[0]
            for i in range(0, len(channels), step)])

    def _tail(self, layer: int) -> tuple:
        """(LayerTail, its session, the session of the values from before the layer or None)."""
        if layer not in self._tails:
            self.task.check_cut(self, "running the model after a layer (AblationCAM, tail())")
            cut = layer_tail(read_plain(self.path, self.manifest), self.layers[layer]["tensor"],
                             self.output_name)
            self._tails[layer] = (cut, session(cut.model, self.provider, spin=False),
                                  cut.before and session(cut.before, self.provider, spin=False))
        return self._tails[layer]

    def _ablation_tail(self, layer: int, axis: int):
        """The session of the layer's rank-1 tail, None where the rewrite does not apply."""
        if (layer, axis) not in self._ablation:
            cut = self._tail(layer)[0]
            fast = ablation_tail(cut.model, self.layers[layer]["tensor"], axis)
            self._ablation[layer, axis] = fast and session(fast, self.provider, spin=False)
        return self._ablation[layer, axis]

    def _before(self, layer: int, image: np.ndarray | None) -> dict[str, np.ndarray]:
        """The values from before the layer that the tail reads (its frontier), computed from
        ``image`` (1, ...): one row each."""
        cut, _, before = self._tail(layer)
        if not cut.frontier:
            return {}
        if image is None:
            raise ExplainError(
                f"the model after layer {self.layers[layer]['name']!r} also reads values "
                f"computed before it ({', '.join(cut.frontier[:3])}), e.g. a residual stream: "
                f"give the image the tensors come from, tail(layer, tensors, image)")
        image = np.ascontiguousarray(image, np.float32)
        if image.shape[0] != 1:
            raise ExplainError(f"tail(layer, tensors, image) takes one image (1, ...); got {image.shape}")
        remembered = self._frontier
        if remembered and remembered[0] == layer and np.array_equal(remembered[1], image):
            return remembered[2]  # AblationCAM asks again for each chunk of one image
        computed = [n for n in cut.frontier if n != self.input_name]
        extra = dict(zip(computed, before.run(computed, {self.input_name: image}))) if computed else {}
        extra.update({n: image for n in cut.frontier if n == self.input_name})
        self._frontier = (layer, image.copy(), extra)
        return extra

    def outputs_for(self, needs=None) -> tuple[str, ...]:
        """The graph outputs that methods with these ``needs`` (registry.MethodInfo.needs) read;
        None: every output."""
        if needs is None:
            return self.graph_outputs
        labels = [layer["name"] for layer in self.layers]
        wanted = {self.output_name, *(activation_name(label) for label in labels)}
        if "gradients" in needs:
            wanted |= {gradient_name(label) for label in labels}
        records = [record for record in self.extras if record.key in needs]
        return tuple(name for name in self.graph_outputs if name in wanted
                     or any(record.owns(name, labels) for record in records))

    def _graph(self, outputs: tuple[str, ...]):
        if outputs not in self._pruned:
            model, _ = read_artifact(self.path, self.manifest)
            self._pruned[outputs] = self._session(prune(model, outputs))
        return self._pruned[outputs]

    def _session(self, model):
        """A session of the artifact's graph or a part of it, as the task runs it."""
        return self.task.session(session(model, self.provider), self)

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
        """(split, head session, tail sessions: camexport.graph.sparse.SparseTails) for
        ``outputs``, built on first use; split None: no cut."""
        outputs = outputs or self.graph_outputs
        if outputs not in self._splits:
            model, _ = read_artifact(self.path, self.manifest)
            extra = [name for name in self.task.head_outputs(self.graph_outputs) if name not in outputs]
            split = split_by_targets(model, [*outputs, *extra]) if self.task.splits else None
            # the head and the tail run in turn: threads left spinning after one slow the other
            # (a YOLOv8n detection's GradCAM at 640: 0.36 -> 0.26 s, 2 cores); within a run
            # they spin (the same GradCAM 67-75 -> 64-70 ms)
            def quiet(part):
                return session(part, self.provider, spin="run")

            self._splits[outputs] = (None, None, None) if split is None else (
                split, quiet(split.head), SparseTails(split.tail, TARGET_WEIGHTS, quiet))
        return self._splits[outputs]

    def _tail_gradients(self, cut: tuple, head: dict[str, np.ndarray],
                        weights: np.ndarray) -> dict[str, np.ndarray]:
        """The tail's outputs for target rows ``weights`` (K, B, *output) on one head run:
        each output as (K, B, ...). Explicit rows only (an all-zero row gives zero gradients).
        Sparse weights run the tail pruned to what they reach (camexport.graph.sparse)."""
        split, _, tails = cut
        slots, batch = weights.shape[:2]
        per_run = max(1, self.batch_size // max(batch, 1))
        parts: dict[str, list] = {name: [] for name in split.tail_outputs}
        for start in range(0, slots, per_run):
            chunk = weights[start:start + per_run]
            rows = np.ascontiguousarray(chunk.reshape(-1, *chunk.shape[2:]), np.float32)
            run, names, zeros, windows = tails.variant(rows)
            ran = {name: np.zeros((len(rows), *shape[1:]), np.float32) for name, shape in zeros.items()}
            if run is not None:
                feed = {name: windows[name] if name in windows else rows if name == TARGET_WEIGHTS
                        else head[name] if len(chunk) == 1 else np.concatenate([head[name]] * len(chunk))
                        for name in (i.name for i in run.get_inputs())}
                ran.update(zip(names, run.run(names, feed)))
            _zero_rows(ran, ~_rows_any(rows), split.tail_outputs)
            for name, value in ran.items():
                parts[name].append(value.reshape(len(chunk), batch, *value.shape[1:]))
        return {name: np.concatenate(values) for name, values in parts.items()}

    # -- explanation ---------------------------------------------------------------------
    def detect(self, x: np.ndarray, outputs: np.ndarray | None = None,
               methods: str | Sequence | None = None) -> list[Detections]:
        """A detector artifact's detections per image (torchvision's post-processing of the
        graph's rows, :func:`camexport.detection.postprocess`; with their masks or keypoints);
        ``outputs``: rows already run. ``methods``: the methods that will explain these
        detections on the same batch next (``camexport run``): the rows then come from the
        split graph's head run for those methods, which that explanation reuses instead of
        running the model again (target methods on a one-stage detector)."""
        x = np.ascontiguousarray(x, np.float32)
        if outputs is None and methods is not None:
            outputs = self._head_rows(x, methods)
        outputs = self.forward(x) if outputs is None else outputs
        return self.task.with_extras(self, x, outputs, self.task.detections(outputs, self.path))

    def _head_rows(self, x: np.ndarray, methods) -> np.ndarray | None:
        """The model outputs of ``x`` from the split graph's head for ``methods``, the head's
        outputs remembered for :meth:`_slots`; None where no split serves them."""
        outputs = self.outputs_for(needs_of(method_objects(methods)))
        if not self.task.splits or not any(name in self.target_outputs for name in outputs):
            return None
        split, head_session, _ = self._split_graph(outputs)
        if split is None:
            return None
        head = dict(zip(split.head_outputs, head_session.run(split.head_outputs, {self.input_name: x})))
        kept = x.copy()  # a copy: the caller may reuse its array
        self._head_memo = (kept, outputs, head)
        self.task.keep_head(kept, head)  # a segment model's prototypes, for the masks
        return head[self.output_name]

    def inputs(self, x: np.ndarray, targets=None, needs=None, free: bool = False) -> CamInputs:
        """Run the graph once (twice for targets that need the outputs first) and gather what
        methods read; ``needs`` (registry.MethodInfo.needs) restricts the run to what methods
        with those needs read (default: every output). ``free``: only methods that ignore
        targets will read the result, so a model with no top class needs none."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        targets = self.task.bind(targets)
        if self.score_function != "logit":
            raise ExplainError("explain needs an artifact built with --score logit")
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
                if self._split_graph(outputs)[0] is not None:
                    # the targets' weights need the outputs: the graph's head runs once (outputs,
                    # activations), its target-dependent tail then, not a forward and a whole run
                    return self._slots(x, [raw], needs, memo=False)[0][0]
                model_outputs = self.forward(x)
            explicit = np.array([t is not None for t in known])
            weights = zeros.copy()
            if explicit.any() and dependent:
                weights[explicit] = target_weights(
                    [t for t in known if t is not None],
                    None if model_outputs is None else model_outputs[explicit], self.output_shape)
            results = self._run(x, weights, outputs)
            _zero_rows(results, explicit & ~_rows_any(weights), dependent)
        resolved = ([None] * len(x) if free and targets is None and not self.task.has_top_class
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
                    forward=None, tail=None, needs=None, ablate=None) -> CamInputs:
        raw = [results[activation_name(layer["name"])] for layer in self.layers]
        layouts = [layer["layout"] for layer in self.layers]
        labels = [layer["name"] for layer in self.layers]
        extras = {record.field: record.collect(results, labels) for record in self.extras
                  if needs is None or record.key in needs}
        gradients = [results.get(gradient_name(label)) for label in labels]
        return CamInputs(
            x=x, outputs=results[self.output_name], targets=resolved, **extras,
            activations=[to_channel_first(a, lay) for a, lay in zip(raw, layouts)],
            gradients=[None if g is None else to_channel_first(g, lay)
                       for g, lay in zip(gradients, layouts)],
            raw_activations=raw, raw_gradients=gradients, layouts=layouts, forward=forward or self.forward,
            # no tail where the model cannot run from a layer on (DFF then skips its concept
            # scores; AblationCAM's ablate still says why it cannot run)
            tail=_for_images(tail or self.tail, x) if self.task.cuts else None,
            ablate=_ablating(ablate or self.ablate, x, raw),
            backward=backward,
            rerun=lambda batch, targets: self.inputs(batch, targets, needs))

    @staticmethod
    def _retargeted(impl: Method, inputs: CamInputs, targets, rerun=None) -> CamInputs:
        """The inputs for a method that picks its own targets from the outputs (FinerCAM)."""
        chosen = impl.retarget(inputs.outputs, targets)
        return inputs if chosen is targets else (rerun or inputs.rerun)(inputs.x, chosen)

    def __call__(self, x: np.ndarray, targets=None, methods: str | Sequence = ("gradcam",),
                 eigen_smooth: bool = False, aug_smooth: bool = False,
                 prepare: Callable[[CamInputs], CamInputs] | None = None) -> Explanation:
        """CAMs of ``methods`` for the batch ``x``; ``prepare`` (optional) changes the CamInputs
        of each pass before the methods read them (camexport.compat applies a user's
        ``reshape_transform`` there)."""
        implementations = method_objects(methods)
        gather = self.inputs if prepare is None else (lambda *args: prepare(self.inputs(*args)))
        needs = needs_of(implementations)
        free = not any(impl.uses_targets for impl in implementations.values())
        if not aug_smooth:
            inputs = gather(x, targets, needs, free)
            cams = {name: impl(self._retargeted(impl, inputs, targets), eigen_smooth)
                    for name, impl in implementations.items()}
            return Explanation(cams, inputs.outputs, inputs.targets, inputs)
        total = {name: None for name in implementations}
        unvaried = None
        for flip, factor in AUG_PASSES:
            varied = np.asarray(x, np.float32)
            varied = varied[..., ::-1] if flip else varied
            varied = varied * np.float32(factor) if factor != 1.0 else varied
            inputs = gather(np.ascontiguousarray(varied), targets, needs, free)
            if not flip and factor == 1.0:
                unvaried = inputs
            for name, impl in implementations.items():
                cam = impl(self._retargeted(impl, inputs, targets), eigen_smooth)
                cam = cam[..., ::-1] if flip else cam
                total[name] = cam if total[name] is None else total[name] + cam
        cams = {name: (value / len(AUG_PASSES)).astype(np.float32) for name, value in total.items()}
        return Explanation(cams, unvaried.outputs, unvaried.targets, unvaried)

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
            raise ExplainError("explain_targets needs an artifact built with --score logit")
        columns = _columns(self.task.bind(targets_per_image), len(x))
        implementations = method_objects(methods)
        per_slot, rerun = self._slots(x, columns, needs_of(implementations))
        cams = {}
        for name, impl in implementations.items():
            if not impl.uses_targets:
                single = impl(per_slot[0], eigen_smooth)
                cams[name] = np.repeat(single[:, None], len(columns), axis=1)
                continue
            maps = [impl(self._retargeted(impl, inputs, column, rerun), eigen_smooth)
                    for inputs, column in zip(per_slot, columns)]
            cams[name] = np.stack(maps, axis=1)
        targets = [[per_slot[k].targets[b] for k in range(len(columns))] for b in range(len(x))]
        return TargetsExplanation(cams, per_slot[0].outputs, targets)

    def _slots(self, x: np.ndarray, columns: list[list], needs, memo: bool = True
               ) -> tuple[list[CamInputs], object]:
        """The CamInputs of each slot (one target column), and the rerun that FinerCAM's own
        targets use (None: each slot's own). ``memo``: the model runs are remembered for the
        call (ScoreCAM's masked images and AblationCAM's ablated maps are the same for every
        slot); one slot has nothing to share, and would keep every result alive."""
        outputs = self.outputs_for(needs)
        forward, tail, ablate = ((_Memo(self.forward), _Memo(self.tail), _Memo(self.ablate)) if memo
                                 else (self.forward, self.tail, self.ablate))
        if not any(name in self.target_outputs for name in outputs):  # one run serves all
            once = self._run(x, np.zeros((len(x), *self.output_shape), np.float32), outputs)
            return [self._cam_inputs(x, once, as_targets(column, once[self.output_name]),
                                     None, forward, tail, needs, ablate) for column in columns], None
        cut = self._split_graph(outputs)
        if cut[0] is None:  # the tail reads the image itself: the whole graph once per slot
            per_slot = []
            for column in columns:
                inputs = self.inputs(x, column, needs)
                inputs.forward, inputs.tail = forward, tail
                inputs.ablate = _ablating(ablate, x, inputs.raw_activations)
                per_slot.append(inputs)
            return per_slot, None
        split, head_session, _ = cut
        memo, self._head_memo = self._head_memo, None
        if memo is not None and memo[1] == outputs and same_batch(memo[0], x):
            head = memo[2]  # detect(methods=...) ran it on this batch
        else:
            head = dict(zip(split.head_outputs, head_session.run(split.head_outputs, {self.input_name: x})))
        model_outputs = head[self.output_name]
        resolved = [as_targets(column, model_outputs) for column in columns]
        rows = [target_weights(column, model_outputs, self.output_shape) for column in resolved]
        weights = rows[0][None] if len(rows) == 1 else np.stack(rows)  # no copy of one column
        ran = self._tail_gradients(cut, head, weights)
        backward = self._head_backward(cut, head)
        per_slot = [self._cam_inputs(x, {**head, **{n: v[k] for n, v in ran.items()}},
                                     resolved[k], backward, forward, tail, needs, ablate)
                    for k in range(len(columns))]

        def rerun(_x, chosen):
            targets = as_targets(chosen, model_outputs)
            rows = target_weights(targets, model_outputs, self.output_shape)[None]
            again = self._tail_gradients(cut, head, rows)
            return self._cam_inputs(x, {**head, **{n: v[0] for n, v in again.items()}},
                                    targets, backward, forward, tail, needs, ablate)
        return per_slot, rerun

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


def _for_images(tail, x: np.ndarray):
    """``tail(layer, tensors, b)``: the model after a layer on tensors that come from image b of
    the batch ``x`` (b None: tensors of no one image)."""
    return lambda layer, tensors, b=None: tail(layer, tensors, None if b is None else x[b:b + 1])


def _ablating(ablate, x: np.ndarray, raw: list[np.ndarray]):
    """``ablate(layer, b, channels, values)`` on image b of the batch ``x`` (layer tensors
    ``raw``), from ``ablate(layer, tensor, channels, values, image)``."""
    return lambda layer, b, channels, values: ablate(layer, raw[layer][b:b + 1], channels, values,
                                                     x[b:b + 1])


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
