"""pytorch_grad_cam.metrics.cam_mult_image: the image multiplied by its CAM (reference §7.1).

The product is camexport's (``camexport.metrics``: x_b ⊙ cam_b in numpy, normalised space), the
model runs in torch; see :mod:`camexport.compat.metrics.perturbation_confidence` for the
arguments, the targets and the deliberate differences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from camexport.compat.metrics.perturbation_confidence import PerturbationConfidenceMetric, Result


def multiply_tensor_with_cam(input_tensor: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """x ⊙ cam: the (normalised) image times its map, broadcast over the channels."""
    return input_tensor * cam


class CamMultImageConfidenceChange(PerturbationConfidenceMetric):
    """t(f(x ⊙ cam)) − t(f(x)) per image. Higher is better."""

    def __init__(self):
        super().__init__(multiply_tensor_with_cam)


class DropInConfidence(CamMultImageConfidenceChange):
    """max(t(f(x)) − t(f(x ⊙ cam)), 0) per image. Lower is better."""

    def __call__(self, input_tensor: torch.Tensor, cams: np.ndarray, targets: Sequence[Callable],
                 model: Callable, return_visualization: bool = False, return_diff: bool = True) -> Result:
        result = super().__call__(input_tensor, cams, targets, model, return_visualization, return_diff)
        return _scores_mapped(result, lambda scores: np.maximum(-scores, 0))


class IncreaseInConfidence(CamMultImageConfidenceChange):
    """1 if t(f(x ⊙ cam)) > t(f(x)) else 0, float32, per image. Higher is better."""

    def __call__(self, input_tensor: torch.Tensor, cams: np.ndarray, targets: Sequence[Callable],
                 model: Callable, return_visualization: bool = False, return_diff: bool = True) -> Result:
        result = super().__call__(input_tensor, cams, targets, model, return_visualization, return_diff)
        return _scores_mapped(result, lambda scores: np.float32(scores > 0))


def _scores_mapped(result: Result, function: Callable[[np.ndarray], np.ndarray]) -> Result:
    """``function`` of the scores, the perturbed batch kept (pgc fails on the tuple)."""
    if isinstance(result, tuple):
        scores, images = result
        return function(scores), images
    return function(result)


__all__ = ["CamMultImageConfidenceChange", "DropInConfidence", "IncreaseInConfidence",
           "multiply_tensor_with_cam"]
