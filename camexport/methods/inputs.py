"""CamInputs: everything a CAM method may read for one batch, filled by the Explainer, torch
eager (camexport.eager) or stored tensors (camexport.recompute)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from camexport.errors import CamexportError


class MethodInputError(CamexportError, ValueError):
    """A method asked for what the artifact or the call does not provide, with the fix."""


def channel_axis(layout: dict | None, rank: int) -> int:
    """The channel axis of a layer's tensor in the graph's own layout: 1 for NCHW, NCDHW and
    vectors (the default), the last axis for channel-last layouts (ViT tokens, NHWC)."""
    kind = (layout or {"kind": "NCHW"}).get("kind")
    return 1 if kind in ("NCHW", "NCDHW", "vector") else rank - 1


def ablated_copies(tensor: np.ndarray, axis: int, channels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """One copy of ``tensor`` (1, ...) per channel: copy i has channel ``channels[i]`` (axis
    ``axis``) set to ``values[i]`` at every position."""
    batch = np.repeat(tensor, len(channels), axis=0)
    moved = np.moveaxis(batch, axis, 1)  # a view: writing it writes batch
    moved[np.arange(len(channels)), channels] = np.asarray(values, batch.dtype).reshape(
        len(channels), *[1] * (moved.ndim - 2))
    return batch


def _at_least_float32(tensor: np.ndarray | None) -> np.ndarray | None:
    if tensor is None or tensor.dtype in (np.float32, np.float64):
        return tensor
    return tensor.astype(np.float32)


@dataclass
class CamInputs:
    """Everything a method may read, for one batch of B images.

    ``activations``/``gradients`` are channel-first (B, C, *spatial), one entry per layer;
    ``raw_activations`` are the same tensors in the graph's own layout. ``targets`` holds one
    target per image (:mod:`camexport.targets`). ``forward(x)`` runs the plain model on a batch of
    inputs and ``tail(layer, tensors, b)`` runs the model from a layer's tensors (raw layout) that
    come from image b (None: from no one image; refused where the model after the layer also reads
    values computed before it); both
    return model outputs; ``ablate(layer, b, channels, values)`` gives the model outputs of
    image b with channel ``channels[i]`` of the layer's tensor set to ``values[i]``, one row per
    i (AblationCAM; None: :meth:`ablated` runs the copies through ``tail``);
    ``backward(layer, weights)`` is the gradient at a layer (channel-first)
    for other ``target_weights`` rows; ``rerun(x, targets)`` gives the inputs of another batch
    (SESS's patches). Methods never see a session.
    """

    x: np.ndarray
    outputs: np.ndarray
    targets: list
    activations: list[np.ndarray]
    gradients: list[np.ndarray | None]
    raw_activations: list[np.ndarray] = field(default_factory=list)
    #: the gradients in the graph's own layout (None where not computed)
    raw_gradients: list[np.ndarray | None] = field(default_factory=list)
    layouts: list[dict] = field(default_factory=list)
    forward: Callable[[np.ndarray], np.ndarray] | None = None
    tail: Callable[..., np.ndarray] | None = None
    ablate: Callable[..., np.ndarray] | None = None
    backward: Callable[[int, np.ndarray], np.ndarray] | None = None
    rerun: Callable[[np.ndarray, list], CamInputs] | None = None
    # optional graph outputs (camexport.graph.outputs fills them; None: not built)
    #: d score / d x (FullGrad's input term), like ``x``
    input_gradient: np.ndarray | None = None
    #: FullGrad's (effective bias (C,), gradient at its layer (B, C, ...)) pairs
    bias_layers: list[tuple[np.ndarray, np.ndarray]] | None = None
    #: the input gradient through guided ReLUs (Guided Backprop), like ``x``
    guided_gradient: np.ndarray | None = None
    #: J A per layer: the model output's tangent along the layer's activation (ShapleyCAM)
    tangents: list[np.ndarray] | None = None
    #: seed of the random methods (RandomCAM, KPCA-CAM's solver); ``rng`` the generator in use
    seed: int = 0
    rng: object | None = None

    def __post_init__(self):
        # reference Q31 fix: float16 (and narrower) tensors are post-processed in float32
        self.activations = [_at_least_float32(a) for a in self.activations]
        self.gradients = [_at_least_float32(g) for g in self.gradients]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.x.shape[2:])

    def ablated(self, layer: int, b: int, channels: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Model outputs of image b with channel ``channels[i]`` of layer ``layer`` set to
        ``values[i]`` (every position), one row per i: ``ablate`` if given, else the ablated
        copies of the layer's tensor through ``tail``."""
        if self.ablate is not None:
            return self.ablate(layer, b, channels, values)
        raw = self.raw_activations[layer][b:b + 1]
        axis = channel_axis(self.layouts[layer] if self.layouts else None, raw.ndim)
        return self.tail(layer, ablated_copies(raw, axis, channels, values), b)

    def scores(self, b: int, outputs: np.ndarray) -> np.ndarray:
        """Target b's score on each row of ``outputs`` (float32)."""
        return np.asarray(self.targets[b].values(outputs), dtype=np.float32)
