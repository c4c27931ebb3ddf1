"""pytorch_grad_cam.random_cam."""

from camexport.compat.cams import RandomCAM

__all__ = ["RandomCAM"]
