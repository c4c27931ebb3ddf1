"""Every method against pytorch-grad-cam 1.5.7 (a test-only dependency), final CAMs compared.

resnet18 and vgg11 at 64x64 (random weights with random batch-norm statistics and biases, so
FullGrad's bias terms are not zero), deit_tiny and swin_tiny at 224 for the gradient and
projection methods with their reshape. Batch 3, fixed seed, targets None / a fixed class /
softmax. Tolerance: max |diff| <= 1e-4 on maps in [0, 1] (reference §11: A and G from another
runtime differ at round-off level).
"""

from __future__ import annotations

import shutil
import weakref
from pathlib import Path

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
from zoo import on_leave, one_model_at_a_time, randomise

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
    # AblationCAM's weight (y - y_ablated) / y subtracts near-equal scores: pgc's own float32
    # result is 1.7e-4 (class), 5e-5 (softmax) from its float64 result on this vgg11 (ours vs
    # pgc measured 4.5e-5 and 9.3e-5); with no target 2e-5 (ours 4e-6)
    ("vgg11", "ablationcam"): 5e-4,
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


def _reshape(setup: str):
    if setup == "deit_tiny":
        return lambda t: t[:, 1:, :].reshape(t.size(0), 14, 14, t.size(2)).permute(0, 3, 1, 2)
    if setup == "swin_tiny":
        return lambda t: t.permute(0, 3, 1, 2)
    return None


_EXPLAINERS = weakref.WeakSet()


def _explainer(directory) -> Explainer:
    explainer = Explainer(directory)
    _EXPLAINERS.add(explainer)
    return explainer


_ROOTS = set()


@one_model_at_a_time
def prepared(setup: str, tmp_root: str):
    from camexport.load import build_architecture

    arch, size, usual, second = SETUPS[setup]
    torch.manual_seed(0)
    model, _ = build_architecture(arch)
    if setup == "vgg11":  # the features as they are; a 256-wide head instead of 120M parameters,
        # initialised N(0, 0.02) (torchvision's 0.01 on this narrow head left AblationCAM's softmax
        # scores badly conditioned: pgc float32 vs float64 3.5e-3; PyTorch's default init: 1e-3)
        model.classifier = torch.nn.Sequential(
            torch.nn.Linear(512 * 7 * 7, 256), torch.nn.ReLU(True), torch.nn.Dropout(),
            torch.nn.Linear(256, 256), torch.nn.ReLU(True), torch.nn.Dropout(), torch.nn.Linear(256, 1000))
        for layer in model.classifier[::3]:
            torch.nn.init.normal_(layer.weight, 0, 0.02)
            torch.nn.init.zeros_(layer.bias)
    model = randomise(model)
    _ROOTS.add(tmp_root)
    path = f"{tmp_root}/{setup}.pt"
    torch.save(model, path)
    methods = ("gradcam,fullgrad,guidedbackprop,shapleycam" if setup in ("resnet18", "vgg11")
               else "gradcam")
    # overwrite: a model the tests come back to after another one is prepared again
    common = {"trust_pickle": True, "input_size": (size, size), "overwrite": True}
    one = build(path, [usual], methods=methods, out_dir=f"{tmp_root}/{setup}-1", **common)
    two = build(path, [usual, second], out_dir=f"{tmp_root}/{setup}-2",
                methods="gradcam,shapleycam" if setup in ("resnet18", "vgg11") else "gradcam",
                **common)
    x = np.random.default_rng(0).standard_normal((BATCH, 3, size, size)).astype(np.float32)
    return model, _explainer(one.directory), _explainer(two.directory), x


@on_leave
def _forget(setup: str) -> None:
    """Free the setup's sessions and delete its files (GBs of ONNX for the larger models)."""
    for explainer in list(_EXPLAINERS):
        explainer.release()
    for root in _ROOTS:
        for path in Path(root).glob(f"{setup}*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


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
    print(f"{what}: max |diff| {diff:.2e}")  # shown with -s / -rP
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
    inputs.rng = np.random.RandomState(0)
    ours = make("randomcam")(inputs)
    np.random.seed(0)
    theirs = _pgc(pgc.RandomCAM, model, [model.layer4], x,
                  [ClassifierOutputTarget(c) for c in CLASSES], "resnet18")
    _compare(ours, theirs, "randomcam")
    again = make("randomcam")(single.inputs(x, list(CLASSES)))
    np.testing.assert_array_equal(again, make("randomcam")(single.inputs(x, list(CLASSES))))


# -- several targets per image in one forward pass -------------------------------------------
MULTI_METHODS = ["gradcam", "gradcam++", "layercam", "eigencam", "shapleycam", "fullgrad",
                 "guidedbackprop", "ablationcam"]


def _slots(size: int):
    """K = 3 targets per image: ints, softmax and ReST objects, None (the top class)."""
    return [[5, ours_targets.ClassifierOutputSoftmaxTarget(7), None],
            [ours_targets.ClassifierOutputReST(2), 9, 1],
            [None, 3, ours_targets.ClassifierOutputSoftmaxTarget(size - 1)]]


SLOT_CASES = [("resnet18", "single"), ("resnet18", "double"), ("vgg11", "single"),
              ("deit_tiny", "single")]


@pytest.mark.parametrize("setup,which", [pytest.param(s, w, id=f"{s}-{w}", marks=pytest.mark.xdist_group(s))
                                         for s, w in SLOT_CASES])
def test_explain_targets_equals_one_call_per_target(setup, which, tmp_root):
    """explain_targets (one head run, the tail on K x B rows) equals K separate calls."""
    _, single, double, x = prepared(setup, tmp_root)
    explainer = single if which == "single" else double
    methods = (MULTI_METHODS if setup != "deit_tiny" else ["gradcam", "layercam", "eigencam"])
    if which == "double":
        methods = ["gradcam", "hirescam", "shapleycam", "refinecam"]
    slots = _slots(1000)
    several = explainer.explain_targets(x, slots, methods=methods)
    assert any(cut[0] is not None for cut in explainer._splits.values())  # no forward per target
    for k in range(3):
        one = explainer(x, targets=[row[k] for row in slots], methods=methods)
        assert [row[k] for row in several.targets] == one.targets
        for name in methods:
            assert several.cams[name].shape[:2] == (BATCH, 3)
            _compare(several.cams[name][:, k], one.cams[name], f"{setup} {name} slot {k}", 1e-5)
    np.testing.assert_array_equal(several.outputs, one.outputs)


@pytest.mark.xdist_group("resnet18")
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam"])
def test_explain_targets_matches_pgc(method, tmp_root):
    model, single, _, x = prepared("resnet18", tmp_root)
    slots = [[5, 1, 7], [9, 3, 2], [1, 4, 4]]
    several = single.explain_targets(x, slots, methods=[method]).cams[method]
    layer = resolve_module(model, SETUPS["resnet18"][2])
    for k in range(3):
        theirs = _pgc(ALL[method], model, [layer], x,
                      [ClassifierOutputTarget(row[k]) for row in slots], "resnet18")
        _compare(several[:, k], theirs, f"{method} slot {k}")


@pytest.mark.xdist_group("resnet18")
def test_explain_targets_without_the_cut_runs_the_whole_graph(tmp_root, monkeypatch):
    """The fallback (a graph the cut does not apply to) gives the same maps, forward included."""
    _, single, _, x = prepared("resnet18", tmp_root)
    slots = _slots(1000)
    cut = single.explain_targets(x, slots, methods=["gradcam", "fullgrad"])
    monkeypatch.setattr(single, "_split_graph", lambda outputs=None: (None, None, None))
    whole = single.explain_targets(x, slots, methods=["gradcam", "fullgrad"])
    for name in cut.cams:
        _compare(whole.cams[name], cut.cams[name], f"fallback {name}", 1e-5)


@pytest.mark.xdist_group("resnet18")
def test_explain_targets_bad_lists_raise(tmp_root):
    _, single, _, x = prepared("resnet18", tmp_root)
    with pytest.raises(ours_targets.TargetError, match="same number"):
        single.explain_targets(x, [[1, 2], [3], [4, 5]])
    with pytest.raises(ours_targets.TargetError, match="2 target lists for 3 images"):
        single.explain_targets(x, [[1, 2], [3, 4]])
    with pytest.raises(ours_targets.TargetError, match="out of range"):
        single.explain_targets(x, [[1, 2], [3, 4], [5, 1000]])


@pytest.mark.xdist_group("deit_tiny")
@pytest.mark.parametrize("kind", ["none", "softmax"])
def test_ablation_on_a_layer_the_residual_stream_bypasses_matches_pgc(kind, tmp_root):
    """ViT blocks.11.norm1: the model after it also reads the block's input (the residual
    stream), computed from each image as pgc's AblationLayerVit recomputes it."""
    from pytorch_grad_cam.ablation_layer import AblationLayerVit

    model, single, _, x = prepared("deit_tiny", tmp_root)
    ours_t, theirs_t = _targets(kind)
    ours = single(x, targets=ours_t, methods=["ablationcam"]).cams["ablationcam"]
    layer = resolve_module(model, SETUPS["deit_tiny"][2])
    with pgc.AblationCAM(model=model, target_layers=[layer], reshape_transform=_reshape("deit_tiny"),
                         ablation_layer=AblationLayerVit()) as cam:
        theirs = cam(input_tensor=torch.tensor(x), targets=theirs_t)
    _compare(ours, theirs, f"deit_tiny ablationcam targets={kind}",
             LOOSER.get(("deit_tiny", "ablationcam"), TOLERANCE))


@pytest.mark.xdist_group("deit_tiny")
def test_tail_past_a_residual_stream_needs_the_image(tmp_root):
    _, single, _, x = prepared("deit_tiny", tmp_root)
    acts = single.inputs(x[:1]).raw_activations[0]
    with pytest.raises(ValueError, match="also reads values computed before it"):
        single.tail(0, acts)
    with pytest.raises(ValueError, match="takes one image"):
        single.tail(0, acts, x[:2])
    # the tail on the layer's own tensors gives the model's outputs
    _compare(single.tail(0, np.repeat(acts, 2, axis=0), x[:1]), np.repeat(single.forward(x[:1]), 2, axis=0),
             "deit_tiny tail = forward", 1e-4)


# -- AblationCAM's ratio_channels_to_ablate (reference §3.8, Q16, Q17) -------------------------
@pytest.mark.xdist_group("resnet18")
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("kind", ["none", "softmax"])
def test_ablation_ratio_matches_pgc(ratio, kind, tmp_root):
    from camexport.methods.perturbation import AblationCAM

    model, single, _, x = prepared("resnet18", tmp_root)
    ours_t, theirs_t = _targets(kind)
    ours = single(x, targets=ours_t, methods=[AblationCAM(ratio_channels_to_ablate=ratio)])
    with pgc.AblationCAM(model=model, target_layers=[model.layer4],
                         ratio_channels_to_ablate=ratio) as cam:
        theirs = cam(input_tensor=torch.tensor(x), targets=theirs_t)
    _compare(ours.cams["ablationcam"], theirs, f"ablationcam ratio {ratio} targets={kind}")


@one_model_at_a_time
def prepared_conv_layer(setup: str, tmp_root: str):
    """vgg11 explained at features.18, a convolution followed by ReLU(inplace=True): its output
    has negative values, and pgc on CPU sees them overwritten (Q4). Returns the model, a copy
    whose ReLUs are not in place (the same function), the explainer and the input."""
    import copy

    model, _, _, x = prepared(setup, tmp_root)
    one = build(f"{tmp_root}/{setup}.pt", ["features.18"], trust_pickle=True, methods="gradcam",
                out_dir=f"{tmp_root}/{setup}-conv", input_size=(64, 64), overwrite=True)
    functional = copy.deepcopy(model)
    for module in functional.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    return model, functional, _explainer(one.directory), x


@pytest.mark.xdist_group("vgg11")
@pytest.mark.parametrize("ratio", [0.1])
def test_ablation_with_negative_activations_matches_pgc(ratio, tmp_root):
    """A minimum below 0: the ablation values depend on each channel's place in the ablation
    list (Q14), here the experimental one as well."""
    from camexport.methods.perturbation import AblationCAM

    _, functional, explainer, x = prepared_conv_layer("vgg11", tmp_root)
    assert explainer.inputs(x).activations[0].min() < 0
    ours = explainer(x, targets=list(CLASSES), methods=[AblationCAM(ratio_channels_to_ablate=ratio)])
    with pgc.AblationCAM(model=functional, target_layers=[functional.features[18]],
                         ratio_channels_to_ablate=ratio) as cam:
        theirs = cam(input_tensor=torch.tensor(x), targets=[ClassifierOutputTarget(c) for c in CLASSES])
    _compare(ours.cams["ablationcam"], theirs, f"vgg11 features.18 ablationcam ratio {ratio}")


@pytest.mark.xdist_group("resnet18")
def test_ablation_ratio_above_half_ablates_each_channel_once(tmp_root):
    """Q16 fix. With r > 0.5 pgc's list names channels twice and every channel after the first
    repeat gets weight 0; camexport ablates the union once. On resnet18's layer4 (minimum 0, so
    every ablation value is 0) r = 0.75 selects every channel: the map equals r = 1.0, which
    pgc's r = 0.75 does not."""
    from camexport.methods.perturbation import AblationCAM

    model, single, _, x = prepared("resnet18", tmp_root)
    targets = [ClassifierOutputTarget(c) for c in CLASSES]
    ours = single(x, targets=list(CLASSES), methods=[AblationCAM(ratio_channels_to_ablate=0.75)])
    full = single(x, targets=list(CLASSES), methods=["ablationcam"])
    _compare(ours.cams["ablationcam"], full.cams["ablationcam"], "ratio 0.75 vs 1.0", 1e-5)
    with pgc.AblationCAM(model=model, target_layers=[model.layer4],
                         ratio_channels_to_ablate=0.75) as cam:
        theirs = cam(input_tensor=torch.tensor(x), targets=targets)
    assert np.abs(theirs - ours.cams["ablationcam"]).max() > 0.05


def test_method_options_are_per_instance():
    """Q18 fix: no shared default state between method objects; unknown options are refused."""
    from camexport.methods import method as make
    from camexport.methods.perturbation import AblationCAM

    tuned = make("ablationcam", ratio_channels_to_ablate=0.5)
    assert tuned.ratio_channels_to_ablate == 0.5
    assert make("ablationcam").ratio_channels_to_ablate == 1.0
    assert AblationCAM().ratio_channels_to_ablate == 1.0
    with pytest.raises(TypeError, match="no option 'ratio'"):
        AblationCAM(ratio=0.5)


# -- quirks camexport fixes (reference §10), each against pgc's own behaviour -----------------
@pytest.mark.xdist_group("vgg11")
def test_in_place_relu_after_the_layer_keeps_the_true_activation(tmp_root):
    """Q4 fix. features.18 is a convolution followed by ReLU(inplace=True). On CPU pgc stores
    the tensor that the ReLU then overwrites, so its A is relu(conv) while G is w.r.t. the conv
    output; camexport's A is the convolution's true output, which pgc gives once the ReLUs are
    not in place (or on CUDA)."""
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

    model, functional, explainer, x = prepared_conv_layer("vgg11", tmp_root)
    targets = [ClassifierOutputTarget(c) for c in CLASSES]
    ours_a = explainer.inputs(x, list(CLASSES)).activations[0]
    recorder = ActivationsAndGradients(model, [model.features[18]], None, detach=True)
    recorder(torch.tensor(x))
    theirs_a = recorder.activations[0].numpy()
    recorder.release()
    assert ours_a.min() < 0
    np.testing.assert_allclose(theirs_a, np.maximum(ours_a, 0), atol=1e-5)
    for name in ("gradcam", "gradcam++", "eigencam"):  # (HiResCAM, LayerCAM: G = 0 where A < 0)
        ours = explainer(x, targets=list(CLASSES), methods=[name]).cams[name]
        true = _pgc(ALL[name], functional, [functional.features[18]], x, targets, "vgg11")
        _compare(ours, true, f"{name} at an in-place layer vs pgc without in-place ReLU")
        overwritten = _pgc(ALL[name], model, [model.features[18]], x, targets, "vgg11")
        assert np.abs(overwritten - ours).max() > 0.05, name


@pytest.mark.xdist_group("resnet18")
def test_targets_default_to_each_images_top_class(tmp_root):
    """Q2 fix: targets are optional (pgc 1.5.7 requires the argument and takes None for the
    argmax); None inside a list is that image's top class, the others as given."""
    model, single, _, x = prepared("resnet18", tmp_root)
    ours = single(x, methods=["gradcam", "gradcam++"])
    for name in ours.cams:
        theirs = _pgc(ALL[name], model, [model.layer4], x, None, "resnet18")
        _compare(ours.cams[name], theirs, f"{name} default targets")
    top = [t.category for t in ours.targets]
    mixed = single(x, targets=[None, 3, None], methods=["gradcam"])
    assert [t.category for t in mixed.targets] == [top[0], 3, top[2]]
    theirs = _pgc(pgc.GradCAM, model, [model.layer4], x,
                  [ClassifierOutputTarget(c) for c in (top[0], 3, top[2])], "resnet18")
    _compare(mixed.cams["gradcam"], theirs, "gradcam with None among the targets")


@pytest.mark.xdist_group("resnet18")
def test_refinecam_eigen_smooth_means_eigen_smoothing(tmp_root):
    """Q23 fix. pgc's RefineCAM passes eigen_smooth into its base call's aug_smooth slot: its
    eigen_smooth=True output is the product of aug-smoothed GradCAM++ maps. camexport's is the
    product of eigen-smoothed ones, built here from pgc's own per-layer GradCAM++."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    model, _, double, x = prepared("resnet18", tmp_root)
    targets = [ClassifierOutputTarget(c) for c in CLASSES]
    layers = [resolve_module(model, name) for name in SETUPS["resnet18"][2:]]

    def product(**kwargs):
        maps = [_pgc(pgc.GradCAMPlusPlus, model, [layer], x, targets, "resnet18", **kwargs)
                for layer in layers]
        return scale_cam_image(np.prod(np.array(maps), axis=0))

    ours = double(x, targets=list(CLASSES), methods=["refinecam"], eigen_smooth=True).cams["refinecam"]
    _compare(ours, product(eigen_smooth=True), "refinecam eigen_smooth vs eigen-smoothed GradCAM++")
    theirs = pgc.RefineCAM(model, layers)(torch.tensor(x), targets, eigen_smooth=True)
    _compare(theirs, product(aug_smooth=True), "pgc RefineCAM eigen_smooth = aug_smooth", 1e-6)
    assert np.abs(theirs - ours).max() > 0.05


@pytest.mark.xdist_group("resnet18")
def test_shapleycam_two_layers_each_get_their_own_hvp(tmp_root):
    """Q21 fix. pgc fails with two target layers (its graph is freed after the first
    Hessian-vector product); camexport computes one per layer, so the map equals pgc's own
    aggregation of its single-layer maps."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    class PerLayer(pgc.ShapleyCAM):
        def aggregate_multi_layers(self, cam_per_target_layer):
            return cam_per_target_layer[0]

    model, _, double, x = prepared("resnet18", tmp_root)
    ours_t, theirs_t = _targets("rest")
    ours = double(x, targets=ours_t, methods=["shapleycam"]).cams["shapleycam"]
    layers = [resolve_module(model, name) for name in SETUPS["resnet18"][2:]]
    per_layer = [_pgc(PerLayer, model, [layer], x, theirs_t, "resnet18") for layer in layers]
    theirs = scale_cam_image(np.maximum(np.concatenate(per_layer, axis=1), 0).mean(axis=1))
    _compare(ours, theirs, "shapleycam two layers vs pgc's single-layer maps")
    with pytest.raises(RuntimeError):
        _pgc(pgc.ShapleyCAM, model, layers, x, theirs_t, "resnet18")


class _TwoConvs(torch.nn.Module):
    """Two biased convolutions, registered in execution order or (``swapped``) the opposite."""

    def __init__(self, swapped: bool = False):
        super().__init__()
        if swapped:
            self.second = torch.nn.Conv2d(6, 6, 3, padding=1)
            self.first = torch.nn.Conv2d(3, 6, 3, padding=1)
        else:
            self.first = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.second = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.second(torch.relu(self.first(x))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.xdist_group("small")
def test_fullgrad_pairs_bias_and_gradient_by_graph_node(tmp_root):
    """Q19 fix. pgc pairs FullGrad's biases (module registration order) with gradients (forward
    order) by position: with the two convolutions registered in reverse order it pairs each bias
    with the other layer's gradient, silently. camexport pairs them by graph node: on the
    swapped model it equals pgc on the same model registered in order. (Per-channel min-max
    makes a nonzero bias's scale irrelevant, so half of one bias is zero: those channels drop
    out of the right layer only.)"""
    torch.manual_seed(3)
    ordered = _TwoConvs().eval()
    with torch.no_grad():
        ordered.first.bias[:3] = 0
    swapped = _TwoConvs(swapped=True).eval()
    swapped.load_state_dict(ordered.state_dict())
    path = f"{tmp_root}/swapped.pt"
    torch.save(swapped, path)
    built = build(path, ["second"], methods="fullgrad", trust_pickle=True,
                  out_dir=f"{tmp_root}/swapped", input_size=(24, 24))
    x = np.random.default_rng(1).standard_normal((2, 3, 24, 24)).astype(np.float32)
    targets = [ClassifierOutputTarget(c) for c in (1, 3)]
    ours = Explainer(built.directory)(x, targets=[1, 3], methods=["fullgrad"]).cams["fullgrad"]
    right = _pgc(pgc.FullGrad, ordered, [], x, targets, "small")
    _compare(ours, right, "fullgrad, biases paired by node")
    wrong = _pgc(pgc.FullGrad, swapped, [], x, targets, "small")
    assert np.abs(wrong - right).max() > 0.05


def _synthetic_inputs(acts, grads):
    from camexport.methods.inputs import CamInputs

    batch = len(acts)
    return CamInputs(x=np.zeros((batch, 3, 40, 40), np.float32),
                     outputs=np.zeros((batch, 4), np.float32), targets=[None] * batch,
                     activations=[acts], gradients=[grads])


def test_float16_tensors_are_processed_in_float32():
    """Q31 fix: pgc's SVD fails on float16 and bfloat16 fails its numpy conversion; camexport
    post-processes in float32 whatever the graph's dtype."""
    from camexport.methods import method as make

    rng = np.random.default_rng(0)
    acts = rng.standard_normal((2, 8, 5, 5)).astype(np.float16)
    grads = rng.standard_normal((2, 8, 5, 5)).astype(np.float16)
    for name in ("gradcam", "gradcam++", "layercam", "eigencam", "eigengradcam"):
        half = make(name)(_synthetic_inputs(acts, grads))
        full = make(name)(_synthetic_inputs(acts.astype(np.float32), grads.astype(np.float32)))
        assert half.dtype == np.float32
        np.testing.assert_array_equal(half, full)


def test_kpca_arpack_start_does_not_read_the_global_rng():
    """Q30 fix: with more than 200 positions KPCA-CAM solves with ARPACK, whose start vector pgc
    draws from numpy's global RNG; camexport's comes from a seeded generator."""
    from camexport.methods import method as make

    acts = np.random.default_rng(0).standard_normal((2, 6, 16, 16)).astype(np.float32)
    np.random.seed(1)
    first = make("kpcacam")(_synthetic_inputs(acts, None))
    np.random.seed(2)
    np.testing.assert_array_equal(make("kpcacam")(_synthetic_inputs(acts, None)), first)


# -- BinaryClassifierOutputTarget on a one-logit model ---------------------------------------
@one_model_at_a_time
def prepared_binary(setup: str, tmp_root: str):
    """resnet18 with a one-logit head (random weights), 64x64."""
    from camexport.load import build_architecture

    torch.manual_seed(0)
    model, _ = build_architecture("resnet18")
    model.fc = torch.nn.Linear(512, 1)
    model = randomise(model)
    path = f"{tmp_root}/binary.pt"
    torch.save(model, path)
    built = build(path, ["layer4"], methods="gradcam", trust_pickle=True,
                  out_dir=f"{tmp_root}/binary", input_size=(64, 64), overwrite=True)
    x = np.random.default_rng(2).standard_normal((BATCH, 3, 64, 64)).astype(np.float32)
    return model, _explainer(built.directory), x


BINARY_METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigengradcam"]


@pytest.mark.xdist_group("binary")
@pytest.mark.parametrize("categories", [(1, 0, 1), (0, 0, 0), None], ids=["mixed", "negative", "none"])
def test_binary_target_matches_pgc(categories, tmp_root):
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    model, explainer, x = prepared_binary("binary", tmp_root)
    ours_t = None if categories is None else [ours_targets.BinaryClassifierOutputTarget(c)
                                              for c in categories]
    theirs_t = None if categories is None else [BinaryClassifierOutputTarget(c) for c in categories]
    ours = explainer(x, targets=ours_t, methods=BINARY_METHODS)
    assert ours.outputs.shape == (BATCH, 1)
    for name in BINARY_METHODS:
        theirs = _pgc(ALL[name], model, [model.layer4], x, theirs_t, "binary")
        _compare(ours.cams[name], theirs, f"binary {name} targets={categories}")


@pytest.mark.xdist_group("binary")
def test_binary_target_errors(tmp_root):
    _, explainer, x = prepared_binary("binary", tmp_root)
    with pytest.raises(ours_targets.TargetError, match="use 1 .positive. or 0"):
        explainer(x, targets=[ours_targets.BinaryClassifierOutputTarget(2)] * BATCH)
    with pytest.raises(ours_targets.TargetError, match="out of range"):
        explainer(x, targets=[0, 1, 0])  # class 1 of a one-logit output
    with pytest.raises(ours_targets.TargetError, match="2 targets for 3 images"):
        explainer(x, targets=[ours_targets.BinaryClassifierOutputTarget(1)] * 2)


@pytest.mark.xdist_group("resnet18")
def test_scorecam_runs_constant_maps_once(tmp_root, monkeypatch):
    """A channel whose map is constant gets an all-zero mask: one forward of that input per
    image serves all of them; the CAMs still equal pgc's, which runs each."""
    model, single, _, x = prepared("resnet18", tmp_root)
    acts = single.inputs(x).activations[0]
    flat = acts.reshape(BATCH, acts.shape[1], -1)
    constant = (flat.max(axis=2) == flat.min(axis=2)).sum(axis=1)
    assert constant.min() > 0, "the test needs constant maps in every image"
    expected = sum(flat.shape[1] - c + 1 for c in constant)
    seen = []
    forward = single.forward
    monkeypatch.setattr(single, "forward", lambda batch: seen.append(len(batch)) or forward(batch))
    ours = single(x, targets=None, methods=["scorecam"]).cams["scorecam"]
    assert sum(seen) == expected < BATCH * flat.shape[1]
    layer = resolve_module(model, SETUPS["resnet18"][2])
    _compare(ours, _pgc(pgc.ScoreCAM, model, [layer], x, None, "resnet18"), "scorecam, constant maps")
