"""Every method against pytorch-grad-cam 1.5.7 (a test-only dependency), final CAMs compared.

resnet18 and vgg11 at 64x64 (random weights with random batch-norm statistics and biases, so
FullGrad's bias terms are not zero), deit_tiny and swin_tiny at 224 for the gradient and
projection methods with their reshape. Batch 3, fixed seed, targets None / a fixed class /
softmax. Tolerance: max |diff| <= 1e-4 on maps in [0, 1] (reference §11: A and G from another
runtime differ at round-off level).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputReST,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)

from camexport import targets as ours_targets
from camexport.build import build
from camexport.eager import resolve_module
from camexport.explain import Explainer

TOLERANCE = 1e-4
#: Cases whose ONNX-path gap is legitimately larger (reference §11), with the reason. Their
#: method code is still held to TOLERANCE on torch-eager inputs by test_eager_path_matches_pgc.
LOOSER = {
    # XGradCAM divides by the signed activation sum + 1e-7; Swin's LayerNorm outputs have
    # channels whose spatial sum is near zero, so round-off in A moves those weights.
    ("swin_tiny", "xgradcam"): 5e-3,
    ("deit_tiny", "xgradcam"): 5e-4,  # the same on ViT's norm1 (measured 9e-5)
}
BATCH = 3
CLASSES = (5, 7, 9)

GRADIENT_METHODS = {
    "gradcam": pgc.GradCAM, "hirescam": pgc.HiResCAM, "gradcamelementwise": pgc.GradCAMElementWise,
    "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM,
    "eigengradcam": pgc.EigenGradCAM, "segeigencam": pgc.SegEigenCAM,
}
PROJECTION_METHODS = {"eigencam": pgc.EigenCAM, "kpcacam": pgc.KPCA_CAM, "fem": pgc.FEM}
FORWARD_METHODS = {"scorecam": pgc.ScoreCAM, "ablationcam": pgc.AblationCAM}
ALL = {**GRADIENT_METHODS, **PROJECTION_METHODS, **FORWARD_METHODS, "fullgrad": pgc.FullGrad,
       "finercam": pgc.FinerCAM, "refinecam": pgc.RefineCAM, "shapleycam": pgc.ShapleyCAM}

SETUPS = {
    # name: (arch, size, usual layer, second layer)
    "resnet18": ("resnet18", 64, "layer4", "layer3"),
    "vgg11": ("vgg11", 64, "features.19", "features.14"),
    "deit_tiny": ("deit_tiny_patch16_224", 224, "blocks.11.norm1", "blocks.10.norm1"),
    "swin_tiny": ("swin_tiny_patch4_window7_224", 224, "layers.3.blocks.1.norm1",
                  "layers.3.blocks.0.norm1"),
}


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial batch-norm statistics and biases (torchvision initialises them to 0/1)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
            elif isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.uniform_(-0.1, 0.1, generator=generator)
    return model.eval()


def _reshape(setup: str):
    if setup == "deit_tiny":
        return lambda t: t[:, 1:, :].reshape(t.size(0), 14, 14, t.size(2)).permute(0, 3, 1, 2)
    if setup == "swin_tiny":
        return lambda t: t.permute(0, 3, 1, 2)
    return None


@lru_cache(maxsize=2)  # tests are grouped per setup (xdist_group)
def prepared(setup: str, tmp_root: str):
    from camexport.load import build_architecture

    arch, size, usual, second = SETUPS[setup]
    torch.manual_seed(0)
    model, _ = build_architecture(arch)
    model = _randomise(model)
    path = f"{tmp_root}/{setup}.pt"
    torch.save(model.state_dict(), path)
    methods = ("gradcam,fullgrad,guidedbackprop,shapleycam" if setup in ("resnet18", "vgg11")
               else "gradcam")
    one = build(path, [usual], arch=arch, methods=methods, out_dir=f"{tmp_root}/{setup}-1",
                input_size=(size, size))
    two = build(path, [usual, second], arch=arch, out_dir=f"{tmp_root}/{setup}-2",
                input_size=(size, size))
    x = np.random.default_rng(0).standard_normal((BATCH, 3, size, size)).astype(np.float32)
    return model, Explainer(one.directory), Explainer(two.directory), x


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("parity"))


def _targets(kind: str):
    if kind == "none":
        return None, None
    if kind == "class":
        return list(CLASSES), [ClassifierOutputTarget(c) for c in CLASSES]
    if kind == "rest":
        return ([ours_targets.ClassifierOutputReST(c) for c in CLASSES],
                [ClassifierOutputReST(c) for c in CLASSES])
    return ([ours_targets.ClassifierOutputSoftmaxTarget(c) for c in CLASSES],
            [ClassifierOutputSoftmaxTarget(c) for c in CLASSES])


def _pgc(cls, model, layers, x, targets, setup, **kwargs):
    if cls is pgc.RefineCAM:  # not a context manager; one base CAM object per layer
        return cls(model, layers, _reshape(setup))(torch.tensor(x), targets, **kwargs)
    with cls(model=model, target_layers=layers, reshape_transform=_reshape(setup)) as cam:
        if cls is pgc.ScoreCAM:
            cam.batch_size = 64
        return cam(input_tensor=torch.tensor(x), targets=targets, **kwargs)


def _compare(ours, theirs, what, tolerance=TOLERANCE):
    diff = np.abs(ours - theirs).max()
    assert diff <= tolerance, f"{what}: max |diff| {diff:.2e}"


CASES = [(setup, method, kind)
         for setup in ("resnet18", "vgg11") for method in ALL for kind in ("none", "class", "softmax")]
# ShapleyCAM's Hessian-vector product is non-zero only for curved targets (ReST, softmax)
CASES += [(setup, "shapleycam", "rest") for setup in ("resnet18", "vgg11")]
CASES += [(setup, method, kind) for setup in ("deit_tiny", "swin_tiny")
          for method in {**GRADIENT_METHODS, **PROJECTION_METHODS}
          for kind in ("none", "class", "softmax")]


def _grouped(cases, ids):
    return [pytest.param(*case, id=i, marks=pytest.mark.xdist_group(case[0]))
            for case, i in zip(cases, ids)]


@pytest.mark.parametrize("setup,method,kind",
                         _grouped(CASES, [f"{s}-{m}-{k}" for s, m, k in CASES]))
def test_method_matches_pgc(setup, method, kind, tmp_root):
    model, single, _, x = prepared(setup, tmp_root)
    ours_t, theirs_t = _targets(kind)
    ours = single(x, targets=ours_t, methods=[method]).cams[method]
    layer = resolve_module(model, SETUPS[setup][2])
    theirs = _pgc(ALL[method], model, [layer], x, theirs_t, setup)
    assert ours.shape == theirs.shape == (BATCH, *x.shape[2:])
    _compare(ours, theirs, f"{setup} {method} targets={kind}", LOOSER.get((setup, method), TOLERANCE))


SMOOTH_CASES = [(setup, method) for setup in ("resnet18", "deit_tiny")
                for method in ("gradcam", "gradcam++", "layercam", "scorecam")
                if not (setup == "deit_tiny" and method == "scorecam")]


@pytest.mark.parametrize("setup,method",
                         _grouped(SMOOTH_CASES, [f"{s}-{m}" for s, m in SMOOTH_CASES]))
@pytest.mark.parametrize("eigen,aug", [(True, False), (False, True)], ids=["eigen", "aug"])
def test_smoothing_matches_pgc(setup, method, eigen, aug, tmp_root):
    model, single, _, x = prepared(setup, tmp_root)
    ours = single(x, targets=None, methods=[method], eigen_smooth=eigen, aug_smooth=aug).cams[method]
    layer = resolve_module(model, SETUPS[setup][2])
    theirs = _pgc(ALL[method], model, [layer], x, None, setup, eigen_smooth=eigen, aug_smooth=aug)
    _compare(ours, theirs, f"{setup} {method} eigen={eigen} aug={aug}")


TWO_LAYER = [(setup, method) for setup in ("resnet18", "vgg11", "deit_tiny")
             for method in ("gradcam", "hirescam", "eigencam", "layercam", "refinecam")]


@pytest.mark.parametrize("setup,method", _grouped(TWO_LAYER, [f"{s}-{m}" for s, m in TWO_LAYER]))
def test_two_layer_aggregation_matches_pgc(setup, method, tmp_root):
    model, _, double, x = prepared(setup, tmp_root)
    ours = double(x, targets=list(CLASSES), methods=[method]).cams[method]
    layers = [resolve_module(model, name) for name in SETUPS[setup][2:]]
    theirs = _pgc(ALL[method], model, layers, x, [ClassifierOutputTarget(c) for c in CLASSES], setup)
    _compare(ours, theirs, f"{setup} {method} two layers")


@pytest.mark.parametrize("setup", [pytest.param(s, marks=pytest.mark.xdist_group(s))
                                   for s in ("resnet18", "vgg11")])
def test_guided_backprop_matches_pgc_per_image(setup, tmp_root):
    model, single, _, x = prepared(setup, tmp_root)
    ours = single(x, targets=list(CLASSES), methods=["guidedbackprop"]).cams["guidedbackprop"]
    guided = GuidedBackpropReLUModel(model, device="cpu")
    for b, category in enumerate(CLASSES):  # pgc explains image 0 only (Q25): one call per image
        theirs = guided(torch.tensor(x[b:b + 1]), target_category=category)
        assert ours[b].shape == theirs.shape
        rel = np.abs(ours[b] - theirs).max() / np.abs(theirs).max()
        assert rel <= 1e-4, f"{setup} guided backprop image {b}: {rel:.2e} of max |g|"


EAGER_CASES = [(setup, method) for setup in ("resnet18", "swin_tiny")
               for method in ("gradcam", "xgradcam", "gradcam++", "eigencam", "scorecam")
               if not (setup == "swin_tiny" and method == "scorecam")]


@pytest.mark.parametrize("setup,method",
                         _grouped(EAGER_CASES, [f"{s}-{m}" for s, m in EAGER_CASES]))
def test_eager_path_matches_pgc(setup, method, tmp_root):
    """The same method code fed by torch eager (hooks, autograd) reproduces pgc to 1e-5."""
    from camexport.eager import eager_inputs
    from camexport.methods import method as make

    model, _, _, x = prepared(setup, tmp_root)
    inputs = eager_inputs(model, x, [SETUPS[setup][2]], targets=list(CLASSES))
    ours = make(method)(inputs)
    layer = resolve_module(model, SETUPS[setup][2])
    theirs = _pgc(ALL[method], model, [layer], x, [ClassifierOutputTarget(c) for c in CLASSES], setup)
    _compare(ours, theirs, f"eager {setup} {method}", 1e-5)


@pytest.mark.xdist_group("resnet18")
def test_deep_feature_factorization_matches_pgc(tmp_root):
    from pytorch_grad_cam import DeepFeatureFactorization

    from camexport.methods import method as make

    model, single, _, x = prepared("resnet18", tmp_root)
    dff = make("dff")
    dff.n_components = 4
    ours = dff.factorize(single.inputs(x))
    theirs = DeepFeatureFactorization(model, target_layer=model.layer4, computation_on_concepts=model.fc)
    concepts, explanations, concept_outputs = theirs(torch.tensor(x), n_components=4)
    np.testing.assert_allclose(ours.concepts, concepts, rtol=1e-3, atol=1e-4)
    _compare(ours.explanations, np.stack(explanations), "dff explanations")
    np.testing.assert_allclose(ours.concept_outputs, concept_outputs, rtol=1e-3, atol=1e-4)


@pytest.mark.xdist_group("resnet18")
def test_sess_matches_pgc(tmp_root):
    """SESS (12 scales of sliding windows, GradCAM per patch, weighted mean fusion, blur)."""
    model, single, _, x = prepared("resnet18", tmp_root)
    ours = single(x, targets=list(CLASSES), methods=["sess"]).cams["sess"]
    theirs = pgc.SESS(model, [model.layer4])(torch.tensor(x), [ClassifierOutputTarget(c) for c in CLASSES])
    _compare(ours, theirs, "sess")


@pytest.mark.xdist_group("resnet18")
def test_random_cam_with_the_same_draws_matches_pgc(tmp_root):
    """RandomCAM draws from a seeded generator (Q30 fix); handed pgc's global-RNG stream, the
    maps match, so only the source of randomness differs."""
    from camexport.methods import method as make

    model, single, _, x = prepared("resnet18", tmp_root)
    inputs = single.inputs(x, list(CLASSES))
    inputs.extras["rng"] = np.random.RandomState(0)
    ours = make("randomcam")(inputs)
    np.random.seed(0)
    theirs = _pgc(pgc.RandomCAM, model, [model.layer4], x,
                  [ClassifierOutputTarget(c) for c in CLASSES], "resnet18")
    _compare(ours, theirs, "randomcam")
    again = make("randomcam")(single.inputs(x, list(CLASSES)))
    np.testing.assert_array_equal(again, make("randomcam")(single.inputs(x, list(CLASSES))))
