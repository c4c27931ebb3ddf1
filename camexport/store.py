"""All HDF5 in one place: input datasets, result files and their crash-safe writing.

Input dataset (``camexport pack`` writes it; any h5py user can too)::

    /images   (N, H, W, 3) uint8 RGB, any H, W   -- resized and normalised at run time from the
              or (N, 3, H, W) float32 already preprocessed (used as is)     artifact's manifest
              or (N, 3, D, H, W) float32 preprocessed volumes or clips (3-D models)
    /labels   (N,) int      optional, -1 = unknown
    /names    (N,) str      optional, e.g. the source file names

Result file (``camexport run`` writes it; read it with :class:`ResultReader`)::

    /outputs/<output name>        (N, *output shape) float32  model outputs, e.g. (N, K) for a
                                  classifier, (N, K, H, W) for segmentation; NaN for invalid
                                  samples; absent for detectors (see /detections)
    /targets                      (N,) int64       the class each sample was explained for
                                                   (-1: invalid, a concept, a detector's own
                                                   detections with --targets pred)
    /cams/<method>                (N, H, W) float32 or float16 (--cam-dtype) in [0, 1], input
                                  resolution ((N, D, H, W) for 3-D models); `camexport
                                  recompute` writes float32
    /metrics/<metric>/<method>    (N,) float32     NaN for invalid samples
    /detections/boxes             (N, D, 4) float32  detectors only, D = the manifest's
                                  detections_per_img: x1 y1 x2 y2 in model-input pixels, best
                                  score first, NaN past /detections/count
    /detections/scores            (N, D) float32   NaN past the count
    /detections/labels            (N, D) int32     -1 past the count
    /detections/count             (N,) int32       detections of each image
    /activations/<layer>, /gradients/<layer>   (N, ...) float32, only with --save-activations
                                  / --save-gradients (graph layout, as the manifest says)
    /done                         (N,) bool        completion mask
    /invalid                      (N,) bool        samples with NaN/Inf pixels (not explained)
    /labels                       (N,) int64       copied from the input when it has them
    /names                        (N,) str         copied from the input when it has them
    attributes                    camexport_version, provider, artifact, data (paths),
                                  model_sha256, graph_sha256 (str); fingerprint (JSON of what
                                  determines the results: graph sha256, data, count, parameters),
                                  manifest, methods, metrics, layers (JSON); complete (bool);
                                  recomputed (JSON list of the methods `camexport recompute` added)

While a run is going ``OUT.h5`` is a live view of the finished batches: every dataset above but
/labels and /names, rows not done yet read as NaN (float), -1 (int) or False (bool), complete
false, and /done absent until the first batch is written.

Every per-sample dataset is chunked one sample per chunk (1-D ones in blocks) and compressed.

Crash safety: while a run is going, each finished batch is a *shard* file in ``OUT.h5.parts/``,
written to a temporary name and renamed (atomic), and ``OUT.h5`` is a small file of virtual
datasets over the shards, itself rewritten by rename. A SIGKILL at any moment leaves every
finished shard and a readable ``OUT.h5``; the next run reads the completion mask from the shards.
When every sample is done the shards are copied into one self-contained ``OUT.h5`` (compressed
chunks copied as they are) and the parts folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from camexport.artifact import replace_atomic, temporary_path
from camexport.errors import CamexportError

if TYPE_CHECKING:
    from typing_extensions import Self

#: Samples per chunk of a 1-D per-sample dataset (one chunk per sample would waste space).
VECTOR_CHUNK = 4096
COMPRESSIONS = ("gzip", "lzf")


class StoreError(CamexportError, ValueError):
    """An input or output file that cannot be used, with what to do about it."""


@contextmanager
def _rewrite(path: Path, parts: Path):
    """An h5py file written under a temporary name and renamed over ``path``; on OSError the
    temporary file goes and a StoreError says that the finished shards are kept."""
    temporary = temporary_path(path)
    try:
        with h5py.File(temporary, "w") as h5:
            yield h5
        replace_atomic(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path} ({err}); the finished shards in "
                         f"{parts} are kept: run the same command again") from err


def _string_array(values) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=h5py.string_dtype())


# -- input datasets ----------------------------------------------------------------------------
@dataclass
class InputData:
    """An open input dataset; ``images(start, stop)`` reads a slice."""

    path: Path
    handle: h5py.File
    preprocessed: bool

    @classmethod
    def open(cls, path: str | Path) -> InputData:
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"input dataset {path} does not exist; make one with "
                             f"`camexport pack IMAGES_DIR --out {path}`")
        try:
            handle = h5py.File(path, "r")
        except OSError as err:
            raise StoreError(f"{path} is not a readable HDF5 file ({err})") from err
        if "images" not in handle:
            handle.close()
            raise StoreError(f"{path} has no /images dataset; an input dataset holds /images "
                             f"(N, H, W, 3) uint8 RGB or (N, 3, H, W) float32 (camexport pack makes one)")
        images = handle["images"]
        if images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3:
            preprocessed = False
        elif images.dtype == np.float32 and images.ndim in (4, 5) and images.shape[1] == 3:
            preprocessed = True
        else:
            handle.close()
            raise StoreError(
                f"{path}:/images is {images.dtype} of shape {images.shape}; expected (N, H, W, 3) "
                f"uint8 RGB or (N, 3, H, W) float32 already preprocessed ((N, 3, D, H, W) for "
                f"3-D models)")
        data = cls(path, handle, preprocessed)
        if "labels" in handle and handle["labels"].shape != (len(data),):
            raise StoreError(f"{path}:/labels has shape {handle['labels'].shape}, expected ({len(data)},)")
        return data

    def __len__(self) -> int:
        return self.handle["images"].shape[0]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.handle["images"].shape[1:])

    def images(self, start: int, stop: int) -> np.ndarray:
        return self.handle["images"][start:stop]

    @property
    def labels(self) -> np.ndarray | None:
        return self.handle["labels"][()].astype(np.int64) if "labels" in self.handle else None

    @property
    def names(self) -> list[str] | None:
        if "names" not in self.handle:
            return None
        return [n.decode() if isinstance(n, bytes) else str(n) for n in self.handle["names"][()]]

    def identity(self) -> dict:
        """What identifies the data for a resumed run: path, shape, dtype, first/last sample."""
        images = self.handle["images"]
        n = len(self)
        probe = np.concatenate([images[0].ravel(), images[n - 1].ravel()]) if n else np.zeros(0)
        return {"path": str(self.path.resolve()), "shape": list(images.shape), "dtype": str(images.dtype),
                "probe_sha256": hashlib.sha256(probe.tobytes()).hexdigest()}

    def close(self) -> None:
        self.handle.close()


def write_input(path: str | Path, images: Iterator[tuple[str, np.ndarray, int]],
                size: tuple[int, int]) -> int:
    """An input dataset from (name, (H, W, 3) uint8 image, label) items, written atomically:
    an error on the way leaves no file and an existing one untouched. Returns the count."""
    path = Path(path)
    temporary = temporary_path(path)
    height, width = size
    names, labels = [], []
    try:
        with h5py.File(temporary, "w") as h5:
            stored = h5.create_dataset("images", (0, height, width, 3), np.uint8,
                                       maxshape=(None, height, width, 3),
                                       chunks=(1, height, width, 3), compression="gzip")
            for name, image, label in images:
                stored.resize(len(names) + 1, axis=0)
                stored[len(names)] = image
                names.append(name)
                labels.append(label)
            h5["names"] = _string_array(names)
            if any(label >= 0 for label in labels):
                h5["labels"] = np.asarray(labels, np.int64)
        replace_atomic(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return len(names)


# -- result files --------------------------------------------------------------------------------
def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 1:
        return (max(1, min(shape[0], VECTOR_CHUNK)),)
    return (1, *shape[1:])


def _flatten(group: h5py.Group, prefix: str = "") -> dict[str, h5py.Dataset]:
    found = {}
    for key, item in group.items():
        name = f"{prefix}{key}"
        if isinstance(item, h5py.Group):
            found.update(_flatten(item, name + "/"))
        else:
            found[name] = item
    return found


class ResultWriter:
    """Writes a result file batch by batch, resumable after any crash (see the module docstring).

    ``fingerprint`` is everything that determines the results; an existing output made with a
    different one is refused unless ``overwrite``.
    """

    def __init__(self, path: str | Path, count: int, fingerprint: dict, attrs: dict,
                 compression: str = "gzip", overwrite: bool = False):
        if compression not in COMPRESSIONS:
            raise StoreError(f"unknown compression {compression!r}; choose one of {COMPRESSIONS}")
        self.path = Path(path)
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.count = count
        self.fingerprint = fingerprint
        self.attrs = attrs
        self.compression = compression
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create {self.path.parent} ({err}); choose another --out") from err
        if overwrite:
            self._remove()
        self._check_existing()
        if not self.complete:
            self._write_json(self.parts / "run.json", {"fingerprint": fingerprint, "count": count})
            for stale in self.parts.glob(".*.partial"):
                stale.unlink()

    # resuming --------------------------------------------------------------------------------
    def _remove(self) -> None:
        shutil.rmtree(self.parts, ignore_errors=True)
        self.path.unlink(missing_ok=True)

    def _check_existing(self) -> None:
        refuse = (f"{self.path} was made by a different run (another artifact, data or "
                  f"parameters); pass --overwrite to replace it, or choose another --out")
        record = self.parts / "run.json"
        if record.is_file():
            if json.loads(record.read_text())["fingerprint"] != self.fingerprint:
                raise StoreError(refuse)
            return
        if self.path.exists():
            try:
                with h5py.File(self.path, "r") as h5:
                    previous = json.loads(h5.attrs.get("fingerprint", "null"))
            except (OSError, ValueError) as err:
                raise StoreError(f"{self.path} exists and is not a camexport result ({err}); "
                                 f"pass --overwrite to replace it") from err
            if previous != self.fingerprint:
                raise StoreError(refuse)

    @property
    def complete(self) -> bool:
        """An existing self-contained result of this very run (nothing left to do)."""
        if self.parts.joinpath("run.json").is_file() and self.shards():
            return False
        if not self.path.exists():
            return False
        with h5py.File(self.path, "r") as h5:
            return bool(h5.attrs.get("complete", False))

    def shards(self) -> list[tuple[int, int, Path]]:
        found = []
        for shard in self.parts.glob("shard-*.h5"):
            _, start, stop = shard.stem.split("-")
            found.append((int(start), int(stop), shard))
        return sorted(found)

    def done(self) -> np.ndarray:
        """The completion mask, from the finished shards (and a finished file)."""
        mask = np.zeros(self.count, bool)
        if self.complete:
            mask[:] = True
        for start, stop, _ in self.shards():
            mask[start:stop] = True
        return mask

    # writing ---------------------------------------------------------------------------------
    def _write_json(self, path: Path, value) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = temporary_path(path)
            temporary.write_text(json.dumps(value))
            replace_atomic(temporary, path)
        except OSError as err:
            raise StoreError(f"cannot write {path} ({err}); choose another --out or free space") from err

    def write(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """One finished batch: samples start .. start + len, as a shard (atomic)."""
        stop = start + len(next(iter(arrays.values())))
        shard = self.parts / f"shard-{start:09d}-{stop:09d}.h5"
        temporary = temporary_path(shard)
        try:
            with h5py.File(temporary, "w") as h5:
                for name, value in arrays.items():
                    h5.create_dataset(name, data=value, chunks=_chunks(value.shape),
                                      compression=self.compression)
                h5["done"] = np.ones(stop - start, bool)
            replace_atomic(temporary, shard)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            raise StoreError(f"cannot write results to {self.parts} ({err}); finished samples are "
                             f"kept: free space or fix permissions and run the same command again") from err

    def _layouts(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        shards = self.shards()
        if not shards:
            return {}
        with h5py.File(shards[0][2], "r") as h5:
            return {name: (d.shape[1:], d.dtype) for name, d in _flatten(h5).items()}

    def _root_attrs(self, h5: h5py.File, complete: bool) -> None:
        h5.attrs.update({key: value if isinstance(value, str) else json.dumps(value)
                         for key, value in self.attrs.items()})
        h5.attrs["fingerprint"] = json.dumps(self.fingerprint)
        h5.attrs["complete"] = complete

    def publish(self) -> None:
        """Rewrite OUT.h5 as virtual datasets over the finished shards (a live, readable view)."""
        shards = self.shards()
        with _rewrite(self.path, self.parts) as h5:
            for name, (tail, dtype) in self._layouts().items():
                layout = h5py.VirtualLayout((self.count, *tail), dtype)
                for start, stop, shard in shards:
                    source = os.path.relpath(shard, self.path.parent)
                    layout[start:stop] = h5py.VirtualSource(source, name, shape=(stop - start, *tail))
                fill = False if dtype == bool else (np.nan if dtype.kind == "f" else -1)
                h5.create_virtual_dataset(name, layout, fillvalue=fill)
            self._root_attrs(h5, complete=False)

    def finish(self, extra: dict[str, np.ndarray]) -> None:
        """Copy every shard into one self-contained OUT.h5 (atomic), then drop the shards.

        ``extra``: whole datasets to add (labels; names as a list of str)."""
        shards = self.shards()
        with _rewrite(self.path, self.parts) as h5:
            for name, (tail, dtype) in self._layouts().items():
                shape = (self.count, *tail)
                target = h5.create_dataset(name, shape, dtype, chunks=_chunks(shape),
                                           compression=self.compression)
                for start, stop, shard in shards:
                    with h5py.File(shard, "r") as part:
                        _copy_rows(part[name], target, start, stop)
            for name, value in extra.items():
                h5.create_dataset(name, data=_string_array(value) if isinstance(value, list) else value)
            self._root_attrs(h5, complete=True)
        shutil.rmtree(self.parts, ignore_errors=True)


def _copy_rows(source: h5py.Dataset, target: h5py.Dataset, start: int, stop: int) -> None:
    """Rows of a shard into the whole file; per-sample chunks travel still compressed."""
    if source.ndim > 1 and source.chunks == target.chunks and source.compression == target.compression:
        for i in range(stop - start):
            mask, chunk = source.id.read_direct_chunk((i,) + (0,) * (source.ndim - 1))
            target.id.write_direct_chunk((start + i,) + (0,) * (source.ndim - 1), chunk, mask)
    else:
        target[start:stop] = source[()]


# -- reading results -----------------------------------------------------------------------------
def open_results(path: str | Path) -> h5py.File:
    """A result file (finished, or the live view of a run going on) open read-only as h5py;
    StoreError when it is missing, unreadable or no camexport result. Prefer :class:`ResultReader`."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path} does not exist; make it with `camexport run`")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise StoreError(f"{path} is not a readable HDF5 file ({err})") from err
    if "fingerprint" not in h5.attrs:
        h5.close()
        raise StoreError(f"{path} is not a camexport result file (no fingerprint attribute)")
    return h5


#: Root attributes of a result file stored as JSON text (:attr:`ResultReader.attrs` parses them).
JSON_ATTRS = ("fingerprint", "manifest", "methods", "metrics", "layers", "recomputed")

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
        dropped (anchors are not stored: zeros)."""
        from camexport.detection import Detections

        count = int(self._h5["detections/count"][i])
        return Detections(*(self._h5[f"detections/{k}"][i][:count] for k in ("boxes", "scores", "labels")),
                          anchors=np.zeros(count, np.int64))

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
    """Counts, methods, metric means per method, provenance: what ``camexport show`` prints."""
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
        return {
            "path": str(path), "samples": len(done), "done": int(done.sum()),
            "invalid": int(invalid.sum()), "complete": results.complete,
            "methods": results.methods, "metrics": metrics,
            "outputs": sorted(results.output_names),
            "provider": attrs.get("provider", ""), "camexport_version": attrs.get("camexport_version", ""),
            "parameters": results.parameters,
        }


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
