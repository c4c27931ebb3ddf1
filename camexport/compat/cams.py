"""pgc's CAM classes, each a row: its pgc constructor, the camexport method it computes and that
method's options. The modules named as pgc's (``grad_cam.py``, ``score_cam.py``, ...) re-export
them, so ``from camexport.compat.grad_cam import GradCAM`` works as pgc's import does."""

from __future__ import annotations

import logging

import numpy as np

from camexport.compat.ablation_layer import AblationLayer
from camexport.compat.base_cam import BaseCAM, _numpy
from camexport.compat.engine import CompatError, as_native_targets, batch_array

log = logging.getLogger(__name__)


class GradCAM(BaseCAM):
    """Selvaraju et al. 2017: w = mean_s G, M = sum_c w A."""

    method = "gradcam"

    def __init__(self, model, target_layers, reshape_transform=None):
        super().__init__(model, target_layers, reshape_transform)


class HiResCAM(GradCAM):
    """Draelos & Carin 2020: M = sum_c G A."""

    method = "hirescam"


class GradCAMElementWise(GradCAM):
    """M = sum_c relu(G A)."""

    method = "gradcamelementwise"


class GradCAMPlusPlus(GradCAM):
    """Chattopadhay et al. 2018 (pgc's closed form, reference §3.2)."""

    method = "gradcam++"


class XGradCAM(GradCAM):
    """Fu et al. 2020: w = sum_s G A / (sum_s A + 1e-7)."""

    method = "xgradcam"


class LayerCAM(GradCAM):
    """Jiang et al. 2021: M = sum_c relu(G) A."""

    method = "layercam"


class EigenGradCAM(GradCAM):
    """M = P(G A): the first principal component of the gradient-weighted activations."""

    method = "eigengradcam"


class SegEigenCAM(GradCAM):
    """M = P±(|G| A), the sign chosen by the larger extreme (pgc 1.5.5+)."""

    method = "segeigencam"


class RandomCAM(GradCAM):
    """w ~ U(-1, 1) per (image, channel): a baseline. camexport draws from its own seeded
    generator, so maps differ from pgc's (which uses numpy's global state)."""

    method = "randomcam"


class ShapleyCAM(BaseCAM):
    """Cai et al. 2024: w = mean_s (G - 1/2 H·A) with the Hessian-vector product of the target."""

    method = "shapleycam"

    def __init__(self, model, target_layers, reshape_transform=None):
        super().__init__(model, target_layers, reshape_transform, detach=False)


class EigenCAM(BaseCAM):
    """Muhammad & Yeasin 2020: M = P(A), no gradients, no target."""

    method = "eigencam"

    def __init__(self, model, target_layers, reshape_transform=None):
        super().__init__(model, target_layers, reshape_transform, uses_gradients=False)


class KPCA_CAM(BaseCAM):
    """Karmani et al. 2024: the first kernel-PCA component of the activations."""

    method = "kpcacam"

    def __init__(self, model, target_layers, reshape_transform=None, kernel="sigmoid", gamma=None):
        super().__init__(model, target_layers, reshape_transform, uses_gradients=False)
        self.kernel, self.gamma = kernel, gamma

    def _method_options(self):
        return {"kernel": self.kernel, "gamma": self.gamma}


class FEM(BaseCAM):
    """Fu et al.: channels weighted by how much of each map exceeds mean + k std."""

    method = "fem"

    def __init__(self, model, target_layers, reshape_transform=None, k=2):
        super().__init__(model, target_layers, reshape_transform, uses_gradients=False)
        self.k = k

    def _method_options(self):
        return {"k": float(self.k)}


class ScoreCAM(BaseCAM):
    """Wang et al. 2020: channel weights from the target scores of channel-masked inputs.
    ``cam.batch_size`` sets the masked images per forward (speed only), as in pgc."""

    method = "scorecam"

    def __init__(self, model, target_layers, reshape_transform=None):
        super().__init__(model, target_layers, reshape_transform, uses_gradients=False)
        self.batch_size = 16

    def _method_options(self):
        return {"batch_size": int(self.batch_size)}


class AblationCAM(BaseCAM):
    """Desai & Ramaswamy 2020: w = (o - s_c) / o with channel c ablated. camexport ablates inside
    the tail graph, so ``ablation_layer`` only has to be one of pgc's kinds (AblationLayer,
    AblationLayerVit: the layer's layout is read from the graph; AblationLayerFasterRCNN on a
    Faster R-CNN's ``backbone``: each ablated copy of the FPN levels gets its own proposals);
    ``batch_size`` sets pgc's chunking of ablation values (it changes the numbers, reference
    §3.8)."""

    method = "ablationcam"

    def __init__(self, model, target_layers, reshape_transform=None, ablation_layer=AblationLayer(),  # noqa: B008 (pgc's default)
                 batch_size=32, ratio_channels_to_ablate=1.0):
        super().__init__(model, target_layers, reshape_transform, uses_gradients=False)
        check_ablation_layer(ablation_layer, model)
        self.ablation_layer = ablation_layer
        self.batch_size = batch_size
        self.ratio_channels_to_ablate = ratio_channels_to_ablate

    def _method_options(self):
        return {"chunk": int(self.batch_size),
                "ratio_channels_to_ablate": float(self.ratio_channels_to_ablate)}


#: what an ablation layer does, in pgc's protocol; camexport does it in the graph instead
_ABLATION_BEHAVIOUR = ("__call__", "forward", "set_next_batch", "activations_to_be_ablated",
                       "objectiveness_mask_from_svd")
#: pgc's own ablation layers, accepted as they are
_PGC_ABLATION_LAYERS = ("AblationLayer", "AblationLayerVit", "AblationLayerFasterRCNN")


def check_ablation_layer(layer, model=None) -> None:
    """Refuse an ``ablation_layer`` whose numbers camexport would not compute: camexport
    ablates inside the tail graph with pgc's AblationLayer rule (the layout, NCHW or tokens as
    AblationLayerVit, read from the graph), so a subclass that changes how channels are
    ablated would be silently ignored. AblationLayerFasterRCNN is the FPN levels' ablation of a
    torchvision Faster R-CNN (``model``), which camexport.two_stage.LevelAblation does."""
    from camexport.compat import ablation_layer as kinds

    klass = type(layer)
    if klass.__module__.startswith("pytorch_grad_cam") and klass.__name__ in _PGC_ABLATION_LAYERS:
        own = getattr(kinds, klass.__name__)
    elif isinstance(layer, kinds.AblationLayer):
        own = next(k for k in (kinds.AblationLayerFasterRCNN, kinds.AblationLayerVit, kinds.AblationLayer)
                   if isinstance(layer, k))
        subclasses = klass.__mro__[:klass.__mro__.index(own)]
        custom = sorted({name for base in subclasses for name in _ABLATION_BEHAVIOUR if name in vars(base)})
        if custom:
            raise CompatError(f"{klass.__name__} overrides {', '.join(custom)}: camexport ablates inside "
                              f"the graph with {own.__name__}'s rule and would not run your code; use "
                              f"{own.__name__}(), or ScoreCAM for another perturbation")
    else:
        raise CompatError(f"ablation_layer is a {klass.__name__}; give AblationLayer() (CNN layers), "
                          f"AblationLayerVit() (token layers) or AblationLayerFasterRCNN() (a Faster "
                          f"R-CNN's backbone) from camexport.compat.ablation_layer")
    if own is kinds.AblationLayerFasterRCNN:
        from torchvision.models.detection import FasterRCNN

        if not isinstance(model, FasterRCNN):
            raise CompatError(f"AblationLayerFasterRCNN ablates a torchvision Faster R-CNN's FPN levels; "
                              f"the model is a {type(model).__name__}: use AblationLayer() (CNN layers) "
                              f"or AblationLayerVit() (token layers)")


class FullGrad(BaseCAM):
    """Srinivas & Fleuret 2019: input-gradient and bias-gradient terms of every bias layer;
    ``target_layers`` is ignored (as pgc, with a warning)."""

    method = "fullgrad"

    def __init__(self, model, target_layers, reshape_transform=None):
        if target_layers:
            log.warning("FullGrad ignores target_layers: it reads every bias layer of the model")
        super().__init__(model, [], reshape_transform, compute_input_gradient=True)

    def _layer_paths(self, model, target_layers):
        return []


def _base_method(base_method):
    """The camexport method class behind a compat class given as ``base_method``."""
    from camexport.methods.registry import METHODS

    name = getattr(base_method, "method", None)
    if not (isinstance(base_method, type) and issubclass(base_method, BaseCAM) and name):
        raise CompatError(f"base_method {base_method!r} is not a CAM class of camexport.compat "
                          f"(e.g. GradCAM)")
    return METHODS[name].implementation


class _Composite(BaseCAM):
    """pgc's wrappers around a ``base_method`` class (FinerCAM, RefineCAM, SESS)."""

    def __init__(self, model, target_layers, reshape_transform=None, base_method=GradCAM):
        super().__init__(model, target_layers, reshape_transform)
        self.base_method = base_method

    def _method_options(self):
        return {"base": _base_method(self.base_method)}


class FinerCAM(_Composite):
    """Zhang et al. 2025: the base method on targets that contrast the top class with its
    nearest classes (FinerWeightedTarget), when ``targets`` is None."""

    method = "finercam"

    def __init__(self, model, target_layers, reshape_transform=None, base_method=GradCAM):
        super().__init__(model, target_layers, reshape_transform, base_method)
        self._alpha, self._positions = 1.0, (1, 2, 3)

    def _method_options(self):
        return {**super()._method_options(), "alpha": float(self._alpha), "positions": self._positions}

    def forward(self, input_tensor, targets=None, eigen_smooth=False, alpha=1, comparison_categories=None,
                target_idx=None) -> np.ndarray:
        if target_idx is not None:
            raise CompatError("FinerCAM's target_idx is not supported; give targets="
                              "[FinerWeightedTarget(main, comparisons, alpha)] instead")
        self._alpha = alpha
        self._positions = (1, 2, 3) if comparison_categories is None else tuple(comparison_categories)
        return super().forward(input_tensor, targets, eigen_smooth)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class RefineCAM(_Composite):
    """The base method (GradCAM++) per layer, multiplied across layers (pgc 1.5.5+)."""

    method = "refinecam"

    def __init__(self, model, target_layers, reshape_transform=None, base_method=GradCAMPlusPlus, **kwargs):
        super().__init__(model, target_layers, reshape_transform, base_method)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input_tensor, targets=None, eigen_smooth=False) -> np.ndarray:
        return super().forward(input_tensor, targets, eigen_smooth)


class SESS(_Composite):
    """Tang et al. 2022 (pgc 1.5.7): the base method over multi-scale sliding patches."""

    method = "sess"

    def __init__(self, model, target_layers, reshape_transform=None, base_method=GradCAM, scales=None,
                 num_scales=12, scale_step_ratio=2.0 / 7.0, window_size=None, step_size=None,
                 pre_filter_ratio=0.0, theta=0.0, pool="mean", smooth=True, use_softmax_scores=True,
                 batch_size=32, **kwargs):
        super().__init__(model, target_layers, reshape_transform, base_method)
        self.options = {"num_scales": num_scales, "scale_step_ratio": scale_step_ratio,
                        "pre_filter_ratio": pre_filter_ratio, "theta": theta, "pool": pool,
                        "smooth": smooth, "use_softmax_scores": use_softmax_scores,
                        "batch_size": batch_size}
        for key, value in (("scales", scales), ("window_size", window_size), ("step_size", step_size)):
            if value is not None:
                self.options[key] = value

    def _method_options(self):
        return {**super()._method_options(), **self.options}

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input_tensor, targets=None, eigen_smooth=False) -> np.ndarray:
        return super().forward(input_tensor, targets, eigen_smooth)


class GuidedBackpropReLUModel:
    """Springenberg et al. 2015: the input gradient of the target through guided ReLUs, for the
    first image, (H, W, C) float32, as pgc returns it. ``target_category`` None: pgc's argmax
    over the flattened output."""

    def __init__(self, model, device=None):
        from camexport.compat.base_cam import check_model
        from camexport.compat.engine import Engine

        check_model(model)
        self.model = model
        self.model.eval()
        self.device = device
        self._engine = Engine(model, [])

    def forward(self, input_img):
        import torch

        with torch.no_grad():
            return self.model(input_img)

    def __call__(self, input_img, target_category=None):
        x = batch_array(input_img)
        explainer = self._engine.explainer(x.shape[1:], frozenset(["guided", "input_gradients"]))
        targets = None
        if target_category is None:
            flat = int(np.argmax(explainer.forward(x)))
            classes = int(np.prod(explainer.output_shape))
            if flat >= classes:
                raise CompatError(f"the top output of the batch is in image {flat // classes}; pgc "
                                  f"explains image 0 only: give target_category, or one image")
            target_category = flat
        targets = [int(target_category)] + [None] * (len(x) - 1)
        result = explainer(x, targets, methods=["guidedbackprop"])
        return result.cams["guidedbackprop"][0]


class DeepFeatureFactorization:
    """Collins et al. 2018: NMF concepts of one layer's activations; maps per image and concept
    resized to the input; ``computation_on_concepts`` (e.g. the classifier head) run on the
    concept vectors in torch, as pgc."""

    def __init__(self, model, target_layer, reshape_transform=None, computation_on_concepts=None):
        from camexport.compat.base_cam import check_model
        from camexport.compat.engine import Engine, layer_paths

        check_model(model)
        self.model = model
        self.model.eval()
        self.reshape_transform = reshape_transform
        self.computation_on_concepts = computation_on_concepts
        self._engine = Engine(model, layer_paths(model, [target_layer]))

    def __call__(self, input_tensor, n_components=16):
        import torch

        from camexport.methods.factorization import factorize
        from camexport.methods.pipeline import min_max, resize

        x = batch_array(input_tensor)
        explainer = self._engine.explainer(x.shape[1:], frozenset())
        inputs = explainer.inputs(x, None, frozenset(), free=True)
        acts = inputs.activations[0]
        if self.reshape_transform is not None:
            acts = _numpy(self.reshape_transform(torch.from_numpy(inputs.raw_activations[0])))
        concepts, parts = factorize(np.asarray(acts), n_components)
        b, k = parts.shape[:2]
        size = x.shape[2:]
        maps = resize(min_max(parts.reshape(b * k, *parts.shape[2:])), size).reshape(b, k, *size)
        explanations = [m.astype(np.float32) for m in maps]
        if self.computation_on_concepts:
            with torch.no_grad():
                tensors = torch.from_numpy(np.float32(concepts).transpose((1, 0)))
                outputs = self.computation_on_concepts(tensors).cpu().numpy()
            return concepts, explanations, outputs
        return concepts, explanations

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        return None


def run_dff_on_image(model, target_layer, classifier, img_pil, img_tensor, reshape_transform=None,
                     n_components=5, top_k=2) -> np.ndarray:
    """pgc's helper: the image beside its DFF concepts, each labelled with its top classes
    (``model.config.id2label``, a Hugging Face model's labels)."""
    import torch

    from camexport.compat.utils.image import create_labels_legend, show_factorization_on_image

    rgb = np.array(img_pil) / 255
    dff = DeepFeatureFactorization(model, target_layer, reshape_transform=reshape_transform,
                                   computation_on_concepts=classifier)
    _concepts, explanations, outputs = dff(img_tensor[None, :], n_components)
    outputs = torch.softmax(torch.from_numpy(outputs), axis=-1).numpy()
    labels = create_labels_legend(outputs, labels=model.config.id2label, top_k=top_k)
    visualization = show_factorization_on_image(rgb, explanations[0], image_weight=0.3,
                                                concept_labels=labels)
    return np.hstack((np.array(img_pil), visualization))


__all__ = [
    "FEM",
    "KPCA_CAM",
    "SESS",
    "AblationCAM",
    "DeepFeatureFactorization",
    "EigenCAM",
    "EigenGradCAM",
    "FinerCAM",
    "FullGrad",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GuidedBackpropReLUModel",
    "HiResCAM",
    "LayerCAM",
    "RandomCAM",
    "RefineCAM",
    "ScoreCAM",
    "SegEigenCAM",
    "ShapleyCAM",
    "XGradCAM",
    "as_native_targets",
    "run_dff_on_image",
]
