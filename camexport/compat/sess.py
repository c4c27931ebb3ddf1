"""pytorch_grad_cam.sess."""

from camexport.compat.cams import SESS

__all__ = ["SESS"]
