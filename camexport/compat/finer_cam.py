"""pytorch_grad_cam.finer_cam."""

from camexport.compat.cams import FinerCAM

__all__ = ["FinerCAM"]
