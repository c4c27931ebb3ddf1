"""All HDF5 in one place: input datasets, result files and their crash-safe writing.

Input dataset (``camexport pack`` writes it; any h5py user can too)::

    /images   (N, H, W, 3) uint8 RGB, any H, W   -- resized and normalised at run time from the
              or (N, 3, H, W) float32 already preprocessed (used as is)     artifact's manifest
              or (N, 3, D, H, W) float32 preprocessed volumes or clips (3-D models)
    /labels   (N,) int      optional, -1 = unknown
    /names    (N,) str      optional, e.g. the source file names
    attributes camexport_kind = "input dataset", camexport_version (pack writes them; they let
              `pack --overwrite` recognise a file it may replace; the run does not need them)

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

One writer per result: ``camexport run`` holds ``OUT.h5.lock`` (an flock, with its pid and host
in it; :class:`~camexport.store.outputs.OutputLock`) for the whole run, and so does `camexport
recompute` while it edits; a second writer is refused, the lock of a killed run is taken over.
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

import h5py
import numpy as np

from camexport import __version__
from camexport.artifact import replace_atomic, temporary_path
from camexport.errors import CamexportError

#: Samples per chunk of a 1-D per-sample dataset (one chunk per sample would waste space).
VECTOR_CHUNK = 4096
COMPRESSIONS = ("gzip", "lzf")
#: Root attribute marking an input dataset written by :func:`write_input` (value INPUT_KIND).
KIND_ATTR = "camexport_kind"
INPUT_KIND = "input dataset"


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
    an error on the way leaves no file and an existing one untouched. Returns the count; with
    no items nothing is written (0)."""
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
            h5.attrs[KIND_ATTR] = INPUT_KIND
            h5.attrs["camexport_version"] = __version__
        if names:
            replace_atomic(temporary, path)
        else:
            temporary.unlink()
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
    different one is refused unless ``overwrite``; any other existing file (not a result) is
    refused, ``overwrite`` or not. One writer at a time: hold an :class:`OutputLock` on the path
    while writing (``camexport run`` does), the writer does not take it.
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
        refuse_foreign(self.path, existing_kind(self.path), RESULT, "run")
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
                raise StoreError(f"{self.path} exists and is not a readable camexport result ({err}); "
                                 f"choose another --out") from err
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


# reading and editing results, and what guards outputs, live beside the writer; they import
# what is above
from camexport.store.outputs import (
    PACKED,
    RESULT,
    OutputLock,
    artifact_files,
    existing_kind,
    refuse_foreign,
    refuse_inputs,
)
from camexport.store.reader import (
    JSON_ATTRS,
    ResultEditor,
    ResultReader,
    Storage,
    edit_results,
    open_results,
    summary,
)

__all__ = ["COMPRESSIONS", "JSON_ATTRS", "PACKED", "RESULT", "InputData", "OutputLock", "ResultEditor",
           "ResultReader", "ResultWriter", "Storage", "StoreError", "artifact_files", "edit_results",
           "existing_kind", "open_results", "refuse_foreign", "refuse_inputs", "summary", "write_input"]
