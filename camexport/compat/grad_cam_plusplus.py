"""pytorch_grad_cam.grad_cam_plusplus."""

from camexport.compat.cams import GradCAMPlusPlus

__all__ = ["GradCAMPlusPlus"]
