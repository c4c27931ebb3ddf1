"""pytorch_grad_cam.utils.reshape_transforms (reference §5): token sequences to channel-first
maps, applied by the CAM classes to activations and gradients alike."""

from __future__ import annotations


def vit_reshape_transform(tensor, height=14, width=14):
    """(B, 1 + h w, D): the class token dropped, tokens row-major on an (h, w) grid -> (B, D, h, w)."""
    grid = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return grid.permute(0, 3, 1, 2)


def swinT_reshape_transform(tensor, height=7, width=7):
    """(B, h w, D), no token dropped -> (B, D, h, w)."""
    grid = tensor.reshape(tensor.size(0), height, width, tensor.size(2))
    return grid.permute(0, 3, 1, 2)


def fasterrcnn_reshape_transform(x):
    """An FPN's ordered dict of levels: each |level| resized bilinearly (no antialias) to the
    spatial size of the coarsest ('pool'), concatenated on channels."""
    import torch

    size = x["pool"].size()[-2:]
    levels = [torch.nn.functional.interpolate(torch.abs(value), size, mode="bilinear", align_corners=False)
              for value in x.values()]
    return torch.cat(levels, axis=1)
