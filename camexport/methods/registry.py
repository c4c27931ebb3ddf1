"""The one table of CAM methods: names as users type them, aliases, and what each needs.

A row says what the method reads beyond the layer activations: ``gradients`` (the layer
gradients of the reverse pass), ``extras`` (optional graph outputs, records of
:mod:`camexport.graph.outputs` that the build emits and the Explainer collects), ``runs``
(model runs beyond the graph's outputs: ``forwards`` of the plain model, the ``tail`` after a
layer, a ``rerun`` of the graph on other targets or inputs), and ``head``, its fused ONNX head
(:mod:`camexport.graph.fuse`), for the methods that have one. The CLI choices, the build, the
manifest, ``camexport run``'s checks and ``camexport recompute`` all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from camexport.errors import CamexportError
from camexport.graph import fuse
from camexport.graph.outputs import BIAS_GRADIENTS, GUIDED, INPUT_GRADIENTS, TANGENTS, GraphOutput
from camexport.methods import activation, composite, factorization, gradient, input_gradient, perturbation
from camexport.methods.base import Method


class MethodError(CamexportError, ValueError):
    """An unknown method name."""


@dataclass(frozen=True)
class MethodInfo:
    name: str
    title: str
    implementation: type[Method]
    gradients: bool = False
    extras: tuple[GraphOutput, ...] = ()
    runs: frozenset[str] = frozenset()
    aliases: tuple[str, ...] = ()
    head: fuse.Head | None = None

    @property
    def graph_needs(self) -> frozenset[str]:
        """What the augmented graph must hold for this method (manifest words)."""
        return frozenset(["gradients"] * self.gradients + [record.key for record in self.extras])

    @property
    def needs(self) -> frozenset[str]:
        """Everything the method needs: the graph's parts and the model runs."""
        return self.graph_needs | self.runs

    @property
    def recomputable(self) -> bool:
        """Whether stored activations, gradients and outputs alone give this method."""
        return not self.extras and not self.runs


def _m(name: str, title: str, implementation: type[Method], gradients: bool = True,
       extras: tuple[GraphOutput, ...] = (), runs: str = "", aliases: tuple[str, ...] = (),
       head: fuse.Head | None = None) -> MethodInfo:
    return MethodInfo(name, title, implementation, gradients, extras, frozenset(runs.split()),
                      aliases, head)


METHODS: dict[str, MethodInfo] = {m.name: m for m in [
    _m("gradcam", "GradCAM", gradient.GradCAM, aliases=("grad-cam",), head=fuse.gradcam_head),
    _m("hirescam", "HiResCAM", gradient.HiResCAM, aliases=("hires-cam",), head=fuse.hirescam_head),
    _m("gradcamelementwise", "GradCAMElementWise", gradient.GradCAMElementWise,
       aliases=("gradcam-elementwise",), head=fuse.gradcam_elementwise_head),
    _m("gradcam++", "GradCAM++", gradient.GradCAMPlusPlus,
       aliases=("gradcampp", "gradcamplusplus", "grad-cam++"), head=fuse.gradcam_plus_plus_head),
    _m("xgradcam", "XGradCAM", gradient.XGradCAM, aliases=("xgrad-cam",), head=fuse.xgradcam_head),
    _m("ablationcam", "AblationCAM", perturbation.AblationCAM, False, runs="tail",
       aliases=("ablation-cam",)),
    _m("scorecam", "ScoreCAM", perturbation.ScoreCAM, False, runs="forwards", aliases=("score-cam",)),
    _m("eigencam", "EigenCAM", activation.EigenCAM, False, aliases=("eigen-cam",),
       head=fuse.eigencam_head),
    _m("eigengradcam", "EigenGradCAM", gradient.EigenGradCAM, aliases=("eigen-grad-cam",)),
    _m("layercam", "LayerCAM", gradient.LayerCAM, aliases=("layer-cam",), head=fuse.layercam_head),
    _m("fullgrad", "FullGrad", input_gradient.FullGrad, extras=(INPUT_GRADIENTS, BIAS_GRADIENTS),
       aliases=("full-grad",)),
    _m("dff", "Deep Feature Factorization", factorization.DeepFeatureFactorization, False,
       runs="tail", aliases=("deepfeaturefactorization",)),
    _m("kpcacam", "KPCA-CAM", activation.KPCACAM, False, aliases=("kpca-cam", "kpca")),
    _m("fem", "FEM", activation.FEM, False),
    _m("shapleycam", "ShapleyCAM", gradient.ShapleyCAM, extras=(TANGENTS,), aliases=("shapley-cam",)),
    # with no targets, FinerCAM runs the graph again on the contrast targets it picks
    _m("finercam", "FinerCAM", composite.FinerCAM, runs="rerun", aliases=("finer-cam",)),
    # RandomCAM reads no gradient; the graph computes them anyway, as pgc's RandomCAM does
    _m("randomcam", "RandomCAM", activation.RandomCAM, aliases=("random-cam", "random")),
    _m("segeigencam", "SegEigenCAM", gradient.SegEigenCAM, aliases=("seg-eigen-cam",)),
    _m("refinecam", "RefineCAM", composite.RefineCAM, aliases=("refine-cam",)),
    _m("sess", "SESS", composite.SESS, runs="forwards rerun"),
    _m("guidedbackprop", "Guided Backprop", input_gradient.GuidedBackprop, False,
       extras=(GUIDED, INPUT_GRADIENTS), aliases=("guided-backprop", "guidedbp", "gbp")),
]}

#: Methods with a fused ONNX head (``camexport build --fuse``), in table order.
FUSABLE: dict[str, fuse.Head] = {m.name: m.head for m in METHODS.values() if m.head is not None}

#: Methods computable from a result file's stored tensors alone (``camexport recompute``).
RECOMPUTABLE: tuple[str, ...] = tuple(m.name for m in METHODS.values() if m.recomputable)

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
    return METHODS[canonical].implementation(**options)


def method_objects(methods) -> dict[str, Method]:
    """Names (aliases accepted) or configured method objects, by canonical name."""
    if isinstance(methods, (str, Method)):
        methods = [methods]
    found: dict[str, Method] = {}
    for entry in methods:
        if isinstance(entry, Method):
            found.setdefault(entry.name, entry)
        else:
            for name in canonical_methods(entry):
                found.setdefault(name, method(name))
    return found


def needs_of(implementations: dict[str, Method]) -> frozenset[str] | None:
    """What the graph must provide for these methods; None (everything) for a method the
    registry does not describe."""
    needs: set[str] = set()
    for impl in implementations.values():
        info = METHODS.get(impl.name)
        if info is None or type(impl) is not info.implementation:
            return None
        needs |= info.needs
    return frozenset(needs)
