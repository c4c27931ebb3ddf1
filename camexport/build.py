"""`camexport build`: load -> export -> locate -> augment -> artifact directory.

An artifact directory holds ``model.cam.onnx`` (the augmented graph, manifest inside),
``manifest.json`` (the same manifest, with the graph's digest), and ``model.plain.onnx`` (the
exported graph as is, for forward-only passes). The whole directory is written beside the target
and renamed into place (:func:`camexport.artifact.write_artifact`), under a lock that lets one
build at a time write a target: a failed or killed build leaves the previous artifact as it was.
An existing artifact is replaced only with ``overwrite``; that is checked before any work.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from camexport import __version__, detection
from camexport.artifact import AUGMENTED_FILE, artifact_writer, set_manifest, write_artifact
from camexport.errors import CamexportError
from camexport.export import to_onnx
from camexport.graph.augment import augment
from camexport.graph.builder import GraphFacts
from camexport.graph.fuse import EIGEN_SQUARINGS
from camexport.graph.fuse import fuse as fuse_heads
from camexport.graph.locate import AUTO_LAYER, check_map, resolve
from camexport.graph.outputs import BIAS_GRADIENTS, FULLGRAD_BIASES, graph_outputs
from camexport.graph.prune_rows import prune_rows
from camexport.graph.rules import MAXPOOL_WITHOUT_INDICES
from camexport.layout import infer_layout
from camexport.load import Loaded, load
from camexport.methods import FUSABLE, METHODS, canonical_methods
from camexport.precision import PRECISIONS, measure_drift, to_float16
from camexport.yolo import DETECTOR_TASKS, ultralytics_task

log = logging.getLogger(__name__)


class BuildError(CamexportError, ValueError):
    """A build that cannot be done as asked, with what to change."""


@dataclass
class BuildResult:
    directory: Path
    manifest: dict
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def graph_path(self) -> Path:
        return self.directory / AUGMENTED_FILE


def build(
    model: str | Loaded,
    layers: list[str],
    methods: str | list[str] = "gradcam",
    arch: str | None = None,
    score: str = "logit",
    out_dir: str | Path | None = None,
    trust_pickle: bool = False,
    output: str | None = None,
    input_size: tuple[int, ...] | None = None,
    progress: Callable[[str], None] = lambda message: None,
    fuse: str | list[str] | None = None,
    fuse_uint8: bool = False,
    precision: str = "fp32",
    eigen_squarings: int = EIGEN_SQUARINGS,
    maxpool_indices: bool = True,
    fullgrad_biases: str = "pgc",
    overwrite: bool = False,
) -> BuildResult:
    """Build the CAM-augmented graph of ``model`` (a model file or name, or an already
    :class:`Loaded` model, e.g. :func:`camexport.load.from_module`) for ``layers`` and write
    the artifact.

    ``fuse`` appends those methods' heads to the graph (:mod:`camexport.graph.fuse`), as uint8
    with ``fuse_uint8``; ``precision="fp16"`` writes a float16 graph with float32 inputs,
    outputs and heads, and records its drift against float32 in the manifest (``fp16_drift``).
    ``out_dir`` holding an artifact is refused before any work unless ``overwrite``, and so is
    one that another build is writing (:func:`camexport.artifact.artifact_writer`).
    """
    if not layers:
        # resolved after export to the last spatial map before pooling (locate.pick_layer)
        layers = [AUTO_LAYER]
        progress("no --layer given: the last spatial map before pooling will be the layer")
    method_names = canonical_methods(methods)
    fused_methods = canonical_methods(fuse) if fuse else []
    if any(m not in FUSABLE for m in fused_methods):
        raise BuildError(f"cannot fuse {[m for m in fused_methods if m not in FUSABLE]}; "
                         f"fusable methods: {', '.join(FUSABLE)}")
    if fullgrad_biases not in FULLGRAD_BIASES:
        raise BuildError(f"unknown FullGrad bias rule {fullgrad_biases!r}; choose one of "
                         f"{', '.join(FULLGRAD_BIASES)}")
    if precision not in PRECISIONS:
        raise BuildError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    _check_size_values(input_size)
    clock = _Clock(progress)
    with ExitStack() as stack:
        if out_dir:  # refused before loading; the default directory needs the model's name
            stack.enter_context(artifact_writer(Path(out_dir), overwrite))
        with clock.step("load", "loading model"):
            loaded = model if isinstance(model, Loaded) else load(model, arch=arch, trust_pickle=trust_pickle)
            if input_size:
                own = tuple(loaded.preprocessing.size)
                loaded.preprocessing.size = tuple(input_size)
                check_input_size(loaded, own)
            _check_two_stage(loaded, method_names, precision)
        directory = Path(out_dir) if out_dir else Path("artifacts") / loaded.name
        if not out_dir:
            stack.enter_context(artifact_writer(directory, overwrite))
        with clock.step("export", "exporting to ONNX"):
            plain, detector = export_plain(loaded)
        with clock.step("augment", "locating layers and differentiating the tail"):
            augmented, manifest = make_augmented(loaded, plain, layers, method_names, score, output,
                                                 maxpool_indices, detector, fullgrad_biases)
        fuse_options = {"uint8": fuse_uint8, "squarings": eigen_squarings,
                        "image_layout": manifest["preprocessing"]["layout"]}
        augmented = _finish(augmented, manifest, precision, fused_methods, fuse_options, clock)
        with clock.step("write", "writing artifact"):
            write_artifact(directory, plain, augmented, manifest,
                           {key: graph.SerializeToString() for key, graph in loaded.graphs.items()})
    return BuildResult(directory, manifest, clock.timings)


def _check_two_stage(loaded: Loaded, methods: list[str], precision: str) -> None:
    """What a two-stage detector (Faster R-CNN) cannot be built with, refused before the export."""
    if loaded.module is not None and detection.detector_kind(loaded.module) == detection.TWO_STAGE:
        refuse_for_two_stage(methods, precision)


def refuse_for_two_stage(methods: list[str], precision: str = "fp32") -> None:
    """A BuildError for what a two-stage detector cannot be built with: FullGrad, fp16."""
    if any(BIAS_GRADIENTS.key in METHODS[m].graph_needs for m in methods):
        raise BuildError("FullGrad on a two-stage detector is not supported yet: its bias terms "
                         "would include the box head's, which run per proposal, not per image. "
                         "Leave fullgrad out of --methods")
    if precision == "fp16":
        raise BuildError("--precision fp16 is not supported for two-stage detectors yet (its drift "
                         "check would need real proposals); build in fp32")


def _check_size_values(input_size: tuple[int, ...] | None) -> None:
    """--input-size H W (and --depth D): positive numbers, or a BuildError naming the fix."""
    if not input_size:
        return
    names = ("--depth D", "--input-size H W") if len(input_size) == 3 else ("--input-size H W",)
    given = " ".join(map(str, input_size))
    if len(input_size) not in (2, 3):
        raise BuildError(f"input size {given}: give height and width (H W), or depth, height and "
                         f"width (D H W) for a 3-D model")
    if any(n < 1 for n in input_size):
        raise BuildError(f"{' and '.join(names)} must be positive, not {given}: pass the size the model "
                         f"takes, e.g. --input-size 224 224, or leave it out for the model's own")


#: The largest square side :func:`check_input_size` tries when looking for a size the model runs at.
LARGEST_PROBE = 1024


def check_input_size(loaded: Loaded, own: tuple[int, ...]) -> None:
    """A BuildError, before the export, when the torch model does not run on one zero image at
    the asked input size (too small for its strides, a --depth for a 2-D model, none for a 3-D
    one): the forward error and the size that works, found by trying. ``own``: the model's own
    size. Models that are no torch module (ONNX, ExportedProgram) and detectors (they resize
    their inputs; an Ultralytics detector is checked against its stride when wrapped) are not
    checked."""
    module = loaded.module
    if module is None or detection.detector_kind(module) or ultralytics_task(module) in DETECTOR_TASKS:
        return
    size = tuple(loaded.preprocessing.size)
    channels = loaded.preprocessing.channels
    error = _forward_error(module, channels, size)
    if error is None:
        return
    shape = ", ".join(map(str, (1, channels, *size)))
    problem = f"the model does not run on a ({shape}) input ({error})"
    if len(size) == 3 and _forward_error(module, channels, size[1:]) is None:
        raise BuildError(f"--depth {size[0]}: {problem}, and it runs on 2-D images "
                         f"({', '.join(map(str, (1, channels, *size[1:])))}): leave --depth out "
                         f"(it is for 3-D models, e.g. r3d_18)")
    if len(size) == 2 and _forward_error(module, channels, (16, *size)) is None:
        raise BuildError(f"{problem}, and it runs on clips of 16 frames: pass --depth D with "
                         f"--input-size H W for this 3-D model")
    text = " ".join(map(str, size))
    smallest = _smallest_square(module, channels, size)
    if smallest is not None:
        side = " ".join([str(smallest)] * len(size[-2:]))
        depth = f"--depth {size[0]} " if len(size) == 3 else ""
        raise BuildError(f"--input-size {text} is too small for this model: {problem}. It runs at "
                         f"{smallest}x{smallest} (the smallest square size found by trying): pass "
                         f"{depth}--input-size {side} or larger")
    raise BuildError(f"--input-size {text}: {problem}; nor at any square size up to {LARGEST_PROBE}: "
                     f"leave --input-size out for the model's own ({' '.join(map(str, own))})")


def _forward_error(module, channels: int, size: tuple[int, ...]) -> str | None:
    """The first line of what a forward pass of one zero input raises (None: it runs)."""
    import torch

    try:
        with torch.no_grad():
            module(torch.zeros(1, channels, *size))
    except Exception as err:  # noqa: BLE001 (whatever the model raises on a wrong size is reported)
        first = (str(err).strip().splitlines() or [""])[0]
        return f"{type(err).__name__}: {first}"
    return None


def _smallest_square(module, channels: int, size: tuple[int, ...]) -> int | None:
    """The smallest square side (with ``size``'s depth, if any) that the model runs at, found by
    doubling above ``size`` and bisecting; None when none up to LARGEST_PROBE does."""
    depth = tuple(size[:-2])
    low = min(size[-2:])  # fails, as the narrower side of a size that fails
    high = max(2 * low, 8)
    while _forward_error(module, channels, (*depth, high, high)) is not None:
        low, high = high, 2 * high
        if high > LARGEST_PROBE:
            return None
    while high - low > 1:
        middle = (low + high) // 2
        if _forward_error(module, channels, (*depth, middle, middle)) is None:
            high = middle
        else:
            low = middle
    return high


class _Clock:
    """Progress messages and the seconds of each build step."""

    def __init__(self, progress: Callable[[str], None]):
        self.progress = progress
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, key: str, message: str):
        self.progress(message)
        start = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - start


def _finish(augmented: onnx.ModelProto, manifest: dict, precision: str, fused: list[str],
            options: dict, clock: _Clock) -> onnx.ModelProto:
    """The augmented graph in float16 (``precision``) and with fused heads, the manifest
    updated (precision, heads, float16 drift)."""
    reference = None
    if precision == "fp16":
        with clock.step("fp16", "converting to float16"):
            reference, augmented = augmented, to_float16(augmented)
            manifest["precision"] = "fp16"
    if fused:
        # heads come after the float16 conversion: they read its float32 outputs and stay float32
        with clock.step("fuse", f"fusing CAM heads: {', '.join(fused)}"):
            augmented, manifest["fused"] = fuse_heads(augmented, manifest["layers"], fused, **options)
            if reference is not None:
                reference, _ = fuse_heads(reference, manifest["layers"], fused, **options)
    if reference is not None:
        with clock.step("drift", "measuring the float16 drift"):
            manifest["fp16_drift"] = measure_drift(reference, augmented)
    if fused or reference is not None:
        set_manifest(augmented, manifest)
    return augmented


def export_plain(loaded: Loaded) -> tuple[onnx.ModelProto, detection.DetectorSpec | None]:
    """The plain ONNX graph of a loaded model at its input size, and the detector spec when it
    is a torchvision RetinaNet/FCOS (exported up to its head outputs, camexport.detection)."""
    detector = detection.wrap(loaded)
    if detector and detector.two_stage:
        from camexport import two_stage

        return two_stage.export(loaded), detector
    plain = to_onnx(loaded)
    if detector:
        detection.name_outputs(plain)
    return plain, detector


def make_augmented(
    loaded: Loaded,
    plain: onnx.ModelProto,
    layers: list[str],
    methods: list[str],
    score: str = "logit",
    output: str | None = None,
    maxpool_indices: bool = True,
    detector: detection.DetectorSpec | None = None,
    fullgrad_biases: str = "pgc",
) -> tuple[onnx.ModelProto, dict]:
    """The augmented graph of an exported model, with its manifest inside, and the manifest.
    ``maxpool_indices`` False: MaxPool gradients by comparison with the pooled maximum instead
    of MaxPool's Indices output, which TensorRT lacks (rules.MAXPOOL_WITHOUT_INDICES).
    ``detector``: the spec of a detector graph (:mod:`camexport.detection`), recorded in the
    manifest; its layer ``backbone`` is the stacked FPN levels. ``fullgrad_biases``: FullGrad's
    bias layers (graph.outputs.FULLGRAD_BIASES), recorded in the manifest when FullGrad is built."""
    facts = GraphFacts(plain)
    scored = output or plain.graph.output[0].name
    if len(facts.shape_or_none(scored) or ()) == 1:
        raise BuildError(
            f"the model output {scored!r} holds one value per image (batch,): camexport needs "
            f"(batch, K). Export a model that returns out.unsqueeze(1) (a one-logit output, explained "
            f"by default or with BinaryClassifierOutputTarget, as pgc's binary classifiers)")
    aliases = detection.layer_aliases(detector)
    resolved = [resolve(plain, layer, facts, aliases) for layer in layers]
    for layer, (_, tensor) in zip(layers, resolved):
        if layer not in aliases:
            check_map(plain, layer, tensor, facts, tuple(loaded.preprocessing.size))
    if detector:
        detection.check_layers(resolved, methods, detector)
    tensors = dict(resolved)
    if len(tensors) != len(layers):
        raise BuildError(f"--layer values {layers} name the same layer more than once")
    needs = set().union(*(METHODS[m].graph_needs for m in methods)) if methods else set()
    if detector and detector.two_stage:  # (build() refuses these before the export)
        refuse_for_two_stage(methods)
    extras = graph_outputs(needs, fullgrad_biases)
    source = plain
    if not detector and BIAS_GRADIENTS.key not in needs:
        # the score's rows only (a ViT's last block for its class token); FullGrad's bias terms
        # read every position of the layers after the target layer, so they keep the whole graph
        source = prune_rows(plain, keep=tensors.values())
    augmented = augment(source, tensors, score=score, output=output, extras=extras,
                        overrides=None if maxpool_indices else MAXPOOL_WITHOUT_INDICES,
                        forward_only=tuple(aliases))
    manifest = {
        "camexport_version": __version__,
        "source": {"path": loaded.source, "sha256": loaded.sha256, "kind": loaded.kind,
                   "name": loaded.name},
        "layers": [{"name": label, "requested": layer, "tensor": tensor, "shape": list(facts.shape(tensor)),
                    "layout": infer_layout(facts.shape(tensor), loaded.preprocessing.size)}
                   for layer, (label, tensor) in zip(layers, resolved)],
        "score": {"function": score, "output": scored},
        "outputs": [o.name for o in plain.graph.output],
        "methods": list(methods),
        "preprocessing": loaded.preprocessing.as_dict(),
        "opset": next(o.version for o in augmented.opset_import if o.domain in ("", "ai.onnx")),
        "maxpool_gradient": "indices" if maxpool_indices else "comparison",
        "plain_sha256": hashlib.sha256(plain.SerializeToString()).hexdigest(),
    }
    if BIAS_GRADIENTS.key in needs:
        manifest["fullgrad_biases"] = fullgrad_biases
    if detector:
        manifest["detection"] = detector.as_dict()
    if loaded.graphs:
        manifest["graphs"] = {key: hashlib.sha256(graph.SerializeToString()).hexdigest()
                              for key, graph in loaded.graphs.items()}
    set_manifest(augmented, manifest)
    return augmented, manifest
