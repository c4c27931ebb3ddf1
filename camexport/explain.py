"""The Python API a pytorch-grad-cam user recognises, on top of an artifact.

    explainer = Explainer("artifacts/resnet50")
    result = explainer(x, targets=None, methods=["gradcam", "scorecam"])
    result.cams["gradcam"]  # (B, H, W) float32 in [0, 1]

``x`` is a preprocessed batch (B, 3, H, W) float32. Targets: None (each image's top class),
ints, or target objects from :mod:`camexport.targets`, one per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from camexport.build import PLAIN_FILE, read_artifact
from camexport.graph.augment import (
    GUIDED_GRADIENT,
    INPUT_GRADIENT,
    TARGET_WEIGHTS,
    activation_name,
    fullgrad_names,
    gradient_name,
    tangent_name,
)
from camexport.methods import canonical_methods, method
from camexport.methods.base import CamInputs, to_channel_first
from camexport.runtime import session
from camexport.targets import ClassifierOutputTarget, as_targets, target_weights

#: pytorch-grad-cam's aug_smooth passes, in its order: (flip along W, factor) (reference §2.8).
AUG_PASSES = [(False, 0.9), (False, 1.0), (False, 1.1), (True, 0.9), (True, 1.0), (True, 1.1)]


@dataclass
class Explanation:
    cams: dict[str, np.ndarray]
    outputs: np.ndarray
    targets: list


class Explainer:
    """Runs an artifact's augmented graph and computes CAM methods from its outputs."""

    def __init__(self, artifact: str | Path, provider: str = "cpu", batch_size: int = 64):
        self.path = Path(artifact)
        model, self.manifest = read_artifact(self.path)
        self.provider = provider
        self.batch_size = batch_size
        self.session = session(model, provider)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.manifest["score"]["output"]
        self.score_function = self.manifest["score"]["function"]
        self.layers = self.manifest["layers"]
        self._plain = None
        self._tails: dict[int, object] = {}

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

    def tail(self, layer: int, tensors: np.ndarray) -> np.ndarray:
        """Model outputs computed from layer ``layer``'s tensors (the tail graph only)."""
        if layer not in self._tails:
            tensor = self.layers[layer]["tensor"]
            plain = onnx.shape_inference.infer_shapes(self._plain_model())
            tail = onnx.utils.Extractor(plain).extract_model([tensor], [self.output_name])
            self._tails[layer] = session(tail, self.provider)
        run = self._tails[layer]
        name = run.get_inputs()[0].name
        return np.concatenate([run.run([self.output_name], {name: tensors[i:i + self.batch_size]})[0]
                               for i in range(0, len(tensors), self.batch_size)])

    def run_graph(self, x: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, {self.input_name: x, TARGET_WEIGHTS: weights})))

    # -- explanation ---------------------------------------------------------------------
    def inputs(self, x: np.ndarray, targets=None) -> CamInputs:
        """Run the graph once (twice for targets that need the outputs first) and gather what
        methods read."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        classes = self.session.get_outputs()[0].shape[-1]
        simple = targets is None or all(
            t is None or isinstance(t, (int, np.integer, ClassifierOutputTarget))
            for t in (targets if isinstance(targets, Sequence) else [targets]))
        if simple and self.score_function == "logit":
            dummy = np.zeros((len(x), classes), np.float32)
            if targets is not None:
                resolved = as_targets(targets, dummy)
                dummy = target_weights(resolved, None, classes)
            results = self.run_graph(x, dummy)
        else:
            if self.score_function != "logit":
                raise ValueError("explicit non-class targets need an artifact built with --score logit")
            outputs = self.forward(x)
            resolved = as_targets(targets, outputs)
            results = self.run_graph(x, target_weights(resolved, outputs, classes))
        outputs = results[self.output_name]
        resolved = as_targets(targets, outputs)
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

        def backward(layer: int, rows: np.ndarray) -> np.ndarray:
            spec = self.layers[layer]
            again = self.run_graph(x, np.asarray(rows, np.float32))
            return to_channel_first(again[gradient_name(spec["name"])], spec["layout"])

        return CamInputs(
            x=x, outputs=outputs, targets=resolved, extras=extras,
            activations=[to_channel_first(a, lay) for a, lay in zip(raw, layouts)],
            gradients=[to_channel_first(results[gradient_name(layer["name"])], layer["layout"])
                       for layer in self.layers],
            raw_activations=raw, layouts=layouts, forward=self.forward, tail=self.tail,
            backward=backward, rerun=self.inputs)

    def _retargeted(self, impl, inputs: CamInputs, targets) -> CamInputs:
        """The inputs for a method that picks its own targets from the outputs (FinerCAM)."""
        retarget = getattr(impl, "retarget", None)
        if retarget is None:
            return inputs
        chosen = retarget(inputs.outputs, targets)
        return inputs if chosen is targets else self.inputs(inputs.x, chosen)

    def __call__(self, x: np.ndarray, targets=None, methods: str | Sequence[str] = ("gradcam",),
                 eigen_smooth: bool = False, aug_smooth: bool = False) -> Explanation:
        names = canonical_methods(list(methods) if not isinstance(methods, str) else methods)
        implementations = {name: method(name) for name in names}
        if not aug_smooth:
            inputs = self.inputs(x, targets)
            cams = {name: impl(self._retargeted(impl, inputs, targets), eigen_smooth)
                    for name, impl in implementations.items()}
            return Explanation(cams, inputs.outputs, inputs.targets)
        total = {name: None for name in names}
        unvaried = None
        for flip, factor in AUG_PASSES:
            varied = np.asarray(x, np.float32)
            varied = varied[..., ::-1] if flip else varied
            varied = varied * np.float32(factor) if factor != 1.0 else varied
            inputs = self.inputs(np.ascontiguousarray(varied), targets)
            if not flip and factor == 1.0:
                unvaried = inputs
            for name, impl in implementations.items():
                cam = impl(self._retargeted(impl, inputs, targets), eigen_smooth)
                cam = cam[..., ::-1] if flip else cam
                total[name] = cam if total[name] is None else total[name] + cam
        cams = {name: (value / len(AUG_PASSES)).astype(np.float32) for name, value in total.items()}
        return Explanation(cams, unvaried.outputs, unvaried.targets)
