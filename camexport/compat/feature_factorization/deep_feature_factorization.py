"""pytorch_grad_cam.feature_factorization.deep_feature_factorization."""

from camexport.compat.cams import DeepFeatureFactorization, run_dff_on_image

__all__ = ["DeepFeatureFactorization", "run_dff_on_image"]
