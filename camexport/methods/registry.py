"""The one table of CAM method names, as users type them, with their accepted aliases.

``needs`` tells the build step what each method asks of the graph: ``gradients`` (the VJP
subgraph), ``forwards`` (extra forward passes of the plain model), ``tail`` (the tail as its own
graph), ``input_gradients`` and ``bias_gradients`` (FullGrad), ``guided`` (guided ReLU), ``tangents`` (ShapleyCAM's J A).
"""

from __future__ import annotations

from dataclasses import dataclass

from camexport.errors import CamexportError
from camexport.methods import factorization, fullgrad, gradient, perturbation, sess
from camexport.methods.core import Method


class MethodError(CamexportError, ValueError):
    """An unknown method name."""


@dataclass(frozen=True)
class MethodInfo:
    name: str
    title: str
    needs: frozenset[str]
    aliases: tuple[str, ...] = ()
    implementation: type[Method] | None = None


def _m(name: str, title: str, needs: str = "", aliases: tuple[str, ...] = (),
       implementation: type[Method] | None = None) -> MethodInfo:
    return MethodInfo(name, title, frozenset(needs.split()), aliases, implementation)


METHODS: dict[str, MethodInfo] = {m.name: m for m in [
    _m("gradcam", "GradCAM", "gradients", ("grad-cam",), gradient.GradCAM),
    _m("hirescam", "HiResCAM", "gradients", ("hires-cam",), gradient.HiResCAM),
    _m("gradcamelementwise", "GradCAMElementWise", "gradients", ("gradcam-elementwise",), gradient.GradCAMElementWise),
    _m("gradcam++", "GradCAM++", "gradients", ("gradcampp", "gradcamplusplus", "grad-cam++"), gradient.GradCAMPlusPlus),
    _m("xgradcam", "XGradCAM", "gradients", ("xgrad-cam",), gradient.XGradCAM),
    _m("ablationcam", "AblationCAM", "tail", ("ablation-cam",), perturbation.AblationCAM),
    _m("scorecam", "ScoreCAM", "forwards", ("score-cam",), perturbation.ScoreCAM),
    _m("eigencam", "EigenCAM", "", ("eigen-cam",), gradient.EigenCAM),
    _m("eigengradcam", "EigenGradCAM", "gradients", ("eigen-grad-cam",), gradient.EigenGradCAM),
    _m("layercam", "LayerCAM", "gradients", ("layer-cam",), gradient.LayerCAM),
    _m("fullgrad", "FullGrad", "gradients input_gradients bias_gradients", ("full-grad",), fullgrad.FullGrad),
    _m("dff", "Deep Feature Factorization", "tail", ("deepfeaturefactorization",),
       factorization.DeepFeatureFactorization),
    _m("kpcacam", "KPCA-CAM", "", ("kpca-cam", "kpca"), gradient.KPCACAM),
    _m("fem", "FEM", "", (), gradient.FEM),
    _m("shapleycam", "ShapleyCAM", "gradients tangents", ("shapley-cam",), gradient.ShapleyCAM),
    _m("finercam", "FinerCAM", "gradients", ("finer-cam",), gradient.FinerCAM),
    _m("randomcam", "RandomCAM", "gradients", ("random-cam", "random"), gradient.RandomCAM),
    _m("segeigencam", "SegEigenCAM", "gradients", ("seg-eigen-cam",), gradient.SegEigenCAM),
    _m("refinecam", "RefineCAM", "gradients", ("refine-cam",), gradient.RefineCAM),
    _m("sess", "SESS", "gradients forwards", (), sess.SESS),
    _m("guidedbackprop", "Guided Backprop", "guided input_gradients",
       ("guided-backprop", "guidedbp", "gbp"), fullgrad.GuidedBackprop),
]}

_LOOKUP = {alias: m.name for m in METHODS.values() for alias in (m.name, *m.aliases)}


def canonical_methods(names: str | list[str]) -> list[str]:
    """Canonical method names from a comma-separated string or a list (case-insensitive)."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    result = []
    for raw in names:
        key = raw.strip().lower().replace("_", "")
        if not key:
            continue
        if key not in _LOOKUP:
            raise MethodError(f"unknown method {raw.strip()!r}; choose from {', '.join(METHODS)}")
        if _LOOKUP[key] not in result:
            result.append(_LOOKUP[key])
    return result


def method(name: str, **options) -> Method:
    """A ready instance of the method called ``name`` (aliases accepted), with ``options``
    overriding its settings (``method("ablationcam", ratio_channels_to_ablate=0.5)``)."""
    (canonical,) = canonical_methods(name)
    info = METHODS[canonical]
    if info.implementation is None:
        raise MethodError(f"{info.title} is not implemented yet in this camexport version")
    return info.implementation(**options)
