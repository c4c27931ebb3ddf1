"""`camexport build`: load -> export -> locate -> augment -> artifact directory.

An artifact directory holds ``model.cam.onnx`` (the augmented graph, manifest inside),
``manifest.json`` (the same manifest), and ``model.plain.onnx`` (the exported graph as is, for
forward-only passes). Files are written under temporary names and renamed at the end, so a
failed build leaves nothing behind and never clobbers a previous artifact half-way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from camexport import __version__
from camexport.export import to_onnx
from camexport.graph.augment import augment, get_manifest, set_manifest
from camexport.graph.builder import GraphFacts
from camexport.graph.locate import resolve
from camexport.layout import infer_layout
from camexport.load import Loaded, load
from camexport.methods import METHODS, canonical_methods

log = logging.getLogger(__name__)

AUGMENTED_FILE = "model.cam.onnx"
PLAIN_FILE = "model.plain.onnx"
MANIFEST_FILE = "manifest.json"


@dataclass
class BuildResult:
    directory: Path
    manifest: dict
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def graph_path(self) -> Path:
        return self.directory / AUGMENTED_FILE


def build(
    model: str,
    layers: list[str],
    methods: str | list[str] = "gradcam",
    arch: str | None = None,
    score: str = "logit",
    out_dir: str | Path | None = None,
    trust_pickle: bool = False,
    output: str | None = None,
    input_size: tuple[int, int] | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> BuildResult:
    """Build the CAM-augmented graph of ``model`` for ``layers`` and write the artifact."""
    if not layers:
        raise ValueError("give at least one --layer (run `camexport inspect MODEL` to list them)")
    method_names = canonical_methods(methods)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    progress("loading model")
    loaded = load(model, arch=arch, trust_pickle=trust_pickle)
    if input_size:
        loaded.preprocessing.size = tuple(input_size)
    timings["load"] = time.perf_counter() - clock

    progress("exporting to ONNX")
    clock = time.perf_counter()
    plain = to_onnx(loaded)
    timings["export"] = time.perf_counter() - clock

    progress("locating layers and differentiating the tail")
    clock = time.perf_counter()
    augmented, manifest = make_augmented(loaded, plain, layers, method_names, score, output)
    timings["augment"] = time.perf_counter() - clock

    progress("writing artifact")
    clock = time.perf_counter()
    directory = Path(out_dir) if out_dir else Path("artifacts") / loaded.name
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / PLAIN_FILE, plain.SerializeToString())
    _write_atomic(directory / AUGMENTED_FILE, augmented.SerializeToString())
    _write_atomic(directory / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    timings["write"] = time.perf_counter() - clock
    return BuildResult(directory, manifest, timings)


def make_augmented(
    loaded: Loaded,
    plain: onnx.ModelProto,
    layers: list[str],
    methods: list[str],
    score: str = "logit",
    output: str | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """The augmented graph of an exported model, with its manifest inside, and the manifest."""
    facts = GraphFacts(plain)
    resolved = [resolve(plain, layer, facts) for layer in layers]
    tensors = dict(resolved)
    if len(tensors) != len(layers):
        raise ValueError(f"--layer values {layers} name the same layer more than once")
    needs = set().union(*(METHODS[m].needs for m in methods)) if methods else set()
    augmented = augment(plain, tensors, score=score, output=output,
                        input_gradient="input_gradients" in needs,
                        bias_gradients="bias_gradients" in needs, guided="guided" in needs,
                        tangents="tangents" in needs)
    manifest = {
        "camexport_version": __version__,
        "source": {"path": loaded.source, "sha256": loaded.sha256, "kind": loaded.kind,
                   "name": loaded.name},
        "layers": [{"name": label, "requested": layer, "tensor": tensor, "shape": list(facts.shape(tensor)),
                    "layout": infer_layout(facts.shape(tensor), loaded.preprocessing.size)}
                   for layer, (label, tensor) in zip(layers, resolved)],
        "score": {"function": score, "output": output or plain.graph.output[0].name},
        "outputs": [o.name for o in plain.graph.output],
        "methods": list(methods),
        "preprocessing": loaded.preprocessing.as_dict(),
        "opset": next(o.version for o in augmented.opset_import if o.domain in ("", "ai.onnx")),
        "plain_sha256": hashlib.sha256(plain.SerializeToString()).hexdigest(),
    }
    set_manifest(augmented, manifest)
    return augmented, manifest


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_artifact(path: str | Path) -> tuple[onnx.ModelProto, dict]:
    """The augmented graph and manifest of an artifact directory (or its .onnx file)."""
    path = Path(path)
    graph_path = path / AUGMENTED_FILE if path.is_dir() else path
    model = onnx.load(str(graph_path))
    manifest = get_manifest(model)
    if manifest is None:
        raise ValueError(f"{graph_path} carries no camexport manifest; build it with camexport build")
    return model, manifest
