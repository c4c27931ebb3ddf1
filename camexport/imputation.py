"""Pixel removal for the ROAD metrics: removal masks and pytorch-grad-cam's NoisyLinearImputer
(reference §7.2, §7.3), without torch. The sparse solve of the imputer is factorised once per
mask (scipy's splu) and solved for every channel.

The noise comes from any object with numpy's ``standard_normal(shape, dtype=...)``: a seeded
``numpy.random.Generator`` for camexport, torch's global generator in pytorch-grad-cam's order for
``camexport.compat.metrics``. The neighbour weights are a parameter (Q29: the library ignores its
``weighting`` argument); the default is the library's.
"""

from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np
import scipy.sparse
from scipy.sparse.linalg import splu

#: NoisyLinearImputer's noise: absolute standard deviation in normalised units (reference §7.3).
NOISE = 0.01
#: The imputer's neighbour weights (reference §7.3, Q29), in the library's order, so that the
#: right-hand sides and diagonals add up in the same order.
NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
              ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))


class NormalSource(Protocol):
    """Where the imputer's noise comes from: ``numpy.random.Generator`` or anything alike."""

    def standard_normal(self, size: tuple[int, ...], dtype=np.float64) -> np.ndarray: ...


def removal_mask(cam: np.ndarray, percentile: float | str, most_relevant_first: bool) -> np.ndarray:
    """The pixels to remove (H, W) bool.

    Ranking r = cam (MoRF) or 1 − cam (LeRF), float32. A number p removes r ≥ P_p(r) (numpy's
    linear percentile, compared in float32 as the library's torch comparison does): the top
    (100 − p) % of r. ``'auto'`` removes uint8(255·r) > Otsu threshold (Q28 fix: the library keeps
    those and removes the rest).
    """
    rank = cam.astype(np.float32)
    if not most_relevant_first:
        rank = np.float32(1) - rank
    if percentile == "auto":
        levels = (rank * np.float32(255)).astype(np.uint8)
        threshold, _ = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        return levels > threshold
    return ~(rank < np.float32(np.percentile(rank, percentile)))


def sparse_system(image: np.ndarray, removed: np.ndarray,
                  weights=NEIGHBOURS) -> tuple[scipy.sparse.csc_matrix, np.ndarray]:
    """The imputer's linear system over the N removed pixels (row-major) of ``image`` (C, H, W):
    A (N, N) and b (N, C) with, for each removed pixel p,
    −s_p x_p + Σ_{removed q} w_q x_q = −Σ_{kept q} w_q v_q,  s_p = 1 − Σ_{outside} w,
    over the in-image neighbours q = p + offset of ``weights`` ((dy, dx), w) pairs.
    """
    channels, height, width = image.shape
    flat = image.reshape(channels, -1)
    pixels = np.flatnonzero(removed.ravel())
    n = pixels.size
    unknown = np.full(height * width, -1)
    unknown[pixels] = np.arange(n)
    rows, cols = np.divmod(pixels, width)
    rhs = np.zeros((n, channels))
    diagonal = np.ones(n)
    entries = []
    for (dy, dx), weight in weights:
        r, c = rows + dy, cols + dx
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        equations = np.flatnonzero(inside)
        neighbours = (r * width + c)[inside]
        variables = unknown[neighbours]
        known = variables < 0
        # float32 products as the library's (weight · float32 image) under numpy's promotion rules
        rhs[equations[known]] -= (np.float32(weight) * flat[:, neighbours[known]]).T
        entries.append((equations[~known], variables[~known], np.full((~known).sum(), weight)))
        diagonal[~inside] -= weight
    entries.append((np.arange(n), np.arange(n), -diagonal))
    i, j, v = (np.concatenate(e) for e in zip(*entries))
    return scipy.sparse.csc_matrix((v, (i, j)), shape=(n, n)), rhs


def _harmonic_fill(image: np.ndarray, removed: np.ndarray, weights=NEIGHBOURS) -> np.ndarray:
    """Values (C, N) of the N removed pixels (row-major) that make each one the weighted mean of
    its in-image neighbours (:func:`sparse_system`). float64 sparse LU (one factorisation for
    every channel), float32 out.
    """
    channels, height, width = image.shape
    n = int(removed.sum())
    if n == height * width:  # nothing known: the library's (singular) solve gives zeros
        return np.zeros((channels, n), np.float32)
    matrix, rhs = sparse_system(image, removed, weights)
    if tuple(weights) == NEIGHBOURS:
        # symmetric and negative definite (every removed region borders a kept pixel): no pivoting,
        # a symmetric ordering; 1.5-2x faster than spsolve's COLAMD, equal to ~1e-15
        lu = splu(matrix, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0, options={"SymmetricMode": True})
    else:  # a user's weights need not make it definite: SuperLU's default, partial pivoting
        lu = splu(matrix)
    return lu.solve(rhs).T.astype(np.float32)


def fill(image: np.ndarray, removed: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[:, removed] = values
    return out


def impute(image: np.ndarray, removed: np.ndarray, noise: np.ndarray, weights=NEIGHBOURS) -> np.ndarray:
    """``image`` with its removed pixels set to their harmonic fill plus ``noise`` (C, N)."""
    return fill(image, removed, _harmonic_fill(image, removed, weights) + noise)


def draw_noise(rng: NormalSource, noise: float, channels: int, count: int) -> np.ndarray:
    """noise · N(0, 1), float32, shape (C, count): the library's randn_like of the solution, as
    one ``rng.standard_normal((C, count), dtype=np.float32)`` draw."""
    return np.float32(noise) * rng.standard_normal((channels, count), dtype=np.float32)


def noisy_linear_impute(image: np.ndarray, removed: np.ndarray, noise: float = NOISE,
                        rng: NormalSource | None = None, weights=NEIGHBOURS) -> np.ndarray:
    """NoisyLinearImputer (ROAD, Rong et al. 2022; reference §7.3): the removed pixels of ``image``
    (C, H, W) get the harmonic fill of their kept neighbours (by default weights 1/6 edge, 1/12
    diagonal) plus ``noise``·N(0, 1) from ``rng``; kept pixels are unchanged. Equal to the library
    with noise 0 (float32 round-off at most) and with the same draws."""
    image = np.asarray(image, np.float32)
    removed = np.asarray(removed, bool)
    rng = np.random.default_rng() if rng is None else rng
    return impute(image, removed, draw_noise(rng, noise, image.shape[0], int(removed.sum())), weights)
