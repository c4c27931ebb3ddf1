"""pytorch_grad_cam.base_cam.BaseCAM, computed by camexport's graph.

The constructor and the call are pgc's. The first call exports the model and builds the
CAM-augmented graph for the target layers (:mod:`camexport.compat.engine`, cached on disk);
every call runs onnxruntime. A class of this package computes its method with camexport's own
implementation (:mod:`camexport.methods`). A user's subclass that overrides ``get_cam_weights``,
``get_cam_image``, ``compute_cam_per_layer`` or ``aggregate_multi_layers`` gets pgc's pipeline
instead, with the hooks called on numpy activations and gradients computed by the graph.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from camexport.compat.engine import CompatError, Engine, as_native_targets, batch_array, layer_paths
from camexport.methods.pipeline import aggregate, eigen_projection, layer_map, weighted_sum

log = logging.getLogger(__name__)

#: the hooks of pgc's pipeline; overriding any of them selects that pipeline
HOOKS = ("get_cam_weights", "get_cam_image", "compute_cam_per_layer", "aggregate_multi_layers")


class ActivationsAndGradients:
    """pgc's record of the last call: ``activations`` and ``gradients`` per target layer (torch
    tensors, channel-first, after ``reshape_transform``), filled from the graph's outputs."""

    def __init__(self, model, target_layers, reshape_transform, detach=True):
        self.model = model
        self.target_layers = target_layers
        self.reshape_transform = reshape_transform
        self.detach = detach
        self.activations: list = []
        self.gradients: list = []
        self.handles: list = []  # pgc's hook handles; the graph needs none

    def __call__(self, x):
        """The model's output on ``x`` (torch, no hooks: camexport reads layers from the graph)."""
        import torch

        self.clear()
        with torch.no_grad():
            return self.model(x)

    def record(self, activations, gradients) -> None:
        import torch

        self.activations = [torch.from_numpy(np.ascontiguousarray(a)) for a in activations]
        self.gradients = [torch.from_numpy(np.ascontiguousarray(g)) for g in gradients if g is not None]

    def clear(self) -> None:
        self.activations.clear()
        self.gradients.clear()

    def release(self) -> None:
        self.clear()


class BaseCAM:
    """pgc's BaseCAM. ``method`` names the camexport method a class computes (None: a user's
    subclass defines ``get_cam_weights`` or ``get_cam_image``, as with pgc)."""

    method: str | None = None

    def __init__(self, model, target_layers, reshape_transform=None, compute_input_gradient=False,
                 uses_gradients=True, tta_transforms=None, detach=True) -> None:
        check_model(model)
        self.model = model
        self.model.eval()
        self.target_layers = target_layers
        parameter = next(iter(model.parameters()), None)
        self.device = parameter.device if parameter is not None else "cpu"
        self.reshape_transform = reshape_transform
        self.compute_input_gradient = compute_input_gradient
        self.uses_gradients = uses_gradients
        self.tta_transforms = tta_transforms
        self.detach = detach
        self.activations_and_grads = ActivationsAndGradients(model, target_layers, reshape_transform, detach)
        self.outputs = None
        self._engine = Engine(model, self._layer_paths(model, target_layers))

    # -- what a class computes ------------------------------------------------------------
    def _layer_paths(self, model, target_layers) -> list[str]:
        return layer_paths(model, target_layers)

    def _method_options(self) -> dict:
        """Options of the camexport method (e.g. AblationCAM's ratio)."""
        return {}

    def _build_options(self) -> dict:
        """Options of the graph's build (part of the cache key)."""
        return {}

    def _method_object(self):
        from camexport.methods.registry import method

        return method(self.method, **self._method_options())

    def _pgc_pipeline(self) -> bool:
        """Whether a user's subclass overrides one of pgc's hooks (their numbers, not ours)."""
        for hook in HOOKS:
            for klass in type(self).__mro__:
                if hook in vars(klass):
                    if not klass.__module__.startswith("camexport.compat"):
                        return True
                    break
        return self.method is None

    # -- pgc's hooks ----------------------------------------------------------------------
    def get_cam_weights(self, input_tensor, target_layers, targets, activations, grads) -> np.ndarray:
        """(B, C) channel weights; this package's weight methods give camexport's (so a user's
        override may call ``super().get_cam_weights``)."""
        impl = self._method_object() if self.method else None
        if impl is None or not hasattr(impl, "weights"):
            raise NotImplementedError("get_cam_weights must be implemented by subclass")
        return impl.weights(self._layer_inputs(input_tensor, targets, activations, grads), 0)

    def _layer_inputs(self, input_tensor, targets, activations, grads):
        """One layer's arrays as the CamInputs camexport's methods read."""
        from camexport.methods.inputs import CamInputs

        x = batch_array(input_tensor)
        explainer = getattr(self, "_last_explainer", None)
        outputs = None if self.outputs is None else self.outputs.numpy()
        return CamInputs(x=x, outputs=outputs, targets=as_native_targets(targets, len(x)),
                         activations=[_numpy(activations)], gradients=[_numpy(grads)],
                         raw_activations=[_numpy(activations)], raw_gradients=[_numpy(grads)],
                         forward=None if explainer is None else explainer.forward)

    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads,
                      eigen_smooth: bool = False) -> np.ndarray:
        impl = self._method_object() if self.method else None
        if impl is not None and not hasattr(impl, "weights"):  # an element or activation method
            return impl.raw(self._layer_inputs(input_tensor, targets, activations, grads), 0, eigen_smooth)
        weights = self.get_cam_weights(input_tensor, target_layer, targets, activations, grads)
        activations = _numpy(activations)
        if activations.ndim not in (4, 5):
            raise ValueError(f"Invalid activation shape. Get {activations.ndim}.")
        weights = np.asarray(weights)
        if eigen_smooth:
            spread = weights.reshape(weights.shape + (1,) * (activations.ndim - 2))
            return eigen_projection(spread * activations)
        return weighted_sum(weights, activations)

    def get_target_width_height(self, input_tensor):
        shape = tuple(input_tensor.shape)
        if len(shape) == 4:
            return shape[-1], shape[-2]
        if len(shape) == 5:
            return shape[-1], shape[-2], shape[-3]
        raise ValueError("Invalid input_tensor shape. Only 2D or 3D images are supported.")

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth: bool) -> list[np.ndarray]:
        activations = [_numpy(a) for a in self.activations_and_grads.activations]
        grads = [_numpy(g) for g in self.activations_and_grads.gradients]
        size = tuple(reversed(self.get_target_width_height(input_tensor)))
        maps = []
        for i, layer in enumerate(self.target_layers):
            cam = self.get_cam_image(input_tensor, layer, targets,
                                     activations[i] if i < len(activations) else None,
                                     grads[i] if i < len(grads) else None, eigen_smooth)
            maps.append(layer_map(np.asarray(cam), size)[:, None])
        return maps

    def aggregate_multi_layers(self, cam_per_target_layer) -> np.ndarray:
        return aggregate([np.asarray(m)[:, 0] for m in cam_per_target_layer])

    # -- calls ----------------------------------------------------------------------------
    def _explainer(self, x: np.ndarray, needs: frozenset[str]):
        self._last_explainer = self._engine.explainer(x.shape[1:], needs, self._build_options())
        return self._last_explainer

    def _prepare(self, inputs):
        """The graph's CamInputs after the user's reshape_transform (applied to activations and
        gradients alike, as pgc's hooks do), recorded for ``activations_and_grads``."""
        if self.reshape_transform is not None:
            # a detector's stacked levels (model.backbone) come out of the graph transformed
            # already, as fasterrcnn_reshape_transform makes them from the dict of levels
            from camexport.detection import STACK

            done = [layer["tensor"] == STACK for layer in self._last_explainer.layers]

            def transformed(values, raw):
                return [value if skip or r is None else _transformed(self.reshape_transform, r)
                        for value, r, skip in zip(values, raw, done)]

            inputs = replace(inputs, activations=transformed(inputs.activations, inputs.raw_activations),
                             gradients=transformed(inputs.gradients, inputs.raw_gradients))
        self.activations_and_grads.record(inputs.activations, inputs.gradients)
        return inputs

    def _outputs(self, outputs: np.ndarray) -> None:
        import torch

        self.outputs = torch.from_numpy(np.ascontiguousarray(outputs))

    def forward(self, input_tensor, targets, eigen_smooth: bool = False) -> np.ndarray:
        x = batch_array(input_tensor)
        native = as_native_targets(targets, len(x))
        if not self._pgc_pipeline():
            impl = self._method_object()
            explainer = self._explainer(x, self._needs(impl))
            result = explainer(x, native, methods=[impl], eigen_smooth=eigen_smooth, prepare=self._prepare)
            self._outputs(result.outputs)
            return result.cams[impl.name]
        explainer = self._explainer(x, frozenset(["gradients"]))
        inputs = self._prepare(explainer.inputs(x, native, frozenset(["gradients"])))
        self._outputs(inputs.outputs)
        if targets is None:
            from camexport.compat.utils.model_targets import ClassifierOutputTarget

            targets = [ClassifierOutputTarget(t.category) for t in inputs.targets]
        per_layer = self.compute_cam_per_layer(input_tensor, targets, eigen_smooth)
        return np.asarray(self.aggregate_multi_layers(per_layer), np.float32)

    def _needs(self, impl) -> frozenset[str]:
        from camexport.methods.registry import needs_of

        return needs_of({impl.name: impl}) or frozenset(["gradients"])

    def forward_augmentation_smoothing(self, input_tensor, targets, eigen_smooth: bool = False) -> np.ndarray:
        if self.tta_transforms is None and not self._pgc_pipeline():
            x = batch_array(input_tensor)
            impl = self._method_object()
            explainer = self._explainer(x, self._needs(impl))
            result = explainer(x, as_native_targets(targets, len(x)), methods=[impl],
                               eigen_smooth=eigen_smooth, aug_smooth=True, prepare=self._prepare)
            self._outputs(result.outputs)
            return result.cams[impl.name]
        import torch

        cams = []
        for transform in self.tta_transforms or _default_tta():
            augmented = transform.augment_image(input_tensor)
            cam = torch.from_numpy(self.forward(augmented, targets, eigen_smooth)[:, None])
            cams.append(transform.deaugment_mask(cam).numpy()[:, 0])
        return np.mean(np.float32(cams), axis=0)

    def __call__(self, input_tensor, targets=None, aug_smooth: bool = False,
                 eigen_smooth: bool = False) -> np.ndarray:
        if aug_smooth is True:
            return self.forward_augmentation_smoothing(input_tensor, targets, eigen_smooth)
        return self.forward(input_tensor, targets, eigen_smooth)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        self.activations_and_grads.release()
        # unlike pgc, an IndexError inside the block is not swallowed (Q: reference §8)


def _numpy(value):
    if value is None:
        return None
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _transformed(transform, array: np.ndarray) -> np.ndarray:
    import torch

    result = transform(torch.from_numpy(np.ascontiguousarray(array)))
    return np.ascontiguousarray(_numpy(result), np.float32)


class _Transform:
    """One pass of pgc's default test-time augmentation: flip along W, then scale."""

    def __init__(self, flip: bool, factor: float):
        self.flip, self.factor = flip, factor

    def augment_image(self, x):
        x = x.flip(-1) if self.flip else x
        return x * self.factor if self.factor != 1 else x

    def deaugment_mask(self, mask):
        return mask.flip(-1) if self.flip else mask


def _default_tta():
    from camexport.explain import AUG_PASSES

    return [_Transform(flip, factor) for flip, factor in AUG_PASSES]


def check_model(model) -> None:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise CompatError(f"model is a {type(model).__name__}; give the torch.nn.Module itself")
