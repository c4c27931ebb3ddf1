"""pytorch_grad_cam.activations_and_gradients."""

from camexport.compat.base_cam import ActivationsAndGradients

__all__ = ["ActivationsAndGradients"]
