"""How a layer's tensor is laid out, so that methods can reshape it as pgc's transforms would."""

from __future__ import annotations

import math


def infer_layout(shape: tuple) -> dict:
    """A layout record for the manifest from a layer's static shape (batch first).

    Rank 4 is NCHW unless the last axis differs from two equal middle ones (channel-last
    feature maps, as in timm's Swin: (B, H, W, C)); rank 3 is a token sequence (B, T, D) whose
    grid is the largest square after 0-2 leading class/distillation tokens.
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
        tokens = shape[1]
        for prefix in (0, 1, 2):
            side = math.isqrt(max(tokens - prefix, 0)) if tokens else 0
            if tokens and side * side == tokens - prefix and side > 1:
                return {"kind": "tokens", "grid": [side, side], "prefix_tokens": prefix}
        return {"kind": "tokens", "grid": None, "prefix_tokens": None}
    return {"kind": f"rank{rank}"}
