"""The method base class: a raw map per layer, then the shared pipeline of :mod:`.pipeline`.

A *weight* method defines ``weights(A, G, inputs, layer) -> (B, C)`` and gets
``M = sum_c w A`` (or ``P(w A)`` with eigen_smooth); an *element* method defines
``elements(A, G) -> (B, C, *spatial)`` and gets ``M = sum_c E`` (or ``P(E)``); it may also
define ``channel_sum(A, G)``, the same M without building E.
"""

from __future__ import annotations

import numpy as np

from camexport.methods.inputs import CamInputs, MethodInputError
from camexport.methods.pipeline import (
    aggregate,
    by_images,
    channel_sum,
    eigen_projection,
    layer_map,
    weighted_sum,
)


class Method:
    """One CAM method. Subclasses set ``name`` and override ``raw`` (or a hook below)."""

    name = ""
    #: False for methods whose map does not depend on the target (EigenCAM, FEM, ...)
    uses_targets = True

    def __init__(self, **options):
        """Options override the method's class-level settings, e.g.
        ``AblationCAM(ratio_channels_to_ablate=0.5)``; an unknown option is an error."""
        for key, value in options.items():
            if key.startswith("_") or not _setting(getattr(type(self), key, _setting)):
                settable = sorted(k for k, v in vars(type(self)).items()
                                  if not k.startswith("_") and _setting(v) and k != "name")
                raise TypeError(f"{type(self).__name__} has no option {key!r}; options: {settable}")
            setattr(self, key, value)

    def retarget(self, outputs: np.ndarray, targets):
        """The targets this method explains, given the model ``outputs`` and the caller's
        ``targets``: the caller's (FinerCAM picks its own contrasts when they are None)."""
        return targets

    def raw(self, inputs: CamInputs, layer: int, eigen_smooth: bool) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, inputs: CamInputs, eigen_smooth: bool = False) -> np.ndarray:
        maps = [layer_map(self.raw(inputs, layer, eigen_smooth), inputs.size)
                for layer in range(len(inputs.activations))]
        return aggregate(maps, reuse=True)

    @staticmethod
    def gradients(inputs: CamInputs, layer: int) -> np.ndarray:
        grads = inputs.gradients[layer]
        if grads is None:
            raise MethodInputError("this method needs gradients; the artifact has none for this layer")
        return grads


def _setting(value) -> bool:
    """Whether a class attribute is a setting (a value, or a class such as a composite method's
    ``base``), not a method."""
    return isinstance(value, type) or not callable(value)


class WeightMethod(Method):
    def weights(self, inputs: CamInputs, layer: int) -> np.ndarray:
        raise NotImplementedError

    def raw(self, inputs, layer, eigen_smooth):
        acts = inputs.activations[layer]
        weights = self.weights(inputs, layer)
        if eigen_smooth:
            return eigen_projection(weights.reshape(weights.shape + (1,) * (acts.ndim - 2)) * acts)
        return by_images(lambda a, w: weighted_sum(w, a), acts, weights)


class ElementMethod(Method):
    def elements(self, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def channel_sum(self, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """sum_c E (B, *spatial); a method may give it without building E (one einsum)."""
        return channel_sum(self.elements(acts, grads))

    def raw(self, inputs, layer, eigen_smooth):
        acts, grads = inputs.activations[layer], self.gradients(inputs, layer)
        if eigen_smooth:
            return eigen_projection(self.elements(acts, grads))
        return self.channel_sum(acts, grads)
