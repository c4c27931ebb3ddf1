"""A drop-in for pytorch-grad-cam 1.5.7: the same module tree, names and signatures, computed by
camexport's ONNX graphs (``docs/compat.md``).

    # from pytorch_grad_cam import GradCAM
    from camexport.compat import GradCAM
    from camexport.compat.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        grayscale_cam = cam(input_tensor=input_tensor, targets=[ClassifierOutputTarget(281)])

Nothing here imports ``pytorch_grad_cam``.
"""

from camexport.compat.ablation_layer import AblationLayer, AblationLayerFasterRCNN, AblationLayerVit
from camexport.compat.base_cam import ActivationsAndGradients, BaseCAM
from camexport.compat.cams import (
    FEM,
    KPCA_CAM,
    SESS,
    AblationCAM,
    DeepFeatureFactorization,
    EigenCAM,
    EigenGradCAM,
    FinerCAM,
    FullGrad,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GuidedBackpropReLUModel,
    HiResCAM,
    LayerCAM,
    RandomCAM,
    RefineCAM,
    ScoreCAM,
    SegEigenCAM,
    ShapleyCAM,
    XGradCAM,
    run_dff_on_image,
)
from camexport.compat.engine import CompatError, cache_root

__all__ = [
    "FEM",
    "KPCA_CAM",
    "SESS",
    "AblationCAM",
    "AblationLayer",
    "AblationLayerFasterRCNN",
    "AblationLayerVit",
    "ActivationsAndGradients",
    "BaseCAM",
    "CompatError",
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
    "cache_root",
    "run_dff_on_image",
]
