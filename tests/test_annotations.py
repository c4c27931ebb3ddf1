"""`camexport pack --annotations`: COCO, Pascal VOC and label PNGs for the packaged photos
(tests/data/annotations, boxes drawn by hand), placed by pack's resize and crop, stored in the
input layout and read back at another size; and the errors of bad sources."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from cli_helper import cli
from pycocotools import mask as coco_mask

from camexport.annotations import read_annotations

DATA = Path(__file__).parent / "data" / "annotations"
COCO, VOC, MASKS, CLASSES = DATA / "coco.json", DATA / "voc", DATA / "masks", DATA / "imagenet_classes.json"
SIZE = 64
#: packed in this order (sorted names); plain.png has no annotation anywhere
NAMES = ["astronaut.png", "chelsea_281.png", "coffee_967.png", "plain.png"]

# The hand-drawn boxes after fit(SIZE), computed by hand:
# astronaut 512 x 512: x 1/8, no crop; person 25 15 370 512
PERSON = [25 / 8, 15 / 8, 370 / 8, 64]
# chelsea 451 x 300: resized to 96 x 64 (x 96/451), crop columns 16..80; cat 20 0 375 300 loses
# its left part (x1 clipped to 0); the whiskers, 0 200 70 290, end at 14.9 < 16: dropped
CAT = [0, 0, 375 * 96 / 451 - 16, 64]
# coffee 600 x 400: x 0.16 to 96 x 64, crop columns 16..80; cup 172 18 425 310, spoon 325 65 425 325
CUP = [172 * 0.16 - 16, 18 * 0.16, 425 * 0.16 - 16, 310 * 0.16]
SPOON = [325 * 0.16 - 16, 65 * 0.16, 425 * 0.16 - 16, 325 * 0.16]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The three skimage photos under the names `camexport samples` gives them, and one image
    that no annotation names."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name, image in zip(NAMES, (data.astronaut(), data.chelsea(), data.coffee(),
                                   np.full((70, 80, 3), 128, np.uint8))):
        cv2.imwrite(str(folder / name), image[..., ::-1])
    return folder


@pytest.fixture(scope="module")
def coco_h5(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("coco") / "data.h5"
    cli("pack", photos, "--out", out, "--size", SIZE, "--annotations", COCO, "-q")
    return out


def _stored(path: Path) -> dict:
    with h5py.File(path, "r") as h5:
        return {name: h5[name][()] for name in ("boxes", "box_count", "box_labels", "masks") if name in h5}


def _assert_boxes(stored: dict, expected: list[list[list[float]]]) -> None:
    """Each image's real boxes equal the hand-computed ones (float32 storage)."""
    assert stored["box_count"].tolist() == [len(boxes) for boxes in expected]
    for got, boxes in zip(stored["boxes"], expected):
        np.testing.assert_allclose(got[:len(boxes)], np.reshape(boxes, (-1, 4)), rtol=0, atol=1e-5)


def _placed(mask: np.ndarray) -> np.ndarray:
    """A full-size mask through fit's geometry: nearest pixel centre to the resized size, crop."""
    height, width = mask.shape
    scale = SIZE / min(height, width)
    new_w, new_h = max(SIZE, round(width * scale)), max(SIZE, round(height * scale))
    resized = cv2.resize(mask.astype(np.uint8), (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT)
    top, left = (new_h - SIZE) // 2, (new_w - SIZE) // 2
    return resized[top:top + SIZE, left:left + SIZE].astype(bool)


def test_pack_coco_boxes_labels_and_masks(coco_h5):
    stored = _stored(coco_h5)
    with h5py.File(coco_h5, "r") as h5:
        assert h5["boxes"].dtype == np.float32 and h5["box_count"].dtype == np.int32
        assert h5["box_labels"].dtype == np.int64 and h5["masks"].dtype == bool
        assert h5["masks"].chunks == (1, 1, SIZE, SIZE) and h5["masks"].compression == "gzip"
    assert stored["boxes"].shape == (4, 2, 4) and stored["masks"].shape == (4, 2, SIZE, SIZE)
    _assert_boxes(stored, [[PERSON], [CAT], [CUP, SPOON], []])  # plain.png: no annotation
    assert stored["box_labels"].tolist() == [[1, -1], [17, -1], [47, 50], [-1, -1]]  # COCO ids
    padding = np.arange(2) >= stored["box_count"][:, None]
    assert np.isnan(stored["boxes"][padding]).all() and not stored["masks"][padding].any()

    doc = json.loads(COCO.read_text())
    segmentation = {ann["category_id"]: ann.get("segmentation") for ann in doc["annotations"]}
    cup = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(segmentation[47], 400, 600)))  # polygon
    spoon = coco_mask.decode(coco_mask.frPyObjects(segmentation[50], 400, 600))  # uncompressed RLE
    cat = coco_mask.decode(segmentation[17])  # compressed RLE
    for got, source in ((stored["masks"][2, 0], cup), (stored["masks"][2, 1], spoon),
                        (stored["masks"][1, 0], cat)):
        assert source.sum() > 1000 and np.array_equal(got, _placed(source))
    # the astronaut has a box only: its mask is the pixels whose centre lies in the box
    rows, cols = np.nonzero(stored["masks"][0, 0])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (2, 63, 3, 45)
    assert stored["masks"][0, 0].sum() == 62 * 43


class _Kept(logging.Handler):
    """The records of one logger (the suite runs with pytest's logging plugin off: no caplog)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_pack_coco_reports_what_it_leaves_out(photos, tmp_path):
    """The whiskers lose all area to the crop; the astronaut is not packed: one line each."""
    out = tmp_path / "two.h5"
    logger, kept = logging.getLogger("camexport.annotations"), _Kept()
    level = logger.level
    logger.addHandler(kept)
    logger.setLevel(logging.WARNING)
    try:
        cli("pack", str(photos / "c*.png"), "--out", out, "--size", SIZE, "--annotations", COCO, "-q")
    finally:
        logger.removeHandler(kept)
        logger.setLevel(level)
    lines = [r.getMessage() for r in kept.records]
    assert len(lines) == 2
    assert "1 annotated images are not among the packed images (first: 'astronaut.png')" in lines[0]
    assert "1 objects have no area left" in lines[1]
    assert _stored(out)["box_count"].tolist() == [1, 2]


def test_pack_voc_with_class_mapping(photos, tmp_path):
    """The same boxes in VOC's 1-based inclusive coordinates land on the same stored boxes; the
    mapping gives ImageNet classes and leaves the person out (null)."""
    out = tmp_path / "voc.h5"
    cli("pack", photos, "--out", out, "--size", SIZE, "--annotations", VOC, "--annotation-classes", CLASSES)
    stored = _stored(out)
    assert "masks" not in stored
    _assert_boxes(stored, [[], [CAT], [CUP, SPOON], []])
    assert stored["box_labels"].tolist() == [[-1, -1], [281, -1], [968, 910], [-1, -1]]

    single = tmp_path / "one.h5"  # one .xml file: the other images get no boxes
    cli("pack", photos, "--out", single, "--size", SIZE, "--annotations", VOC / "coffee_967.xml",
        "--annotation-classes", CLASSES, "-q")
    stored = _stored(single)
    assert stored["box_count"].tolist() == [0, 0, 2, 0] and stored["boxes"].shape == (4, 2, 4)


def test_masks_only_label_pngs(photos, tmp_path):
    """A segmentation dataset: each class value of the label PNG is one object, its box the
    extent of its mask after the crop; 0 and 255 (void) are no object."""
    classes = tmp_path / "voc_classes.json"
    classes.write_text(json.dumps({"8": 281}))
    out = tmp_path / "masks.h5"
    cli("pack", photos, "--out", out, "--size", SIZE, "--annotations", MASKS, "--annotation-classes", classes,
        "-q")
    stored = _stored(out)
    assert stored["box_count"].tolist() == [0, 1, 0, 0] and stored["box_labels"][1, 0] == 281
    values = cv2.imread(str(MASKS / "chelsea_281.png"), cv2.IMREAD_UNCHANGED)
    expected = _placed(values == 8)
    assert np.array_equal(stored["masks"][1, 0], expected)
    rows, cols = np.nonzero(expected)
    assert stored["boxes"][1, 0].tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_coco_segmentation_without_bbox(photos, tmp_path):
    """A COCO annotation with a segmentation and no bbox takes its box from its placed mask."""
    doc = json.loads(COCO.read_text())
    for ann in doc["annotations"]:
        if ann["category_id"] == 47:
            del ann["bbox"]
    source = tmp_path / "nobbox.json"
    source.write_text(json.dumps(doc))
    out = tmp_path / "nobbox.h5"
    cli("pack", str(photos / "coffee*.png"), "--out", out, "--size", SIZE, "--annotations", source, "-q")
    stored = _stored(out)
    rows, cols = np.nonzero(stored["masks"][0, 0])
    assert stored["boxes"][0, 0].tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    np.testing.assert_allclose(stored["boxes"][0, 1], SPOON, atol=1e-5)


def _nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask resized to ``size`` (w, h), nearest pixel centre."""
    return cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST_EXACT) > 0


def test_read_annotations_rescales(coco_h5):
    """Rows in any order, at another size: stretch scales x and y apart, letterbox fits and pads;
    masks (with targets only) are the union of the target class's masks, nearest-resized."""
    with h5py.File(coco_h5, "r") as h5:
        stored_masks = h5["masks"][()]
        got = read_annotations(h5, np.array([2, 0, 3]), (32, 48))
        assert got.counts.tolist() == [2, 1, 0] and got.labels.tolist() == [[47, 50], [1, -1], [-1, -1]]
        scale = np.array([48 / SIZE, 32 / SIZE] * 2)
        np.testing.assert_allclose(got.boxes[0], np.array([CUP, SPOON]) * scale, atol=1e-5)
        np.testing.assert_allclose(got.boxes[1, 0], np.array(PERSON) * scale, atol=1e-5)
        assert (got.boxes[1, 1] == 0).all() and (got.boxes[2] == 0).all()  # padding reads as zeros
        assert got.masks is None  # no targets: no class to take the pixels of

        spoon = read_annotations(h5, np.array([2, 1, 3]), (32, 48), targets=np.array([50, 5, 1]))
        assert spoon.masks.shape == (3, 32, 48) and not spoon.masks[1:].any()  # no box of the class
        assert np.array_equal(spoon.masks[0], _nearest(stored_masks[2, 1], (48, 32)))
        both = read_annotations(h5, slice(1, 2), (32, 32), targets=np.array([17]))
        assert np.array_equal(both.masks[0], _nearest(stored_masks[1, 0], (32, 32)))

        boxed = read_annotations(h5, slice(0, 1), (40, 80), resize="letterbox", targets=np.array([1]))
        np.testing.assert_allclose(boxed.boxes[0, 0], np.array(PERSON) * 40 / 64 + [20, 0, 20, 0], atol=1e-5)
        assert boxed.masks[0].any() and not boxed.masks[0, :, :20].any() and not boxed.masks[0, :, 60:].any()
        assert np.array_equal(boxed.masks[0, :, 20:60], _nearest(stored_masks[0, 0], (40, 40)))


def test_read_annotations_none_without_boxes(photos, tmp_path):
    out = tmp_path / "plain.h5"
    cli("pack", str(photos / "plain.png"), "--out", out, "--size", 16, "-q")
    with h5py.File(out, "r") as h5:
        assert read_annotations(h5, slice(None), (16, 16)) is None


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    if name.endswith("/"):
        path.mkdir()
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _voc(box: str, name: str = "cat") -> str:
    xmin, ymin, xmax, ymax = box.split()
    return (f"<annotation><filename>chelsea_281.png</filename><object><name>{name}</name><bndbox>"
            f"<xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>"
            f"</object></annotation>")


def _coco(**change) -> str:
    doc = json.loads(COCO.read_text())
    for key, value in change.items():
        if key == "size":
            doc["images"][0]["width"] = value
        else:
            doc["annotations"][0][key] = value
    return json.dumps(doc)


#: (file name, content, extra options, what the error says)
BAD = [
    ("a.json", "{oops", [], "is not JSON"),
    ("a.json", '{"info": {}}', [], 'no "images" and "annotations" keys'),
    ("a.xml", "<svg></svg>", [], "is not Pascal VOC XML"),
    ("a.xml", "<annotation", [], "is not XML"),
    ("a.txt", "x", [], "neither .json nor .xml"),
    ("empty/", "", [], "holds no .xml or .png files"),
    ("v/chelsea.xml", _voc("100 1 50 300"), ["--annotation-classes", CLASSES], "x2 < x1"),
    ("v/chelsea.xml", _voc("1 1 50 300"), [], "class 'cat' is a name, not a class index"),
    ("v/chelsea.xml", _voc("1 1 50 300", "dog"), ["--annotation-classes", CLASSES],
     "class 'dog' is not in --annotation-classes"),
    ("a.json", _coco(bbox=[20, 0, -5, 300]), [], "x2 < x1"),
    ("a.json", _coco(bbox=[20, 0, "wide", 300]), [], "not a number"),
    ("a.json", _coco(category_id=5), [], "category_id 5, which is not in \"categories\""),
    ("a.json", _coco(image_id=99), [], "names image_id 99"),
    ("a.json", _coco(segmentation={"size": [30, 40], "counts": "abc"}), [], "has size [30, 40]"),
    ("a.json", _coco(segmentation=[[1, 2, 3]]), [], "neither polygons"),
    ("a.json", _coco(size=640), [], "says chelsea_281.png is 640x300 pixels"),
]


@pytest.mark.parametrize("name, content, options, message", BAD, ids=[b[3] for b in BAD])
def test_bad_annotations_are_one_line_and_keep_the_output(photos, tmp_path, name, content, options, message):
    out = tmp_path / "data.h5"
    cli("pack", str(photos / "plain.png"), "--out", out, "--size", 8, "-q")
    before = out.read_bytes()
    source = _write(tmp_path, name, content)
    result = cli("pack", str(photos / "c*.png"), "--out", out, "--size", 8, "--overwrite",
                 "--annotations", source.parent if name.startswith("v/") else source, *options, ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip()
    assert line.startswith("Error: ") and len(line.splitlines()) == 1 and message in line, line
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.glob("data.h5*")) == ["data.h5"]


@pytest.mark.parametrize("mapping, message", [
    ("[281]", "holds a JSON list, not an object"),
    ('{"cat": "tabby"}', "maps 'cat' to 'tabby'"),
    ('{"cat": -3}', "a class index is a whole number"),
    ("nope", "is not JSON"),
])
def test_bad_mapping(photos, tmp_path, mapping, message):
    path = _write(tmp_path, "map.json", mapping)
    result = cli("pack", photos, "--out", tmp_path / "x.h5", "--annotations", VOC,
                 "--annotation-classes", path, ok=False)
    assert result.exit_code == 1 and message in result.output and not (tmp_path / "x.h5").exists()


def test_mapping_without_annotations_and_missing_source(photos, tmp_path):
    result = cli("pack", photos, "--out", tmp_path / "x.h5", "--annotation-classes", CLASSES, ok=False)
    assert "pass --annotations FILE too" in result.output
    result = cli("pack", photos, "--out", tmp_path / "x.h5", "--annotations", tmp_path / "no.json", ok=False)
    assert "does not exist" in result.output and not (tmp_path / "x.h5").exists()


def test_wildcard_mapping_keeps_only_named(photos, tmp_path):
    """"*": null leaves out every category the mapping does not name (here all but the cup)."""
    mapping = _write(tmp_path, "map.json", json.dumps({"cup": 968, "*": None}))
    out = tmp_path / "cup.h5"
    folder = tmp_path / "voc"
    shutil.copytree(VOC, folder)
    cli("pack", photos, "--out", out, "--size", SIZE, "--annotations", folder,
        "--annotation-classes", mapping, "-q")
    stored = _stored(out)
    assert stored["box_count"].tolist() == [0, 0, 1, 0] and stored["box_labels"].shape == (4, 1)
    np.testing.assert_allclose(stored["boxes"][2, 0], CUP, atol=1e-5)


def test_read_annotations_feeds_the_metrics(coco_h5):
    """A CAM that is the target's mask holds all its relevance mass; the other object's mask,
    which overlaps it a little (the spoon lies on the cup's saucer side), holds part of it."""
    from camexport.localisation import evaluate

    with h5py.File(coco_h5, "r") as h5:
        targets = np.array([50, 47])
        got = read_annotations(h5, np.array([2, 2]), (48, 48), targets=targets)
    cams = got.masks.astype(np.float32)
    np.testing.assert_allclose(evaluate("relevance-mass-accuracy", cams, got, targets), [1, 1])
    swapped = evaluate("relevance-mass-accuracy", cams[::-1].copy(), got, targets)
    assert (swapped < 1).all() and (swapped > 0).all()
