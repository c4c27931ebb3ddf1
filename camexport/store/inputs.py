"""Input datasets: the reader with its checks (``/images``, ``/labels``) and ``camexport pack``'s
writer. The layout is drawn in :mod:`camexport.store`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from camexport import __version__
from camexport.store import INPUT_KIND, KIND_ATTR, VECTOR_CHUNK, StoreError, _string_array, _written


def _check_images(path: Path, handle: h5py.File, made: str) -> bool:
    """Whether ``handle``'s /images is preprocessed float32 (False: uint8 RGB), or a StoreError
    (read while the file is open)."""
    expected = ("(N, H, W, 3) uint8 RGB or (N, 3, H, W) float32 already preprocessed ((N, 3, D, H, W) "
                "for 3-D models)")
    if "images" not in handle:
        raise StoreError(f"{path} has no /images dataset (it holds {sorted(handle) or 'nothing'}); an "
                         f"input dataset holds /images {expected}: {made}")
    images = handle["images"]
    if not isinstance(images, h5py.Dataset):
        raise StoreError(f"{path}:/images is an HDF5 group, not a dataset; store the images as one "
                         f"array /images {expected}: {made}")
    dtype, shape = images.dtype, images.shape
    if dtype == np.uint8 and len(shape) == 4 and shape[3] == 3:
        preprocessed = False
    elif dtype == np.float32 and len(shape) in (4, 5) and shape[1] == 3:
        preprocessed = True
    else:
        convert = ""
        if len(shape) >= 4 and dtype != np.uint8 and shape[-1] == 3:
            convert = " (for 0-255 pixels: images.astype(numpy.uint8))"
        elif len(shape) >= 4 and dtype != np.float32 and shape[1] == 3:
            convert = " (images.astype(numpy.float32))"
        raise StoreError(f"{path}:/images is {dtype} of shape {shape}; expected {expected}: convert "
                         f"it{convert}, or {made}")
    if shape[0] == 0:
        raise StoreError(f"{path}:/images holds no images (shape {shape}); {made} from a folder "
                         f"of images")
    return preprocessed


def _check_labels(path: Path, handle: h5py.File, count: int) -> None:
    """/labels, if there: one integer class index per image (-1: unknown), or a StoreError."""
    if "labels" not in handle:
        return
    labels = handle["labels"]
    fix = "store one integer class index per image in /labels (-1: unknown), or remove /labels"
    if not isinstance(labels, h5py.Dataset) or labels.shape != (count,):
        shape = labels.shape if isinstance(labels, h5py.Dataset) else "a group"
        raise StoreError(f"{path}:/labels has shape {shape}, but /images holds {count} images: {fix}")
    if labels.dtype.kind not in "iuf":
        raise StoreError(f"{path}:/labels holds {labels.dtype} values, not class indices: {fix}")
    values = labels[()]
    if labels.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if len(bad):
            raise StoreError(f"{path}:/labels holds {len(bad)} values that are not whole numbers "
                             f"(first: sample {bad[0]}, {values[bad[0]].item()!r}), and a label is a class "
                             f"index: {fix}")
    bad = np.flatnonzero(values < -1)
    if len(bad):
        raise StoreError(f"{path}:/labels holds {len(bad)} negative labels other than -1 (first: "
                         f"sample {bad[0]}, {values[bad[0]].item()!r}): {fix}")


@dataclass
class InputData:
    """An open input dataset; ``images(start, stop)`` reads a slice."""

    path: Path
    handle: h5py.File
    preprocessed: bool

    @classmethod
    def open(cls, path: str | Path) -> InputData:
        """The input dataset ``path``, its /images and /labels checked (a StoreError naming the
        problem and the fix otherwise), before any work."""
        path = Path(path)
        made = "`camexport pack IMAGES_DIR --out data.h5` makes one"
        if path.is_dir():
            raise StoreError(f"input dataset {path} is a directory, not an HDF5 file: pass the .h5 "
                             f"file itself; `camexport pack {path} --out data.h5` makes one from a "
                             f"folder of images")
        if not path.is_file():
            raise StoreError(f"input dataset {path} does not exist; make one with "
                             f"`camexport pack IMAGES_DIR --out {path}`")
        try:
            handle = h5py.File(path, "r")
        except OSError as err:
            raise StoreError(f"{path} is not a readable HDF5 file ({err}); pass an input dataset "
                             f"(.h5 with /images): {made}") from err
        try:
            preprocessed = _check_images(path, handle, made)
            data = cls(path, handle, preprocessed)
            _check_labels(path, handle, len(data))
        except BaseException:
            handle.close()
            raise
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


class _NothingPacked(Exception):
    """No image came: the temporary file is dropped and an existing ``--out`` kept."""


def write_input(path: str | Path, images: Iterator[tuple], size: tuple[int, int],
                annotations: str | None = None) -> int:
    """An input dataset from (name, (H, W, 3) uint8 image, label) items, written atomically
    through the store's guarded writer: an error on the way (a full disk too) leaves no file and
    an existing one untouched. Returns the count; with no items nothing is written (0).

    ``annotations`` "boxes" or "masks": every item carries a fourth element, the image's objects
    (boxes (k, 4) float x1 y1 x2 y2, labels (k,) int, masks (k, H, W) bool or None), stored as
    /boxes, /box_count, /box_labels and, for "masks", /masks (the layout in camexport.store)."""
    path = Path(path)
    height, width = size
    names, labels = [], []
    guard = None
    try:
        with _written(path, "pack") as (h5, guard):
            stored = h5.create_dataset("images", (0, height, width, 3), np.uint8,
                                       maxshape=(None, height, width, 3),
                                       chunks=(1, height, width, 3), compression="gzip")
            objects = _ObjectWriter(h5, size, annotations == "masks") if annotations else None
            for name, image, label, *found in images:
                if guard.error is not None:
                    break
                guard.held.raise_pending()  # a Ctrl-C between two images, not inside HDF5
                stored.resize(len(names) + 1, axis=0)
                stored[len(names)] = image
                if objects is not None:
                    objects.add(len(names), *found[0])
                names.append(name)
                labels.append(label)
            if not names:
                raise _NothingPacked
            h5["names"] = _string_array(names)
            if any(label >= 0 for label in labels):
                h5["labels"] = np.asarray(labels, np.int64)
            h5.attrs[KIND_ATTR] = INPUT_KIND
            h5.attrs["camexport_version"] = __version__
    except _NothingPacked:
        return 0
    except OSError as err:
        if guard is None or guard.error is not err:
            raise
        raise StoreError(f"cannot write {path} after {len(names)} images ({err.strerror}); nothing was "
                         f"written and an existing file is unchanged: free space (or fix the disk) "
                         f"where {path.parent} is, then run the same pack again") from err
    return len(names)


#: Rows of /boxes and /box_labels per chunk (their depth D grows as images with more boxes come).
OBJECT_CHUNK = (256, 8)


class _ObjectWriter:
    """/boxes (N, D, 4) float32 NaN-padded, /box_count (N,) int32, /box_labels (N, D) int64
    -1-padded and optionally /masks (N, D, H, W) bool, one image at a time; D grows to the
    largest count (at least 1), the fill values pad what an image does not use."""

    def __init__(self, h5: h5py.File, size: tuple[int, int], masks: bool):
        self.depth = 1
        self.boxes = h5.create_dataset("boxes", (0, 1, 4), np.float32, maxshape=(None, None, 4),
                                       chunks=(*OBJECT_CHUNK, 4), fillvalue=np.nan, compression="gzip")
        self.labels = h5.create_dataset("box_labels", (0, 1), np.int64, maxshape=(None, None),
                                        chunks=OBJECT_CHUNK, fillvalue=-1, compression="gzip")
        self.count = h5.create_dataset("box_count", (0,), np.int32, maxshape=(None,),
                                       chunks=(VECTOR_CHUNK,), compression="gzip")
        self.masks = None
        if masks:
            self.masks = h5.create_dataset("masks", (0, 1, *size), bool, maxshape=(None, None, *size),
                                           chunks=(1, 1, *size), fillvalue=False, compression="gzip")

    def add(self, row: int, boxes: np.ndarray, labels: np.ndarray, masks: np.ndarray | None) -> None:
        k = len(boxes)
        if k > self.depth:
            self.depth = k
            for dataset in (self.boxes, self.labels, self.masks):
                if dataset is not None:
                    dataset.resize(k, axis=1)
        for dataset in (self.boxes, self.labels, self.count, self.masks):
            if dataset is not None:
                dataset.resize(row + 1, axis=0)
        self.count[row] = k
        if k:
            self.boxes[row, :k] = boxes
            self.labels[row, :k] = labels
            if self.masks is not None:
                self.masks[row, :k] = masks
