"""pytorch_grad_cam.seg_eigen_cam."""

from camexport.compat.cams import SegEigenCAM

__all__ = ["SegEigenCAM"]
