"""pytorch_grad_cam.ablation_cam."""

from camexport.compat.cams import AblationCAM

__all__ = ["AblationCAM"]
