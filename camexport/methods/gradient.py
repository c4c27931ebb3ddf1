"""Gradient methods: GradCAM and its relatives, weighted by the gradient at the layer
(reference §3.1-§3.4, §3.10, §3.12)."""

from __future__ import annotations

import numpy as np

from camexport.methods.base import ElementMethod, Method, WeightMethod
from camexport.methods.inputs import MethodInputError
from camexport.methods.pipeline import (
    by_images,
    channel_sum,
    eigen_projection,
    product_sum,
    relu,
    spatial_axes,
    spatial_product_total,
    spatial_sums,
    spatial_total,
)

#: GradCAM++ denominator epsilon (pytorch-grad-cam, reference §3.2, Q10).
GRADCAM_PP_EPS = 1e-6
#: XGradCAM denominator epsilon, added to the signed activation sum (reference §3.3, Q11).
XGRADCAM_EPS = 1e-7


class GradCAM(WeightMethod):
    """Selvaraju et al. 2017. w_bc = mean_s G_bc; M = sum_c w A. Parity with pgc: 1e-5."""

    name = "gradcam"

    def weights(self, inputs, layer):
        grads = self.gradients(inputs, layer)
        return spatial_total(grads) / grads.dtype.type(np.prod(grads.shape[2:]))


class HiResCAM(ElementMethod):
    """Draelos & Carin 2020. M = sum_c G * A."""

    name = "hirescam"

    def elements(self, acts, grads):
        return grads * acts

    def channel_sum(self, acts, grads):
        return by_images(product_sum, grads, acts)


class GradCAMElementWise(ElementMethod):
    """M = sum_c relu(G * A) (ReLU before the channel sum)."""

    name = "gradcamelementwise"

    def elements(self, acts, grads):
        product = grads * acts
        return relu(product, out=product)

    def channel_sum(self, acts, grads):
        return by_images(lambda a, g: channel_sum(self.elements(a, g)), acts, grads)


def _gradcam_pp_weights(grads: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """pgc's GradCAM++ weights from G and S, its expression in its order, in three buffers; the
    sum of relu(G) alpha over positions in one einsum."""
    g2 = grads * grads
    g3 = g2 * grads
    denominator = np.multiply(g2, 2)
    denominator += np.multiply(g3, sums, out=g3)
    denominator += grads.dtype.type(GRADCAM_PP_EPS)
    alpha = np.divide(g2, denominator, out=g2)
    if not np.isfinite(sums).all():
        # where G = 0 the expression is 0 / eps = 0, unless S is inf or nan (0 * S)
        alpha[grads == 0] = 0
    return spatial_product_total(relu(grads, out=denominator), alpha)


class GradCAMPlusPlus(WeightMethod):
    """Chattopadhyay et al. 2018, as pgc computes it: alpha = G^2 / (2 G^2 + S G^3 + 1e-6)
    (alpha = 0 where G = 0), S_bc = sum_s A; w_bc = sum_s relu(G) alpha."""

    name = "gradcam++"

    def weights(self, inputs, layer):
        sums = spatial_sums(inputs.activations[layer])
        return by_images(_gradcam_pp_weights, self.gradients(inputs, layer), sums)


def _xgradcam_weights(acts: np.ndarray, grads: np.ndarray, sums: np.ndarray) -> np.ndarray:
    ratio = grads * acts
    ratio /= sums + acts.dtype.type(XGRADCAM_EPS)
    return spatial_total(ratio)


class XGradCAM(WeightMethod):
    """Fu et al. 2020. w_bc = sum_s G A / (sum_s A + 1e-7)."""

    name = "xgradcam"

    def weights(self, inputs, layer):
        acts = inputs.activations[layer]
        return by_images(_xgradcam_weights, acts, self.gradients(inputs, layer), spatial_sums(acts))


class LayerCAM(ElementMethod):
    """Jiang et al. 2021 (without the tanh scaling for shallow layers). M = sum_c relu(G) A."""

    name = "layercam"

    def elements(self, acts, grads):
        return relu(grads) * acts

    def channel_sum(self, acts, grads):
        return by_images(lambda a, g: product_sum(relu(g), a), acts, grads)


class EigenGradCAM(Method):
    """M = P(G * A)."""

    name = "eigengradcam"

    def raw(self, inputs, layer, eigen_smooth):
        return eigen_projection(self.gradients(inputs, layer) * inputs.activations[layer])


class SegEigenCAM(Method):
    """Chung & Ying 2025. M = P+-(|G| * A): the first principal component of the
    gradient-magnitude-weighted activations, negated when |min| > |max| (reference §3.4)."""

    name = "segeigencam"

    def raw(self, inputs, layer, eigen_smooth):
        weighted = np.abs(self.gradients(inputs, layer)) * inputs.activations[layer]
        return eigen_projection(weighted, sign_correction=True)


class ShapleyCAM(WeightMethod):
    """Cai et al. 2025, as pgc 1.5.7 (reference §3.10): w_bc = mean_s(G - H_A A / 2),
    M = sum_c w A. The Hessian-vector product is exact by another route than second-order
    autodiff: the graph gives J A (forward mode over the tail), then H_A A = J^T (d2t/dz2)(J A)
    by one more backward pass; exact when the tail is piecewise linear (ReLU, max-pool, conv,
    linear: d(J^T)/dA = 0 there), which the build checks. With a logit target the product is 0
    and ShapleyCAM equals GradCAM (reference Q20)."""

    name = "shapleycam"

    def weights(self, inputs, layer):
        grads = self.gradients(inputs, layer)
        tangents = inputs.tangents
        if tangents is None:
            raise MethodInputError("ShapleyCAM needs an artifact built with --methods shapleycam")
        rows = np.asarray([t.hessian_vector(z, v) for t, z, v in
                           zip(inputs.targets, inputs.outputs.astype(np.float64),
                               tangents[layer].astype(np.float64))], dtype=np.float32)
        product = inputs.backward(layer, rows) if np.any(rows) else np.zeros_like(grads)
        return (grads - np.float32(0.5) * product).mean(axis=spatial_axes(grads))
