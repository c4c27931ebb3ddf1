"""pytorch_grad_cam.xgrad_cam."""

from camexport.compat.cams import XGradCAM

__all__ = ["XGradCAM"]
