"""pytorch_grad_cam.fullgrad_cam."""

from camexport.compat.cams import FullGrad

__all__ = ["FullGrad"]
