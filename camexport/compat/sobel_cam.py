"""pytorch_grad_cam.sobel_cam (reference §3.17): an image-gradient baseline map, no model."""

from __future__ import annotations

import cv2
import numpy as np


def sobel_cam(img: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (H, W) uint8: 0.5 |S_x g| + 0.5 |S_y g| of the grey image g, with
    3 x 3 Sobel derivatives in float64 (reflect-101 border), each absolute value saturated to
    uint8 with rounding, and the weighted sum saturated again."""
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    edges = [cv2.convertScaleAbs(cv2.Sobel(grey, cv2.CV_64F, dx, 1 - dx, ksize=3)) for dx in (1, 0)]
    return cv2.addWeighted(edges[0], 0.5, edges[1], 0.5, 0)
