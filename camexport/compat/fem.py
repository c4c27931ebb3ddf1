"""pytorch_grad_cam.fem."""

from camexport.compat.cams import FEM

__all__ = ["FEM"]
