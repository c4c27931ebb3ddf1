"""pytorch_grad_cam.metrics.arcc: ARCC (reference §7.5), the harmonic mean of coherency,
1 − complexity and the ROAD score:

    ARCC = 3 / (1/(coherency + ε) + 1/(1 − complexity + ε) + 1/(road + ε)),  ε = 1e-8 (pgc's)

- Complexity = mean |cam| over the pixels (pgc cites arXiv 2104.10252 for it and coherency).
- Coherency = (ρ + 1) / 2, ρ the Pearson correlation between the map and the map the base CAM
  method gives on x ⊙ cam; with a compat CAM object (e.g. ``camexport.compat.GradCAM``) that map
  comes from camexport's graph (torch's global generator kept as it was, so ROAD's noise is pgc's
  even on the call that exports the model); any pgc-style CAM object
  ``base_method(input_tensor=, targets=)`` works.
- Road = clip(2 · ROADCombined(road_percentiles), 0, 1) (:mod:`camexport.compat.metrics.road`,
  noise from torch's global generator as pgc).

pgc's docstring calls it a geometric mean; the formula, kept here, is the harmonic mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from camexport.compat.base_cam import BaseCAM
from camexport.compat.engine import batch_array
from camexport.compat.metrics.road import ROADCombined

#: pgc's epsilons: the Pearson denominator and ARCC's reciprocals
PEARSON_EPS = 1e-8
ARCC_EPS = 1e-8


def batch_pearson_coherency(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """ρ_b = cov(A_b, B_b) / (σ(A_b) σ(B_b) + 1e-8) over each image's pixels, covariance and
    standard deviations with divisor n − 1; computed in float64, float32 (B,) out."""
    a = A.reshape(len(A), -1).astype(np.float64)
    b = B.reshape(len(B), -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    dof = a.shape[1] - 1
    covariance = (a * b).sum(axis=1) / dof
    deviations = np.sqrt((a * a).sum(axis=1) / dof) * np.sqrt((b * b).sum(axis=1) / dof)
    return np.float32(covariance / (deviations + PEARSON_EPS))


class Complexity:
    """mean_ij |cam_ij| per image: 0 for an empty map, 1 for a map of ones. Lower is better."""

    def __call__(self, grayscale_cams: np.ndarray) -> np.ndarray:
        return np.abs(grayscale_cams).reshape(len(grayscale_cams), -1).mean(axis=1)


class Coherency:
    """(ρ(base_method(x ⊙ cam), cam) + 1) / 2 per image, the cam broadcast over the channels."""

    def __call__(self, input_tensor: torch.Tensor, grayscale_cams: np.ndarray, targets: Sequence[Callable],
                 model: Callable, base_method) -> np.ndarray:
        cams = np.asarray(grayscale_cams, np.float32)
        mixed = torch.from_numpy(batch_array(input_tensor) * cams[:, None]).to(input_tensor.device)
        with _generator_kept(base_method):
            mixed_cams = np.asarray(base_method(input_tensor=mixed, targets=targets))
        return (batch_pearson_coherency(mixed_cams, grayscale_cams) + 1) / 2


def _generator_kept(base_method) -> AbstractContextManager:
    """A compat CAM object leaves torch's global generator as pgc's CAMs do (untouched): its
    first call exports the model, which draws an example input from it, and ARCC's ROAD draws
    its noise next."""
    return torch.random.fork_rng(devices=[]) if isinstance(base_method, BaseCAM) else nullcontext()


class ARCC:
    """3 / (1/(coherency + ε) + 1/(1 − complexity + ε) + 1/(road + ε)) per image. Higher is better."""

    def __init__(self, base_method, road_percentiles=[20, 40, 60, 80]):  # noqa: B006 (pgc's)
        self.complexity = Complexity()
        self.coherency = Coherency()
        self.road = ROADCombined(percentiles=road_percentiles)
        self.base_method = base_method

    def __call__(self, input_tensor: torch.Tensor, grayscale_cams: np.ndarray, targets: Sequence[Callable],
                 model: Callable) -> np.ndarray:
        complexity = self.complexity(grayscale_cams)
        coherency = self.coherency(input_tensor, grayscale_cams, targets, model, self.base_method)
        # ROADCombined lies in [-0.5, 0.5]: scaled to [-1, 1], clipped to [0, 1]
        road = (self.road(input_tensor, grayscale_cams, targets, model) * 2).clip(0, 1)
        return 3 / (1 / (coherency + ARCC_EPS) + 1 / ((1 - complexity) + ARCC_EPS) + 1 / (road + ARCC_EPS))


__all__ = ["ARCC", "Coherency", "Complexity", "batch_pearson_coherency"]
