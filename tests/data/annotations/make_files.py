"""Writes the annotation files of this folder from the boxes and outlines below, which were drawn
by hand (read off a pixel grid laid over each photo) for the photos packaged with camexport
(`camexport samples` writes them as chelsea_281.png, coffee_967.png, astronaut.png).

    .venv/bin/python tests/data/annotations/make_files.py

coco.json: boxes; the cup's outline as a polygon, the cat's as compressed RLE, the spoon's as
uncompressed RLE (iscrowd 1); the whiskers and the astronaut have boxes only. voc/: the same boxes
as Pascal VOC XML (1-based, inclusive xmax ymax). masks/: the cat's outline as a VOC-style label
PNG (8 = VOC's cat, 255 = void border). imagenet_classes.json: the names mapped to ImageNet
classes (whiskers to the tabby too; the person has no ImageNet class).
"""

import json
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as coco_mask

HERE = Path(__file__).parent
# file name, (width, height)
IMAGES = {"chelsea_281.png": (451, 300), "coffee_967.png": (600, 400), "astronaut.png": (512, 512)}
CATEGORIES = {"person": 1, "cat": 17, "cup": 47, "spoon": 50, "whiskers": 91}
# x1 y1 x2 y2 in continuous pixel edges, by hand
BOXES = [
    ("chelsea_281.png", "cat", (20, 0, 375, 300)),
    ("chelsea_281.png", "whiskers", (0, 200, 70, 290)),
    ("coffee_967.png", "cup", (172, 18, 425, 310)),
    ("coffee_967.png", "spoon", (325, 65, 425, 325)),
    ("astronaut.png", "person", (25, 15, 370, 512)),
]
OUTLINES = {  # polygons (x, y), by hand
    "cat": [(20, 0), (375, 0), (375, 120), (355, 200), (330, 260), (300, 300), (60, 300), (20, 230)],
    "cup": [(174, 80), (195, 40), (240, 22), (290, 18), (340, 20), (390, 38), (410, 70), (405, 130),
            (392, 190), (370, 228), (330, 250), (262, 250), (258, 300), (235, 308), (205, 300),
            (198, 265), (215, 230), (195, 190), (180, 130)],
    "spoon": [(405, 68), (425, 72), (412, 120), (395, 205), (385, 235), (405, 260), (405, 300),
              (390, 322), (360, 325), (330, 310), (325, 280), (335, 250), (360, 238), (375, 205),
              (395, 120)],
}


def polygon_rle(name: str, width: int, height: int) -> dict:
    flat = [float(v) for point in OUTLINES[name] for v in point]
    return coco_mask.merge(coco_mask.frPyObjects([flat], height, width))


def uncompressed(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts: run lengths in column-major order, starting with zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def coco() -> dict:
    images = [{"id": i + 1, "file_name": name, "width": w, "height": h}
              for i, (name, (w, h)) in enumerate(IMAGES.items())]
    ids = {image["file_name"]: image["id"] for image in images}
    annotations = []
    for k, (name, category, (x1, y1, x2, y2)) in enumerate(BOXES):
        width, height = IMAGES[name]
        ann = {"id": k + 1, "image_id": ids[name], "category_id": CATEGORIES[category],
               "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
        if category == "cup":
            ann["segmentation"] = [[float(v) for point in OUTLINES["cup"] for v in point]]
        elif category == "cat":
            rle = polygon_rle("cat", width, height)
            ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        elif category == "spoon":
            mask = coco_mask.decode(polygon_rle("spoon", width, height))
            ann["segmentation"] = {"size": [height, width], "counts": uncompressed(mask)}
            ann["iscrowd"] = 1
        annotations.append(ann)
    categories = [{"id": i, "name": name, "supercategory": name} for name, i in CATEGORIES.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def voc(name: str) -> str:
    width, height = IMAGES[name]
    objects = "".join(
        f"  <object>\n    <name>{category}</name>\n    <pose>Unspecified</pose>\n"
        f"    <truncated>0</truncated>\n    <difficult>0</difficult>\n    <bndbox>\n"
        f"      <xmin>{x1 + 1}</xmin>\n      <ymin>{y1 + 1}</ymin>\n"
        f"      <xmax>{x2}</xmax>\n      <ymax>{y2}</ymax>\n    </bndbox>\n  </object>\n"
        for image, category, (x1, y1, x2, y2) in BOXES if image == name)
    return (f"<annotation>\n  <folder>camexport</folder>\n  <filename>{name}</filename>\n  <size>\n"
            f"    <width>{width}</width>\n    <height>{height}</height>\n    <depth>3</depth>\n  </size>\n"
            f"  <segmented>0</segmented>\n{objects}</annotation>\n")


def label_png() -> np.ndarray:
    width, height = IMAGES["chelsea_281.png"]
    mask = np.ascontiguousarray(coco_mask.decode(polygon_rle("cat", width, height))) * 8
    cv2.polylines(mask, [np.array(OUTLINES["cat"], np.int32)], True, 255, thickness=3)
    return mask


if __name__ == "__main__":
    (HERE / "coco.json").write_text(json.dumps(coco()) + "\n")
    (HERE / "voc").mkdir(exist_ok=True)
    for name in IMAGES:
        (HERE / "voc" / f"{Path(name).stem}.xml").write_text(voc(name))
    (HERE / "masks").mkdir(exist_ok=True)
    cv2.imwrite(str(HERE / "masks" / "chelsea_281.png"), label_png())
    (HERE / "imagenet_classes.json").write_text(
        json.dumps({"cat": 281, "whiskers": 281, "cup": 968, "spoon": 910, "person": None}, indent=1) + "\n")
