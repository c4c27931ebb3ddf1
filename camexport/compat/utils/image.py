"""pytorch_grad_cam.utils.image (reference §6, §3.15): input preparation, overlays, legends and
the min-max scaling of maps, with pgc's signatures and numbers.

The overlay is :func:`camexport.render.overlay` and the scaling is the CAM pipeline's own
``min_max`` and ``resize`` (:mod:`camexport.methods.pipeline`). matplotlib is needed only for
the default colours and the legend of :func:`show_factorization_on_image`; it is imported there,
not here. Differences from pgc (none changes a number on input that pgc accepts):

- a bad image or weight raises :class:`camexport.render.RenderError` (a ``ValueError``, so
  ``except Exception`` still catches it) with the fix, instead of a bare ``Exception``; a
  ``mean``/``std`` with neither one value nor one per channel raises a ValueError with the fix
  instead of torch's broadcasting RuntimeError;
- ``show_factorization_on_image`` leaves the caller's ``explanations`` unchanged (pgc zeroes
  every pixel outside each component's argmax in place, reference Q26) and draws its legend on
  its own Agg canvas without changing matplotlib's global ``rcParams`` (pgc sets
  ``legend.fontsize`` for the whole session) or opening a pyplot figure;
- ``scale_accross_batch_and_channels`` also accepts volumes, (W, H, D) sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

from camexport.errors import CamexportError
from camexport.methods.pipeline import min_max, resize
from camexport.render import overlay

if TYPE_CHECKING:
    import torch

#: the factor that maps pgc's deprocessed image to a contrast of 0.1 around 0.5 (keras-grad-cam)
DEPROCESS_CONTRAST = 0.1
#: added to the standard deviation in ``deprocess_image`` (pgc's constant)
DEPROCESS_EPS = 1e-5


class MatplotlibMissing(CamexportError, ImportError):
    """matplotlib, needed for the colours and legend of show_factorization_on_image, is absent."""


def _matplotlib():
    try:
        import matplotlib
    except ImportError as err:
        raise MatplotlibMissing("show_factorization_on_image needs matplotlib for its default colours and "
                                "its legend: pip install matplotlib (or pass colors= and no "
                                "concept_labels)") from err
    return matplotlib


def preprocess_image(img: np.ndarray, mean=[0.5, 0.5, 0.5],  # noqa: B006 (pgc's defaults, never mutated)
                     std=[0.5, 0.5, 0.5]) -> torch.Tensor:  # noqa: B006
    """An (H, W, C) or (H, W) image -> a (1, C, H, W) torch tensor, (x - mean_c) / std_c.

    As torchvision's ``ToTensor`` + ``Normalize``: uint8 is converted to the default float dtype
    and divided by 255; a float image is not divided and keeps its dtype. ImageNet models take
    mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
    """
    import torch

    img = np.asarray(img)  # a PIL image too, as ToTensor reads it
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise ValueError(f"preprocess_image takes an (H, W, C) or (H, W) image, got shape {img.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    if img.dtype == np.uint8:
        tensor = tensor.to(torch.get_default_dtype()).div(255)
    elif not tensor.is_floating_point():
        raise TypeError(f"preprocess_image takes a uint8 image (0..255) or a float one, got {img.dtype}: "
                        f"convert it, e.g. np.float32(img) / 255")
    mean = torch.as_tensor(mean, dtype=tensor.dtype).reshape(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype).reshape(-1, 1, 1)
    if {len(mean), len(std)} - {1, len(tensor)}:
        raise ValueError(f"mean and std have {len(mean)} and {len(std)} values for a {len(tensor)}-channel "
                         f"image: give one value per channel (or one for all)")
    if (std == 0).any():
        raise ValueError(f"std has a zero ({std.flatten().tolist()}): every channel's std must be non-zero")
    return ((tensor - mean) / std).unsqueeze(0)


def deprocess_image(img: np.ndarray) -> np.ndarray:
    """y = (img - mean) / (std + 1e-5) * 0.1 + 0.5 over the whole array (population std), clipped
    to [0, 1], uint8(255 y) by truncation: a gradient image made visible (keras-grad-cam)."""
    img = img - np.mean(img)
    img = img / (np.std(img) + DEPROCESS_EPS)
    img = np.clip(img * DEPROCESS_CONTRAST + 0.5, 0, 1)
    return np.uint8(img * 255)


def show_cam_on_image(img: np.ndarray, mask: np.ndarray, use_rgb: bool = False,
                      colormap: int = cv2.COLORMAP_JET, image_weight: float = 0.5) -> np.ndarray:
    """The map ``mask`` (H, W) in [0, 1] as an OpenCV heatmap over ``img`` (H, W, 3), float in
    [0, 1]: v = (1 - w) heat + w img, v / max(v), uint8 (:func:`camexport.render.overlay`).

    The heatmap is BGR unless ``use_rgb`` (give it True for an RGB image). A ``img`` above 1 or a
    weight outside [0, 1] raises :class:`camexport.render.RenderError` (a ValueError).
    """
    return overlay(img, mask, image_weight, colormap, use_rgb=use_rgb)


def create_labels_legend(concept_scores: np.ndarray, labels: dict[int, str], top_k=2) -> list[str]:
    """One legend entry per concept (row of ``concept_scores``, concepts x classes): its
    ``top_k`` classes, best first, each ``name:score`` (the first three comma-separated parts of
    the class's name, the score to two decimals), one per line."""
    best = np.argsort(concept_scores, axis=1)[:, ::-1][:, :top_k]
    return ["\n".join(f"{','.join(labels[k].split(',')[:3])}:{concept_scores[row, k]:.2f}" for k in ks)
            for row, ks in enumerate(best)]


def _default_colors(count: int) -> list[np.ndarray]:
    """matplotlib's gist_rainbow at 0, 1/k, 2/k, ... (RGBA), as DFF's authors colour concepts."""
    cmap = _matplotlib().colormaps["gist_rainbow"]
    return [np.array(cmap(t)) for t in np.arange(0, 1, 1.0 / count)[:count]]


def _hsv(color) -> np.ndarray:
    """An RGB(A) colour in [0, 1] as OpenCV's HSV triple of uint8(255 rgb)."""
    pixel = np.uint8(np.float64(color[:3]) * 255).reshape(1, 1, 3)
    return cv2.cvtColor(pixel, cv2.COLOR_RGB2HSV)[0, 0]


def show_factorization_on_image(img: np.ndarray, explanations: np.ndarray, colors=None,
                                image_weight: float = 0.5, concept_labels: list | None = None) -> np.ndarray:
    """Each pixel coloured by the component with the largest explanation there (the first on
    ties), its brightness that component's value: HSV of the component's colour with
    V = uint8(255 e); result = uint8(255 (img w + rgb / 255 (1 - w))) for an RGB float image.

    ``explanations`` (k, H, W); ``colors``: k RGB(A) colours in [0, 1] (default gist_rainbow).
    With ``concept_labels`` (k strings), a legend of the same size is drawn beside the image by
    matplotlib: (H, 2 W, 3).
    """
    count = explanations.shape[0]
    if colors is None:
        colors = _default_colors(count)
    winner = explanations.argmax(axis=0)
    # only the winning component is non-zero at a pixel, and HSV -> RGB works pixel by pixel:
    # one image with each pixel's winning hue and saturation gives what k images summed would
    hues = np.stack([_hsv(c) for c in colors[:count]])
    hsv = hues[winner]
    hsv[:, :, 2] = np.uint8(255 * np.take_along_axis(explanations, winner[None], axis=0)[0])
    mask = np.float32(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)) / 255
    result = np.uint8((img * image_weight + mask * (1 - image_weight)) * 255)
    if concept_labels is not None:
        result = np.hstack((result, _legend(colors[:count], concept_labels, result.shape[:2])))
    return result


def _legend(colors: Sequence, labels: Sequence[str], size: tuple[int, int]) -> np.ndarray:
    """pgc's legend: a (H, W) figure at matplotlib's ``figure.dpi``, one line of width
    5 H / 256 per component, font size int(14 H / 256 / max(1, k / 6)), 'expand' mode, fancy
    box with a shadow, axes hidden, tight layout; RGB uint8 resized to (H, W) by OpenCV."""
    matplotlib = _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    height, width = size
    dpi = matplotlib.rcParams["figure.dpi"]
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    lines = [Line2D([0], [0], color=c, lw=5 * height / 256) for c in colors]
    axes.legend(lines, labels, mode="expand", fancybox=True, shadow=True,
                fontsize=int(14 * height / 256 / max(1, len(colors) / 6)))
    figure.tight_layout(pad=0, w_pad=0, h_pad=0)
    axes.axis("off")
    canvas.draw()
    picture = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return cv2.resize(picture, (width, height))


def scale_cam_image(cam, target_size=None) -> np.ndarray:
    """n(X) = (X - min X) / (max(X - min X) + 1e-7) per map (the first axis indexes maps),
    then, with ``target_size`` (W, H) or (W, H, D), the CAM pipeline's resize: OpenCV bilinear
    for 2-D maps, scipy's cubic zoom for volumes (reference §2.4). float32."""
    maps = np.asarray(cam)
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)  # pgc divides by (1e-7 + max) in float64
    maps = min_max(maps)
    if target_size is None:
        return np.float32(maps)
    return resize(maps, tuple(target_size)[::-1])


def scale_accross_batch_and_channels(tensor, target_size) -> np.ndarray:
    """(B, C, *spatial) -> scale_cam_image of each (b, c) map -> (B, C, H, W) (or (B, C, D, H, W)
    for a (W, H, D) size)."""
    batch, channels = tensor.shape[:2]
    scaled = scale_cam_image(tensor.reshape(batch * channels, *tensor.shape[2:]), target_size)
    return scaled.reshape(batch, channels, *scaled.shape[1:])


__all__ = [
    "create_labels_legend",
    "deprocess_image",
    "preprocess_image",
    "scale_accross_batch_and_channels",
    "scale_cam_image",
    "show_cam_on_image",
    "show_factorization_on_image",
]
