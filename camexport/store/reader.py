"""Reading and editing result files (the layout is drawn in :mod:`camexport.store`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from camexport.artifact import replace_atomic, temporary_path
from camexport.store import RUN_RECORD, StoreError, _chunks, finished_shards, parts_of, virtual_view

if TYPE_CHECKING:
    from typing_extensions import Self


# -- reading results -----------------------------------------------------------------------------
def open_results(path: str | Path) -> h5py.File:
    """A result file open read-only as h5py: a finished one, or for an unfinished run (a parts
    folder beside it) a fresh view of its finished shards, however stale ``OUT.h5`` is (it is
    rewritten at most every second) or even absent (a run killed before writing it). StoreError
    when it is missing, unreadable or no camexport result. Prefer :class:`ResultReader`."""
    path = Path(path)
    try:
        record = json.loads((parts_of(path) / RUN_RECORD).read_text())
    except FileNotFoundError:  # no run going on, or one that has just finished
        record = None
    if record is not None and not _complete(path):
        return _shards_view(path, record)
    h5 = _open_file(path)
    if "fingerprint" not in h5.attrs:
        h5.close()
        raise StoreError(f"{path} is not a camexport result file (no fingerprint attribute)")
    return h5


def _complete(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as h5:
            return bool(h5.attrs.get("complete", False))
    except OSError:
        return False


def _shards_view(path: Path, record: dict) -> h5py.File:
    """An in-memory result file of virtual datasets over the finished shards of ``path``'s
    unfinished run (as the live view, with absolute shard paths), its attributes from the run's
    record (or from OUT.h5, for records written before they held them)."""
    attrs = record.get("attrs")
    if attrs is None:
        with _open_file(path) as old:
            attrs = {key: value for key, value in old.attrs.items() if key not in ("fingerprint", "complete")}
    # in memory only (no file is made); the shards open with its driver, so not h5py's fileobj
    h5 = h5py.File(f"{path}.view-{id(record)}", "w", driver="core", backing_store=False)
    virtual_view(h5, record["count"], finished_shards(parts_of(path)), lambda shard: str(shard.resolve()))
    h5.attrs.update({key: value if isinstance(value, str) else json.dumps(value)
                     for key, value in attrs.items()})
    h5.attrs["fingerprint"] = json.dumps(record["fingerprint"])
    h5.attrs["complete"] = False
    return h5


def _open_file(path: Path) -> h5py.File:
    """``path`` itself open read-only (StoreError naming the file when it cannot be)."""
    if not path.is_file():
        raise StoreError(f"{path} does not exist; make it with `camexport run`")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise StoreError(f"{path} is not a readable HDF5 file ({err})") from err


def writer_alive(path: str | Path) -> str | None:
    """The pid of a live process on this host holding ``path``'s output lock (a run writing it
    now), from the lock file's record; None when no live holder is recorded."""
    try:
        owner = json.loads(Path(path).with_name(Path(path).name + ".lock").read_text())
        pid = int(owner["pid"])
        if owner["host"] != socket.gethostname():
            return None
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(pid)


#: Root attributes of a result file stored as JSON text (:attr:`ResultReader.attrs` parses them).
JSON_ATTRS = ("fingerprint", "manifest", "methods", "metrics", "layers", "recomputed", "evaluated")

#: Rows of a per-sample dataset: an index, a slice or increasing indices.
Rows = int | slice | np.ndarray | list


@dataclass(frozen=True)
class Storage:
    """How one dataset of a result file is stored."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...] | None
    compression: str | None
    virtual: bool


def _decode_attr(key: str, value):
    if isinstance(value, bytes):
        value = value.decode()
    if key in JSON_ATTRS and isinstance(value, str):
        return json.loads(value)
    return value.item() if isinstance(value, np.generic) else value


class ResultReader:
    """Reads a result file (the layout is in the module docstring): a finished one, or the live
    view of a run going on, where rows not done yet hold fill values (check :attr:`done`).

    ``with ResultReader(path) as results: results.cams("gradcam", rows)``. Every array read
    takes ``rows`` (an index, a slice or increasing indices; all rows by default).
    """

    def __init__(self, path: str | Path, handle: h5py.File | None = None):
        self.path = Path(path)
        self._h5 = open_results(path) if handle is None else handle
        self._attrs: dict | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._h5.close()

    # what the file holds -----------------------------------------------------------------------
    def has(self, path: str) -> bool:
        """Whether the file holds this dataset or group, e.g. ``"gradients/layer4"``."""
        return path in self._h5

    def read(self, path: str, rows: Rows = slice(None)) -> np.ndarray:
        """Rows of any per-sample dataset, e.g. ``read("detections/scores", 3)``."""
        return self._h5[path][rows]

    def storage(self, path: str) -> Storage:
        """Shape, dtype, chunks, compression and whether a dataset is virtual (a live view)."""
        dataset = self._h5[path]
        return Storage(tuple(dataset.shape), dataset.dtype, dataset.chunks, dataset.compression,
                       dataset.is_virtual)

    @property
    def attrs(self) -> dict:
        """The root attributes, JSON ones (:data:`JSON_ATTRS`) parsed, numpy scalars as Python."""
        if self._attrs is None:
            self._attrs = {key: _decode_attr(key, value) for key, value in self._h5.attrs.items()}
        return self._attrs

    @property
    def fingerprint(self) -> dict:
        """What determines the results: graph sha256, data identity, count, parameters."""
        return self.attrs["fingerprint"]

    @property
    def parameters(self) -> dict:
        """The run's parameters (methods, targets, batch size, ... as RunConfig.parameters)."""
        return self.fingerprint.get("parameters", {})

    @property
    def manifest(self) -> dict:
        """The artifact's manifest the results were made with."""
        return self.attrs["manifest"]

    @property
    def complete(self) -> bool:
        """Every sample done and the file self-contained (not a live view)."""
        return bool(self.attrs.get("complete", False))

    @property
    def done(self) -> np.ndarray:
        """The completion mask (N,) bool; empty while a run has written no batch yet."""
        return self._h5["done"][()] if "done" in self._h5 else np.zeros(0, bool)

    @property
    def count(self) -> int:
        """Rows in the file: N (0 while a run has written no batch yet)."""
        return len(self._h5["done"]) if "done" in self._h5 else 0

    @property
    def invalid(self) -> np.ndarray:
        """Samples with NaN/Inf pixels (N,) bool, not explained; all False when not recorded."""
        return self._h5["invalid"][()] if "invalid" in self._h5 else np.zeros(self.count, bool)

    def _names(self, group: str) -> list[str]:
        return list(self._h5[group]) if group in self._h5 else []

    @property
    def methods(self) -> list[str]:
        """The methods with CAMs in /cams, sorted."""
        return sorted(self._names("cams"))

    @property
    def metrics(self) -> dict[str, list[str]]:
        """{metric: [methods it scored]} from /metrics."""
        return {metric: self._names(f"metrics/{metric}") for metric in self._names("metrics")}

    @property
    def output_names(self) -> list[str]:
        """The model outputs stored in /outputs (none for detectors)."""
        return self._names("outputs")

    @property
    def detector(self) -> bool:
        """Whether the results are a detector's (/detections instead of /outputs)."""
        return "detections" in self._h5

    # per-sample arrays -------------------------------------------------------------------------
    def cams(self, method: str, rows: Rows = slice(None)) -> np.ndarray:
        """/cams/<method> rows, as stored (float32 or float16)."""
        return self._h5[f"cams/{method}"][rows]

    def outputs(self, name: str | None = None, rows: Rows = slice(None)) -> np.ndarray:
        """/outputs/<name> rows; ``name`` None: the first (usually only) output."""
        if name is None:
            if not self.output_names:
                raise KeyError(f"{self.path} has no /outputs")
            name = self.output_names[0]
        return self._h5[f"outputs/{name}"][rows]

    def targets(self, rows: Rows = slice(None)) -> np.ndarray:
        """/targets rows: the class each sample was explained for (-1: none)."""
        return self._h5["targets"][rows]

    def metric(self, metric: str, method: str, rows: Rows = slice(None)) -> np.ndarray:
        """/metrics/<metric>/<method> rows."""
        return self._h5[f"metrics/{metric}/{method}"][rows]

    def activations(self, layer: str, rows: Rows = slice(None)) -> np.ndarray:
        """/activations/<layer> rows (graph layout)."""
        return self._h5[f"activations/{layer}"][rows]

    def gradients(self, layer: str, rows: Rows = slice(None)) -> np.ndarray:
        """/gradients/<layer> rows (graph layout)."""
        return self._h5[f"gradients/{layer}"][rows]

    def detections(self, i: int):
        """Image ``i``'s detections as a :class:`camexport.detection.Detections`, padding
        dropped (anchors are not stored: zeros), with the masks or keypoints stored (a Mask R-CNN's
        box masks / 255)."""
        from camexport.detection import Detections

        count = int(self._h5["detections/count"][i])
        extras = {k: self._h5[f"detections/{k}"][i][:count] for k in ("box_masks", "masks", "keypoints")
                  if f"detections/{k}" in self._h5}
        if "box_masks" in extras:  # a Mask R-CNN's, in the box frame, stored x 255
            extras["box_masks"] = extras["box_masks"].astype(np.float32) / np.float32(255)
        return Detections(*(self._h5[f"detections/{k}"][i][:count] for k in ("boxes", "scores", "labels")),
                          anchors=np.zeros(count, np.int64), **extras)

    @property
    def labels(self) -> np.ndarray | None:
        """/labels (copied from the input), or None."""
        return self._h5["labels"][()] if "labels" in self._h5 else None

    @property
    def names(self) -> list[str] | None:
        """/names (copied from the input) as str, or None."""
        if "names" not in self._h5:
            return None
        return [n.decode() if isinstance(n, bytes) else str(n) for n in self._h5["names"][()]]


def summary(path: str | Path) -> dict:
    """Counts, methods, metric means per method, provenance: what ``camexport show`` prints.
    ``state``: "complete", "running" (a live process holds the output lock; ``writer``: its
    pid) or "unfinished" (rerun the same command to finish); counts come from the finished
    shards while a run is unfinished."""
    with ResultReader(path) as results:
        done = results.done
        invalid = results.invalid & done
        ok = done & ~invalid
        metrics = {}
        for metric, methods in results.metrics.items():
            metrics[metric] = {method: float(np.nanmean(results.metric(metric, method)[ok]))
                               if ok.any() else float("nan")
                               for method in methods}
        attrs = results.attrs
        writer = None if results.complete else writer_alive(path)
        state = "complete" if results.complete else "running" if writer else "unfinished"
        return {
            "path": str(path), "samples": int(results.fingerprint.get("count", len(done))),
            "done": int(done.sum()), "invalid": int(invalid.sum()), "complete": results.complete,
            "state": state, "writer": writer,
            "methods": results.methods, "metrics": metrics,
            "outputs": sorted(results.output_names),
            "provider": attrs.get("provider", ""), "camexport_version": attrs.get("camexport_version", ""),
            "parameters": results.parameters,
        }


def describe_state(info: dict) -> str:
    """A :func:`summary`'s state in words, as ``camexport show`` and ``camexport report`` say it."""
    return {"complete": "complete", "running": f"in progress: pid {info['writer']} is writing it",
            "unfinished": "unfinished: rerun the same command to finish"}[info["state"]]


# -- editing results -----------------------------------------------------------------------------
class ResultEditor:
    """A result file open for editing (see :func:`edit_results`); ``reader`` reads it."""

    def __init__(self, path: Path, handle: h5py.File):
        self._h5 = handle
        self.reader = ResultReader(path, handle)

    def replace_cams(self, method: str, shape: tuple[int, ...], dtype=np.float32,
                     compression: str = "gzip") -> h5py.Dataset:
        """A new, zero-filled /cams/<method> of ``shape`` (N, *input size) in place of any old
        one, chunked one sample per chunk; assign rows to it (``cams[rows] = maps``)."""
        name = f"cams/{method}"
        if name in self._h5:
            del self._h5[name]
        return self._h5.create_dataset(name, shape, dtype, chunks=_chunks(shape), compression=compression)

    def replace_dataset(self, name: str, values: np.ndarray, compression: str = "gzip") -> None:
        """A per-sample dataset (e.g. ``metrics/arcc:gradcam/gradcam``) in place of any old one,
        chunked as the result layout chunks it."""
        if name in self._h5:
            del self._h5[name]
        self._h5.create_dataset(name, data=values, chunks=_chunks(values.shape), compression=compression)

    def set_attr(self, key: str, value) -> None:
        """Set a root attribute: str, bool and numbers as they are, anything else as JSON."""
        self._h5.attrs[key] = value if isinstance(value, (str, bool, int, float)) else json.dumps(value)
        self.reader._attrs = None


@contextmanager
def edit_results(path: str | Path) -> Iterator[ResultEditor]:
    """Edit a result file safely: the edits go to a copy (``.NAME.partial``) that replaces the
    file (fsync, rename) when the block ends; on any exception the copy goes and the file is
    untouched."""
    path = Path(path)
    open_results(path).close()
    temporary = temporary_path(path)
    try:
        shutil.copyfile(path, temporary)
        with h5py.File(temporary, "r+") as h5:
            yield ResultEditor(path, h5)
        replace_atomic(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
