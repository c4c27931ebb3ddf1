"""pytorch_grad_cam.refine_cam."""

from camexport.compat.cams import RefineCAM

__all__ = ["RefineCAM"]
