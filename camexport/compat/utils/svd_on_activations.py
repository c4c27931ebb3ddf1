"""pytorch_grad_cam.utils.svd_on_activations (reference §2.7, §3.5): the projections of the Eigen
methods and KPCA-CAM, as camexport's methods compute them.

Each takes activations (B, C, *spatial), NaN read as 0 (on a copy), and returns float32
(B, *spatial). Per image, Y is the (positions x channels) matrix, each channel centred over
the positions.
"""

from __future__ import annotations

import numpy as np

from camexport.methods.activation import KPCACAM
from camexport.methods.inputs import CamInputs
from camexport.methods.pipeline import eigen_projection


def get_2d_projection(activation_batch: np.ndarray) -> np.ndarray:
    """P(A) = Y v, v the first right singular vector of Y, with the sign numpy's LAPACK gives
    (pgc applies no sign fix, reference Q9; EigenCAM's map)."""
    return eigen_projection(np.asarray(activation_batch))


def get_2d_projection_kernel(activation_batch: np.ndarray, kernel="sigmoid", gamma=None) -> np.ndarray:
    """The first kernel-PCA score of Y: scikit-learn's ``KernelPCA(n_components=1, kernel,
    gamma)`` (sigmoid: k(y, y') = tanh(gamma <y, y'> + 1), gamma = 1 / C by default).

    Above 200 positions scikit-learn's ARPACK solver starts from a vector seeded with 0 here;
    pgc draws it from numpy's global random state (reference Q30). Up to 200 positions the solver
    is dense and the two agree."""
    method = KPCACAM(kernel=kernel, gamma=gamma)
    batch = np.asarray(activation_batch)
    inputs = CamInputs(x=batch, outputs=np.empty(0), targets=[], activations=[batch], gradients=[None])
    return method.raw(inputs, 0, eigen_smooth=False)


def get_2d_projection_with_sign_correction(activation_batch: np.ndarray) -> np.ndarray:
    """P+-(A): P(A), negated where |min P| > |max P| so that the salient side is positive
    (Chung & Ying 2025, Seg-Eigen-CAM, Eq. 13; SegEigenCAM's map)."""
    return eigen_projection(np.asarray(activation_batch), sign_correction=True)


__all__ = ["get_2d_projection", "get_2d_projection_kernel", "get_2d_projection_with_sign_correction"]
