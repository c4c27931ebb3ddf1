"""Deep Feature Factorization (Collins et al. 2018), as pytorch-grad-cam 1.5.7 (reference §3.15)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from camexport.methods.base import Method
from camexport.methods.pipeline import min_max, resize


@dataclass
class Factorization:
    concepts: np.ndarray  # (C, k): each concept's channel vector
    explanations: np.ndarray  # (B, k, H, W): each concept's map per image, in [0, 1]
    concept_outputs: np.ndarray | None = None  # (k, outputs)


def factorize(acts: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """NMF of the activations (B, C, h, w) arranged as (C, B h w), offset by each row's minimum:
    scikit-learn NMF(k, init='random', random_state=0). Returns concepts (C, k) and
    explanations (B, k, h, w). The caller's array is not modified (pgc's Q26 fix)."""
    from sklearn.decomposition import NMF

    batch, channels = acts.shape[:2]
    spatial = acts.shape[2:]
    data = np.nan_to_num(np.moveaxis(acts, 1, 0).reshape(channels, -1), nan=0.0)
    offset = data.min(axis=-1, keepdims=True)
    model = NMF(n_components=n_components, init="random", random_state=0)
    weights = model.fit_transform(data - offset)
    parts = model.components_.reshape(n_components, batch, *spatial)
    return weights + offset, np.moveaxis(parts, 1, 0)


class DeepFeatureFactorization(Method):
    """Concepts from a non-negative factorisation of one layer; each concept's map per image is
    min-max normalised and resized. ``concept_outputs`` come from running the tail on a spatially
    constant map of each concept: the classifier head on the concept vector whenever the tail
    starts with global pooling (ResNet, EfficientNet, ...), as pgc's ``computation_on_concepts``."""

    name = "dff"
    uses_targets = False
    n_components = 16

    def factorize(self, inputs, layer: int = 0) -> Factorization:
        acts = inputs.activations[layer]
        concepts, parts = factorize(acts, self.n_components)
        b, k = parts.shape[:2]
        maps = resize(min_max(parts.reshape(b * k, *parts.shape[2:])), inputs.size)
        explanations = maps.reshape(b, k, *inputs.size)
        outputs = None
        if inputs.tail is not None and inputs.layouts[layer].get("kind") == "NCHW":
            constant = np.broadcast_to(concepts.T.astype(np.float32)[:, :, None, None],
                                       (k, concepts.shape[0], *acts.shape[2:]))
            outputs = inputs.tail(layer, np.ascontiguousarray(constant))
        return Factorization(concepts, explanations, outputs)

    def __call__(self, inputs, eigen_smooth=False):
        return self.factorize(inputs).explanations
