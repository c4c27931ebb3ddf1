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


def preprocess(image: np.ndarray, size, mean, std, resize: str = "stretch",
               pad_value: int = 114) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, h, w) float32: bilinear resize (``resize`` "letterbox": keep
    the aspect and pad with ``pad_value``, :func:`letterbox`), /255, (x - mean) / std. A
    manifest's preprocessing gives every argument (:func:`preprocess_args`)."""
    import cv2

    height, width = size
    if resize == "letterbox":
        resized = letterbox(image, size, pad_value)
    elif resize == "stretch":
        resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    else:
        raise ImageError(f"unknown resize mode {resize!r} in the artifact's preprocessing; "
                         f"camexport knows 'stretch' and 'letterbox'")
    x = resized.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_args(preprocessing: dict) -> dict:
    """The keyword arguments of :func:`preprocess` that a manifest's ``preprocessing`` gives
    (``resize`` is absent from artifacts made before letterboxing existed: "stretch")."""
    return {"size": preprocessing["size"], "mean": preprocessing["mean"], "std": preprocessing["std"],
            "resize": preprocessing.get("resize", "stretch"),
            "pad_value": preprocessing.get("pad_value", 114)}


def letterbox(image: np.ndarray, size, pad_value: int = 114) -> np.ndarray:
    """(H, W, C) -> (h, w, C) as Ultralytics' LetterBox (auto False, scaleup True, centred):
    scale r = min(h / H, w / W), bilinear resize to (round(W r), round(H r)) (at least 1),
    the rest padded with ``pad_value``, split round(d / 2 -+ 0.1) top/bottom and left/right."""
    import cv2

    new_w, new_h, left, top = letterbox_placement(image.shape[:2], size)
    right, bottom = size[1] - new_w - left, size[0] - new_h - top
    if (image.shape[1], image.shape[0]) != (new_w, new_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = np.full((new_h + top + bottom, new_w + left + right, image.shape[2]), pad_value, image.dtype)
    out[top:top + new_h, left:left + new_w] = image
    return out


def letterbox_placement(shape, size) -> tuple[int, int, int, int]:
    """Where :func:`letterbox` puts an image of ``shape`` (H, W) in ``size`` (h, w): the resized
    width and height and the left and top padding, (new_w, new_h, left, top); a point x, y of
    the image lands at x · new_w / W + left, y · new_h / H + top."""
    height, width = size
    ratio = min(height / shape[0], width / shape[1])
    new_w, new_h = max(round(shape[1] * ratio), 1), max(round(shape[0] * ratio), 1)
    return new_w, new_h, round((width - new_w) / 2 - 0.1), round((height - new_h) / 2 - 0.1)


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

    new_w, new_h, left, top = fit_placement(image.shape[:2], size)
    interpolation = cv2.INTER_AREA if size < min(image.shape[:2]) else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    return np.ascontiguousarray(resized[top:top + size, left:left + size])


def fit_placement(shape, size: int) -> tuple[int, int, int, int]:
    """What :func:`fit` does to an image of ``shape`` (H, W): the resized width and height and
    the left and top of the crop, (new_w, new_h, left, top); a point x, y of the image (pixel
    edges, continuous) lands at x · new_w / W − left, y · new_h / H − top."""
    height, width = shape
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    return new_w, new_h, (new_w - size) // 2, (new_h - size) // 2


def labels_from_names(paths: list[Path]) -> list[int]:
    """Labels written at the end of file names, ``<anything>_<label>.jpg`` (foolbox's style)."""
    labels = []
    for path in paths:
        tail = path.stem.rsplit("_", 1)[-1]
        labels.append(int(tail) if tail.isdigit() else -1)
    return labels


LABELS_FORMAT = "a CSV of 'file name,label' lines (img0.png,281; a header line is allowed)"


def _label(text: str) -> int | None:
    """A label cell as a class index: an integer, or a whole float ('281.0'); None otherwise."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_labels_file(path: Path) -> None:
    """--labels FILE: an existing file, or an ImageError naming the fix."""
    if path.is_dir():
        raise ImageError(f"--labels {path} is a directory; pass {LABELS_FORMAT}, or --labels names")
    if not path.is_file():
        raise ImageError(f"--labels {path} does not exist; pass {LABELS_FORMAT}, or --labels names "
                         f"for labels at the end of file names (x_281.jpg)")


def read_labels(path: Path, paths: list[Path]) -> list[int]:
    """Labels from a CSV/TSV of ``file name,label`` lines (name or stem); -1 where absent. An
    ImageError when a label is no class index (the first line may be a header), or when the
    file names none of the images."""
    import csv

    check_labels_file(path)
    table = {}
    with open(path, newline="") as handle:
        sample = handle.read(2048)
        handle.seek(0)
        dialect = csv.Sniffer().sniff(sample, delimiters=",\t; ") if sample.strip() else csv.excel
        for line, row in enumerate(csv.reader(handle, dialect), 1):
            if len(row) < 2 or not "".join(row).strip():
                continue
            label = _label(row[1])
            if label is None and not (line == 1 and not _is_number(row[1])):  # not a header line
                raise ImageError(f"{path}, line {line}: label {row[1].strip()!r} is not a class index; "
                                 f"labels are whole numbers (-1: unknown) in {LABELS_FORMAT}")
            if label is not None:
                table[row[0].strip()] = label
    if not table:
        raise ImageError(f"{path} holds no 'file name,label' lines; pass {LABELS_FORMAT}")
    labels = [table.get(p.name, table.get(p.stem, -1)) for p in paths]
    if all(label == -1 for label in labels):
        raise ImageError(f"{path} names none of the {len(paths)} images (it names {next(iter(table))!r}, "
                         f"...; the images are {paths[0].name!r}, ...): the first column must be each "
                         f"image's file name ({paths[0].name}) or stem ({paths[0].stem})")
    return labels


def pack(spec: str | Path, out: str | Path, size: int = 224, labels: str | Path | None = None,
         skip_unreadable: bool = False, progress=None, overwrite: bool = False,
         annotations: str | Path | None = None, annotation_classes: str | Path | None = None
         ) -> tuple[int, list[Path]]:
    """Image files into an input dataset (/images uint8 at size x size, /names, /labels).

    ``labels``: a CSV of ``file name,label`` lines, or ``names`` for labels at the end of the
    file names. ``annotations``: a COCO instances JSON, Pascal VOC XML (a file or a folder) or a
    folder of label PNGs, stored as /boxes, /box_count, /box_labels (and /masks) after the same
    resize and crop as the images; ``annotation_classes``: a JSON mapping from category to the
    model's class index (:mod:`camexport.annotations`). An existing ``out`` is refused, unless
    ``overwrite`` and it is an input dataset made by pack; ``out`` is never one of the inputs,
    and one pack at a time writes it. Returns the count and the files skipped as unreadable."""
    from camexport.store import PACKED, OutputLock, StoreError, existing_kind, refuse_foreign, refuse_inputs

    if size < 1:
        raise ImageError(f"--size must be a positive number of pixels, not {size}: pass the side the "
                         f"images are cut to, e.g. --size 224 (the artifact's input size)")
    if labels not in (None, "names"):
        check_labels_file(Path(labels))
    paths = image_paths(spec)
    out = Path(out)
    inputs = [("input image", path) for path in paths]
    inputs.append(("--labels file", None if labels in (None, "names") else labels))
    inputs += [("--annotations file", annotations), ("--annotation-classes file", annotation_classes)]
    if annotations is not None and Path(annotations).is_dir():
        inputs += [("--annotations file", path) for path in Path(annotations).iterdir()]
    refuse_inputs([(out, "--out"), (out.with_name(out.name + ".lock"), "--out (its lock file)")], inputs)
    found = None
    if annotations is not None:
        from camexport.annotations import read_source

        found = read_source(annotations, annotation_classes)
    elif annotation_classes is not None:
        raise ImageError("--annotation-classes maps the classes of --annotations: pass --annotations "
                         "FILE too, or leave --annotation-classes out")
    with OutputLock(out, "pack"):
        kind = existing_kind(out)
        refuse_foreign(out, kind, PACKED, "pack")
        if kind is not None and not overwrite:
            raise StoreError(f"--out {out} exists ({kind}); pass --overwrite to replace it, or "
                             f"choose another --out")
        return _pack(paths, spec, out, size, labels, skip_unreadable, progress, found)


def _pack(paths: list[Path], spec, out: Path, size: int, labels, skip_unreadable: bool,
          progress, found=None) -> tuple[int, list[Path]]:
    from camexport.store import write_input

    if labels is None:
        values = [-1] * len(paths)
    elif str(labels) == "names":
        values = labels_from_names(paths)
    else:
        values = read_labels(Path(labels), paths)
    skipped, packed = [], []

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
            packed.append(path.name)
            if found is None:
                yield path.name, fit(image, size), label
            else:
                yield path.name, fit(image, size), label, found.place(path.name, image.shape[:2], size)

    kind = None if found is None else "masks" if found.masks else "boxes"
    count = write_input(out, items(), (size, size), annotations=kind)
    if count == 0:
        raise ImageError(f"none of the {len(paths)} files in {spec} could be read as an image")
    if found is not None:
        found.report(packed)
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
