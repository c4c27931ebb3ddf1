"""pytorch_grad_cam.shapley_cam."""

from camexport.compat.cams import ShapleyCAM

__all__ = ["ShapleyCAM"]
