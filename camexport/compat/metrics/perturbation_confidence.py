"""pytorch_grad_cam.metrics.perturbation_confidence, computed by camexport's metric driver
(:func:`camexport.metrics.perturbation_run`, reference §7.1-§7.2).

``PerturbationConfidenceMetric(perturbation)(input_tensor, cams, targets, model)`` is, per image,
t_b(f(x'_b)) − t_b(f(x_b)) with x'_b the perturbed image (or t_b(f(x'_b)) alone with
``return_diff=False``), float32 (B,), or (B, K) for a target giving K values per image
(pgc's ``SoftmaxOutputTarget``, ``RawScoresOutputTarget``).

How it is computed:

- The perturbations pgc ships become camexport's: ``multiply_tensor_with_cam`` is x ⊙ cam,
  ``RemoveMostRelevantFirst`` / ``RemoveLeastRelevantFirst`` with a ``NoisyLinearImputer`` are
  camexport's removal mask and imputer (:mod:`camexport.imputation`). Any other perturbation (a
  user's callable, a subclass overriding ``__call__``, another imputer) is called as pgc calls it,
  image by image in order: ``perturbation(x_b on the CPU, torch.from_numpy(cam_b))``.
- Perturbed images of all images (and of all thresholds, for the averagers and ROADCombined) go
  through ``model`` in torch, under ``no_grad``, on ``input_tensor``'s device and dtype, in batches
  of at most ``camexport.metrics.MAX_BATCH``.
- Targets: the compat target classes (:mod:`camexport.compat.utils.model_targets`) give their
  values by camexport's formulas; any other callable is called on each output row in torch, as
  pgc does.
- The imputer noise comes from torch's global CPU generator in pgc's order (threshold by
  threshold, image by image, LeRF before MoRF in ROADCombined), each draw laid out as pgc's
  ``torch.randn_like`` of the transposed (n, C) solution, so after the same ``torch.manual_seed``
  the scores are pgc's to float32 round-off. ``camexport.metrics.evaluate`` keeps its seeded numpy
  generator (reference Q30).
- Batches differ from pgc's (all thresholds in one model call); on CUDA with TF32 convolutions
  (PyTorch's cuDNN default) outputs depend on the batch at ~1e-4, so scores differ from pgc's by
  that much there (measured 2.5e-4 on an H200; 2.4e-7 with ``torch.backends.cudnn.allow_tf32 =
  False``).

Deliberate differences from pytorch-grad-cam 1.5.7:

- Q28: ``percentile='auto'`` (Otsu) removes the pixels *above* the Otsu threshold of uint8(255·cam)
  for MoRF (of uint8(255·(1 − cam)) for LeRF); pgc removes the ones at or below it, the opposite
  end, i.e. pgc's MoRF 'auto' imputes the least relevant pixels. Same thresholds, inverted mask.
  Numeric percentiles are pgc's exactly. The mask handed to an imputer is float32 {0, 1} (pgc:
  uint8 {0, 255} for 'auto').
- Q29: ``NoisyLinearImputer`` uses its ``weighting`` (pgc ignores it); the default is pgc's.
- ``DropInConfidence`` / ``IncreaseInConfidence`` with ``return_visualization=True`` return
  ``(scores, images)`` (pgc raises ``TypeError`` negating the tuple).
- ``cams`` are cast to float32 for the built-in perturbations (a user's perturbation gets them as
  given, as in pgc); the perturbed batch returned is float32.
- Errors name the fix (``CompatError`` / ``MetricError``, both ``ValueError``): one target per image
  (pgc silently scores ``min(len(targets), B)`` images), a model returning a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import partial

import numpy as np
import torch

from camexport.compat.engine import CompatError, batch_array
from camexport.imputation import NEIGHBOURS, removal_mask
from camexport.metrics import Perturbation, perturbation_run

Result = np.ndarray | tuple[np.ndarray, torch.Tensor]


class PerturbationConfidenceMetric:
    """t(f(perturbation(x, cam))) − t(f(x)) per image (reference §7.1)."""

    def __init__(self, perturbation):
        self.perturbation = perturbation

    def __call__(self, input_tensor: torch.Tensor, cams: np.ndarray, targets: Sequence[Callable],
                 model: Callable, return_visualization: bool = False, return_diff: bool = True) -> Result:
        """Scores (B,) float32 (after − before, or after alone), and the perturbed batch (B, C, H, W)
        on ``input_tensor``'s device if ``return_visualization``."""
        cams = _numpy(cams)
        images: list | None = [] if return_visualization else None
        with _opened(input_tensor, cams, targets, model) as run:
            before = run.before if return_diff else None
            perturb = _perturbation(self.perturbation, run, input_tensor, cams)
            after = run.scores([perturb], keep=images)[0]
        result = after - before if return_diff else after
        if return_visualization:
            return result, torch.from_numpy(np.concatenate(images)).to(input_tensor.device)
        return result


class RemoveMostRelevantFirst:
    """``imputer(x_b, keep)`` with keep = 0 on the pixels of highest cam: cam ≥ P_p(cam), the top
    (100 − p) % (numpy's linear percentile), or for p = 'auto' uint8(255·cam) > Otsu threshold
    (Q28: pgc keeps those). ``keep`` is float32 {0, 1} (H, W)."""

    most_relevant_first = True

    def __init__(self, percentile, imputer):
        self.percentile = percentile
        self.imputer = imputer

    def __call__(self, input_tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        removed = removal_mask(_numpy(mask), self.percentile, self.most_relevant_first)
        return self.imputer(input_tensor, torch.from_numpy(np.float32(~removed)).to(mask.device))


class RemoveLeastRelevantFirst(RemoveMostRelevantFirst):
    """The same on 1 − cam: removes (1 − cam) ≥ P_p(1 − cam), the (100 − p) % least relevant."""

    most_relevant_first = False


class AveragerAcrossThresholds:
    """mean over p of ``imputer(p)(input_tensor, cams, targets, model)`` (``imputer`` makes a metric
    per percentile, pgc's name), float32. Metrics that are plain PerturbationConfidenceMetrics
    share one run: every threshold's images in the same model calls."""

    def __init__(self, imputer, percentiles=[10, 20, 30, 40, 50, 60, 70, 80, 90]):  # noqa: B006 (pgc's)
        self.imputer = imputer
        self.percentiles = percentiles

    def __call__(self, input_tensor: torch.Tensor, cams: np.ndarray, targets: Sequence[Callable],
                 model: Callable) -> np.ndarray:
        metrics = [self.imputer(p) for p in self.percentiles]
        if _batchable(metrics):
            return _mean_changes([metrics], input_tensor, cams, targets, model)[0]
        return np.mean(np.float32([m(input_tensor, cams, targets, model) for m in metrics]), axis=0)

    def _batched_metrics(self) -> list | None:
        """The metrics of pgc's loop when they can share one run, else None."""
        if type(self).__call__ is not AveragerAcrossThresholds.__call__:
            return None
        metrics = [self.imputer(p) for p in self.percentiles]
        return metrics if _batchable(metrics) else None


def _mean_changes(groups: Sequence[Sequence[PerturbationConfidenceMetric]], input_tensor: torch.Tensor,
                  cams: np.ndarray, targets: Sequence[Callable], model: Callable) -> list[np.ndarray]:
    """Each group's mean over its metrics of after − before, float32, from one run: perturbations
    made group by group, metric by metric, image by image (pgc's order of random draws)."""
    cams = _numpy(cams)
    with _opened(input_tensor, cams, targets, model) as run:
        changes = run.change([_perturbation(m.perturbation, run, input_tensor, cams)
                              for group in groups for m in group])
    bounds = np.cumsum([len(group) for group in groups])[:-1]
    return [part.mean(axis=0) for part in np.split(changes, bounds)]


# ---------------------------------------------------------------------------------------------
# The glue: pgc's torch arguments as camexport's driver takes them


class _TorchGlobalNormal:
    """N(0, 1) float32 draws from torch's global CPU generator, as pgc's imputer makes them:
    ``torch.randn_like(res.t())`` with res = torch.tensor(spsolve(A, b)), (n, C). SuperLU returns
    the solution in Fortran order and torch.tensor keeps the strides, so res.t() is a contiguous
    (C, n) and the draw is ``torch.randn(C, n)`` (measured with scipy 1.17.1, torch 2.14.1; the
    layout matters: from 16 values up torch fills contiguous and strided tensors differently)."""

    def standard_normal(self, size: tuple[int, int], dtype=np.float32) -> np.ndarray:
        draws = torch.randn(tuple(size), dtype=torch.float32, device="cpu")
        return draws.numpy().astype(dtype, copy=False)


TORCH_GLOBAL_NORMAL = _TorchGlobalNormal()


class _TorchTarget:
    """A pgc target callable, ``target(output_row) -> tensor``, called on each output row in torch
    on the model's device (one number or a vector per image)."""

    def __init__(self, function: Callable, device):
        self.function = function
        self.device = device

    def __repr__(self) -> str:
        return repr(self.function)

    def values(self, outputs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            rows = torch.from_numpy(np.ascontiguousarray(outputs, np.float32)).to(self.device)
            return np.stack([_numpy(self.function(row)) for row in rows])


def _opened(input_tensor: torch.Tensor, cams: np.ndarray, targets, model) -> AbstractContextManager:
    """camexport's run over pgc's arguments: the batch in numpy, the model called in torch, pgc's
    targets and torch's global generator for the imputer noise."""
    x = batch_array(input_tensor)
    device = input_tensor.device if isinstance(input_tensor, torch.Tensor) else torch.device("cpu")
    dtype = input_tensor.dtype if isinstance(input_tensor, torch.Tensor) else torch.float32
    if not callable(model):
        raise CompatError(f"model is a {type(model).__name__}; give the torch.nn.Module (or any "
                          f"callable batch -> outputs)")
    return perturbation_run(x, cams, _targets(targets, device), _torch_model(model, device, dtype),
                            TORCH_GLOBAL_NORMAL, scalar_targets=False)


def _targets(targets, device) -> list:
    """pgc's targets as the driver takes them: compat target classes as they are (their
    ``values``), other callables called in torch; the driver checks the count."""
    if targets is None:
        raise CompatError("the metrics need one target per image, e.g. "
                          "targets=[ClassifierOutputTarget(281)] (pgc's targets=None fails too)")
    result = []
    for target in targets:
        if callable(target) and not callable(getattr(target, "values", None)):
            target = _TorchTarget(target, device)
        result.append(target)
    return result


def _torch_model(model: Callable, device, dtype) -> Callable[[np.ndarray], np.ndarray]:
    def call(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            outputs = model(torch.from_numpy(images).to(device=device, dtype=dtype))
        if not isinstance(outputs, torch.Tensor):
            raise CompatError(f"the model returned a {type(outputs).__name__}; the metrics need a tensor "
                              f"of outputs, one row per image: wrap the model so that forward(x) "
                              f"returns one tensor (e.g. model(x)['out'])")
        return outputs.detach().to("cpu", torch.float32).numpy()
    return call


def _batchable(metrics: Sequence) -> bool:
    """Metrics whose call is the plain PerturbationConfidenceMetric.__call__ (no post-processing):
    their perturbations can share one run."""
    return bool(metrics) and all(type(m).__call__ is PerturbationConfidenceMetric.__call__ for m in metrics)


def _perturbation(perturbation, run, input_tensor: torch.Tensor, cams: np.ndarray) -> Perturbation:
    """camexport's perturbation for pgc's built-in ones; any other is called per image."""
    from camexport.compat.metrics.cam_mult_image import multiply_tensor_with_cam
    from camexport.compat.metrics.road import NoisyLinearImputer

    if perturbation is multiply_tensor_with_cam:
        return run.multiply
    kind = type(perturbation)
    if kind in (RemoveMostRelevantFirst, RemoveLeastRelevantFirst) and \
            type(perturbation.imputer) is NoisyLinearImputer:
        imputer = perturbation.imputer
        weights = NEIGHBOURS if imputer.weighting is None else tuple(
            (tuple(offset), float(weight)) for offset, weight in imputer.weighting)
        return run.road(perturbation.percentile, kind.most_relevant_first, imputer.noise, weights)
    return _called(perturbation, input_tensor, cams)


def _called(perturbation: Callable, input_tensor: torch.Tensor, cams: np.ndarray) -> Perturbation:
    """pgc's way: ``perturbation(x_b on the CPU, torch.from_numpy(cam_b))``, image by image in the
    caller's thread (so its random draws come in pgc's order)."""
    def plan(b: int, rng) -> Callable[[], np.ndarray]:
        return partial(_numpy, perturbation(input_tensor[b, ...].cpu(), torch.from_numpy(cams[b])))
    return plan


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


__all__ = ["AveragerAcrossThresholds", "PerturbationConfidenceMetric", "RemoveLeastRelevantFirst",
           "RemoveMostRelevantFirst"]
