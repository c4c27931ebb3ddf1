"""Activation-only methods: maps from the layer's activations alone, no gradient, no target
(reference §3.5, §3.6, §3.9, RandomCAM's Q30 fix)."""

from __future__ import annotations

import numpy as np

from camexport.methods.base import Method, WeightMethod
from camexport.methods.pipeline import eigen_projection, one_blas_thread, spatial_axes


class EigenCAM(Method):
    """Muhammad & Yeasin 2020. M = P(A): the first principal component; not class
    discriminative; sign as numpy's LAPACK returns it (reference Q9)."""

    name = "eigencam"
    uses_targets = False

    def raw(self, inputs, layer, eigen_smooth):
        return eigen_projection(inputs.activations[layer])

class RandomCAM(WeightMethod):
    """A baseline: w_bc ~ U(-1, 1) in float64 from a seeded generator (``inputs.seed``,
    default 0), not numpy's global RNG (reference Q30 fix)."""

    name = "randomcam"

    def weights(self, inputs, layer):
        acts = inputs.activations[layer]
        if inputs.rng is None:
            inputs.rng = np.random.default_rng(inputs.seed)
        return inputs.rng.uniform(-1, 1, size=acts.shape[:2])

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
                                 random_state=inputs.seed)
                maps.append(kpca.fit_transform(rows).reshape(item.shape[1:]))
        return np.asarray(maps, dtype=np.float32)
