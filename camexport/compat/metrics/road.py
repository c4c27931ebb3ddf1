"""pytorch_grad_cam.metrics.road: ROAD (Rong et al. 2022, "A Consistent and Efficient Evaluation
Strategy for Attribution Methods"), reference §7.2-§7.4.

Removal masks and the noisy linear imputer are camexport's (:mod:`camexport.imputation`: the
harmonic fill of the removed pixels from their neighbours, one sparse LU per mask for all
channels, plus noise·N(0, 1)); the noise comes from torch's global generator in pgc's order, so
after the same ``torch.manual_seed`` the scores equal pgc's to float32 round-off.

| Class | Score (higher / lower is better) |
|---|---|
| ROADMostRelevantFirst(p=80) | t(f(x with the top (100 − p) % of cam imputed)) − t(f(x)) (lower) |
| ROADLeastRelevantFirst(p=20) | the same with the bottom (100 − p) % imputed (higher) |
| ROAD…Average(percentiles) | the mean of those over the percentiles |
| ROADCombined(percentiles) | (LeRF average − MoRF average) / 2 (higher) |

Deliberate differences (details in :mod:`camexport.compat.metrics.perturbation_confidence`):
Q28, ``percentile='auto'`` removes the pixels above the Otsu threshold for MoRF (pgc: the ones
below, the opposite end); Q29, ``NoisyLinearImputer`` uses its ``weighting`` (pgc ignores it;
the default is the same).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from camexport.compat.metrics.perturbation_confidence import (
    TORCH_GLOBAL_NORMAL,
    AveragerAcrossThresholds,
    PerturbationConfidenceMetric,
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
    _mean_changes,
)
from camexport.imputation import NEIGHBOURS, draw_noise, impute, sparse_system

#: the weights of the 8 neighbours, ((dy, dx), w): 1/6 edge, 1/12 diagonal (pgc's list)
neighbors_weights = list(NEIGHBOURS)


class NoisyLinearImputer:
    """Imputes the pixels where ``mask`` == 0 with the weighted mean of their in-image neighbours
    (a discrete harmonic fill, one sparse solve for all channels) plus ``noise``·N(0, 1), noise
    absolute in normalised units, drawn from torch's global generator. ``weighting``: the
    neighbours' ((dy, dx), weight) pairs, honoured (pgc ignores it, Q29)."""

    def __init__(self, noise: float = 0.01, weighting: list = neighbors_weights):
        self.noise = noise
        self.weighting = weighting

    @staticmethod
    def add_offset_to_indices(indices: np.ndarray, offset, mask_shape) -> tuple[np.ndarray, np.ndarray]:
        """(inside, moved): flat indices of an (H, W) mask moved by ``offset`` (dy, dx), and
        whether the moved pixel is still in the mask."""
        rows, cols = np.divmod(np.asarray(indices), mask_shape[1])
        rows, cols = rows + offset[0], cols + offset[1]
        inside = (rows >= 0) & (cols >= 0) & (rows < mask_shape[0]) & (cols < mask_shape[1])
        return inside, indices + offset[0] * mask_shape[1] + offset[1]

    @staticmethod
    def setup_sparse_system(mask: np.ndarray, img: np.ndarray, neighbors_weights):
        """The system A (N, N) x = b (N, C) over the N pixels with mask == 0 of ``img`` (C, H, W)
        (:func:`camexport.imputation.sparse_system`); A is CSC (pgc: LIL)."""
        return sparse_system(np.asarray(img), np.asarray(mask) == 0, neighbors_weights)

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``img`` (C, H, W) with its pixels where ``mask`` (H, W) == 0 imputed."""
        image = np.ascontiguousarray(img.detach().cpu().numpy(), np.float32)
        removed = mask.detach().cpu().numpy() == 0
        draws = draw_noise(TORCH_GLOBAL_NORMAL, self.noise, image.shape[0], int(removed.sum()))
        weights = NEIGHBOURS if self.weighting is None else self.weighting
        return torch.from_numpy(impute(image, removed, draws, weights)).to(img.device, img.dtype)


class ROADMostRelevantFirst(PerturbationConfidenceMetric):
    """Change of the target after imputing the top (100 − percentile) % of the CAM. Lower is better."""

    def __init__(self, percentile=80):
        super().__init__(RemoveMostRelevantFirst(percentile, NoisyLinearImputer()))


class ROADLeastRelevantFirst(PerturbationConfidenceMetric):
    """Change of the target after imputing the bottom (100 − percentile) % of the CAM. Higher is better."""

    def __init__(self, percentile=20):
        super().__init__(RemoveLeastRelevantFirst(percentile, NoisyLinearImputer()))


class ROADMostRelevantFirstAverage(AveragerAcrossThresholds):
    """ROADMostRelevantFirst averaged over ``percentiles``."""

    def __init__(self, percentiles=[10, 20, 30, 40, 50, 60, 70, 80, 90]):  # noqa: B006 (pgc's)
        super().__init__(ROADMostRelevantFirst, percentiles)


class ROADLeastRelevantFirstAverage(AveragerAcrossThresholds):
    """ROADLeastRelevantFirst averaged over ``percentiles``."""

    def __init__(self, percentiles=[10, 20, 30, 40, 50, 60, 70, 80, 90]):  # noqa: B006 (pgc's)
        super().__init__(ROADLeastRelevantFirst, percentiles)


class ROADCombined:
    """(LeRF average − MoRF average) / 2 over ``percentiles``, LeRF drawn first. Higher is better."""

    def __init__(self, percentiles=[10, 20, 30, 40, 50, 60, 70, 80, 90]):  # noqa: B006 (pgc's)
        self.percentiles = percentiles
        self.morf_averager = ROADMostRelevantFirstAverage(percentiles)
        self.lerf_averager = ROADLeastRelevantFirstAverage(percentiles)

    def __call__(self, input_tensor: torch.Tensor, cams: np.ndarray, targets: Sequence[Callable],
                 model: Callable) -> np.ndarray:
        groups = [averager._batched_metrics() for averager in (self.lerf_averager, self.morf_averager)]
        if all(group is not None for group in groups):  # both in one run, every image in the same calls
            scores_lerf, scores_morf = _mean_changes(groups, input_tensor, cams, targets, model)
        else:
            scores_lerf = self.lerf_averager(input_tensor, cams, targets, model)
            scores_morf = self.morf_averager(input_tensor, cams, targets, model)
        return (scores_lerf - scores_morf) / 2


__all__ = [
    "AveragerAcrossThresholds",
    "NoisyLinearImputer",
    "PerturbationConfidenceMetric",
    "ROADCombined",
    "ROADLeastRelevantFirst",
    "ROADLeastRelevantFirstAverage",
    "ROADMostRelevantFirst",
    "ROADMostRelevantFirstAverage",
    "RemoveLeastRelevantFirst",
    "RemoveMostRelevantFirst",
    "neighbors_weights",
]
