"""Composite methods: a base method run on other targets (FinerCAM), per layer (RefineCAM) or on
patches of the input (SESS: Saliency Enhancing with Scaling and Sliding, Tyagi et al. 2022),
as pgc 1.5.7 (reference §3.11, §3.13, §3.14)."""

from __future__ import annotations

import cv2
import numpy as np

from camexport.methods.base import Method
from camexport.methods.gradient import GradCAM, GradCAMPlusPlus
from camexport.methods.inputs import MethodInputError
from camexport.methods.pipeline import aggregate, layer_map, min_max


class FinerCAM(Method):
    """Zhang et al. 2025, as pgc 1.5.7 (reference §3.11): with targets given, the base method
    (GradCAM) with those targets. With targets None, per image: order = argsort |z - max z|
    (numpy's default sort), main = order[0], comparisons = order[j] for j in (1, 2, 3) (j <= K-1),
    target = FinerWeightedTarget(main, comparisons, alpha) whose gradient flows through softmax."""

    name = "finercam"
    alpha = 1.0
    positions = (1, 2, 3)
    base = GradCAM

    def retarget(self, outputs: np.ndarray, targets):
        from camexport.targets import FinerWeightedTarget

        if targets is not None:
            return targets
        result = []
        for row in outputs.reshape(outputs.shape[0], -1):
            order = np.argsort(np.abs(row - row.max()))
            comparisons = tuple(int(order[j]) for j in self.positions if j <= len(row) - 1)
            result.append(FinerWeightedTarget(int(order[0]), comparisons, self.alpha))
        return result

    def raw(self, inputs, layer, eigen_smooth):
        return self.base().raw(inputs, layer, eigen_smooth)

class RefineCAM(Method):
    """pgc 1.5.5+ (reference §3.13): the base method (GradCAM++) run on each layer alone, the
    per-layer final maps multiplied pixel-wise, then min-max normalised (eps 1e-7).
    ``eigen_smooth`` means eigen smoothing here (pgc runs aug_smooth instead, Q23)."""

    name = "refinecam"
    base = GradCAMPlusPlus

    def __call__(self, inputs, eigen_smooth=False):
        base = self.base()
        product = None
        for layer in range(len(inputs.activations)):
            final = aggregate([layer_map(base.raw(inputs, layer, eigen_smooth), inputs.size)],
                              reuse=True)
            product = final if product is None else product * final
        return min_max(product).astype(np.float32)


def window_starts(length: int, window: int, step: int) -> list[int]:
    """0, step, 2 step, ... up to the first start whose window reaches the end, which is moved
    back to max(length - window, 0)."""
    starts, position = [], 0
    while position + window < length:
        starts.append(position)
        position += step
    starts.append(max(length - window, 0))
    return starts


class SESS(Method):
    """Per image: the input resized to 12 scales (shorter side w + round(2w/7) i), square
    windows of the shorter side w slid with stride w; each patch scored by its target on the
    softmax of the outputs (clipped at 0); the base method's CAM of each patch, weighted by its
    score over the best score, pasted back at its place and resized to the input; fused by a
    thresholded mean (theta 0); an 11x11 Gaussian blur (sigma 5); min-max per image. Each
    patch's outputs and base CAM come from one graph run. Parity with pgc: 1.4e-6 (resnet18)."""

    name = "sess"
    base = GradCAM
    num_scales = 12
    scale_step_ratio = 2.0 / 7.0
    pre_filter_ratio = 0.0
    theta = 0.0
    pool = "mean"
    smooth = True
    use_softmax_scores = True
    batch_size = 32

    def __call__(self, inputs, eigen_smooth=False):
        if inputs.rerun is None:
            raise MethodInputError("SESS needs the graph on new inputs")
        return min_max(np.stack([self.single(inputs, b, eigen_smooth)
                                 for b in range(len(inputs.x))])).astype(np.float32)

    def patches(self, image: np.ndarray, window: int):
        """The patches (n, C, w, w) and their (x, y, width, height) in the scaled image."""
        _, height, width = image.shape
        step = round(window * self.scale_step_ratio)
        patches, places = [], []
        for scale in (window + step * i for i in range(self.num_scales)):
            short, long = min(height, width), max(height, width)
            size = (scale, long * scale // short)  # (shorter, longer)
            new_h, new_w = size if height <= width else size[::-1]
            scaled = image
            if (new_h, new_w) != (height, width):
                hwc = cv2.resize(np.ascontiguousarray(image.transpose(1, 2, 0)), (new_w, new_h),
                                 interpolation=cv2.INTER_LINEAR)
                scaled = hwc.reshape(new_h, new_w, -1).transpose(2, 0, 1)
            for y in window_starts(new_h, window, window):
                for x in window_starts(new_w, window, window):
                    patches.append(scaled[:, y:y + window, x:x + window])
                    places.append((x, y, new_w, new_h))
        return np.ascontiguousarray(np.stack(patches), dtype=np.float32), places

    def single(self, inputs, b: int, eigen_smooth: bool) -> np.ndarray:
        """One image: each patch's outputs and base CAM come from the same graph run (in chunks
        of ``batch_size`` patches, in patch order), so the patches' forward pass runs once."""
        height, width = inputs.size
        window = min(height, width)
        target = inputs.targets[b]
        patches, places = self.patches(inputs.x[b], window)
        base = self.base()
        outputs, cams = [], []
        for start in range(0, len(patches), self.batch_size):
            chunk = patches[start:start + self.batch_size]
            patch_inputs = inputs.rerun(chunk, [target] * len(chunk))
            outputs.append(patch_inputs.outputs)
            cams.append(base(patch_inputs, eigen_smooth))
        outputs, cams = np.concatenate(outputs), np.concatenate(cams)
        if self.use_softmax_scores:
            shifted = np.exp(outputs - outputs.max(axis=-1, keepdims=True))
            outputs = shifted / shifted.sum(axis=-1, keepdims=True)
        scores = np.maximum(np.asarray(target.values(outputs), np.float32), 0)
        order = np.argsort(scores)[int(len(scores) * self.pre_filter_ratio):]
        best = scores[order[-1]]
        weights = scores[order] / best if best > 0 else np.ones(len(order), np.float32)
        total = np.zeros((height, width), np.float32)
        count = np.zeros((height, width), np.float32)
        for index, weight in zip(order, weights):  # pgc's order: the sums round the same way
            x, y, scaled_w, scaled_h = places[index]
            canvas = np.zeros((scaled_h, scaled_w), np.float32)
            canvas[y:y + window, x:x + window] = cams[index] * weight
            pasted = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_LINEAR)
            if self.pool == "max":
                total = np.maximum(total, pasted)
            else:
                keep = pasted > self.theta
                total += np.where(keep, pasted, 0)
                count += keep
        fused = total if self.pool == "max" else np.where(count > 0, total / np.maximum(count, 1), 0)
        fused = fused.astype(np.float32)
        return cv2.GaussianBlur(fused, (11, 11), 5.0, 0) if self.smooth else fused
