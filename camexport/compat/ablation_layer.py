"""pytorch_grad_cam.ablation_layer (reference §3.8): the modules that pgc's AblationCAM puts in
the target layer's place, each returning copies of one image's cached activations with one
channel per copy ablated.

camexport's AblationCAM ablates inside the ONNX tail graph, so it reads only the kind of layer
given as ``ablation_layer`` (the layer's layout comes from the graph). These classes exist for
users' code that builds or subclasses them, and behave as pgc's when used directly::

    layer.activations_to_be_ablated(activations[b], ratio)      # numpy (C, ...): self.indices
    layer.set_next_batch(b, cached_output, n)                   # n copies of image b
    ablated = layer(x)                                          # x is ignored
    layer.indices = layer.indices[n:]                           # the next chunk's channels

Row i of the chunk has channel ``indices[i]`` filled with the value of
:func:`camexport.methods.perturbation.ablation_values`: 0 when the chunk's minimum m is exactly 0,
else m - (i + 1) 1e7 (iterated in float32). Differences from pgc, none numerical on the first
call of a float32 layer:

- a call returns new tensors and leaves ``activations`` as prepared (pgc ablates them in place,
  so a second call ablated further);
- the layer is an ordinary module (``forward``; pgc overrides ``__call__``), so hooks run;
- ``activations_to_be_ablated`` lists each channel once (pgc lists a channel twice when the
  ratio exceeds 0.5, reference Q16; the list is pgc's for ratios up to 0.5);
- the fill values are float32 steps whatever the layer's dtype (pgc steps in the layer's
  dtype), and keep stepping when one of them is exactly 0 (pgc then switches to 0, for a
  minimum of exactly k 1e7);
- calling the layer before ``set_next_batch`` or with fewer indices than rows raises an error
  that says so.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from camexport.errors import CamexportError
from camexport.methods.perturbation import OBJECTIVENESS_THRESHOLD, ablation_order, ablation_values
from camexport.methods.pipeline import eigen_projection
from camexport.two_stage import FPN_ABLATION_VALUE  # pgc's constant for an ablated FPN channel

#: torchvision's FPN levels, in the order of the flat channel index of fasterrcnn_reshape_transform
FPN_LEVELS = ("0", "1", "2", "3", "pool")
#: channels per FPN level (torchvision's out_channels)
FPN_CHANNELS = 256


class AblationLayerError(CamexportError, RuntimeError):
    """An ablation layer called before it was prepared."""


class AblationLayer(torch.nn.Module):
    """Channel-first activations (B, C, *spatial): the channel is axis 1 of each copy."""

    #: the axis of the channels in the chunk (n, ...)
    channel_axis = 1

    def __init__(self):
        super().__init__()
        #: the chunk (n copies of one image's activations) that set_next_batch prepared
        self.activations = None
        #: the channels still to ablate, one per row of the next chunk
        self.indices = None

    def objectiveness_mask_from_svd(self, activations: np.ndarray,
                                    threshold=OBJECTIVENESS_THRESHOLD) -> np.ndarray:
        """[q > threshold], q = |P(A)| min-max normalised without eps, P the EigenCAM projection
        of one image's activations (C, ...): where the first principal component is active."""
        projection = np.abs(eigen_projection(np.asarray(activations)[None])[0])
        projection = projection - projection.min()
        with np.errstate(invalid="ignore", divide="ignore"):
            return projection / projection.max() > threshold

    def activations_to_be_ablated(self, activations: np.ndarray, ratio_channels_to_ablate=1.0) -> np.ndarray:
        """The channels of one image's activations (C, ...) to ablate, kept as ``self.indices``
        (int32): all, in order, for ratio 1.0; else the floor(C r) channels that lie most in the
        objectiveness mask (mask with threshold 0.01), highest first, then the floor(C r) that
        lie least (:func:`camexport.methods.perturbation.ablation_order`, which computes the
        mask of :meth:`objectiveness_mask_from_svd` itself: overriding that method does not
        change this list)."""
        self.indices = np.int32(ablation_order(np.asarray(activations), ratio_channels_to_ablate))
        return self.indices

    def set_next_batch(self, input_batch_index, activations, num_channels_to_ablate) -> None:
        """Prepare the next chunk: ``num_channels_to_ablate`` copies of image
        ``input_batch_index`` of the layer's cached output ``activations``."""
        image = activations[input_batch_index]
        self.activations = image.clone().unsqueeze(0).repeat(num_channels_to_ablate, *[1] * image.dim())

    def _prepared(self):
        """The prepared chunk, or an error saying what to call first."""
        if self.activations is None or self.indices is None:
            raise AblationLayerError(f"{type(self).__name__} is not prepared: call activations_to_be_ablated "
                                     f"(or set .indices) and set_next_batch before calling it")
        return self.activations

    def _indices(self, rows: int) -> np.ndarray:
        """The channels of a chunk of ``rows`` copies, one per row."""
        if len(self.indices) < rows:
            raise AblationLayerError(f"{len(self.indices)} channel indices left for a chunk of {rows} rows: "
                                     f"set_next_batch with at most as many copies as indices")
        return self.indices[:rows]

    def forward(self, x):
        """The prepared chunk (``x`` is ignored) with row i's channel ``indices[i]`` filled with
        0 if the chunk's minimum m is exactly 0, else m - (i + 1) 1e7 (float32 steps)."""
        output = self._prepared().clone()
        indices = self._indices(output.shape[0])
        fills = ablation_values(np.float32(output.min().item()), len(indices))
        for row, (channel, value) in enumerate(zip(indices, fills, strict=True)):
            output.select(self.channel_axis, int(channel))[row] = float(value)
        return output


class AblationLayerVit(AblationLayer):
    """Token activations (B, tokens, D): the channel is the last axis, ablated across every
    token (class token included); the same minimum rule over the whole chunk."""

    channel_axis = -1


class AblationLayerFasterRCNN(AblationLayer):
    """A torchvision FPN's ordered dict of levels ('0', '1', '2', '3', 'pool', 256 channels
    each): flat channel k is channel k mod 256 of level floor(k / 256), as
    fasterrcnn_reshape_transform concatenates them, set to -1000 (no minimum rule)."""

    def set_next_batch(self, input_batch_index, activations, num_channels_to_ablate) -> None:
        """Prepare the next chunk: ``num_channels_to_ablate`` copies of image
        ``input_batch_index`` of every level."""
        self.activations = OrderedDict(
            (key, level[input_batch_index].clone().unsqueeze(0).repeat(num_channels_to_ablate, 1, 1, 1))
            for key, level in activations.items())

    def forward(self, x):
        """The prepared levels (``x`` is ignored), row i's flat channel ``indices[i]`` at -1000."""
        output = OrderedDict((key, level.clone()) for key, level in self._prepared().items())
        for row, flat in enumerate(self._indices(output["pool"].shape[0])):
            level, channel = divmod(int(flat), FPN_CHANNELS)
            output[FPN_LEVELS[level]][row, channel] = FPN_ABLATION_VALUE
        return output


__all__ = ["AblationLayer", "AblationLayerFasterRCNN", "AblationLayerVit"]
