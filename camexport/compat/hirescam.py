"""pytorch_grad_cam.hirescam."""

from camexport.compat.cams import HiResCAM

__all__ = ["HiResCAM"]
