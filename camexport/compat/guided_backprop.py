"""pytorch_grad_cam.guided_backprop."""

from camexport.compat.cams import GuidedBackpropReLUModel

__all__ = ["GuidedBackpropReLUModel"]
