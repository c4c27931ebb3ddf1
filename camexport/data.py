"""Real photos that ship inside installed packages (nothing is downloaded).

- scikit-image: ``chelsea`` (a tabby cat, ImageNet 281), ``coffee`` (a cup, 967 espresso),
  ``astronaut``;
- foolbox 3.3.4 (installed without its dependencies): 20 ImageNet validation photos named
  ``imagenet_<k>_<label>.jpg``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camexport.errors import CamexportError


@dataclass
class Photo:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    label: int | None


def skimage_photos() -> list[Photo]:
    from skimage import data

    return [Photo("chelsea", data.chelsea(), 281), Photo("coffee", data.coffee(), 967),
            Photo("astronaut", data.astronaut(), None)]


def foolbox_files() -> list[Path]:
    """foolbox's labelled ImageNet photos (found without importing foolbox)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted((Path(next(iter(spec.submodule_search_locations))) / "data").glob("imagenet_*"))


def foolbox_photos() -> list[Photo]:
    from PIL import Image

    photos = []
    for path in foolbox_files():
        label = int(path.stem.rsplit("_", 1)[1])
        photos.append(Photo(path.stem, np.asarray(Image.open(path).convert("RGB")), label))
    return photos


def sample_photos() -> list[Photo]:
    """Every packaged photo: the scikit-image ones first, then foolbox's."""
    return skimage_photos() + foolbox_photos()


def preprocess(image: np.ndarray, size, mean, std) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, h, w) float32: bilinear resize, /255, (x - mean) / std."""
    import cv2

    height, width = size
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    x = resized.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageError(CamexportError, ValueError):
    """An image file that cannot be read, or a folder with none."""


def image_paths(spec: str | Path) -> list[Path]:
    """The image files of a folder (sorted, recursive) or of a glob pattern."""
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        import glob

        found = sorted(Path(p) for p in glob.glob(str(spec), recursive=True)
                       if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ImageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {spec}; give a folder or a "
                         f"glob such as 'photos/*.jpg'")
    return found


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, or ImageError naming it."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(f"cannot read {path} as an image; remove it or pass --skip-unreadable")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def fit(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bilinear; area when shrinking), then a centred size x size crop."""
    import cv2

    height, width = image.shape[:2]
    scale = size / min(height, width)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, new, interpolation=interpolation)
    top, left = (new[1] - size) // 2, (new[0] - size) // 2
    return np.ascontiguousarray(resized[top:top + size, left:left + size])


def labels_from_names(paths: list[Path]) -> list[int]:
    """Labels written at the end of file names, ``<anything>_<label>.jpg`` (foolbox's style)."""
    labels = []
    for path in paths:
        tail = path.stem.rsplit("_", 1)[-1]
        labels.append(int(tail) if tail.isdigit() else -1)
    return labels


def read_labels(path: Path, paths: list[Path]) -> list[int]:
    """Labels from a CSV/TSV of ``file name,label`` lines (name or stem); -1 where absent."""
    import csv

    table = {}
    with open(path, newline="") as handle:
        sample = handle.read(2048)
        handle.seek(0)
        dialect = csv.Sniffer().sniff(sample, delimiters=",\t; ") if sample.strip() else csv.excel
        for row in csv.reader(handle, dialect):
            if len(row) >= 2 and row[1].strip().lstrip("-").isdigit():
                table[row[0].strip()] = int(row[1])
    if not table:
        raise ImageError(f"{path} holds no 'file name,label' lines")
    return [table.get(p.name, table.get(p.stem, -1)) for p in paths]


def pack(spec: str | Path, out: str | Path, size: int = 224, labels: str | Path | None = None,
         skip_unreadable: bool = False, progress=None, overwrite: bool = False) -> tuple[int, list[Path]]:
    """Image files into an input dataset (/images uint8 at size x size, /names, /labels).

    ``labels``: a CSV of ``file name,label`` lines, or ``names`` for labels at the end of the
    file names. An existing ``out`` is refused, unless ``overwrite`` and it is an input dataset
    made by pack; ``out`` is never one of the inputs, and one pack at a time writes it. Returns
    the count and the files skipped as unreadable."""
    from camexport.store import PACKED, OutputLock, StoreError, existing_kind, refuse_foreign, refuse_inputs

    paths = image_paths(spec)
    out = Path(out)
    inputs = [("input image", path) for path in paths]
    inputs.append(("--labels file", None if labels in (None, "names") else labels))
    refuse_inputs([(out, "--out"), (out.with_name(out.name + ".lock"), "--out (its lock file)")], inputs)
    with OutputLock(out, "pack"):
        kind = existing_kind(out)
        refuse_foreign(out, kind, PACKED, "pack")
        if kind is not None and not overwrite:
            raise StoreError(f"--out {out} exists ({kind}); pass --overwrite to replace it, or "
                             f"choose another --out")
        return _pack(paths, spec, out, size, labels, skip_unreadable, progress)


def _pack(paths: list[Path], spec, out: Path, size: int, labels, skip_unreadable: bool,
          progress) -> tuple[int, list[Path]]:
    from camexport.store import write_input

    if labels is None:
        values = [-1] * len(paths)
    elif str(labels) == "names":
        values = labels_from_names(paths)
    else:
        values = read_labels(Path(labels), paths)
    skipped = []

    def items():
        for i, (path, label) in enumerate(zip(paths, values)):
            try:
                image = read_image(path)
            except ImageError:
                if not skip_unreadable:
                    raise
                skipped.append(path)
                continue
            if progress:
                progress(i + 1, len(paths))
            yield path.name, fit(image, size), label

    count = write_input(out, items(), (size, size))
    if count == 0:
        raise ImageError(f"none of the {len(paths)} files in {spec} could be read as an image")
    return count, skipped


def write_samples(folder: str | Path) -> list[Path]:
    """The packaged photos as files ``<name>_<label>.png`` (``pack --labels names`` reads the
    label back; unlabelled photos get no suffix), and ``imagenet_classes.txt`` beside them."""
    import cv2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for photo in sample_photos():
        name = photo.name.rsplit("_", 1)[0] if photo.name.startswith("imagenet_") else photo.name
        stem = name if photo.label is None else f"{name}_{photo.label}"
        path = folder / f"{stem}.png"
        cv2.imwrite(str(path), cv2.cvtColor(photo.image, cv2.COLOR_RGB2BGR))
        written.append(path)
    classes = imagenet_classes()
    if classes:
        (folder.parent / "imagenet_classes.txt").write_text("\n".join(classes) + "\n")
    return written


def imagenet_classes() -> list[str]:
    """ImageNet class names in index order, from torchvision's weight metadata (no download)."""
    try:
        from torchvision.models import ResNet50_Weights
    except ImportError:
        return []
    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
