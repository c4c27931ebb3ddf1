"""pytorch_grad_cam.eigen_grad_cam."""

from camexport.compat.cams import EigenGradCAM

__all__ = ["EigenGradCAM"]
