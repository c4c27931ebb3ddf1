"""All HDF5 in one place: input datasets, result files and their crash-safe writing.

Input dataset (``camexport pack`` writes it; any h5py user can too)::

    /images   (N, H, W, 3) uint8 RGB, any H, W   -- resized and normalised at run time from the
              or (N, 3, H, W) float32 already preprocessed (used as is)     artifact's manifest
              or (N, 3, D, H, W) float32 preprocessed volumes or clips (3-D models)
    /labels   (N,) int      optional, -1 = unknown
    /names    (N,) str      optional, e.g. the source file names
    /boxes    (N, D, 4) float32  optional (`pack --annotations`): x1 y1 x2 y2 in stored-image
              pixels, continuous edges (COCO's), NaN past the count; D the most boxes of an
              image (at least 1). camexport.annotations.read_annotations reads them at a CAM's size
    /box_count  (N,) int32       real boxes of each image (0: none)
    /box_labels (N, D) int64     the model's class index of each box, -1 past the count
    /masks    (N, D, H, W) bool  optional, one mask per box (aligned with /boxes, False past the
              count), chunked (1, 1, H, W), gzip; a segmentation dataset's boxes are its
              masks' extents
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
    /detections/box_masks         (N, D, M, M) uint8  Mask R-CNN only: each detection's mask
                                  probability x 255 (rounded) in its box's frame, M x M (28),
                                  torchvision's before paste_masks_in_image
                                  (camexport.detection.paste_masks); 0 past the count
    /detections/masks             (N, D, h, w) uint8  Ultralytics segment models only: each
                                  detection's mask, 0/1, at the prototypes' resolution (h, w =
                                  input / 4) in the image frame, as Ultralytics' process_mask
                                  with upsample=False; 0 past the count
    /detections/keypoints         (N, D, K, 3) float32  Ultralytics pose models only: x, y in
                                  input pixels, visibility (sigmoid); NaN past the count
    /detections/count             (N,) int32       detections of each image
    /detections/explained         (N,) int32       0: no detection reached --detection-threshold
                                                   (target methods give an all-zero map)
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
                                  recomputed (JSON list of the methods `camexport recompute` added);
                                  evaluated (JSON list of the metrics `camexport evaluate` added,
                                  also listed in metrics; its crash-safe shards:
                                  :mod:`camexport.store.evaluations`)

While a run is going ``OUT.h5`` is a live view of the finished batches: every dataset above but
/labels and /names, rows not done yet read as NaN (float), -1 (int), 0 (unsigned) or False (bool), complete
false, and /done absent until the first batch is written.

Every per-sample dataset is chunked one sample per chunk (1-D ones in blocks) and compressed.

Crash safety: while a run is going, each finished batch is a *shard* file in ``OUT.h5.parts/``,
written to a temporary name and renamed (atomic), and ``OUT.h5`` is a small file of virtual
datasets over the shards, itself rewritten by rename. A SIGKILL at any moment leaves every
finished shard and a readable ``OUT.h5``; the next run reads the completion mask from the shards.
When every sample is done the shards are copied into one self-contained ``OUT.h5`` (compressed
chunks copied as they are) and the parts folder is removed. ``OUT.h5.parts/run.json`` records the
run (fingerprint, count, root attributes): while it is there, readers (:class:`ResultReader`,
``show``, ``render``) see a fresh in-memory view of the finished shards, not the OUT.h5 view,
which may lag (rewritten at most every second) or be missing.

Write failures: HDF5 writes every file through :class:`_GuardedFile`, which keeps a failed
write (a full disk, an I/O error) from HDF5 (it has segfaulted on them); the partial file is
removed, every finished shard is kept, and a StoreError says how much space the rest needs.
``camexport.faults`` names the kill points the fault-injection tests use.

One writer per result: ``camexport run`` holds ``OUT.h5.lock`` (an flock, with its pid and host
in it; :class:`~camexport.store.outputs.OutputLock`) for the whole run, and so does `camexport
recompute` while it edits; a second writer is refused, the lock of a killed run is taken over.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from camexport.artifact import replace_atomic, temporary_path
from camexport.errors import CamexportError
from camexport.faults import fault_point
from camexport.interrupts import Held, held_back

#: Samples per chunk of a 1-D per-sample dataset (one chunk per sample would waste space).
VECTOR_CHUNK = 4096
COMPRESSIONS = ("gzip", "lzf")
#: Root attribute marking an input dataset written by :func:`write_input` (value INPUT_KIND).
KIND_ATTR = "camexport_kind"
INPUT_KIND = "input dataset"


class StoreError(CamexportError, ValueError):
    """An input or output file that cannot be used, with what to do about it."""


class _GuardedFile:
    """The file object HDF5 writes a file through (h5py's ``fileobj`` driver). HDF5 crashes on
    some failed writes of its own (a full disk has segfaulted it, and left the half-written file
    behind), so HDF5 never sees one: every write goes to disk with ``os.pwrite``, the first
    OSError (ENOSPC, EIO, ...) is kept in :attr:`error` and the writes after it are dropped,
    while HDF5 goes on to a clean close; :func:`_written` then removes the file and raises it."""

    def __init__(self, path: Path, point: str, held: Held):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self.held = held
        self.position = 0
        self.point = point
        self.error: OSError | None = None

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position}.get(whence)
        self.position = offset + (os.fstat(self.fd).st_size if base is None else base)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        count = os.preadv(self.fd, [buffer], self.position)
        self.position += count
        return count

    def read(self, size: int = -1) -> bytes:
        data = os.pread(self.fd, size if size >= 0 else os.fstat(self.fd).st_size, self.position)
        self.position += len(data)
        return data

    def write(self, buffer) -> int:
        data = memoryview(buffer).cast("B")
        fault_point(f"{self.point}-write")
        written = 0
        while self.error is None and written < len(data):
            try:
                written += os.pwrite(self.fd, data[written:], self.position + written)
            except OSError as err:
                self.error = err
        self.position += len(data)
        return len(data)

    def truncate(self, size: int | None = None) -> int:
        size = self.position if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as err:
                self.error = err
        return size

    def flush(self) -> None:
        """Nothing is buffered here (HDF5 flushes its caches through :meth:`write`)."""

    def close(self) -> None:
        """Close the descriptor; the first failed write, if any, is raised."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.error is not None:
            raise self.error


@contextmanager
def _written(path: Path, point: str) -> Iterator[tuple[h5py.File, _GuardedFile]]:
    """``with _written(path, "shard") as (h5, guard):`` an h5py file written to a temporary name
    beside ``path`` through a :class:`_GuardedFile` (``guard``: check ``guard.error`` to stop a
    long write early; ``guard.held.raise_pending()`` to let Ctrl-C through between two writes:
    inside the block it is held back, see camexport.interrupts) and renamed over ``path``
    (fsync, atomic) when the block ends. On a failed write or any exception the temporary file
    is removed and the error raised (an OSError for a failed write): ``path`` is untouched.
    ``point`` names the fault points (camexport.faults)."""
    with held_back() as held:  # no Ctrl-C/SIGTERM inside HDF5's calls into the guard
        temporary = temporary_path(path)
        guard = _GuardedFile(temporary, point, held)
        try:
            try:
                with h5py.File(guard, "w") as h5:
                    yield h5, guard
            except Exception:
                if guard.error is None:
                    raise  # else HDF5 read back what was never written: the write error is the cause
            guard.close()
            fault_point(f"{point}-rename")
            replace_atomic(temporary, path)
        except BaseException:
            try:
                guard.close()
            except OSError:
                pass
            temporary.unlink(missing_ok=True)
            raise


def _string_array(values) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=h5py.string_dtype())


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


#: The record of an unfinished run in its parts folder: fingerprint, count, root attributes.
RUN_RECORD = "run.json"


def parts_of(path: Path) -> Path:
    """The folder of a result's shards while its run is unfinished (``OUT.h5.parts``)."""
    return path.with_name(path.name + ".parts")


def finished_shards(parts: Path) -> list[tuple[int, int, Path]]:
    """(start, stop, file) of every finished shard in a parts folder, by start."""
    found = []
    for shard in parts.glob("shard-*.h5"):
        _, start, stop = shard.stem.split("-")
        found.append((int(start), int(stop), shard))
    return sorted(found)


def virtual_view(h5: h5py.File, count: int, shards: list[tuple[int, int, Path]], source) -> None:
    """Virtual datasets in ``h5`` over the shards, as the result layout; rows no shard holds read
    as NaN, -1 or False. ``source(shard)``: the file name the view records for a shard."""
    if not shards:
        return
    with h5py.File(shards[0][2], "r") as first:
        layouts = {name: (d.shape[1:], d.dtype) for name, d in _flatten(first).items()}
    for name, (tail, dtype) in layouts.items():
        layout = h5py.VirtualLayout((count, *tail), dtype)
        for start, stop, shard in shards:
            layout[start:stop] = h5py.VirtualSource(source(shard), name, shape=(stop - start, *tail))
        fill = False if dtype == bool else np.nan if dtype.kind == "f" else 0 if dtype.kind == "u" else -1
        h5.create_virtual_dataset(name, layout, fillvalue=fill)


def _megabytes(size: float) -> str:
    if size >= 1e9:
        return f"{size / 1e9:.1f} GB"
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"


class ResultWriter:
    """Writes a result file batch by batch, resumable after any crash (see the module docstring).

    ``fingerprint`` is everything that determines the results; an existing output made with a
    different one is refused unless ``overwrite``; any other existing file (not a result) is
    refused, ``overwrite`` or not. One writer at a time: hold an :class:`OutputLock` on the path
    while writing (``camexport run`` does), the writer does not take it. A write that fails (a
    full disk, an I/O error) leaves no partial file and raises a StoreError saying how much space
    the rest needs; every finished shard is kept for the next run.
    """

    def __init__(self, path: str | Path, count: int, fingerprint: dict, attrs: dict,
                 compression: str = "gzip", overwrite: bool = False):
        if compression not in COMPRESSIONS:
            raise StoreError(f"unknown compression {compression!r}; choose one of {COMPRESSIONS}")
        self.path = Path(path)
        self.parts = parts_of(self.path)
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
        temporary_path(self.path).unlink(missing_ok=True)  # a view or final copy cut short
        if self.complete:  # killed after the final copy was in place: the shards are redundant
            shutil.rmtree(self.parts, ignore_errors=True)
        else:
            for stale in self.parts.glob(".*.partial"):
                stale.unlink()
            self._write_json(self.parts / RUN_RECORD, {"fingerprint": fingerprint, "count": count,
                                                       "attrs": self.attrs})

    @classmethod
    def for_worker(cls, path: str | Path, count: int, compression: str = "gzip") -> ResultWriter:
        """A writer of shards only, for one of many workers of a run whose driver made the
        ResultWriter (and holds the lock, publishes the view, finishes the file)."""
        writer = cls.__new__(cls)
        writer.path, writer.parts, writer.count = Path(path), parts_of(Path(path)), count
        writer.compression, writer.fingerprint, writer.attrs = compression, None, None
        return writer

    def shard_path(self, start: int, stop: int) -> Path:
        return self.parts / f"shard-{start:09d}-{stop:09d}.h5"

    # resuming --------------------------------------------------------------------------------
    def _remove(self) -> None:
        shutil.rmtree(self.parts, ignore_errors=True)
        self.path.unlink(missing_ok=True)

    def _check_existing(self) -> None:
        refuse = (f"{self.path} was made by a different run (another artifact, data or "
                  f"parameters); pass --overwrite to replace it, or choose another --out")
        record = self.parts / RUN_RECORD
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
        if not self.path.exists():
            return False
        try:
            with h5py.File(self.path, "r") as h5:
                return bool(h5.attrs.get("complete", False))
        except OSError:
            return False

    def shards(self) -> list[tuple[int, int, Path]]:
        return finished_shards(self.parts)

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
        temporary = temporary_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(value))
            replace_atomic(temporary, path)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            raise self._failed(err, str(path), 0) from err

    def _failed(self, err: OSError, what: str, batch_bytes: float) -> StoreError:
        """The error for a failed write of ``what``: what happened, what is kept, what to do;
        on a full disk how much space the rest needs (the bytes per finished sample, or
        ``batch_bytes`` per sample before any is finished, times the samples left, plus the
        final copy)."""
        shards = self.shards()
        finished = sum(stop - start for start, stop, _ in shards)
        kept = (f"{finished}/{self.count} samples are done and kept in {self.parts}" if finished
                else f"no sample is finished yet ({self.count} to do)")
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            return StoreError(f"cannot write {what} ({err}); {kept}: fix the disk or the permissions of "
                              f"{self.path.parent}, then run the same command again to resume")
        per_sample = sum(shard.stat().st_size for *_, shard in shards) / finished if finished else batch_bytes
        left = self.count - finished
        free = shutil.disk_usage(self.path.parent).free
        final = per_sample * self.count
        rest = (f"{_megabytes(per_sample * left + final)} free there ({left} samples left at "
                f"{_megabytes(per_sample)} each, plus {_megabytes(final)} for the final copy into "
                f"{self.path.name}" if left else f"{_megabytes(final)} free there for the final copy "
                f"into {self.path.name} (the shards go after it")
        return StoreError(
            f"the disk holding {self.path.parent} is full ({err.strerror}) while writing {what}; {kept}. "
            f"The rest needs about {rest}; {_megabytes(free)} free now): free space (or choose another "
            f"--out), then run the same command again to resume")

    def write(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """One finished batch: samples start .. start + len, as a shard (atomic)."""
        stop = start + len(next(iter(arrays.values())))
        shard = self.shard_path(start, stop)
        try:
            with _written(shard, "shard") as (h5, _):
                for name, value in arrays.items():
                    h5.create_dataset(name, data=value, chunks=_chunks(value.shape),
                                      compression=self.compression)
                h5["done"] = np.ones(stop - start, bool)
        except OSError as err:
            batch_bytes = sum(value.nbytes for value in arrays.values()) / (stop - start)
            raise self._failed(err, f"samples {start}..{stop - 1} ({shard.name})", batch_bytes) from err

    def _root_attrs(self, h5: h5py.File, complete: bool) -> None:
        h5.attrs.update({key: value if isinstance(value, str) else json.dumps(value)
                         for key, value in self.attrs.items()})
        h5.attrs["fingerprint"] = json.dumps(self.fingerprint)
        h5.attrs["complete"] = complete

    def publish(self) -> None:
        """Rewrite OUT.h5 as virtual datasets over the finished shards (a live, readable view)."""
        try:
            with _written(self.path, "view") as (h5, _):
                virtual_view(h5, self.count, self.shards(),
                             lambda shard: os.path.relpath(shard, self.path.parent))
                self._root_attrs(h5, complete=False)
        except OSError as err:
            raise self._failed(err, f"the live view {self.path}", 0) from err

    def finish(self, extra: dict[str, np.ndarray]) -> None:
        """Copy every shard into one self-contained OUT.h5 (atomic), then drop the shards.

        ``extra``: whole datasets to add (labels; names as a list of str)."""
        shards = self.shards()
        try:
            with _written(self.path, "final") as (h5, guard):
                with h5py.File(shards[0][2], "r") as first:
                    layouts = {name: (d.shape[1:], d.dtype) for name, d in _flatten(first).items()}
                for name, (tail, dtype) in layouts.items():
                    shape = (self.count, *tail)
                    target = h5.create_dataset(name, shape, dtype, chunks=_chunks(shape),
                                               compression=self.compression)
                    for start, stop, shard in shards:
                        if guard.error is not None:
                            raise guard.error  # the disk is full: stop copying
                        guard.held.raise_pending()  # Ctrl-C between two shards, not inside HDF5
                        with h5py.File(shard, "r") as part:
                            _copy_rows(part[name], target, start, stop)
                for name, value in extra.items():
                    h5.create_dataset(name, data=_string_array(value) if isinstance(value, list) else value)
                self._root_attrs(h5, complete=True)
        except OSError as err:
            raise self._failed(err, f"the final copy {self.path}", 0) from err
        fault_point("parts-remove")
        shutil.rmtree(self.parts, ignore_errors=True)


def _copy_rows(source: h5py.Dataset, target: h5py.Dataset, start: int, stop: int) -> None:
    """Rows of a shard into the whole file; per-sample chunks travel still compressed."""
    if source.ndim > 1 and source.chunks == target.chunks and source.compression == target.compression:
        for i in range(stop - start):
            mask, chunk = source.id.read_direct_chunk((i,) + (0,) * (source.ndim - 1))
            target.id.write_direct_chunk((start + i,) + (0,) * (source.ndim - 1), chunk, mask)
    else:
        target[start:stop] = source[()]


# input datasets, reading and editing results, and what guards outputs live beside the writer;
# they import what is above
from camexport.store.inputs import InputData, write_input
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
