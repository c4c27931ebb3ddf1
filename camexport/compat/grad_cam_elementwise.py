"""pytorch_grad_cam.grad_cam_elementwise."""

from camexport.compat.cams import GradCAMElementWise

__all__ = ["GradCAMElementWise"]
