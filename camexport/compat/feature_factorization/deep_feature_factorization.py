"""pytorch_grad_cam.feature_factorization.deep_feature_factorization."""

from camexport.compat.cams import DeepFeatureFactorization, run_dff_on_image
from camexport.methods.factorization import factorize


def dff(activations, n_components=5):
    """(concepts (C, k), explanations (B, k, h, w)): the NMF of (B, C, h, w) activations."""
    return factorize(activations, n_components)


__all__ = ["DeepFeatureFactorization", "dff", "run_dff_on_image"]
