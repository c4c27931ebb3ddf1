"""pytorch_grad_cam.score_cam."""

from camexport.compat.cams import ScoreCAM

__all__ = ["ScoreCAM"]
