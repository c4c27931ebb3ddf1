"""pytorch_grad_cam.sess."""

from camexport.compat.cams import SESS
from camexport.methods import composite


def window_starts(length, step_size, window_size):
    """pgc's argument order over camexport's own window placement."""
    return composite.window_starts(length, window_size, step_size)


def sliding_window(height, width, step_size, window_size):
    """The (x, y) top-left corners of equal windows covering the image, rows outer."""
    return [(x, y) for y in window_starts(height, step_size, window_size)
            for x in window_starts(width, step_size, window_size)]


__all__ = ["SESS", "sliding_window", "window_starts"]
