"""Gradient-weighted methods: GradCAM and its relatives (reference §3.1-§3.4, §3.12)."""

from __future__ import annotations

import numpy as np

from camexport.methods.base import (
    aggregate,
    eigen_projection,
    layer_map,
    min_max,
    one_blas_thread,
    spatial_axes,
)
from camexport.methods.core import ElementMethod, Method, WeightMethod

#: GradCAM++ denominator epsilon (pytorch-grad-cam, reference §3.2, Q10).
GRADCAM_PP_EPS = 1e-6
#: XGradCAM denominator epsilon, added to the signed activation sum (reference §3.3, Q11).
XGRADCAM_EPS = 1e-7


class GradCAM(WeightMethod):
    """Selvaraju et al. 2017. w_bc = mean_s G_bc; M = sum_c w A. Parity with pgc: 1e-5."""

    name = "gradcam"

    def weights(self, inputs, layer):
        return self.gradients(inputs, layer).mean(axis=spatial_axes(inputs.activations[layer]))


class HiResCAM(ElementMethod):
    """Draelos & Carin 2020. M = sum_c G * A."""

    name = "hirescam"

    def elements(self, acts, grads):
        return grads * acts


class GradCAMElementWise(ElementMethod):
    """M = sum_c relu(G * A) (ReLU before the channel sum)."""

    name = "gradcamelementwise"

    def elements(self, acts, grads):
        return np.maximum(grads * acts, 0)


class GradCAMPlusPlus(WeightMethod):
    """Chattopadhyay et al. 2018, as pgc computes it: alpha = G^2 / (2 G^2 + S G^3 + 1e-6)
    (alpha = 0 where G = 0), S_bc = sum_s A; w_bc = sum_s relu(G) alpha."""

    name = "gradcam++"

    def weights(self, inputs, layer):
        acts, grads = inputs.activations[layer], self.gradients(inputs, layer)
        axes = spatial_axes(acts)
        g2 = grads**2
        g3 = g2 * grads
        sums = acts.sum(axis=axes, keepdims=True)
        alpha = g2 / (2 * g2 + sums * g3 + grads.dtype.type(GRADCAM_PP_EPS))
        alpha = np.where(grads != 0, alpha, 0)
        return (np.maximum(grads, 0) * alpha).sum(axis=axes)


class XGradCAM(WeightMethod):
    """Fu et al. 2020. w_bc = sum_s G A / (sum_s A + 1e-7)."""

    name = "xgradcam"

    def weights(self, inputs, layer):
        acts, grads = inputs.activations[layer], self.gradients(inputs, layer)
        axes = spatial_axes(acts)
        sums = acts.sum(axis=axes, keepdims=True)
        return (grads * acts / (sums + acts.dtype.type(XGRADCAM_EPS))).sum(axis=axes)


class LayerCAM(ElementMethod):
    """Jiang et al. 2021 (without the tanh scaling for shallow layers). M = sum_c relu(G) A."""

    name = "layercam"

    def elements(self, acts, grads):
        return np.maximum(grads, 0) * acts


class EigenCAM(Method):
    """Muhammad & Yeasin 2020. M = P(A): the first principal component; not class
    discriminative; sign as numpy's LAPACK returns it (reference Q9)."""

    name = "eigencam"
    uses_targets = False

    def raw(self, inputs, layer, eigen_smooth):
        return eigen_projection(inputs.activations[layer])


class EigenGradCAM(Method):
    """M = P(G * A)."""

    name = "eigengradcam"

    def raw(self, inputs, layer, eigen_smooth):
        return eigen_projection(self.gradients(inputs, layer) * inputs.activations[layer])


class RandomCAM(WeightMethod):
    """A baseline: w_bc ~ U(-1, 1) in float64 from a seeded generator (``inputs.extras["seed"]``,
    default 0), not numpy's global RNG (reference Q30 fix)."""

    name = "randomcam"

    def weights(self, inputs, layer):
        acts = inputs.activations[layer]
        rng = inputs.extras.get("rng") or np.random.default_rng(inputs.extras.get("seed", 0))
        inputs.extras["rng"] = rng
        return rng.uniform(-1, 1, size=acts.shape[:2])


class FEM(WeightMethod):
    """Fu et al., feature explanation method: mask = A > mean_s A + k std_s A (population std,
    strict), w_bc = fraction of positions in the mask (float64), k = 2."""

    name = "fem"
    uses_targets = False
    k = 2.0

    def weights(self, inputs, layer):
        acts = inputs.activations[layer]
        axes = spatial_axes(acts)
        mean = acts.mean(axis=axes, keepdims=True)
        std = acts.std(axis=axes, keepdims=True)
        return (acts > mean + self.k * std).mean(axis=axes, dtype=np.float64)

    def raw(self, inputs, layer, eigen_smooth):  # eigen_smooth is ignored, as in pgc
        return super().raw(inputs, layer, False)


class KPCACAM(Method):
    """Karmani et al. 2024. M = first kernel-PCA score of the centred (positions x channels)
    matrix, scikit-learn KernelPCA(n_components=1, kernel='sigmoid', gamma=None); ARPACK starts
    from a seeded vector (reference Q30 fix; dense solver, identical to pgc, when h w <= 200)."""

    name = "kpcacam"
    uses_targets = False
    kernel = "sigmoid"
    gamma = None

    def raw(self, inputs, layer, eigen_smooth):
        from sklearn.decomposition import KernelPCA

        acts = np.nan_to_num(inputs.activations[layer], nan=0.0)
        maps = []
        with one_blas_thread():
            for item in acts:
                rows = item.reshape(item.shape[0], -1).T
                rows = rows - rows.mean(axis=0)
                kpca = KernelPCA(n_components=1, kernel=self.kernel, gamma=self.gamma,
                                 random_state=inputs.extras.get("seed", 0))
                maps.append(kpca.fit_transform(rows).reshape(item.shape[1:]))
        return np.asarray(maps, dtype=np.float32)


class FinerCAM(Method):
    """Zhang et al. 2025, as pgc 1.5.7 (reference §3.11): with targets given, the base method
    (GradCAM) with those targets. With targets None, per image: order = argsort |z - max z|
    (numpy's default sort), main = order[0], comparisons = order[j] for j in (1, 2, 3) (j <= K-1),
    target = FinerWeightedTarget(main, comparisons, alpha) whose gradient flows through softmax."""

    name = "finercam"
    alpha = 1.0
    positions = (1, 2, 3)
    base = GradCAM

    def retarget(self, outputs: np.ndarray, targets):
        from camexport.targets import FinerWeightedTarget

        if targets is not None:
            return targets
        result = []
        for row in outputs.reshape(outputs.shape[0], -1):
            order = np.argsort(np.abs(row - row.max()))
            comparisons = tuple(int(order[j]) for j in self.positions if j <= len(row) - 1)
            result.append(FinerWeightedTarget(int(order[0]), comparisons, self.alpha))
        return result

    def raw(self, inputs, layer, eigen_smooth):
        return self.base().raw(inputs, layer, eigen_smooth)


class SegEigenCAM(Method):
    """Chung & Ying 2025. M = P+-(|G| * A): the first principal component of the
    gradient-magnitude-weighted activations, negated when |min| > |max| (reference §3.4)."""

    name = "segeigencam"

    def raw(self, inputs, layer, eigen_smooth):
        weighted = np.abs(self.gradients(inputs, layer)) * inputs.activations[layer]
        return eigen_projection(weighted, sign_correction=True)


class RefineCAM(Method):
    """pgc 1.5.5+ (reference §3.13): the base method (GradCAM++) run on each layer alone, the
    per-layer final maps multiplied pixel-wise, then min-max normalised (eps 1e-7).
    ``eigen_smooth`` means eigen smoothing here (pgc runs aug_smooth instead, Q23)."""

    name = "refinecam"
    base = GradCAMPlusPlus

    def __call__(self, inputs, eigen_smooth=False):
        base = self.base()
        product = None
        for layer in range(len(inputs.activations)):
            final = aggregate([layer_map(base.raw(inputs, layer, eigen_smooth), inputs.size)])
            product = final if product is None else product * final
        return min_max(product).astype(np.float32)


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
        tangents = inputs.extras.get("tangents")
        if tangents is None:
            raise ValueError("ShapleyCAM needs an artifact built with --methods shapleycam")
        rows = np.asarray([t.hessian_vector(z, v) for t, z, v in
                           zip(inputs.targets, inputs.outputs.astype(np.float64),
                               tangents[layer].astype(np.float64))], dtype=np.float32)
        product = inputs.backward(layer, rows) if np.any(rows) else np.zeros_like(grads)
        return (grads - np.float32(0.5) * product).mean(axis=spatial_axes(grads))
