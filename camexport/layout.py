"""How a layer's tensor is laid out, so that methods can reshape it as pgc's transforms would."""

from __future__ import annotations

import math


def infer_layout(shape: tuple, input_size: tuple | None = None) -> dict:
    """A layout record for the manifest from a layer's static shape (batch first).

    Rank 4 is NCHW unless the last axis differs from two equal middle ones (channel-last
    feature maps, as in timm's Swin: (B, H, W, C)); rank 3 is a token sequence (B, T, D): after
    0-2 leading class/distillation tokens, the patch grid of the input (``input_size`` (H, W)
    cut into square patches, e.g. 14 x 20 for 224 x 320 with 16-pixel patches), else the
    largest square. ``grid`` None: no grid found (a clear error when a method reshapes it).
    """
    rank = len(shape)
    if rank == 2:
        return {"kind": "vector"}
    if rank == 5:
        return {"kind": "NCDHW"}
    if rank == 4:
        _, d1, d2, d3 = shape
        if d1 == d2 and d3 != d1:
            return {"kind": "NHWC", "grid": [d1, d2]}
        return {"kind": "NCHW", "grid": [d2, d3]}
    if rank == 3:
        tokens = shape[1] or 0
        for prefix in (0, 1, 2):
            grid = _patch_grid(tokens - prefix, input_size) or _square(tokens - prefix)
            if grid:
                return {"kind": "tokens", "grid": grid, "prefix_tokens": prefix}
        return {"kind": "tokens", "grid": None, "prefix_tokens": None}
    return {"kind": f"rank{rank}"}


def _square(count: int) -> list[int] | None:
    side = math.isqrt(max(count, 0))
    return [side, side] if side > 1 and side * side == count else None


def _patch_grid(count: int, input_size: tuple | None) -> list[int] | None:
    """(H/p, W/p) for the patch size p that makes ``count`` patches of the input, if one does."""
    if not input_size or len(input_size) != 2 or count < 2:
        return None
    height, width = input_size
    for patch in range(1, min(height, width) + 1):
        if height % patch == 0 and width % patch == 0 and (height // patch) * (width // patch) == count:
            return [height // patch, width // patch]
    return None
