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


@dataclass
class Photo:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    label: int | None


def skimage_photos() -> list[Photo]:
    from skimage import data

    return [Photo("chelsea", data.chelsea(), 281), Photo("coffee", data.coffee(), 967),
            Photo("astronaut", data.astronaut(), None)]


def foolbox_photos() -> list[Photo]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        return []
    from PIL import Image

    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    photos = []
    for path in sorted(folder.glob("imagenet_*")):
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
