"""Model targets as in pytorch-grad-cam (reference §4), for classifier outputs (B, K) and
embeddings (B, D).

Each target is a scalar function t(z) of one sample's output row. ``values(z)`` evaluates it on a
batch of rows; ``cotangent(z)`` is dt/dz for one row. Since every target is a function of the
output alone, the augmented graph built with the ``logit`` score gives the exact gradient of any
target when ``target_weights`` = dt/dz (the chain rule); one-hot targets need no output first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from camexport.errors import CamexportError

#: FinerWeightedTarget's denominator epsilon (pytorch-grad-cam, reference §4).
FINER_EPS = 1e-9


class TargetError(CamexportError, ValueError):
    """Targets that do not fit the batch or the model output."""


def _softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class ClassifierOutputTarget:
    """t(z) = z[c]."""

    category: int
    linear = True

    def values(self, z):
        return z[..., self.category]

    def cotangent(self, z):
        out = np.zeros(z.shape[-1], np.float64)
        out[self.category] = 1
        return out

    def hessian_vector(self, z, v):
        return np.zeros(z.shape[-1], np.float64)


@dataclass(frozen=True)
class ClassifierOutputSoftmaxTarget:
    """t(z) = softmax(z)[c]; dt/dz = p_c (e_c - p)."""

    category: int
    linear = False

    def values(self, z):
        return _softmax(z)[..., self.category]

    def cotangent(self, z):
        p = _softmax(z.astype(np.float64))
        out = -p[self.category] * p
        out[self.category] += p[self.category]
        return out

    def hessian_vector(self, z, v):
        """p_c [(e_c - p)((e_c - p) . v) - (p v - p (p . v))]."""
        p = _softmax(z.astype(np.float64))
        d = -p
        d[self.category] += 1
        return p[self.category] * (d * (d @ v) - (p * v - p * (p @ v)))


@dataclass(frozen=True)
class ClassifierOutputReST:
    """t(z) = z[c] - CE(z, c) = 2 z_c - logsumexp(z); dt/dz = 2 e_c - softmax(z)."""

    category: int
    linear = False

    def values(self, z):
        zmax = z.max(axis=-1, keepdims=True)
        lse = (zmax + np.log(np.exp(z - zmax).sum(axis=-1, keepdims=True)))[..., 0]
        return 2 * z[..., self.category] - lse

    def cotangent(self, z):
        out = -_softmax(z.astype(np.float64))
        out[self.category] += 2
        return out

    def hessian_vector(self, z, v):
        """-(diag(p) - p p^T) v."""
        p = _softmax(z.astype(np.float64))
        return -(p * v - p * (p @ v))


@dataclass(frozen=True)
class BinaryClassifierOutputTarget:
    """t(z) = z * (+1 if c == 1 else -1) for a one-logit output (category 1: the positive
    logit, 0: its negation). On an output of more than one value pgc's loss is not a scalar and
    fails; camexport raises a TargetError."""

    category: int
    linear = True

    def values(self, z):
        sign = 1.0 if self.category == 1 else -1.0
        return sign * z.reshape(z.shape[0], -1).sum(axis=-1) if z.ndim > 1 else sign * z.sum()

    def cotangent(self, z):
        return np.full(z.shape[-1], 1.0 if self.category == 1 else -1.0)

    def hessian_vector(self, z, v):
        return np.zeros(z.shape[-1], np.float64)


@dataclass(frozen=True)
class FinerWeightedTarget:
    """t(z) = sum_j p_j (z_main - alpha z_j) / (sum_j p_j + 1e-9), p = softmax(z), p not
    detached (reference §4)."""

    main: int
    comparisons: tuple[int, ...]
    alpha: float = 1.0
    linear = False

    def values(self, z):
        p = _softmax(z)
        comps = list(self.comparisons)
        num = (p[..., comps] * (z[..., [self.main]] - self.alpha * z[..., comps])).sum(axis=-1)
        return num / (p[..., comps].sum(axis=-1) + FINER_EPS)

    def cotangent(self, z):
        z = z.astype(np.float64)
        p = _softmax(z)
        comps = list(self.comparisons)
        diff = z[self.main] - self.alpha * z[comps]
        num = (p[comps] * diff).sum()
        den = p[comps].sum() + FINER_EPS
        # d num: through p_j (softmax Jacobian) and through z_main, z_j
        dnum_dp = np.zeros_like(z)
        dnum_dp[comps] = diff
        dden_dp = np.zeros_like(z)
        dden_dp[comps] = 1.0
        jac = np.diag(p) - np.outer(p, p)  # dp/dz
        dnum = jac.T @ dnum_dp
        dnum[self.main] += p[comps].sum()
        np.add.at(dnum, comps, -self.alpha * p[comps])
        dden = jac.T @ dden_dp
        return (dnum * den - num * dden) / den**2


@dataclass(frozen=True, eq=False)
class SemanticSegmentationTarget:
    """t(z) = sum_ij z[c, i, j] mask_ij on a (K, H, W) output (pgc's SemanticSegmentationTarget:
    the mask is a constant, e.g. the pixels the model assigns to class c)."""

    category: int
    mask: np.ndarray
    linear = True

    def __post_init__(self):
        object.__setattr__(self, "mask", np.asarray(self.mask, np.float64))

    def values(self, z):
        return (np.asarray(z)[..., self.category, :, :] * self.mask).sum(axis=(-2, -1))

    def cotangent(self, z):
        if z.ndim != 3 or self.mask.shape != z.shape[1:]:
            raise TargetError(f"SemanticSegmentationTarget's mask is {self.mask.shape} for an output "
                              f"of shape {z.shape}; give a mask of the output's (H, W)")
        out = np.zeros(z.shape, np.float64)
        out[self.category] = self.mask
        return out

    def hessian_vector(self, z, v):
        return np.zeros(z.shape, np.float64)


#: torch.nn.CosineSimilarity's eps (pgc's tutorial target uses its default): the product of the
#: norms is clamped below at eps.
COSINE_EPS = 1e-8


@dataclass(frozen=True, eq=False)
class SimilarityToConceptTarget:
    """t(z) = cos(z, c) = z.c / max(|z| |c|, 1e-8): an embedding's similarity to a concept
    embedding c given at run time (a text embedding for CLIP, another image's embedding for
    image-to-image similarity), as pgc's embeddings tutorial (torch.nn.CosineSimilarity).
    With u = z/|z|, c' = c/|c|: dt/dz = (c' - t u)/|z|."""

    concept: np.ndarray
    linear = False

    def __post_init__(self):
        concept = np.asarray(self.concept, np.float64).reshape(-1)
        if not np.isfinite(concept).all() or not concept.any():
            raise TargetError("the concept embedding must be finite and not all zero")
        object.__setattr__(self, "concept", concept)

    def values(self, z):
        z = np.asarray(z, np.float64)
        norms = np.linalg.norm(z, axis=-1) * np.linalg.norm(self.concept)
        return (z @ self.concept) / np.maximum(norms, COSINE_EPS)

    def _parts(self, z):
        z = np.asarray(z, np.float64)
        n = np.linalg.norm(z)
        return z / n, self.concept / np.linalg.norm(self.concept), n

    def cotangent(self, z):
        u, c, n = self._parts(z)
        return (c - (u @ c) * u) / n

    def hessian_vector(self, z, v):
        """[3t (u.v) u - t v - c'(u.v) - u (c'.v)] / |z|^2."""
        u, c, n = self._parts(z)
        t, uv = u @ c, u @ v
        return (3 * t * uv * u - t * v - c * uv - u * (c @ v)) / n**2


def as_target(target):
    """One raw target as a target object: ints are class targets, objects pass through."""
    if isinstance(target, (bool, np.bool_)):
        raise TargetError(f"target {target!r} is a bool; give a class index or a target object")
    if isinstance(target, (int, np.integer)):
        return ClassifierOutputTarget(int(target))
    if not (callable(getattr(target, "values", None)) and callable(getattr(target, "cotangent", None))):
        raise TargetError(f"unsupported target {target!r}: give None, a class index or a target "
                          f"from camexport.targets")
    return target


def target_list(targets, batch: int) -> list:
    """The raw targets as one entry per image: an int or a single target object applies to every
    image; a sequence must hold exactly one target per image (reference Q1 fix)."""
    if targets is None:
        return [None] * batch
    if isinstance(targets, (int, np.integer)) or not isinstance(targets, (list, tuple, np.ndarray)):
        return [targets] * batch
    targets = list(targets)
    if len(targets) != batch:
        raise TargetError(f"{len(targets)} targets for {batch} images: give one target per image "
                          f"(or None for each image's top class)")
    return targets


def as_targets(targets, outputs: np.ndarray) -> list:
    """One target object per sample: None -> argmax of the last axis (first index on ties);
    ints -> ClassifierOutputTarget. Fewer targets than samples is an error (reference Q1 fix)."""
    batch = outputs.shape[0]
    dense = outputs.ndim > 2
    if targets is None and not dense:
        return [ClassifierOutputTarget(int(k)) for k in outputs.reshape(batch, -1).argmax(axis=-1)]
    if dense and (targets is None or any(t is None for t in target_list(targets, batch))):
        raise TargetError(f"a model whose output is {outputs.shape[1:]} per sample has no top class: "
                          f"give a target per image, e.g. SemanticSegmentationTarget(category, mask), "
                          f"or FasterRCNNBoxScoreTarget(labels, boxes) for a detector")
    classes = outputs.shape[1] if dense else outputs.shape[-1]
    result = []
    for b, target in enumerate(target_list(targets, batch)):
        if target is None:
            target = ClassifierOutputTarget(int(outputs[b].reshape(-1).argmax()))
        target = as_target(target)
        _check(target, b, classes)
        result.append(target)
    return result


def _check(target, b: int, classes: int) -> None:
    """A clear error for a target that does not fit an output of ``classes`` values."""
    if isinstance(target, BinaryClassifierOutputTarget):
        if target.category not in (0, 1):
            raise TargetError(f"BinaryClassifierOutputTarget of image {b} has category "
                              f"{target.category!r}; use 1 (positive) or 0 (negative)")
        if classes != 1:
            raise TargetError(f"BinaryClassifierOutputTarget of image {b} needs a one-logit output, "
                              f"and this model has {classes} outputs (pytorch-grad-cam fails there "
                              f"too); use ClassifierOutputTarget(c)")
        return
    if isinstance(target, SimilarityToConceptTarget):
        if target.concept.shape != (classes,):
            raise TargetError(f"the concept embedding of image {b} has {target.concept.size} values "
                              f"and the model output {classes}: give an embedding of the model's "
                              f"output size")
        return
    categories = [target.main, *target.comparisons] if isinstance(target, FinerWeightedTarget) \
        else [getattr(target, "category", 0)]
    for category in categories:
        if not -classes <= category < classes:
            raise TargetError(f"target class {category} of image {b} is out of range for an "
                              f"output with {classes} classes")


def target_weights(targets: Sequence, outputs: np.ndarray | None, classes) -> np.ndarray:
    """The ``target_weights`` rows (B, K) for a logit-score graph: dt_b/dz_b. ``classes``: the
    number of outputs, or the output shape per sample ((K, H, W) for segmentation)."""
    shape = (classes,) if isinstance(classes, (int, np.integer)) else tuple(classes)
    rows = np.empty((len(targets), *shape), np.float32)
    for b, target in enumerate(targets):
        if getattr(target, "linear", False):
            row = target.cotangent(np.zeros(shape))
        else:
            if outputs is None:
                raise TargetError("this target needs the model outputs first")
            row = target.cotangent(outputs[b])
        row = np.asarray(row, np.float64)
        if row.shape != shape:
            raise TargetError(f"the target of image {b} gives weights of shape {row.shape} for an "
                              f"output of shape {shape}: expected {shape}")
        with np.errstate(over="ignore"):  # beyond float32's range: inf, refused next
            rows[b] = row
        if not np.isfinite(rows[b]).all():  # float32's range too
            raise TargetError(f"the target of image {b} gives weights that are not finite in "
                              f"float32: {row}")
    return rows
