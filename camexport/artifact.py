"""The artifact on disk: its file names, its manifest, reading it back, and atomic writes.

An artifact directory (``camexport build`` writes it)::

    model.cam.onnx     the CAM-augmented graph; the manifest (JSON) in its metadata_props
    model.plain.onnx   the exported graph as it is (forward-only passes: ScoreCAM, metrics, tails)
    manifest.json      the same manifest, for people and tools that do not read ONNX

Both the build half (:mod:`camexport.build`) and the run-time half (:mod:`camexport.explain`,
:mod:`camexport.run`) use this module; neither imports the other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import onnx

from camexport.errors import CamexportError

AUGMENTED_FILE = "model.cam.onnx"
PLAIN_FILE = "model.plain.onnx"
MANIFEST_FILE = "manifest.json"

#: The metadata_props key that holds the manifest in the augmented graph.
MANIFEST_KEY = "camexport.manifest"


class ArtifactError(CamexportError, ValueError):
    """A path that is not a usable camexport artifact, with how to make one."""


def set_manifest(model: onnx.ModelProto, manifest: Mapping) -> None:
    """Store the manifest (JSON) in the model's ``metadata_props``, replacing any earlier one."""
    kept = [p for p in model.metadata_props if p.key != MANIFEST_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = MANIFEST_KEY, json.dumps(manifest, sort_keys=True)


def get_manifest(model: onnx.ModelProto) -> dict | None:
    """The manifest stored in ``model``, or None for a graph camexport did not build."""
    for prop in model.metadata_props:
        if prop.key == MANIFEST_KEY:
            return json.loads(prop.value)
    return None


def directory_of(path: str | Path) -> Path:
    """The artifact directory of ``path`` (the directory itself, or the folder of its .onnx)."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def graph_path(path: str | Path) -> Path:
    """The augmented graph's file of an artifact directory (or ``path`` itself, an .onnx file)."""
    path = Path(path)
    return path / AUGMENTED_FILE if path.is_dir() else path


def plain_path(path: str | Path) -> Path:
    """The plain graph's file of an artifact."""
    return directory_of(path) / PLAIN_FILE


def is_artifact(path: str | Path) -> bool:
    """Whether ``path`` is an artifact directory (it holds the augmented graph)."""
    return (Path(path) / AUGMENTED_FILE).is_file()


def read_artifact(path: str | Path) -> tuple[onnx.ModelProto, dict]:
    """The augmented graph and manifest of an artifact directory (or its .onnx file)."""
    graph = graph_path(path)
    if not graph.is_file():
        raise ArtifactError(f"{path} is not an artifact (no {AUGMENTED_FILE}); make one with camexport build")
    model = onnx.load(str(graph))
    manifest = get_manifest(model)
    if manifest is None:
        raise ArtifactError(f"{graph} carries no camexport manifest; build it with camexport build")
    return model, manifest


def read_plain(path: str | Path) -> onnx.ModelProto:
    """The plain (forward-only) graph of an artifact."""
    return onnx.load(str(plain_path(path)))


def temporary_path(path: Path) -> Path:
    """Where a file is written before it is renamed over ``path``."""
    return path.with_name(f".{path.name}.partial")


def replace_atomic(temporary: Path, path: Path) -> None:
    """Flush ``temporary`` to disk and rename it over ``path`` (atomic on one filesystem)."""
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new, never half."""
    temporary = temporary_path(path)
    with open(temporary, "wb") as handle:
        handle.write(data)
    replace_atomic(temporary, path)


def write_artifact(directory: Path, plain: onnx.ModelProto, augmented: onnx.ModelProto,
                   manifest: Mapping) -> None:
    """Write the three files of an artifact, each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / PLAIN_FILE, plain.SerializeToString())
    write_atomic(directory / AUGMENTED_FILE, augmented.SerializeToString())
    write_atomic(directory / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
