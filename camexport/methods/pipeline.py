"""The shared CAM pipeline: layer layouts, per-layer post-processing and layer aggregation.

Mirrors pytorch-grad-cam 1.5.7 (reference §2.3): for each layer l and image b,
``Q_l = R(n(relu(M_l)))`` (min-max with eps 1e-7, then bilinear resize to the input size), then
``CAM = n(mean_l relu(Q_l))``. ``n(X) = (X - min X) / (max(X - min X) + 1e-7)`` per map.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from functools import lru_cache

import cv2
import numpy as np

from camexport.errors import CamexportError


class LayoutError(CamexportError, ValueError):
    """A layer layout the methods cannot read as channel-first maps."""


#: pytorch-grad-cam's epsilon in every min-max normalisation (reference §2.3, Q6).
NORM_EPS = 1e-7

def to_channel_first(tensor: np.ndarray, layout: dict) -> np.ndarray:
    """A layer tensor as (B, C, *spatial), as pgc's reshape transforms make it (reference §5).

    Channel-last layouts come back as a strided view, like torch's permute: numpy's pairwise
    sums follow memory order, and near-zero denominators (XGradCAM) notice the difference."""
    kind = layout.get("kind")
    if kind in ("NCHW", "NCDHW", "vector"):
        return tensor
    if kind == "NHWC":
        return np.moveaxis(tensor, -1, 1)
    if kind == "tokens":
        grid, prefix = layout.get("grid"), layout.get("prefix_tokens")
        if grid is None:
            raise LayoutError(f"token layer of shape {tensor.shape} has no square grid; "
                             f"give the grid and prefix token count explicitly")
        b, _, d = tensor.shape
        spatial = tensor[:, prefix:, :].reshape(b, grid[0], grid[1], d)
        return np.moveaxis(spatial, -1, 1)
    raise LayoutError(f"unsupported layer layout {layout}")


def spatial_axes(a: np.ndarray) -> tuple[int, ...]:
    return tuple(range(2, a.ndim))


#: (a weak reference to the last tensor :func:`spatial_sums` read, its sums)
_last_sums: tuple[weakref.ref, np.ndarray] | None = None


def spatial_sums(tensor: np.ndarray) -> np.ndarray:
    """S_bc = sum_s X_bc, (B, C, 1, ...), read-only. Remembered for the last tensor (by
    identity, while it lives): GradCAM++ and XGradCAM of one call both read S of the same
    activations, and the sum over positions costs as much as their other reductions."""
    global _last_sums
    last = _last_sums
    if last is not None and last[0]() is tensor:
        return last[1]
    sums = tensor.sum(axis=spatial_axes(tensor), keepdims=True)
    sums.flags.writeable = False
    _last_sums = (weakref.ref(tensor), sums)
    return sums


#: float32 zeros that :func:`relu` compares with (grown on demand, never written)
_zeros = np.zeros(0, np.float32)
#: the largest array :func:`relu` keeps zeros for (elements): 16 MB
ZEROS_LIMIT = 1 << 22


def relu(tensor: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``np.maximum(tensor, 0, out=out)``, bit for bit (NaN and -0.0 kept as numpy keeps them),
    against an array of zeros: numpy's vectorised maximum runs on two arrays only, and with the
    scalar 0 it takes 3x as long (0.185 vs 0.064 ms for EfficientNet-Lite0's 8 x 1280 x 7 x 7)."""
    global _zeros
    tensor = np.asarray(tensor)
    if tensor.dtype != np.float32 or tensor.size > ZEROS_LIMIT:
        return np.maximum(tensor, 0, out=out)
    zeros = _zeros  # one read: another thread may replace it meanwhile
    if zeros.size < tensor.size:
        zeros = np.zeros(min(max(tensor.size, 2 * zeros.size), ZEROS_LIMIT), np.float32)
        zeros.flags.writeable = False
        _zeros = zeros
    return np.maximum(tensor, zeros[:tensor.size].reshape(tensor.shape), out=out)


def spatial_total(tensor: np.ndarray) -> np.ndarray:
    """sum_s X_bc, (B, C), for per-channel weights: one einsum over the flattened positions of a
    contiguous tensor, 4x as fast as numpy's sum (0.06 vs 0.26 ms for EfficientNet-Lite0's
    8 x 1280 x 7 x 7), which adds 49 positions with a call per channel. Not numpy's pairwise
    order: the weights differ from pgc's in the last bits (against float64: 7e-8 relative on
    7 x 7 positions, 5e-7 on 160 x 160, numpy's 5e-8), as round-off in the activations already
    makes them. The signed sums that are divided by (S of GradCAM++ and XGradCAM,
    :func:`spatial_sums`) keep numpy's order."""
    if not tensor.flags.c_contiguous or tensor.ndim < 3:
        return tensor.sum(axis=spatial_axes(tensor))
    return np.einsum("bcs->bc", tensor.reshape(_positions(tensor)))


def _positions(tensor: np.ndarray) -> tuple[int, int, int]:
    """(B, C, positions) of a (B, C, *spatial) tensor (explicit sizes: -1 fails on empty batches)."""
    return (*tensor.shape[:2], int(np.prod(tensor.shape[2:])))


def spatial_product_total(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """sum_s first_bc * second_bc, (B, C): :func:`spatial_total` of the product, in one einsum
    without the product array where both are contiguous."""
    if first.flags.c_contiguous and second.flags.c_contiguous and first.ndim > 2:
        shape = _positions(first)
        return np.einsum("bcs,bcs->bc", first.reshape(shape), second.reshape(shape))
    return spatial_total(first * second)


def min_max(maps: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """n(X) per map over all but the first axis, eps added after subtracting the min.
    ``out=maps`` normalises in place; else a new array (the shifted maps, divided in place)."""
    axes = tuple(range(1, maps.ndim))
    shifted = np.subtract(maps, maps.min(axis=axes, keepdims=True), out=out)
    scale = shifted.max(axis=axes, keepdims=True)
    scale += maps.dtype.type(NORM_EPS)
    return np.divide(shifted, scale, out=shifted if shifted.dtype.kind == "f" else None)


def resize(maps: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Each (h, w) map to ``size`` = (H, W): OpenCV INTER_LINEAR (half-pixel, no antialias).
    Volumes (d, h, w) to (D, H, W) as pgc's 3-D path (reference §2.4, Q8): scipy's cubic
    B-spline ``zoom`` (order 3, corner-aligned, mode 'constant'), which overshoots [0, 1].

    One cv2 call per map, written straight into the result: no per-map arrays to stack. (One
    call on the maps as channels of an (h, w, n) image is slower here: its (H, W, n) result
    must be transposed, and OpenCV's multi-channel path rounds differently, by up to 1.2e-7.)"""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape[1:] == tuple(size):
        return maps.copy()
    if len(size) == 3:
        from scipy.ndimage import zoom

        factors = [n / m for n, m in zip(size, maps.shape[1:])]
        return np.stack([zoom(m, factors, order=3, mode="constant") for m in maps])
    height, width = size
    resized = np.empty((len(maps), height, width), np.float32)
    for source, target in zip(maps, resized):
        cv2.resize(source, (width, height), dst=target, interpolation=cv2.INTER_LINEAR)
    return resized


def layer_map(raw: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Q_l = R(n(relu(M_l))) for one layer's raw maps (B, h, w)."""
    return resize(min_max(relu(raw)), size)


def aggregate(layer_maps: Sequence[np.ndarray], reuse: bool = False) -> np.ndarray:
    """CAM = n(mean_l relu(Q_l)), float32 (B, H, W). ``reuse``: the maps are the caller's own
    temporaries from :func:`layer_map` (non-negative: a bilinear resize of non-negative maps),
    which the result may overwrite."""
    if all(m.dtype == np.float32 and m.ndim == 3 for m in layer_maps):
        # the maps added in order, then divided (numpy's mean over the stacked axis): the same
        # numbers without the stacked copy; the relu changes nothing on the reused maps
        total = layer_maps[0] if reuse else relu(layer_maps[0])
        for other in layer_maps[1:]:
            total += other if reuse else relu(other)
        if len(layer_maps) > 1:
            total /= np.float32(len(layer_maps))
        return min_max(total, out=total)
    stacked = np.stack(layer_maps, axis=1)
    stacked = relu(stacked, out=stacked)
    return min_max(stacked.mean(axis=1)).astype(np.float32, copy=False)


#: elements (per tensor) of one block of images in :func:`by_images`: about 1 MB of float32
BLOCK_ELEMENTS = 1 << 18


def by_images(function: Callable[..., np.ndarray], *tensors: np.ndarray) -> np.ndarray:
    """``function(*tensors)`` on blocks of whole images (axis 0), concatenated: the same numbers
    for any per-image formula, with temporaries of about a MB each. Whole-batch temporaries (MBs
    each, out of the CPU caches, fresh memory on every call) cost 3x the arithmetic: GradCAM++
    weights on EfficientNet-Lite0, 8 images, 2 cores: 4.3 ms at once, 1.2 ms by blocks."""
    count = len(tensors[0])
    step = max(1, BLOCK_ELEMENTS // max(tensors[0][:1].size, 1))
    if step >= count:
        return function(*tensors)
    return np.concatenate([function(*(t[start:start + step] for t in tensors))
                           for start in range(0, count, step)])


def _sums_channel_by_channel(*tensors: np.ndarray) -> bool:
    """Whether numpy's sum over the channel axis (1) of these tensors' product adds one channel
    after another, as ``np.einsum`` does: the channel axis is not the innermost in memory (numpy
    adds contiguous channels pairwise, in blocks) and no stride is negative (numpy may walk a
    reversed axis backwards). Axes of size 1 do not count: numpy's iterator drops them, whatever
    their strides (a (B, C, 1, 1) view of a larger array sums its channels pairwise)."""
    def sequential(t: np.ndarray) -> bool:
        moving = [(stride, axis) for axis, (stride, size) in enumerate(zip(t.strides, t.shape))
                  if size > 1]
        spatial = [stride for stride, axis in moving if axis >= 2]
        return (t.ndim > 2 and bool(spatial) and all(stride > 0 for stride, _ in moving)
                and t.strides[1] > min(spatial))

    return all(sequential(t) for t in tensors)


def channel_sum(tensor: np.ndarray) -> np.ndarray:
    """sum_c X_bc: (B, C, *spatial) -> (B, *spatial), bit for bit ``tensor.sum(axis=1)``: one
    einsum where numpy adds the channels one after another (channel-first layouts), twice as
    fast as numpy's reduction (a call per channel)."""
    if _sums_channel_by_channel(tensor):
        return np.einsum("bc...->b...", tensor)
    return tensor.sum(axis=1)


def product_sum(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """sum_c first_bc * second_bc: (B, C, *spatial) twice -> (B, *spatial). Bit for bit
    ``(first * second).sum(axis=1)``: one einsum, without the product array, where numpy adds
    the channels one after another either way (channel-first layouts)."""
    if _sums_channel_by_channel(first, second):
        return np.einsum("bc...,bc...->b...", first, second)
    return (first * second).sum(axis=1)


def weighted_sum(weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
    """M = sum_c w_bc A_bc, for w (B, C): bit for bit the broadcast product summed over c, as
    :func:`product_sum` (one einsum for channel-first layouts)."""
    if _sums_channel_by_channel(activations):
        return np.einsum("bc,bc...->b...", weights, activations)
    expanded = weights.reshape(weights.shape + (1,) * (activations.ndim - 2))
    return (expanded * activations).sum(axis=1)


@lru_cache(maxsize=1)
def _blas_pools():
    import scipy.linalg  # noqa: F401 (scipy's own OpenBLAS, used by scikit-learn, is loaded too)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def one_blas_thread():
    """Context: numpy's and scipy's BLAS/LAPACK on one thread. The per-image decompositions
    (an SVD of a positions x channels matrix) are too small to gain from threads, and BLAS
    threads left spinning after them slow the next onnxruntime run on the same cores:
    EigenCAM on EfficientNet-Lite0, 8 images, 2 cores: 0.19 s -> 0.066 s (forward 0.040 s)."""
    return _blas_pools().limit(limits=1, user_api="blas")


def eigen_projection(tensor: np.ndarray, sign_correction: bool = False) -> np.ndarray:
    """P(X) per image: centred (positions x channels) matrix projected on its first right
    singular vector, numpy's LAPACK sign kept (reference §2.7, Q9). float32 (B, *spatial).
    ``sign_correction`` (SegEigenCAM's P+-): negate a map whose |min| exceeds its max."""
    tensor = np.nan_to_num(tensor, nan=0.0)
    projections = []
    with one_blas_thread():
        for item in tensor:
            rows = item.reshape(item.shape[0], -1).T
            rows = rows - rows.mean(axis=0)
            _, _, vt = np.linalg.svd(rows, full_matrices=False)
            projection = (rows @ vt[0]).reshape(item.shape[1:])
            if sign_correction and abs(projection.min()) > abs(projection.max()):
                projection = -projection
            projections.append(projection)
    return np.asarray(projections, dtype=np.float32)
