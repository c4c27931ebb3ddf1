"""Methods that re-run the model: ScoreCAM (whole model) and AblationCAM (the tail only)."""

from __future__ import annotations

import numpy as np

from camexport.methods.base import WeightMethod
from camexport.methods.inputs import MethodInputError, channel_axis
from camexport.methods.pipeline import eigen_projection

#: ScoreCAM's per-channel mask normalisation epsilon (pytorch-grad-cam, reference §3.7, Q13).
SCORECAM_EPS = 1e-8
#: AblationCAM's step below the image minimum per ablated row (reference §3.8, Q14).
ABLATION_STEP = 1e7


def upsample_align_corners(maps: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of (N, h, w) float32 maps with corner-aligned sampling,
    u = i (n_in - 1) / (n_out - 1), as torch's UpsamplingBilinear2d."""
    out = maps.astype(np.float32)
    for axis, n_out in zip((1, 2), size):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0)
        coords = np.arange(n_out, dtype=np.float32) * scale
        low = np.minimum(np.floor(coords).astype(np.int64), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        frac = (coords - low).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = n_out
        frac = frac.reshape(shape)
        out = np.take(out, low, axis=axis) * (1 - frac) + np.take(out, high, axis=axis) * frac
    return out


class ScoreCAM(WeightMethod):
    """Wang et al. 2020, as pgc 1.5.7 computes it: each channel's map, corner-aligned upsampled
    and min-max normalised (eps 1e-8), masks the input; w_b = softmax over channels of the target
    scores of the masked inputs; M = sum_c w A with the low-resolution A. Up to B*C forwards, in
    batches of ``batch_size`` masked images: every channel whose map is constant has the same
    all-zero mask, hence the same masked input (zeros) and score, so that input runs once per
    image (pgc runs it for each such channel; post-ReLU layers of trained models have many).
    The masked images are made ``batch_size`` at a time and handed to ``inputs.forward``, which
    picks its own inner batch (the Explainer's by measurement, :mod:`camexport.tuning`)."""

    name = "scorecam"
    #: masked images made at once (64 at 224^2: 38 MB); not the inner batch of the forwards
    batch_size = 64

    def weights(self, inputs, layer):
        if inputs.forward is None:
            raise MethodInputError("ScoreCAM needs forward passes of the model")
        acts = inputs.activations[layer]
        if acts.ndim != 4:
            raise MethodInputError("ScoreCAM works on 2-D feature maps")
        weights = []
        for b in range(acts.shape[0]):
            up = upsample_align_corners(acts[b], inputs.size)
            low = up.min(axis=(1, 2), keepdims=True)
            high = up.max(axis=(1, 2), keepdims=True)
            masks = (up - low) / (high - low + np.float32(SCORECAM_EPS))
            scores = self._scores(inputs, b, masks, (high == low).reshape(-1))
            shifted = np.exp(scores - scores.max())
            weights.append(shifted / shifted.sum())
        return np.asarray(weights, dtype=np.float32)

    def _scores(self, inputs, b: int, masks: np.ndarray, zero: np.ndarray) -> np.ndarray:
        """Target scores of image b masked by each of ``masks`` (C, H, W); the masks flagged in
        ``zero`` (constant maps: U - min U = 0 exactly) are all zero and share one forward."""
        run = np.flatnonzero(~zero)
        if zero.any():
            run = np.append(run, np.flatnonzero(zero)[0])
        found = []
        for start in range(0, len(run), self.batch_size):
            chunk = inputs.x[b][None] * masks[run[start:start + self.batch_size], None]
            found.append(inputs.scores(b, inputs.forward(chunk.astype(np.float32))))
        found = np.concatenate(found).astype(np.float32)
        scores = np.empty(len(masks), np.float32)
        scores[run] = found
        scores[zero] = found[-1]  # (an empty assignment when no mask is all zero)
        return scores


def ablation_values(minimum: np.float32, rows: int) -> np.ndarray:
    """The fill value of each row of a chunk: 0 when the image minimum is exactly 0, else
    v_0 = m - 1e7, v_i = v_(i-1) - 1e7 in float32 (pgc re-reads the chunk minimum, Q14)."""
    if minimum == 0:
        return np.zeros(rows, np.float32)
    values, current = [], np.float32(minimum)
    for _ in range(rows):
        current = np.float32(current - np.float32(ABLATION_STEP))
        values.append(current)
    return np.asarray(values, np.float32)


#: Threshold of the objectiveness mask of AblationCAM's channel selection (pgc, reference §3.8).
OBJECTIVENESS_THRESHOLD = 0.01


def ablation_order(acts: np.ndarray, ratio: float) -> np.ndarray:
    """The channels of one image's activations (C, *spatial) that AblationCAM ablates, in order.

    ratio 1.0: every channel. Otherwise pgc's experimental selection (reference §3.8): mask =
    |P(A)| min-max normalised without eps, > 0.01; each channel's |A| min-max normalised without
    eps (a constant channel scores NaN, which sorts last, Q17); score = sum(mask a') / sum(a');
    the floor(C r) highest-scoring channels, highest first, then the floor(C r) lowest. pgc
    ablates a channel listed twice (r > 0.5) twice and then mis-assembles every later channel's
    score (Q16); here each channel is ablated once, at its first place in the list, which is the
    same list whenever r <= 0.5."""
    channels = acts.shape[0]
    if ratio == 1.0:
        return np.arange(channels)
    with np.errstate(invalid="ignore", divide="ignore"):
        projection = np.abs(eigen_projection(acts[None])[0])
        projection = projection - projection.min()
        mask = projection / projection.max() > OBJECTIVENESS_THRESHOLD
        flat = np.abs(acts.reshape(channels, -1))
        flat = flat - flat.min(axis=1, keepdims=True)
        normalised = flat / flat.max(axis=1, keepdims=True)
        scores = ((mask.reshape(-1) * normalised).sum(axis=1) / normalised.sum(axis=1))
    order = np.argsort(scores.astype(np.float32))
    count = int(channels * ratio)
    listed = [*order[::-1][:count], *order[:count]]
    return np.asarray(list(dict.fromkeys(int(c) for c in listed)), dtype=np.int64)


class AblationCAM(WeightMethod):
    """Desai & Ramaswamy 2020: w_bc = (o_b - s_bc) / o_b, s_bc = the target score with channel c
    of the layer replaced by pgc's ablation value, o_b the unablated score; M = sum_c w A. Only
    the tail (layer -> outputs) is re-run, on many channels per batch. Ablation values follow
    pgc's chunks of ``chunk`` rows (32) whatever the run batch (``batch_size``), over the list
    of ablated channels. ``ratio_channels_to_ablate`` < 1 ablates only the channels that
    :func:`ablation_order` picks (the others get weight 0), as pgc's experimental option, with
    the Q16 fix for ratios above 0.5. The Explainer runs each batch of ablated channels as
    one run of the rank-1 tail where the layer feeds a linear op
    (:mod:`camexport.graph.ablate`: a ViT's norm1 -> q/k/v projection), else the copies."""

    name = "ablationcam"
    chunk = 32
    batch_size = 256
    ratio_channels_to_ablate = 1.0

    def weights(self, inputs, layer):
        if inputs.tail is None and inputs.ablate is None:
            raise MethodInputError("AblationCAM needs the tail of the model")
        raw = inputs.raw_activations[layer]
        acts = inputs.activations[layer]
        layout = inputs.layouts[layer] if inputs.layouts else None
        channels = raw.shape[channel_axis(layout, raw.ndim)]
        base = inputs.scores
        weights = []
        for b in range(raw.shape[0]):
            original = base(b, inputs.outputs[b:b + 1])[0]
            order = ablation_order(acts[b], self.ratio_channels_to_ablate)
            minimum = np.float32(raw[b].min())
            fills = np.concatenate([ablation_values(minimum, min(self.chunk, len(order) - s))
                                    for s in range(0, len(order), self.chunk)] or [[]])
            scores = np.full(channels, original, np.float32)
            for start in range(0, len(order), self.batch_size):
                chosen = order[start:start + self.batch_size]
                values = fills[start:start + len(chosen)].astype(np.float32)
                scores[chosen] = base(b, inputs.ablated(layer, b, chosen, values))
            weights.append((original - scores) / original)
        return np.asarray(weights, dtype=np.float32)
