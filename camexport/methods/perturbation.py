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


def _interpolation(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of corner-aligned linear interpolation: row i holds
    1 - t at floor(u) and t at floor(u) + 1, u = i (n_in - 1) / (n_out - 1), t = u - floor(u)."""
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0)
    coords = np.arange(n_out, dtype=np.float32) * scale
    low = np.minimum(np.floor(coords).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = (coords - low).astype(np.float32)
    weights = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, low), 1 - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


def upsample_align_corners(maps: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of (N, h, w) float32 maps with corner-aligned sampling,
    u = i (n_in - 1) / (n_out - 1), as torch's UpsamplingBilinear2d: two matrix products
    R_h A R_w^T with the interpolation weights (float32 round-off of torch's two-tap sums)."""
    maps = np.asarray(maps, dtype=np.float32)
    (height, width), (h, w) = size, maps.shape[1:]
    rows = maps if h == height else np.matmul(_interpolation(h, height), maps)
    return rows if w == width else np.matmul(rows, _interpolation(w, width).T)


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
            scores = self._scores(inputs, b, acts[b])
            shifted = np.exp(scores - scores.max())
            weights.append(shifted / shifted.sum())
        return np.asarray(weights, dtype=np.float32)

    def _scores(self, inputs, b: int, maps: np.ndarray) -> np.ndarray:
        """Target scores of image b masked by each of ``maps`` (C, h, w), upsampled and min-max
        normalised ``batch_size`` maps at a time. The masked images are written into one buffer
        and run whenever it is full. A constant map gives an all-zero mask (its upsampled map is
        constant: U - min U = 0): those share one forward, run last. Constancy is read on the
        low-resolution map, exactly; pgc reads it on its float32 upsampling, which leaves a
        non-zero constant map constant only up to round-off (0.37 at 7 -> 224: a spread of
        3e-8) that its 1e-8 turns into an arbitrary mask."""
        size = self.batch_size
        image = np.asarray(inputs.x[b], dtype=np.float32)
        buffer = np.empty((min(size, len(maps) + 1), *image.shape), np.float32)
        zero = np.zeros(len(maps), bool)
        order, found, filled = [], [], 0  # channels in the order run, their scores, buffer rows

        def place(masks: np.ndarray, channels: np.ndarray) -> None:
            nonlocal filled
            done = 0
            while done < len(channels):
                take = min(size - filled, len(channels) - done)
                np.multiply(image[None], masks[done:done + take, None], out=buffer[filled:filled + take])
                order.extend(channels[done:done + take].tolist())
                filled, done = filled + take, done + take
                if filled == size:
                    found.append(inputs.scores(b, inputs.forward(buffer)))
                    filled = 0

        flat = maps.reshape(len(maps), -1)
        zero[:] = flat.max(axis=1) == flat.min(axis=1)
        live = np.flatnonzero(~zero)
        for start in range(0, len(live), size):
            channels = live[start:start + size]
            up = upsample_align_corners(maps[channels], inputs.size)
            low = up.min(axis=(1, 2), keepdims=True)
            high = up.max(axis=(1, 2), keepdims=True)
            np.subtract(up, low, out=up)
            np.divide(up, high - low + np.float32(SCORECAM_EPS), out=up)
            place(up, channels)
        if zero.any():
            place(np.zeros((1, *inputs.size), np.float32), np.flatnonzero(zero)[:1])
        if filled:
            found.append(inputs.scores(b, inputs.forward(buffer[:filled])))
        found = np.concatenate(found).astype(np.float32)
        scores = np.empty(len(maps), np.float32)
        scores[order] = found
        scores[zero] = found[-1]  # (an empty assignment when no map is constant)
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
