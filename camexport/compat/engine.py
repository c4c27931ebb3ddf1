"""The graph behind the compat CAM objects: the user's ``nn.Module`` exported and augmented once
per (weights, target layers, input shape, graph parts), cached on disk, then run by onnxruntime.

The cache lives in ``$CAMEXPORT_CACHE`` or ``~/.cache/camexport/compat/``, one artifact directory
per key (``camexport inspect DIR`` reads it; delete the folder to clear it). In a process, the
artifact's :class:`~camexport.explain.Explainer` is kept too, so a second call on the same model
neither exports nor loads anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camexport import __version__
from camexport.errors import CamexportError
from camexport.load import module_digest
from camexport.targets import TargetError

log = logging.getLogger(__name__)

CACHE_ENV = "CAMEXPORT_CACHE"
PROVIDER_ENV = "CAMEXPORT_PROVIDER"

#: the graph parts (registry words) each extra method adds, and the method that asks the build
#: for them; every compat graph has the layer gradients
_PART_METHODS = {"input_gradients": "fullgrad", "bias_gradients": "fullgrad",
                 "guided": "guidedbackprop", "tangents": "shapleycam"}


class CompatError(CamexportError, ValueError):
    """A call of the pytorch-grad-cam API that camexport cannot serve, with what to change."""


def cache_root() -> Path:
    """Where compat artifacts are kept: ``$CAMEXPORT_CACHE`` or ``~/.cache/camexport/compat``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "camexport" / "compat"


def layer_paths(model, target_layers) -> list[str]:
    """The module path of each target layer object (pgc takes the modules themselves)."""
    import torch

    if isinstance(target_layers, torch.nn.Module):
        raise CompatError("target_layers is one module; pass a list of modules, e.g. "
                          "target_layers=[model.layer4[-1]]")
    paths = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), name)
    found = []
    for k, layer in enumerate(target_layers):
        if not isinstance(layer, torch.nn.Module):
            raise CompatError(f"target_layers[{k}] is a {type(layer).__name__}, not a module of the "
                              f"model: pass modules, e.g. target_layers=[model.layer4[-1]]")
        name = paths.get(id(layer))
        if name is None:
            raise CompatError(f"target_layers[{k}] ({type(layer).__name__}) is not a submodule of "
                              f"the model ({type(model).__name__}): pass modules reached from the "
                              f"model you give, e.g. model.layer4[-1], not a copy or another model's")
        if name == "":
            raise CompatError(f"target_layers[{k}] is the model itself; pick one of its layers, "
                              f"e.g. the last convolutional block")
        found.append(name)
    return found


def batch_array(input_tensor) -> np.ndarray:
    """The input batch as float32 numpy (B, C, H, W) or (B, C, D, H, W)."""
    import torch

    if not isinstance(input_tensor, (torch.Tensor, np.ndarray)):
        raise CompatError(f"input_tensor is a {type(input_tensor).__name__}; give a torch tensor "
                          f"(B, C, H, W), e.g. preprocess_image(rgb_img)")
    shape = tuple(input_tensor.shape)
    if len(shape) not in (4, 5):
        hint = " (one image: input_tensor.unsqueeze(0))" if len(shape) == 3 else ""
        raise CompatError(f"input_tensor has shape {shape}; give a batch (B, C, H, W) or "
                          f"(B, C, D, H, W){hint}")
    if isinstance(input_tensor, torch.Tensor):
        input_tensor = input_tensor.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(input_tensor, np.float32)


def _weights_version(model) -> tuple:
    """Cheap fingerprint of the weights' identity and in-place versions: when it is unchanged
    the digest is too, so steady-state calls skip hashing the weights."""
    return tuple((key, tensor.data_ptr(), tensor._version)
                 for key, tensor in model.state_dict(keep_vars=True).items())


@dataclass(frozen=True)
class GraphKey:
    digest: str
    layers: tuple[str, ...]
    sample_shape: tuple[int, ...]
    parts: tuple[str, ...]
    options: tuple = ()

    @property
    def name(self) -> str:
        text = json.dumps([__version__, self.digest, self.layers, self.sample_shape, self.parts,
                           [list(o) for o in self.options]])
        return hashlib.sha256(text.encode()).hexdigest()[:24]


#: Explainers of this process, by artifact key
_LIVE: dict[str, object] = {}


class Engine:
    """One model's graphs: finds or builds the artifact for a call, keeps its Explainer."""

    def __init__(self, model, layers: list[str]):
        self.model = model
        self.layers = layers
        self._version = None
        self._digest = None

    def digest(self) -> str:
        version = _weights_version(self.model)
        if version != self._version:
            self._digest, self._version = module_digest(self.model), version
        return self._digest

    def explainer(self, sample_shape: tuple[int, ...], parts: frozenset[str], options: dict | None = None):
        """The Explainer of the artifact for inputs of ``sample_shape`` (C, H, W) whose graph holds
        ``parts`` (registry words beyond the layer gradients); built on first use."""
        from camexport.artifact import ArtifactError
        from camexport.explain import Explainer

        extra = tuple(sorted(p for p in parts if p in _PART_METHODS))
        options = dict(options or {})
        provider = os.environ.get(PROVIDER_ENV, "cpu")
        if provider not in ("cpu", "openvino"):  # GPU providers get MaxPool's Indices wrong
            # (runtime.check_graph); OpenVINO's CPU plugin gets them right
            options["maxpool_indices"] = False
        key = GraphKey(self.digest(), tuple(self.layers), tuple(sample_shape), extra,
                       tuple(sorted(options.items())))
        name = key.name
        if name not in _LIVE:
            directory = cache_root() / name
            try:
                _LIVE[name] = Explainer(directory, provider=provider)
            except ArtifactError as err:  # absent, or left incomplete or stale: built (again)
                if directory.exists():
                    log.info("camexport.compat: rebuilding the cached graph: %s", err)
                self._build(directory, sample_shape, extra, options)
                _LIVE[name] = Explainer(directory, provider=provider)
        return _LIVE[name]

    def _build(self, directory: Path, sample_shape, parts, options) -> None:
        import copy

        import torch

        from camexport.artifact import ArtifactBusyError, artifact_lock
        from camexport.build import build
        from camexport.export import ExportError
        from camexport.load import Preprocessing, from_module

        model = self.model
        if any(p.device.type != "cpu" for p in model.parameters()):
            model = copy.deepcopy(model).cpu()
        # a detector's stacked FPN levels (pgc's fasterrcnn_reshape_transform on model.backbone)
        # have no gradient: activations only there, as pgc (whose hook gets a dict) has
        base = "eigencam" if _stacked_levels(model, self.layers) else "gradcam"
        methods = [base, *dict.fromkeys(_PART_METHODS[p] for p in parts)]
        loaded = from_module(model, type(model).__name__, Preprocessing(size=tuple(sample_shape[1:]),
                                                                         channels=int(sample_shape[0])))
        log.info("camexport.compat: exporting %s for layers %s (cached in %s)",
                 type(model).__name__, ", ".join(self.layers), directory)
        try:
            with torch.no_grad():  # the cache owns the directory: whatever is there is replaced
                build(loaded, self.layers, methods=methods, out_dir=directory, overwrite=True, **options)
        except ArtifactBusyError:
            with artifact_lock(directory, wait=True):  # another process builds it: wait for it
                pass
        except ExportError as err:
            raise CompatError(
                f"{type(self.model).__name__} could not be exported to ONNX: {err}. Wrap the model "
                f"so that forward(x) returns one tensor (e.g. model(x)['out']), or export it "
                f"yourself and use `camexport build model.onnx --layer ... --output NAME`") from err


class CallableTarget:
    """A user's target callable, ``t(output_row) -> scalar tensor``, as pgc calls it: evaluated
    on each image's output with torch autograd, never traced into the graph. Its gradient with
    respect to the output becomes that image's ``target_weights`` row; the graph's score is
    linear in those weights, so the layer gradients are exactly those of t (chain rule). The
    Hessian-vector product (ShapleyCAM) comes from double backward the same way."""

    linear = False

    def __init__(self, function):
        self.function = function

    def __repr__(self):
        return f"CallableTarget({self.function!r})"

    def _value(self, z):
        import torch

        row = torch.tensor(np.asarray(z, np.float32), requires_grad=True)
        value = self.function(row)
        if not isinstance(value, torch.Tensor):
            raise TargetError(f"the target {self.function!r} returned a {type(value).__name__}; a "
                              f"target returns a tensor computed from the model output row")
        if value.numel() != 1:
            raise TargetError(f"the target {self.function!r} returns {tuple(value.shape)} values per "
                              f"image; a CAM target returns one scalar (sum it, or pick a class)")
        return row, value.reshape(())

    def values(self, z):
        import torch

        with torch.no_grad():
            rows = np.asarray(z, np.float32)
            return np.array([float(self.function(torch.from_numpy(r.copy()))) for r in rows])

    def cotangent(self, z):
        import torch

        row, value = self._value(z)
        if not value.requires_grad:  # a target that does not depend on the output
            return np.zeros(row.shape, np.float64)
        (grad,) = torch.autograd.grad(value, row)
        return grad.double().numpy()

    def hessian_vector(self, z, v):
        import torch

        row, value = self._value(z)
        if not value.requires_grad:
            return np.zeros(row.shape, np.float64)
        (grad,) = torch.autograd.grad(value, row, create_graph=True)
        if not grad.requires_grad:  # linear in the output
            return np.zeros(row.shape, np.float64)
        (hv,) = torch.autograd.grad(grad, row, torch.as_tensor(np.asarray(v), dtype=grad.dtype),
                                    allow_unused=True)
        return np.zeros(row.shape, np.float64) if hv is None else hv.double().numpy()


def _stacked_levels(model, layers: list[str]) -> bool:
    """Whether ``layers`` name a detector's stacked levels (camexport.detection.layer_aliases)."""
    from camexport import detection
    from camexport.yolo import ultralytics_task

    stacked = {detection.STACK_LAYER, detection.NECK_LAYER} & set(layers)
    return bool(stacked) and bool(detection.detector_kind(model) or ultralytics_task(model))


def as_native_targets(targets, batch: int):
    """pgc targets (None, a list of target objects or callables) as camexport targets: the
    built-in classes pass (they are camexport targets too), other callables are wrapped."""
    if targets is None:
        return None
    if not isinstance(targets, (list, tuple)):
        targets = [targets]
    if len(targets) != batch:
        raise TargetError(f"{len(targets)} targets for a batch of {batch} images: give one target per "
                          f"image (pytorch-grad-cam would silently explain only the first "
                          f"{min(len(targets), batch)}), or targets=None for each image's top class")
    result = []
    for k, target in enumerate(targets):
        if target is None or isinstance(target, (int, np.integer)) or _native(target):
            result.append(target)
        elif callable(target):
            result.append(CallableTarget(target))
        else:
            raise TargetError(f"targets[{k}] is a {type(target).__name__}; give a target such as "
                              f"ClassifierOutputTarget(281) or a callable output -> scalar tensor")
    return result


def _native(target) -> bool:
    """A camexport target (``values`` and ``cotangent``): no torch needed for its weights."""
    return callable(getattr(target, "cotangent", None)) and callable(getattr(target, "values", None))
