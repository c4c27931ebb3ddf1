"""pytorch_grad_cam.kpca_cam."""

from camexport.compat.cams import KPCA_CAM

__all__ = ["KPCA_CAM"]
