"""CAM evaluation metrics of pytorch-grad-cam (reference §7) without torch, plus a few additions.

Every metric scores one CAM per image from model runs on perturbed copies of the image::

    evaluate(name, x, cams, targets, model, seed=0) -> (B,) float32

``x`` is the preprocessed (normalised) batch (B, C, H, W), ``cams`` the maps (B, H, W) in [0, 1] at
the input size, ``targets`` one target object per image (camexport.targets: ``t.values(z)``) and
``model(batch) -> outputs (n, K)`` any callable (an onnxruntime session in production). Perturbed
images of all thresholds and images of a call go to ``model`` in chunks of at most ``MAX_BATCH``.

A metric name may carry its parameter after a colon: ``road-morf:70``, ``road-morf:auto``,
``road-combined:20,40,60,80``, ``deletion-auc:50``. ``metric_names`` gives the canonical spelling
(the parameter is dropped when it is the default), which is also what ``evaluate`` accepts.

Deliberate differences from pytorch-grad-cam 1.5.7 (reference §10):

- Q28: ``'auto'`` (Otsu) removes the pixels *above* the Otsu threshold of uint8(255·cam) for MoRF
  (of uint8(255·(1 − cam)) for LeRF); the library removes the ones below, i.e. the opposite end.
- Q30: the imputer noise comes from ``numpy.random.default_rng(seed)``, drawn in the library's
  order (threshold by threshold, image by image; LeRF before MoRF in road-combined), not from
  torch's global generator. Inject the same draws and the scores agree (tests/test_metrics.py).
- CAMs are cast to float32 first, so percentiles are float32 as for the usual float32 CAMs.

Additions (not in the library): ``remove-morf`` / ``remove-lerf`` remove the same pixels as ROAD
but set them to the image's per-channel mean (no imputer: the classic removal, whose mask shape
leaks, which ROAD was made to avoid). ``deletion-auc`` / ``insertion-auc`` are RISE's curves
(Petsiuk et al. 2018): S = 20 steps by default, after step k the round(k/S·H·W) pixels of highest
CAM (ties in row-major order) are set to 0 in normalised space (deletion; the dataset mean colour
under mean/std normalisation) or copied from x onto a Gaussian blur of x (insertion); the score is
the trapezoidal mean of the target's value over the S + 1 points (use ClassifierOutputSoftmaxTarget
for RISE's probability). ``adcc`` is Poppi et al. 2021's ADCC, of the ARCC family below.

The ARCC family (reference §7.5) re-runs a CAM method inside the metric: ``coherency[:METHOD]``,
``arcc[:METHOD][:percentiles]`` (``arcc::30,70``: own method, other percentiles) and
``adcc[:METHOD]`` call ``cam_fn(method, images, targets) -> cams`` (evaluate's ``cam_fn``; one
callable serves every method the names ask for) on x ⊙ cam, with ``cam_targets``, the targets the
CAMs were made for (default: ``targets``, as the library passes its one list to both). Without
METHOD the method is the one that made the CAMs (evaluate's ``cam_method``; `camexport run` and
`camexport evaluate` score each method's CAMs with the method itself, as the library's ARCC is
used). ``complexity`` needs neither model nor method.

Parity (tests/test_metrics.py, random resnet18, 64×64, batch 3): every library metric within 3e-7
of pytorch-grad-cam 1.5.7, imputed pixels within 2e-8 (noise 0). The ARCC family
(tests/test_arcc.py, camexport's graph against pgc's GradCAM in torch, random resnet18 and the
pretrained EfficientNet-Lite0): complexity exact, coherency and ARCC within 1e-5.

The driver under ``evaluate`` is open to callers that choose the perturbations, the noise source
and vector targets themselves (``perturbation_run``): ``camexport.compat.metrics``, the library's
classes with torch models and torch's global generator, is computed by it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property, partial
from itertools import islice

import cv2
import numpy as np

from camexport.errors import CamexportError
from camexport.imputation import (
    NEIGHBOURS,
    NOISE,
    NormalSource,
    draw_noise,
    fill,
    impute,
    noisy_linear_impute,
    removal_mask,
)
from camexport.targets import ClassifierOutputTarget

#: ROADMostRelevantFirst / ROADLeastRelevantFirst defaults and the averagers' thresholds.
MORF_PERCENTILE = 80
LERF_PERCENTILE = 20
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
#: Deletion / insertion curves: points at 0, 1/S, ..., 1 of the pixels.
AUC_STEPS = 20
#: Insertion starts from a Gaussian blur of the image, RISE's (Petsiuk et al. 2018) klen=11, sigma=5.
BLUR_SIZE = 11
BLUR_SIGMA = 5.0
#: Most images per model call.
MAX_BATCH = 64
#: ARCC's ROADCombined thresholds (the library's ARCC default road_percentiles).
ARCC_PERCENTILES = (20, 40, 60, 80)
#: The library's epsilons (reference §7.5): Pearson's denominator, and each reciprocal of ARCC's
#: harmonic mean (ADCC's too: Poppi et al. write none, the same ε keeps a zero term finite).
PEARSON_EPS = 1e-8
HARMONIC_EPS = 1e-8

#: what the metrics module offers (the imputer is re-exported from camexport.imputation)
__all__ = ["METRICS", "CamFn", "Metric", "MetricError", "evaluate", "metric_methods", "metric_names",
           "noisy_linear_impute", "pearson", "perturbation_run", "removal_mask"]

Plan = Callable[[], np.ndarray]
"""Computes one perturbed image (C, H, W); may run in a worker thread."""
Perturbation = Callable[[int, NormalSource], Plan]
"""(image index, generator) -> plan; called in order in the caller's thread, so random draws are
made in a fixed order."""
CamFn = Callable[[str, np.ndarray, list], np.ndarray]
"""(method, images (n, C, H, W), targets) -> that method's CAMs (n, H, W) in [0, 1]: what the
ARCC family re-runs on x ⊙ cam."""


class MetricError(CamexportError, ValueError):
    """An unknown metric, a bad parameter, or inputs that do not fit together."""


# ---------------------------------------------------------------------------------------------
# The driver: perturbed images through the model, target values out


@dataclass
class _Run:
    """One evaluate call: the batch, the model, the generator and the worker pool.
    ``scalar_targets``: refuse targets that give more than one number per image (evaluate's
    contract); pytorch-grad-cam's metrics also take vector targets (SoftmaxOutputTarget).
    ``cam_fn``, ``cam_targets`` and ``cam_method``: the CAM method callable, the targets the CAMs
    were made for and the method that made them, for the metrics that re-run a method
    (coherency, ARCC, ADCC)."""

    x: np.ndarray
    cams: np.ndarray
    targets: list
    model: Callable[[np.ndarray], np.ndarray]
    rng: NormalSource
    noise: float
    pool: ThreadPoolExecutor | None
    scalar_targets: bool = True
    cam_fn: CamFn | None = None
    cam_targets: list | None = None
    cam_method: str | None = None

    def _outputs(self, images: np.ndarray) -> np.ndarray:
        outputs = np.asarray(self.model(images), np.float32)
        if outputs.ndim < 2 or outputs.shape[0] != len(images):
            raise MetricError(f"the model returned shape {outputs.shape} for {len(images)} images; "
                              f"it must return one output row per image, (n, K)")
        return outputs

    def _values(self, outputs: np.ndarray) -> np.ndarray:
        """(P, B, ...) outputs -> (P, B) float32 target values; (P, B, ...) for targets giving
        one value of shape (...) per output, when the run allows them."""
        columns = []
        for b, target in enumerate(self.targets):
            values = np.asarray(target.values(outputs[:, b]), np.float32)
            if values.shape[:1] != outputs.shape[:1] or (self.scalar_targets and values.ndim != 1):
                raise MetricError(f"target {target!r} gives shape {values.shape[1:]} per output; "
                                  f"metrics need one number per image (a class target)")
            if columns and values.shape != columns[0].shape:
                raise MetricError(f"target {target!r} gives shape {values.shape[1:]} per output, "
                                  f"target 0 {columns[0].shape[1:]}: every image's target must give "
                                  f"values of one shape")
            columns.append(values)
        return np.stack(columns, axis=1)

    def scores(self, perturbations: Sequence[Perturbation], keep: list | None = None) -> np.ndarray:
        """Target values (P, B) on perturbation p of image b, in model calls of MAX_BATCH images.
        The perturbed images, (P·B, C, H, W) in chunks, are appended to ``keep`` if given."""
        batch = len(self.x)
        plans = (perturb(b, self.rng) for perturb in perturbations for b in range(batch))
        outputs = []
        for chunk in _chunks(plans, MAX_BATCH):
            images = np.stack(list(self.pool.map(_call, chunk) if self.pool else map(_call, chunk)))
            if keep is not None:
                keep.append(images)
            outputs.append(self._outputs(images))
        outputs = np.concatenate(outputs)
        return self._values(outputs.reshape(len(perturbations), batch, *outputs.shape[1:]))

    @cached_property
    def before(self) -> np.ndarray:
        """Target values (B,) on the unperturbed images."""
        chunks = [self._outputs(self.x[i:i + MAX_BATCH]) for i in range(0, len(self.x), MAX_BATCH)]
        return self._values(np.concatenate(chunks)[None])[0]

    def change(self, perturbations: Sequence[Perturbation]) -> np.ndarray:
        """after − before (P, B), float32 (PerturbationConfidenceMetric, reference §7.1)."""
        return self.scores(perturbations) - self.before

    def method_cams(self, method: str | None, images: np.ndarray) -> np.ndarray:
        """``method``'s CAMs (B, H, W) float32 of ``images`` for the CAMs' targets, via cam_fn;
        None: the method that made the CAMs."""
        method = method or self.cam_method
        if method is None:
            raise MetricError("this metric re-runs the CAM method that made the CAMs: pass "
                              "cam_method='gradcam' (its name), or name it: coherency:gradcam")
        if self.cam_fn is None:
            raise MetricError(f"this metric re-runs {method} on x ⊙ cam: pass cam_fn=(method, images, "
                              f"targets) -> cams, e.g. lambda m, x, t: explainer(x, targets=t, "
                              f"methods=[m]).cams[m]")
        targets = self.targets if self.cam_targets is None else self.cam_targets
        cams = np.asarray(self.cam_fn(method, images, targets), np.float32)
        if cams.shape != self.cams.shape:
            raise MetricError(f"cam_fn gave {method} maps of shape {cams.shape} for {len(images)} "
                              f"images; it must give {self.cams.shape}")
        return cams

    # perturbations

    def multiply(self, b: int, rng: NormalSource) -> Plan:
        """x_b ⊙ cam_b, the CAM broadcast over channels (normalised space)."""
        return partial(np.multiply, self.x[b], self.cams[b])

    def road(self, percentile: float | str, most_relevant_first: bool, noise: float | None = None,
             weights=NEIGHBOURS) -> Perturbation:
        """RemoveMost/LeastRelevantFirst(percentile, NoisyLinearImputer(noise, weights)); the
        run's noise by default."""
        noise = self.noise if noise is None else noise

        def plan(b: int, rng: NormalSource) -> Plan:
            removed = removal_mask(self.cams[b], percentile, most_relevant_first)
            draws = draw_noise(rng, noise, self.x.shape[1], int(removed.sum()))
            return partial(impute, self.x[b], removed, draws, weights)
        return plan

    def remove(self, percentile: float | str, most_relevant_first: bool) -> Perturbation:
        """The same pixels as ROAD, set to the image's per-channel mean instead of imputed."""
        def plan(b: int, rng: NormalSource) -> Plan:
            removed = removal_mask(self.cams[b], percentile, most_relevant_first)
            image = self.x[b]
            return partial(fill, image, removed, image.mean(axis=(1, 2))[:, None])
        return plan

    @cached_property
    def order(self) -> np.ndarray:
        """Pixels (B, H·W) by decreasing CAM, ties in row-major order."""
        return np.argsort(-self.cams.reshape(len(self.cams), -1), axis=1, kind="stable")

    def reveal(self, step: int, steps: int, deletion: bool) -> Perturbation:
        """Deletion: x with its first n = round(step/steps·H·W) pixels in CAM order set to 0.
        Insertion: blur(x) with those pixels taken from x."""
        def plan(b: int, rng: NormalSource) -> Plan:
            image = self.x[b]
            start, end = (image, np.zeros_like(image)) if deletion else (_blur(image), image)
            pixels = self.order[b, :round(step * self.order.shape[1] / steps)]
            return partial(_swap, start, end, pixels)
        return plan


def _call(plan: Plan) -> np.ndarray:
    return plan()


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _blur(image: np.ndarray) -> np.ndarray:
    return np.stack([cv2.GaussianBlur(channel, (BLUR_SIZE, BLUR_SIZE), BLUR_SIGMA) for channel in image])


def _swap(start: np.ndarray, end: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    out = start.reshape(len(start), -1).copy()
    out[:, pixels] = end.reshape(len(end), -1)[:, pixels]
    return out.reshape(start.shape)


# ---------------------------------------------------------------------------------------------
# The metrics: (run, parameter) -> (B,) float32


def _cam_mult(run: _Run, _=None) -> np.ndarray:
    """CamMultImageConfidenceChange: t(f(x ⊙ cam)) − t(f(x)). Higher is better."""
    return run.change([run.multiply])[0]


def _drop_in_confidence(run: _Run, _=None) -> np.ndarray:
    """DropInConfidence: max(t(f(x)) − t(f(x ⊙ cam)), 0). Lower is better."""
    return np.maximum(-_cam_mult(run), 0)


def _increase_in_confidence(run: _Run, _=None) -> np.ndarray:
    """IncreaseInConfidence: 1 if t(f(x ⊙ cam)) > t(f(x)) else 0. Higher is better."""
    return np.float32(_cam_mult(run) > 0)


def _road(most_relevant_first: bool) -> Callable[[_Run, float | str], np.ndarray]:
    def metric(run: _Run, percentile: float | str) -> np.ndarray:
        return run.change([run.road(percentile, most_relevant_first)])[0]
    return metric


def _road_average(most_relevant_first: bool) -> Callable[[_Run, tuple], np.ndarray]:
    def metric(run: _Run, percentiles: tuple) -> np.ndarray:
        return run.change([run.road(p, most_relevant_first) for p in percentiles]).mean(axis=0)
    return metric


def _road_combined(run: _Run, percentiles: tuple) -> np.ndarray:
    """ROADCombined: (LeRF average − MoRF average) / 2, LeRF drawn first. Higher is better."""
    changes = run.change([run.road(p, False) for p in percentiles]
                         + [run.road(p, True) for p in percentiles])
    lerf, morf = changes[:len(percentiles)].mean(axis=0), changes[len(percentiles):].mean(axis=0)
    return (lerf - morf) / 2


def _remove(most_relevant_first: bool) -> Callable[[_Run, float | str], np.ndarray]:
    def metric(run: _Run, percentile: float | str) -> np.ndarray:
        return run.change([run.remove(percentile, most_relevant_first)])[0]
    return metric


def _auc(deletion: bool) -> Callable[[_Run, int], np.ndarray]:
    def metric(run: _Run, steps: int) -> np.ndarray:
        curve = run.scores([run.reveal(k, steps, deletion) for k in range(steps + 1)]).astype(np.float64)
        return np.float32((curve.sum(axis=0) - (curve[0] + curve[-1]) / 2) / steps)
    return metric


# The ARCC family (reference §7.5): complexity, coherency, ARCC; and ADCC (Poppi et al. 2021)


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ρ_i = cov(a_i, b_i) / (σ(a_i) σ(b_i) + PEARSON_EPS) over the pixels of each map (B, ...),
    divisor n − 1 throughout (the library's batch_pearson_coherency); float64 inside, (B,) float32."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    dof = a.shape[1] - 1
    spread = np.sqrt((a * a).sum(axis=1) / dof) * np.sqrt((b * b).sum(axis=1) / dof)
    return np.float32((a * b).sum(axis=1) / dof / (spread + PEARSON_EPS))


def _harmonic(*terms: np.ndarray) -> np.ndarray:
    """n / Σ 1/(t + ε): the harmonic mean of n terms in [0, 1], ε = HARMONIC_EPS."""
    return np.float32(len(terms) / sum(1 / (t + HARMONIC_EPS) for t in terms))


def _complexity(run: _Run, _=None) -> np.ndarray:
    """Complexity: mean_ij |cam_ij| (the L1 norm over H·W). Lower is better."""
    return np.abs(run.cams).reshape(len(run.cams), -1).mean(axis=1)


def _coherency(run: _Run, method: str | None) -> np.ndarray:
    """Coherency: (ρ(M(x ⊙ cam), cam) + 1) / 2, M the CAM method re-run for the CAMs' targets,
    the CAM broadcast over the channels. Higher is better."""
    mixed = run.x * run.cams[:, None]
    return (pearson(run.method_cams(method, mixed), run.cams) + 1) / 2


def _arcc(run: _Run, param: tuple) -> np.ndarray:
    """ARCC = 3 / (1/(coherency + ε) + 1/(1 − complexity + ε) + 1/(road + ε)), road =
    clip(2 · ROADCombined(percentiles), 0, 1): a harmonic mean (the library's docstring says
    geometric). Higher is better."""
    method, percentiles = param
    complexity, coherency = _complexity(run), _coherency(run, method)
    road = np.clip(_road_combined(run, percentiles) * 2, 0, 1)  # [-0.5, 0.5] -> [-1, 1] -> [0, 1]
    return _harmonic(coherency, 1 - complexity, road)


def _adcc(run: _Run, method: str | None) -> np.ndarray:
    """ADCC (Poppi, Cornia, Baraldi, Cucchiara 2021, "Revisiting the evaluation of class activation
    mapping for explainability: a novel metric and experimental analysis", CVPR workshops):
    3 / (1/coherency + 1/(1 − complexity) + 1/(1 − AD)), AD = max(y − o, 0) / y the average drop
    of one image, y = t(f(x)), o = t(f(x ⊙ cam)) (the paper's y is the class probability: the
    softmax target, `camexport run`'s default --metric-score), each reciprocal's term + ε.
    Higher is better."""
    drop = _drop_in_confidence(run) / run.before
    return _harmonic(_coherency(run, method), 1 - _complexity(run), 1 - drop)


# ---------------------------------------------------------------------------------------------
# The one table


@dataclass(frozen=True)
class Metric:
    """A metric as users name it. ``param`` is '' (none), 'percentile' (a number in [0, 100] or
    'auto'), 'percentiles' (a list of those), 'steps' (an integer ≥ 1), 'method' (a CAM method
    to re-run; None: the CAMs' own) or 'method-percentiles' (a method, then optionally ':'
    percentiles: ``arcc:gradcam:20,40``, ``arcc::20,40``; the value is (method, percentiles))."""

    name: str
    summary: str
    compute: Callable[[_Run, object], np.ndarray]
    higher_is_better: bool
    param: str = ""
    default: object = None
    aliases: tuple[str, ...] = ()


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("cam-mult-image-confidence-change", "t(f(x ⊙ cam)) − t(f(x))", _cam_mult, True,
           aliases=("CamMultImageConfidenceChange", "cam-mult-image")),
    Metric("drop-in-confidence", "max(t(f(x)) − t(f(x ⊙ cam)), 0)", _drop_in_confidence, False,
           aliases=("DropInConfidence",)),
    Metric("increase-in-confidence", "1 if t(f(x ⊙ cam)) > t(f(x)) else 0", _increase_in_confidence,
           True, aliases=("IncreaseInConfidence",)),
    Metric("road-morf", "ROAD: change after imputing the top (100 − p) % of the CAM", _road(True),
           False, "percentile", MORF_PERCENTILE, ("ROADMostRelevantFirst",)),
    Metric("road-lerf", "ROAD: change after imputing the bottom (100 − p) % of the CAM", _road(False),
           True, "percentile", LERF_PERCENTILE, ("ROADLeastRelevantFirst",)),
    Metric("road-morf-average", "road-morf averaged over percentiles", _road_average(True), False,
           "percentiles", ROAD_PERCENTILES, ("ROADMostRelevantFirstAverage",)),
    Metric("road-lerf-average", "road-lerf averaged over percentiles", _road_average(False), True,
           "percentiles", ROAD_PERCENTILES, ("ROADLeastRelevantFirstAverage",)),
    Metric("road-combined", "(road-lerf-average − road-morf-average) / 2", _road_combined, True,
           "percentiles", ROAD_PERCENTILES, ("ROADCombined", "road")),
    Metric("remove-morf", "road-morf with the image's channel means instead of the imputer",
           _remove(True), False, "percentile", MORF_PERCENTILE),
    Metric("remove-lerf", "road-lerf with the image's channel means instead of the imputer",
           _remove(False), True, "percentile", LERF_PERCENTILE),
    Metric("deletion-auc", "mean target value as pixels go to 0 in CAM order (RISE deletion)",
           _auc(True), False, "steps", AUC_STEPS, ("deletion",)),
    Metric("insertion-auc", "mean target value as pixels return onto a blurred image in CAM order "
           "(RISE insertion)", _auc(False), True, "steps", AUC_STEPS, ("insertion",)),
    Metric("complexity", "mean |cam| over the pixels", _complexity, False, aliases=("Complexity",)),
    Metric("coherency", "(ρ(M(x ⊙ cam), cam) + 1) / 2, M the method after the colon (default: "
           "the CAMs' own)", _coherency, True, "method", aliases=("Coherency",)),
    Metric("arcc", "harmonic mean of coherency, 1 − complexity and clip(2 · road-combined, 0, 1)",
           _arcc, True, "method-percentiles", ARCC_PERCENTILES, ("ARCC",)),
    Metric("adcc", "harmonic mean of coherency, 1 − complexity and 1 − average drop (Poppi et al.)",
           _adcc, True, "method", aliases=("ADCC",)),
]}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "-_ ")


_LOOKUP = {_key(alias): m.name for m in METRICS.values() for alias in (m.name, *m.aliases)}


def _parse_value(metric: Metric, text: str) -> float | str:
    text = text.strip().lower()
    if metric.param == "steps":
        if not text.isdigit() or int(text) < 1:
            raise MetricError(f"{metric.name} takes a number of steps ≥ 1, not {text!r}")
        return int(text)
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 100:
        raise MetricError(f"{metric.name} takes percentiles in [0, 100] or 'auto', not {text!r}")
    return int(value) if value.is_integer() else value


def _parse(token: str) -> tuple[Metric, object]:
    """'name' or 'name:param[,param...]' -> (metric, parameter value, default if not given)."""
    name, _, param = token.partition(":")
    key = _key(name)
    if key not in _LOOKUP:
        raise MetricError(f"unknown metric {name.strip()!r}; choose from {', '.join(METRICS)}")
    metric = METRICS[_LOOKUP[key]]
    if metric.param.startswith("method"):
        return metric, _parse_method(metric, param)
    if not param.strip():
        return metric, metric.default
    if not metric.param:
        raise MetricError(f"{metric.name} takes no parameter (got {token.strip()!r})")
    values = [_parse_value(metric, v) for v in param.split(",")]
    if metric.param == "percentiles":
        return metric, tuple(values)
    if len(values) != 1:
        hint = f"; use {metric.name}-average for a list" if metric.name.startswith("road-") else ""
        raise MetricError(f"{metric.name} takes one {metric.param}, got {param!r}{hint}")
    return metric, values[0]


def _parse_method(metric: Metric, text: str) -> str | None | tuple[str | None, tuple]:
    """'[METHOD]' or, for 'method-percentiles', '[METHOD][:p1,p2,...]'; the method canonical,
    None for the CAMs' own method."""
    from camexport.methods import MethodError, canonical_methods

    method, colon, percentiles = text.partition(":")
    usage = f"{metric.name}[:METHOD]" + ("[:P1,P2,...]" if metric.param == "method-percentiles" else "")
    if "," in method or (colon and metric.param == "method"):
        raise MetricError(f"{metric.name} re-runs a CAM method on x ⊙ cam: write {usage}, e.g. "
                          f"{metric.name}:gradcam (got {metric.name}:{text})")
    try:
        method = canonical_methods([method])[0] if method.strip() else None
    except MethodError as err:
        raise MetricError(f"{metric.name}:{text}: {err}") from None
    if metric.param == "method":
        return method
    if not percentiles.strip():
        return method, metric.default
    return method, tuple(_parse_value(metric, v) for v in percentiles.split(","))


def _numbers(values: tuple) -> str:
    return ",".join(v if isinstance(v, str) else f"{v:g}" for v in values)


def _format(metric: Metric, value: object) -> str:
    if metric.param == "method":
        return metric.name + (f":{value}" if value else "")
    if metric.param == "method-percentiles":
        method, percentiles = value
        name = metric.name + (f":{method}" if method else "")
        if percentiles != metric.default:  # arcc:gradcam:30,70, or arcc::30,70 for the CAMs' own
            name += ("" if method else ":") + ":" + _numbers(percentiles)
        return name
    if value == metric.default:
        return metric.name
    return f"{metric.name}:" + _numbers(value if isinstance(value, tuple) else (value,))


def metric_tokens(spec: str | Sequence[str], is_value: Callable[[str], bool] | None = None) -> list[str]:
    """Comma-separated tokens; a value (``is_value``: by default a number or 'auto') continues
    the parameter list before it, so 'road-combined:20,40,drop-in-confidence' is two metrics.
    camexport.localisation parses its names with it too."""
    is_value = is_value or _is_value
    pieces = [p.strip() for item in ([spec] if isinstance(spec, str) else spec)
              for p in str(item).split(",")]
    tokens: list[str] = []
    for piece in filter(None, pieces):
        if tokens and ":" in tokens[-1] and is_value(piece):
            tokens[-1] += "," + piece
        else:
            tokens.append(piece)
    return tokens


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_value(text: str) -> bool:
    return is_number(text) or text.lower() == "auto"


def metric_methods(spec: str | Sequence[str]) -> list[str]:
    """The CAM methods the metrics of ``spec`` name (coherency:gradcam -> gradcam), in order."""
    found = []
    for token in metric_tokens(spec):
        metric, value = _parse(token)
        if metric.param.startswith("method"):
            method = value if metric.param == "method" else value[0]
            found += [method] if method and method not in found else []
    return found


def metric_names(spec: str | Sequence[str]) -> list[str]:
    """Canonical metric names from 'road-combined,drop-in-confidence' or a list. Aliases: the
    library's class names, any case, with or without '-' / '_'. Duplicates are dropped."""
    result = []
    for token in metric_tokens(spec):
        name = _format(*_parse(token))
        if name not in result:
            result.append(name)
    return result


# ---------------------------------------------------------------------------------------------
# The entry point


def evaluate(name: str, x: np.ndarray, cams: np.ndarray, targets: Sequence,
             model: Callable[[np.ndarray], np.ndarray], seed: int | None = 0, *,
             noise: float = NOISE, workers: int | None = None, cam_fn: CamFn | None = None,
             cam_targets: Sequence | None = None, cam_method: str | None = None) -> np.ndarray:
    """Scores (B,) float32 of metric ``name`` (with an optional ':param', see metric_names) for
    the CAMs (B, H, W) of the preprocessed images x (B, C, H, W), one target object per image.

    ``seed`` seeds the ROAD imputer's noise (None: fresh entropy); ``noise`` is its standard
    deviation (0 for a noise-free imputer). ``workers`` threads compute perturbed images
    (default: the CPU count, at most 8); the result does not depend on it. ``cam_fn`` (method,
    images, targets) -> CAMs re-runs a CAM method for coherency, arcc and adcc, on
    ``cam_targets`` (the targets the CAMs were made for; default ``targets``); ``cam_method``:
    the method that made the CAMs, re-run when the name gives none (``coherency``).
    """
    metric, param = _parse(name)
    with perturbation_run(x, cams, targets, model, np.random.default_rng(seed), noise=noise,
                          workers=workers, cam_fn=cam_fn, cam_targets=cam_targets,
                          cam_method=cam_method) as run:
        return np.asarray(metric.compute(run, param), np.float32)


@contextmanager
def perturbation_run(x: np.ndarray, cams: np.ndarray, targets: Sequence,
                     model: Callable[[np.ndarray], np.ndarray], rng: NormalSource, *,
                     noise: float = NOISE, workers: int | None = None,
                     scalar_targets: bool = True, cam_fn: CamFn | None = None,
                     cam_targets: Sequence | None = None, cam_method: str | None = None) -> Iterator[_Run]:
    """The driver behind :func:`evaluate`, checked inputs and a worker pool, for callers that
    choose the perturbations themselves (``camexport.compat.metrics``): ``run.scores`` /
    ``run.change`` of ``run.multiply``, ``run.road(...)`` or any ``(b, rng) -> plan``.
    ``rng`` draws the imputer noise (``standard_normal``); ``scalar_targets=False`` lets targets
    give a vector per image (scores (P, B, K)); ``cam_fn``, ``cam_targets``, ``cam_method``: see
    :func:`evaluate`."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise MetricError(f"x must be a preprocessed batch (B, C, H, W), got shape {x.shape}")
    cams = np.asarray(cams, np.float32)
    batch, _, height, width = x.shape
    if cams.shape != (batch, height, width):
        raise MetricError(f"cams must be (B, H, W) = {(batch, height, width)} to match x {x.shape}, "
                          f"got {cams.shape}: one map per image, resized to the input size")
    if not np.isfinite(cams).all():
        raise MetricError("cams contain NaN or Inf; metrics need finite maps in [0, 1]")
    targets = _as_targets(targets, batch)
    if cam_targets is not None:
        cam_targets = list(cam_targets)
        if len(cam_targets) != batch:
            raise MetricError(f"{len(cam_targets)} cam_targets for {batch} images: give the target "
                              f"each CAM was made for")
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    with ThreadPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        yield _Run(x, cams, targets, model, rng, noise, pool, scalar_targets, cam_fn, cam_targets, cam_method)


def _as_targets(targets: Sequence, batch: int) -> list:
    if targets is None or isinstance(targets, (int, np.integer)):
        raise MetricError("metrics need one explicit target per image, e.g. "
                          "[ClassifierOutputTarget(c) for c in explained_classes]")
    targets = list(targets)
    if len(targets) != batch:
        raise MetricError(f"{len(targets)} targets for {batch} images: give one target per image")
    result = []
    for b, target in enumerate(targets):
        if isinstance(target, (int, np.integer)):
            target = ClassifierOutputTarget(int(target))
        if not callable(getattr(target, "values", None)):
            raise MetricError(f"target {b} ({target!r}) is not a target object; use "
                              f"camexport.targets, e.g. ClassifierOutputTarget(c)")
        result.append(target)
    return result

