"""Methods built on input and bias gradients: FullGrad and Guided Backprop."""

from __future__ import annotations

import numpy as np

from camexport.methods.base import Method
from camexport.methods.inputs import MethodInputError
from camexport.methods.pipeline import eigen_projection, min_max, resize


def _scaled(maps: np.ndarray, size) -> np.ndarray:
    """pgc's per-(image, channel) n() then resize: (B, C, h, w) -> (B, C, H, W)."""
    b, c = maps.shape[:2]
    flat = maps.reshape(b * c, *maps.shape[2:])
    return resize(min_max(flat), size).reshape(b, c, *size)


class FullGrad(Method):
    """Srinivas & Fleuret 2019, as pgc 1.5.7 computes it (reference §3.9):
    CAM = n( sum_k n(|x_k dL/dx_k|) + sum_l sum_c R(n(|bias_lc G_lc|)) ), no ReLU, eps 1e-7.
    Bias layers are every Conv with a bias and every BatchNormalization of the graph; after
    batch-norm folding, a bias-free Conv followed by BatchNorm2d (ResNet style) is one folded
    Conv whose bias and output gradient are exactly pgc's BatchNorm2d term. The graph pairs each
    bias with its own output (pgc pairs them by position, Q19)."""

    name = "fullgrad"

    def terms(self, inputs) -> np.ndarray:
        size = inputs.size
        grad_x = inputs.input_gradient
        layers = inputs.bias_layers
        if grad_x is None or layers is None:
            raise MethodInputError("FullGrad needs an artifact built with --methods fullgrad")
        parts = [_scaled(np.abs(grad_x * inputs.x), size)]
        for bias, grad in layers:
            weighted = np.abs(bias.reshape((1, -1) + (1,) * (grad.ndim - 2)) * grad)
            # sum_c R(n(m_c)) = R(sum_c n(m_c)): bilinear resizing is linear, so one resize per
            # image instead of one per channel (pgc's order; 1e-6 apart in float32)
            scaled = min_max(weighted.reshape(-1, *weighted.shape[2:])).reshape(weighted.shape)
            parts.append(resize(scaled.sum(axis=1), size)[:, None])
        return np.concatenate(parts, axis=1)

    def __call__(self, inputs, eigen_smooth=False):
        terms = self.terms(inputs)
        if eigen_smooth:
            height, width = inputs.size
            small = _scaled(terms, (height // 8, width // 8))
            projected = min_max(eigen_projection(small))
            return min_max(resize(projected, inputs.size)).astype(np.float32)
        return min_max(terms.sum(axis=1)).astype(np.float32)


class GuidedBackprop(Method):
    """Springenberg et al. 2015: the input gradient of each image's target through guided ReLUs
    (dX = dY [X > 0][dY > 0]), as (B, H, W, C) float32. Unlike pgc (Q25): every image of the
    batch, each with its own target, and every Relu node of the graph is guided."""

    name = "guidedbackprop"

    def __call__(self, inputs, eigen_smooth=False):
        guided = inputs.guided_gradient
        if guided is None:
            raise MethodInputError("Guided Backprop needs an artifact built with --methods guidedbackprop")
        return np.ascontiguousarray(np.moveaxis(guided, 1, -1)).astype(np.float32)
