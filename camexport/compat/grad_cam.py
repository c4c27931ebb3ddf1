"""pytorch_grad_cam.grad_cam."""

from camexport.compat.cams import GradCAM

__all__ = ["GradCAM"]
