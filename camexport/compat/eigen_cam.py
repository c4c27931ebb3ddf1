"""pytorch_grad_cam.eigen_cam."""

from camexport.compat.cams import EigenCAM

__all__ = ["EigenCAM"]
