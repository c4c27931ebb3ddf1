"""Object annotations of input datasets: read from COCO, Pascal VOC or label PNGs, placed where
``camexport pack`` puts the image, and read back at a CAM's size.

Sources (``camexport pack IMAGES --out X.h5 --annotations SOURCE``):

- **COCO instances JSON** (a ``.json`` file): ``images`` are matched to the packed files by the
  base name of ``file_name``; each annotation's ``bbox`` (x, y, w, h) becomes x1 y1 x2 y2 = x, y,
  x + w, y + h; its ``segmentation`` (polygons, or RLE compressed or not) is decoded by
  pycocotools at the image's size. ``iscrowd`` annotations are kept as ordinary objects: a crowd
  of cats is still where the cats are. An annotation without ``bbox`` takes its box from its
  mask.
- **Pascal VOC XML** (one ``.xml`` file, or a folder of them, one per image, matched by
  ``<filename>``): every ``<object>``'s ``<name>`` and ``<bndbox>``. VOC counts pixels from 1
  and its xmax, ymax are the last pixel inside (inclusive), so x1 y1 x2 y2 = xmin − 1, ymin − 1,
  xmax, ymax in continuous edges (detectron2 reads VOC the same way). ``difficult`` and
  ``truncated`` objects are kept.
- **Label PNGs** (a folder of ``.png``, one per image, matched by the file stem; VOC's
  SegmentationClass style, palette or grey): each pixel holds a class value, 0 background and
  255 void; every other value present becomes one object whose mask is its pixels and whose box
  is the mask's extent (a segmentation dataset: masks only).

Conventions: boxes are x1 y1 x2 y2 in continuous pixel edges (an integer box covers columns x1 …
x2 − 1, COCO's convention; :mod:`camexport.localisation` reads them so). Each box and mask goes
through exactly the geometry of :func:`camexport.data.fit` (shorter side to SIZE, centred crop):
boxes scaled and shifted, then clipped to the image; masks resized nearest-neighbour (pixel
centres, ``cv2.INTER_NEAREST_EXACT``) and cropped. An object whose box loses all its area to the
crop (or whose mask loses every pixel, for a box taken from its mask) is left out, and one warning
line counts them. When any object of the source has a mask, every object gets one: an object
without a segmentation gets its box's pixels (those whose centre lies in the box).

Class labels are the model's class indices (an ImageNet model's "tabby" is 281). A mapping file
(``--annotation-classes MAP.json``) is a JSON object from a category's name (or COCO id, or label
PNG value, written as a string) to a class index, or to ``null`` to leave that category out;
``"*"`` gives the value of every category not named (``"*": null`` keeps only the named ones).
Without a mapping COCO's ``category_id`` and a PNG's values are used as they are, and VOC's
names are refused (a name is no class index). Every category an object uses must be mapped.

Images without annotations get no boxes (count 0); objects of images that were not packed are
reported in one warning line (how many images, the first name).

The stored layout (/boxes, /box_count, /box_labels, /masks) is drawn in :mod:`camexport.store`;
:func:`read_annotations` reads it back as :class:`~camexport.localisation.Annotations`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import h5py
import numpy as np

from camexport.data import fit_placement, letterbox_placement
from camexport.errors import CamexportError
from camexport.localisation import Annotations

log = logging.getLogger(__name__)

#: Label PNG values that are no object: background, and VOC's void (object borders, don't care).
BACKGROUND, VOID = 0, 255
SOURCES = ("a COCO instances .json, a Pascal VOC .xml (or a folder of them) or a folder of label "
           ".png masks")
MAPPING = ("a JSON object from category name (or id) to the model's class index, e.g. "
           '{"cat": 281, "dog": null}')


class AnnotationError(CamexportError, ValueError):
    """An annotation source or class mapping that cannot be used, with what to do about it."""


@dataclass
class _Object:
    box: np.ndarray  # (4,) float64 x1 y1 x2 y2 in source pixels; NaN: the mask's extent
    label: int
    shape: object = None  # a COCO segmentation, a (H, W) bool mask, or None


@dataclass
class AnnotationSet:
    """The objects of a source by image (base name, or stem for label PNGs), before placing;
    ``masks``: whether the source has any mask (then every placed object carries one)."""

    source: Path
    images: dict[str, list[_Object] | Path]  # a label PNG's path is read when its image comes
    masks: bool
    by_stem: bool = False
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # declared (H, W)
    mapping: _Mapping | None = None  # label PNGs' values, mapped when their image comes
    dropped: int = 0

    def key(self, name: str) -> str:
        return Path(name).stem if self.by_stem else Path(name).name

    def place(self, name: str, shape: tuple[int, int], size: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The objects of image ``name`` (source ``shape`` H, W) after :func:`fit` to ``size``:
        boxes (k, 4) float32, labels (k,) int64, masks (k, size, size) bool (None without
        masks). Objects that lose all their area are left out (counted in ``dropped``)."""
        objects = self.images.get(self.key(name), [])
        declared = self.sizes.get(self.key(name))
        if declared and tuple(declared) != tuple(shape):
            raise AnnotationError(f"{self.source} says {name} is {declared[1]}x{declared[0]} pixels, but "
                                  f"the image is {shape[1]}x{shape[0]}: the annotations belong to "
                                  f"another version of the image; pack the images they were made on")
        if isinstance(objects, Path):
            objects = _label_png_objects(objects, shape, name, self.mapping)
        new_w, new_h, left, top = fit_placement(shape, size)
        boxes = np.array([o.box for o in objects], np.float64).reshape(-1, 4)
        scale = np.array([new_w / shape[1], new_h / shape[0]] * 2)
        boxes = np.clip(boxes * scale - [left, top, left, top], 0, size)
        masks = None
        if self.masks:
            masks = np.zeros((len(objects), size, size), bool)
            for i, obj in enumerate(objects):
                if obj.shape is None:
                    masks[i] = _box_pixels(boxes[i], size)
                else:
                    source = _decode(obj.shape, shape, name, self.source)
                    masks[i] = _resize_nearest(source, (new_w, new_h))[top:top + size, left:left + size]
            for i in np.flatnonzero(np.isnan(boxes[:, 0])):  # no bbox: the mask's extent
                boxes[i] = _extent(masks[i])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        self.dropped += int((~keep).sum())
        labels = np.array([o.label for o in objects], np.int64)
        return (boxes[keep].astype(np.float32), labels[keep],
                None if masks is None else masks[keep])

    def report(self, packed: list[str]) -> None:
        """One warning line for the objects left out: of images not packed, cut off by the crop."""
        packed_keys = {self.key(name) for name in packed}
        missing = [key for key, objects in self.images.items() if objects and key not in packed_keys]
        if missing:
            log.warning(f"{self.source}: {len(missing)} annotated images are not among the packed "
                        f"images (first: {missing[0]!r}); their annotations were not stored")
        if self.dropped:
            log.warning(f"{self.source}: {self.dropped} objects have no area left in the resized and "
                        f"cropped images (outside the crop, or empty to begin with) and were left out")


# ---------------------------------------------------------------------------------------------
# Reading sources


def read_source(source: str | Path, classes: str | Path | None = None) -> AnnotationSet:
    """An annotation source (see the module docstring) with its classes mapped, or an
    AnnotationError naming the problem and the fix."""
    source = Path(source)
    mapping = _Mapping(read_mapping(Path(classes)) if classes is not None else None, classes)
    if source.is_file():
        if source.suffix.lower() == ".xml":
            return read_voc([source], source, mapping)
        if source.suffix.lower() == ".json":
            return read_coco(source, mapping)
        raise AnnotationError(f"--annotations {source} is neither .json nor .xml; pass {SOURCES}")
    if source.is_dir():
        xml = sorted(source.glob("*.xml"))
        png = sorted(source.glob("*.png"))
        if xml and png:
            raise AnnotationError(f"--annotations {source} holds both VOC .xml files and .png masks; "
                                  f"pass a folder of one kind")
        if xml:
            return read_voc(xml, source, mapping)
        if png:
            return read_label_pngs(png, source, mapping)
        raise AnnotationError(f"--annotations {source} holds no .xml or .png files; pass {SOURCES}")
    raise AnnotationError(f"--annotations {source} does not exist; pass {SOURCES}")


def read_mapping(path: Path) -> dict[str, int | None]:
    """--annotation-classes FILE: {category name or id: class index or null}."""
    fix = f"pass {MAPPING}"
    if not path.is_file():
        raise AnnotationError(f"--annotation-classes {path} is no file; {fix}")
    try:
        mapping = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AnnotationError(f"--annotation-classes {path} is not JSON ({err}); {fix}") from err
    if not isinstance(mapping, dict):
        raise AnnotationError(f"--annotation-classes {path} holds a JSON {type(mapping).__name__}, not an "
                              f"object; {fix}")
    for key, value in mapping.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise AnnotationError(f"--annotation-classes {path} maps {key!r} to {value!r}; a class index is "
                                  f"a whole number ≥ 0 (null leaves the category out): {fix}")
    return mapping


class _Mapping:
    """Category -> class index through the mapping file, or the categories' own ids."""

    def __init__(self, mapping: dict[str, int | None] | None, path):
        self.mapping, self.path = mapping, path

    def __call__(self, keys: tuple, what: str, source: Path, own: int | None) -> int | None:
        """The class of a category known by ``keys`` (name, id); ``own``: its index when no
        mapping is given (None: refused)."""
        if self.mapping is None:
            if own is None:
                raise AnnotationError(f"{source}: {what} is a name, not a class index; pass "
                                      f"--annotation-classes MAP.json, {MAPPING}")
            return own
        for key in keys:
            if str(key) in self.mapping:
                return self.mapping[str(key)]
        if "*" in self.mapping:
            return self.mapping["*"]
        name = json.dumps(str(keys[0]))
        raise AnnotationError(f"{source}: {what} is not in --annotation-classes {self.path}: add "
                              f"{name}: <class index> (or {name}: null to leave it out, or \"*\": null "
                              f"for every category not named)")


def _number(value, what: str, source: Path) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise AnnotationError(f"{source}: {what} is {value!r}, not a number; fix the file")
    return number


def _box(x1: float, y1: float, x2: float, y2: float, what: str, source: Path) -> np.ndarray:
    if x2 < x1 or y2 < y1:
        raise AnnotationError(f"{source}: {what} has x2 < x1 or y2 < y1 (x1 y1 x2 y2 = {x1:g} {y1:g} "
                              f"{x2:g} {y2:g}); fix the box (a box's right and bottom edges come "
                              f"after its left and top)")
    return np.array([x1, y1, x2, y2], np.float64)


def read_coco(path: Path, classes: _Mapping) -> AnnotationSet:
    """A COCO instances JSON file (module docstring)."""
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AnnotationError(f"--annotations {path} is not JSON ({err}); pass a COCO instances file "
                              f"(.json)") from err
    if not isinstance(doc, dict) or not {"images", "annotations"} <= set(doc):
        has = sorted(doc) if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
        raise AnnotationError(f"--annotations {path} is not a COCO instances file: it has no \"images\" "
                              f"and \"annotations\" keys (it holds {has}); pass instances_*.json")
    names = {c.get("id"): c.get("name", str(c.get("id"))) for c in doc.get("categories") or []}
    files, images, sizes = {}, {}, {}
    for image in doc["images"]:
        if not isinstance(image, dict) or "file_name" not in image or "id" not in image:
            raise AnnotationError(f"{path}: an entry of \"images\" has no \"id\" or \"file_name\" "
                                  f"({image!r:.80}); fix the file")
        key = Path(str(image["file_name"])).name
        if key in images:
            raise AnnotationError(f"{path}: two images are named {key!r}; images are matched to the packed "
                                  f"files by base name, so pack and annotate them in separate datasets")
        files[image["id"]], images[key] = key, []
        if image.get("height") and image.get("width"):
            sizes[key] = (int(image["height"]), int(image["width"]))
    masks = False
    for i, ann in enumerate(doc["annotations"]):
        what = f"annotation {ann.get('id', f'#{i}')}" if isinstance(ann, dict) else f"annotation #{i}"
        if not isinstance(ann, dict) or ann.get("image_id") not in files:
            raise AnnotationError(f"{path}: {what} names image_id "
                                  f"{ann.get('image_id') if isinstance(ann, dict) else None!r}, which is not "
                                  f"in \"images\"; fix the file")
        category = ann.get("category_id")
        if names and category not in names:
            raise AnnotationError(f"{path}: {what} has category_id {category!r}, which is not in "
                                  f"\"categories\"; fix the file")
        own = category if isinstance(category, int) else None
        label = classes((names.get(category, category), category),
                        f"category {names.get(category, category)!r} (id {category})", path, own)
        if label is None:
            continue
        segmentation = ann.get("segmentation") or None
        bbox = ann.get("bbox")
        if bbox:
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise AnnotationError(f"{path}: {what} has bbox {bbox!r}; a COCO bbox is [x, y, width, "
                                      f"height]")
            x, y, w, h = (_number(v, f"{what}'s bbox", path) for v in bbox)
            box = _box(x, y, x + w, y + h, f"{what} (bbox [x, y, w, h] = {bbox})", path)
        elif segmentation is not None:
            box = np.full(4, np.nan)
        else:
            raise AnnotationError(f"{path}: {what} has neither a bbox nor a segmentation; fix the file")
        if segmentation is not None:
            _check_segmentation(segmentation, what, path)
            masks = True
        images[files[ann["image_id"]]].append(_Object(box, label, segmentation))
    return AnnotationSet(path, images, masks, sizes=sizes)


def _check_segmentation(segmentation, what: str, path: Path) -> None:
    """Polygons [[x, y, ...], ...] (≥ 3 points each) or RLE {"size": [h, w], "counts": ...}."""
    if isinstance(segmentation, list):
        if all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation):
            return
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, list)):
        size = segmentation.get("size")
        if isinstance(size, list) and len(size) == 2:
            return
    raise AnnotationError(f"{path}: {what} has a segmentation that is neither polygons ([[x1, y1, x2, y2, "
                          f"x3, y3, ...]], at least 3 points each) nor RLE ({{\"size\": [h, w], \"counts\": "
                          f"...}}); fix the file")


def read_voc(files: list[Path], source: Path, classes: _Mapping) -> AnnotationSet:
    """Pascal VOC XML files, one per image (module docstring)."""
    images, sizes = {}, {}
    for path in files:
        try:
            root = ElementTree.parse(path).getroot()
        except (ElementTree.ParseError, UnicodeDecodeError) as err:
            raise AnnotationError(f"{path} is not XML ({err}); pass Pascal VOC annotation files") from err
        if root.tag != "annotation" or not (root.findtext("filename") or "").strip():
            raise AnnotationError(f"{path} is not Pascal VOC XML: it needs an <annotation> root with a "
                                  f"<filename> (it has <{root.tag}>); pass VOC's Annotations/*.xml")
        key = Path(root.findtext("filename").strip()).name
        if key in images:
            raise AnnotationError(f"{path} and another file both annotate {key!r}; keep one file per image")
        width, height = (root.findtext(f"size/{side}") for side in ("width", "height"))
        if width and height:  # VOC writes 0 0 for an unknown size
            width, height = (int(_number(v, "<size>", path)) for v in (width, height))
            if width > 0 and height > 0:
                sizes[key] = (height, width)
        objects = []
        for i, obj in enumerate(root.findall("object")):
            name = (obj.findtext("name") or "").strip()
            what = f"object {i + 1} ({name or 'no <name>'})"
            if not name or obj.find("bndbox") is None:
                raise AnnotationError(f"{path}: {what} has no <name> or no <bndbox>; fix the file")
            xmin, ymin, xmax, ymax = (_number(obj.findtext(f"bndbox/{edge}"), f"{what}'s <{edge}>", path)
                                      for edge in ("xmin", "ymin", "xmax", "ymax"))
            box = _box(xmin, ymin, xmax, ymax, f"{what} (<bndbox> as x1 y1 x2 y2)", path) - [1, 1, 0, 0]
            label = classes((name,), f"class {name!r}", path, None)
            if label is not None:
                objects.append(_Object(box, label))
        images[key] = objects
    return AnnotationSet(source, images, masks=False, sizes=sizes)


def read_label_pngs(files: list[Path], source: Path, classes: _Mapping) -> AnnotationSet:
    """A folder of label PNGs, one per image (module docstring); read when their image comes."""
    return AnnotationSet(source, {path.stem: path for path in files}, masks=True, by_stem=True,
                         mapping=classes)


def _label_png_objects(path: Path, shape: tuple[int, int], name: str, classes: _Mapping
                       ) -> list[_Object]:
    from PIL import Image

    try:
        with Image.open(path) as png:
            values = np.asarray(png if png.mode in ("P", "L") else png.convert("L"))
    except OSError as err:
        raise AnnotationError(f"cannot read the label PNG {path} ({err}); fix or remove it") from err
    if values.shape != tuple(shape):
        raise AnnotationError(f"label PNG {path} is {values.shape[1]}x{values.shape[0]} pixels but the image "
                              f"{name} is {shape[1]}x{shape[0]}: a label PNG has the size of its image")
    objects = []
    for value in np.unique(values).tolist():
        if value in (BACKGROUND, VOID):
            continue
        label = classes((value,), f"label value {value}", path, value)
        if label is not None:
            objects.append(_Object(np.full(4, np.nan), label, values == value))
    return objects


def _decode(shape, image_shape: tuple[int, int], name: str, source: Path) -> np.ndarray:
    """(H, W) bool of a COCO segmentation (pycocotools) or a mask as it is."""
    if isinstance(shape, np.ndarray):
        return shape
    from pycocotools import mask as coco_mask

    height, width = image_shape
    if isinstance(shape, list):
        rle = coco_mask.merge(coco_mask.frPyObjects([[float(v) for v in p] for p in shape], height, width))
    else:
        if [int(v) for v in shape["size"]] != [height, width]:
            raise AnnotationError(f"{source}: an RLE segmentation of {name} has size {shape['size']} (h, w) "
                                  f"but the image is {height}x{width} (h x w); fix the file")
        counts = shape["counts"]
        rle = (coco_mask.frPyObjects(shape, height, width) if isinstance(counts, list)
               else {"size": [height, width], "counts": counts.encode()})
    return np.ascontiguousarray(coco_mask.decode(rle), dtype=bool)  # pycocotools' is Fortran-ordered


def _resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool -> (h, w) bool, nearest pixel centre; ``size`` (w, h) as OpenCV's."""
    import cv2

    if mask.shape[::-1] == tuple(size):
        return mask
    return cv2.resize(mask.view(np.uint8), size, interpolation=cv2.INTER_NEAREST_EXACT).view(bool)


def _box_pixels(box: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: the pixels whose centre lies in ``box`` (localisation's convention)."""
    centres = np.arange(size) + 0.5
    rows = (box[1] <= centres) & (centres <= box[3])
    cols = (box[0] <= centres) & (centres <= box[2])
    return rows[:, None] & cols[None, :]


def _extent(mask: np.ndarray) -> np.ndarray:
    """x1 y1 x2 y2 (continuous edges) of a mask's pixels; an empty box (0 0 0 0) for none."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return np.zeros(4)
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)


# ---------------------------------------------------------------------------------------------
# Reading an input dataset's annotations at the CAM's size


def read_annotations(h5: h5py.File, rows: slice | np.ndarray, size: tuple[int, int], *,
                     resize: str = "stretch", targets: np.ndarray | None = None) -> Annotations | None:
    """The annotations of input dataset rows ``rows`` at ``size`` (h, w), the CAM's resolution;
    None when the dataset has no /boxes.

    Boxes go through the map that takes a stored image to the model's input (``resize`` as the
    artifact's preprocessing, :func:`camexport.data.preprocess`): "stretch" scales x by w / W and
    y by h / H; "letterbox" scales both to fit and adds the padding's left and top. Padding past
    a sample's count holds zeros in ``boxes`` and -1 in ``labels``.

    ``masks`` is what :class:`Annotations` asks for, each sample's pixels of its target class:
    with ``targets`` (one class per row) and /masks in the file, the union of the masks of the
    row's boxes of class ``targets[i]``, resized nearest-neighbour (pixel centres) and padded
    with False for "letterbox"; None otherwise (the metrics then use the target's boxes), so
    that no caller scores a class against another class's pixels."""
    if "boxes" not in h5:
        return None
    images = h5["images"]
    stored = images.shape[1:3] if images.dtype == np.uint8 else images.shape[-2:]
    if isinstance(rows, slice):
        index = np.arange(len(images))[rows]

        def take(name: str) -> np.ndarray:
            return h5[name][rows]
    else:
        index = np.asarray(rows)
        index = np.flatnonzero(index) if index.dtype == bool else index.astype(np.int64)
        unique, inverse = np.unique(index, return_inverse=True)  # h5py reads increasing rows

        def take(name: str) -> np.ndarray:
            dataset = h5[name]
            if not len(unique):
                return np.zeros((0, *dataset.shape[1:]), dataset.dtype)
            return dataset[unique.tolist()][inverse]
    boxes = take("boxes").astype(np.float64)
    counts = take("box_count").astype(np.int64)
    labels = take("box_labels").astype(np.int64)
    real = np.arange(boxes.shape[1]) < counts[:, None]
    boxes[~real] = 0
    labels[~real] = -1
    height, width = size
    if resize == "stretch":
        new_w, new_h, left, top = width, height, 0, 0
    elif resize == "letterbox":
        new_w, new_h, left, top = letterbox_placement(stored, size)
    else:
        raise AnnotationError(f"unknown resize mode {resize!r}; camexport knows 'stretch' and 'letterbox'")
    scale = np.array([new_w / stored[1], new_h / stored[0]] * 2)
    boxes[real] = boxes[real] * scale + [left, top, left, top]
    masks = None
    if "masks" in h5 and targets is not None:
        if np.shape(targets) != (len(counts),):
            raise AnnotationError(f"targets must give one class per row ({len(counts)}), got shape "
                                  f"{np.shape(targets)}")
        chosen = real & (labels == np.asarray(targets)[:, None])
        masks = np.zeros((len(index), height, width), bool)
        for i, row in enumerate(index.tolist()):  # only the chosen masks of a row are read
            slots = np.flatnonzero(chosen[i]).tolist()
            if slots:
                union = h5["masks"][row, slots].any(axis=0)
                masks[i, top:top + new_h, left:left + new_w] = _resize_nearest(union, (new_w, new_h))
    return Annotations(boxes, labels, counts, masks)
