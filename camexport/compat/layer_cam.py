"""pytorch_grad_cam.layer_cam."""

from camexport.compat.cams import LayerCAM

__all__ = ["LayerCAM"]
