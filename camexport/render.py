"""Overlays like pytorch-grad-cam's ``show_cam_on_image`` (reference §6)."""

from __future__ import annotations

import cv2
import numpy as np


def overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.5,
            colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """RGB float image in [0, 1] (H, W, 3) and a map in [0, 1] (H, W) -> RGB uint8 blend.

    heat = OpenCV colormap of uint8(255 cam) as RGB / 255; v = (1 - w) heat + w image;
    v / max(v); uint8(255 v) by truncation.
    """
    if image.max() > 1:
        raise ValueError("the image must be float in [0, 1]")
    if not 0 <= image_weight <= 1:
        raise ValueError(f"image_weight must be in [0, 1], got {image_weight}")
    heat = cv2.applyColorMap(np.uint8(255 * cam), colormap)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    blend = (1 - image_weight) * heat + image_weight * image
    return np.uint8(255 * blend / blend.max())


def grid(tiles: list[np.ndarray], labels: list[str]) -> np.ndarray:
    """Tiles side by side, each with its label written above."""
    height = tiles[0].shape[0]
    framed = []
    for tile, label in zip(tiles, labels):
        band = np.full((22, tile.shape[1], 3), 255, np.uint8)
        cv2.putText(band, label[:28], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
        framed.append(np.concatenate([band, tile[:height]], axis=0))
    return np.concatenate(framed, axis=1)
