"""pytorch_grad_cam.utils.model_targets: pgc's target classes, with pgc's constructors.

Each class is both what pgc's is, a callable ``target(model_output) -> tensor`` on one sample's
torch output (so user code that calls a target keeps working, and the metrics call them), and the
camexport target of the same formula (:mod:`camexport.targets`), whose ``cotangent`` feeds the
graph's ``target_weights`` directly: no torch at run time for the built-in targets. Any other
callable is a user target, differentiated by torch autograd on the model output
(:class:`camexport.compat.engine.CallableTarget`).
"""

from __future__ import annotations

import numpy as np

from camexport import targets as native
from camexport.detection import FasterRCNNBoxScoreTarget as _NativeBoxScore


def _torch():
    import torch

    return torch


class ClassifierOutputTarget(native.ClassifierOutputTarget):
    """z[c] (one sample's 1-D output) or z[:, c] (a batch)."""

    def __init__(self, category):
        super().__init__(int(category))

    def __call__(self, model_output):
        if model_output.dim() == 1:
            return model_output[self.category]
        return model_output[:, self.category]


class ClassifierOutputSoftmaxTarget(native.ClassifierOutputSoftmaxTarget):
    """softmax(z)[c] over the last axis."""

    def __init__(self, category):
        super().__init__(int(category))

    def __call__(self, model_output):
        return _torch().softmax(model_output, dim=-1)[..., self.category]


class ClassifierOutputReST(native.ClassifierOutputReST):
    """z[c] - CE(z, c) per row (pgc 1.5.7: ``reduction='none'``); a 1-D output as a batch of one."""

    def __init__(self, category):
        super().__init__(int(category))

    def __call__(self, model_output):
        torch = _torch()
        single = model_output.dim() == 1
        rows = model_output[None] if single else model_output
        labels = torch.full((rows.shape[0],), self.category, dtype=torch.long, device=rows.device)
        loss = torch.nn.functional.cross_entropy(rows, labels, reduction="none")
        value = rows[:, self.category] - loss
        return value[0] if single else value


class BinaryClassifierOutputTarget(native.BinaryClassifierOutputTarget):
    """z (category 1) or -z (category 0), the whole output."""

    def __init__(self, category):
        super().__init__(int(category))

    def __call__(self, model_output):
        return model_output * (1 if self.category == 1 else -1)


class SoftmaxOutputTarget:
    """The whole softmax vector (for the metrics; not a scalar, so not a CAM target)."""

    def __call__(self, model_output):
        return _torch().softmax(model_output, dim=-1)


class RawScoresOutputTarget:
    """The whole output (for the metrics; not a scalar, so not a CAM target)."""

    def __call__(self, model_output):
        return model_output


class SemanticSegmentationTarget(native.SemanticSegmentationTarget):
    """sum_ij out[c, i, j] mask_ij on one sample's (K, H, W) output."""

    def __init__(self, category, mask):
        super().__init__(int(category), mask)

    def __call__(self, model_output):
        torch = _torch()
        mask = torch.as_tensor(self.mask, dtype=model_output.dtype, device=model_output.device)
        return (model_output[self.category, :, :] * mask).sum()


class FinerWeightedTarget(native.FinerWeightedTarget):
    """sum_j p_j (z_main - alpha z_j) / (sum_j p_j + 1e-9), p = softmax(z) not detached."""

    def __init__(self, main_category, comparison_categories, alpha):
        super().__init__(int(main_category), tuple(int(c) for c in comparison_categories), alpha)

    @property
    def main_category(self) -> int:
        return self.main

    @property
    def comparison_categories(self) -> list[int]:
        return list(self.comparisons)

    def __call__(self, model_output):
        torch = _torch()
        p = torch.softmax(model_output, dim=-1)
        comps = list(self.comparisons)
        weighted = p[..., comps] * (model_output[..., [self.main]] - self.alpha * model_output[..., comps])
        return weighted.sum(dim=-1) / (p[..., comps].sum(dim=-1) + native.FINER_EPS)


class FasterRCNNBoxScoreTarget(_NativeBoxScore):
    """For each reference (box, label): the predicted box of best IoU; add IoU + score when the
    IoU exceeds ``iou_threshold`` and the labels agree. Called on torchvision's per-image dict
    output (``boxes``, ``labels``, ``scores``); a (1,) tensor, 0 when nothing is predicted."""

    def __init__(self, labels, bounding_boxes, iou_threshold=0.5):
        super().__init__(labels, bounding_boxes, iou_threshold)

    def __call__(self, model_outputs):
        torch = _torch()
        from torchvision.ops import box_iou

        boxes = model_outputs["boxes"]
        output = torch.zeros(1, dtype=boxes.dtype, device=boxes.device)
        if len(boxes) == 0:
            return output
        references = torch.as_tensor(np.asarray(self.bounding_boxes), dtype=boxes.dtype,
                                     device=boxes.device)
        for box, label in zip(references, self.labels):
            ious = box_iou(box[None], boxes)
            index = ious.argmax()
            if ious[0, index] > self.iou_threshold and model_outputs["labels"][index] == label:
                output = output + ious[0, index] + model_outputs["scores"][index]
        return output


__all__ = [
    "BinaryClassifierOutputTarget",
    "ClassifierOutputReST",
    "ClassifierOutputSoftmaxTarget",
    "ClassifierOutputTarget",
    "FasterRCNNBoxScoreTarget",
    "FinerWeightedTarget",
    "RawScoresOutputTarget",
    "SemanticSegmentationTarget",
    "SoftmaxOutputTarget",
]
