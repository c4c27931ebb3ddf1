"""Targets: values and gradients against torch, and clear errors for bad targets (never zeros)."""

import numpy as np
import pytest
import torch

from camexport import targets as T
from camexport.explain import Explainer

TARGETS = [
    T.ClassifierOutputTarget(3),
    T.ClassifierOutputSoftmaxTarget(2),
    T.ClassifierOutputReST(4),
    T.FinerWeightedTarget(1, (0, 5, 6), alpha=0.7),
    T.SimilarityToConceptTarget(np.random.default_rng(5).standard_normal(8)),
]


def _torch_value(target, z):
    if isinstance(target, T.ClassifierOutputTarget):
        return z[target.category]
    if isinstance(target, T.ClassifierOutputSoftmaxTarget):
        return torch.softmax(z, -1)[target.category]
    if isinstance(target, T.SimilarityToConceptTarget):  # pgc's embeddings tutorial
        return torch.nn.CosineSimilarity(dim=0)(z, torch.tensor(target.concept))
    if isinstance(target, T.ClassifierOutputReST):
        return z[target.category] - torch.nn.functional.cross_entropy(
            z[None], torch.tensor([target.category]))
    p = torch.softmax(z, -1)
    comps = list(target.comparisons)
    return (p[comps] * (z[target.main] - target.alpha * z[comps])).sum() / (p[comps].sum() + 1e-9)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: type(t).__name__)
def test_value_and_cotangent_match_torch(target):
    z = torch.tensor(np.random.default_rng(0).standard_normal(8), dtype=torch.float64,
                     requires_grad=True)
    value = _torch_value(target, z)
    value.backward()
    row = z.detach().numpy()
    assert np.isclose(float(target.values(row[None])[0]), float(value), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(target.cotangent(row), z.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("target", [t for t in TARGETS[1:] if hasattr(t, "hessian_vector")],
                         ids=lambda t: type(t).__name__)
def test_hessian_vector_matches_torch(target):
    """ShapleyCAM's second-order term: H v against torch's double backward (float64); the
    curved targets that have one (FinerCAM's has none: ShapleyCAM takes no FinerWeightedTarget)."""
    rng = np.random.default_rng(1)
    z = torch.tensor(rng.standard_normal(8), dtype=torch.float64, requires_grad=True)
    v = rng.standard_normal(8)
    (grad,) = torch.autograd.grad(_torch_value(target, z), z, create_graph=True)
    (expected,) = torch.autograd.grad(grad @ torch.tensor(v), z)
    np.testing.assert_allclose(target.hessian_vector(z.detach().numpy(), v), expected.numpy(),
                               rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def explainer(tmp_path_factory):
    """resnet18 (1000 classes, random weights) at 64x64 (layer4 is 2x2)."""
    import torchvision

    from camexport.build import build

    folder = tmp_path_factory.mktemp("targets")
    torch.manual_seed(0)
    path = folder / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    build(str(path), ["layer4"], arch="resnet18", out_dir=folder / "a", input_size=(64, 64))
    return Explainer(folder / "a")


def test_bad_targets_raise(explainer):
    """Out-of-range classes, fewer targets than images (Q1 fix: pgc pairs up to the shorter list
    and leaves the rest at zero), and targets that are not targets give a TargetError."""
    x = np.zeros((2, 3, 64, 64), np.float32)
    with pytest.raises(T.TargetError, match="out of range"):
        explainer(x, targets=[1, 1000])
    for methods in (["gradcam"], ["scorecam"], ["ablationcam"]):
        with pytest.raises(T.TargetError, match="1 targets for 2 images"):
            explainer(x, targets=[1], methods=methods)
    with pytest.raises(T.TargetError, match="out of range"):
        explainer(x, targets=[T.FinerWeightedTarget(1, (2, 5000)), 3])
    with pytest.raises(T.TargetError, match="unsupported target 'cat'"):
        explainer(x, targets=["cat", 3])
    good = explainer(x, targets=[1, -1])  # negative indices count from the end, as in torch
    assert good.cams["gradcam"].shape == (2, 64, 64)
    assert explainer(x, targets=7).targets == [T.ClassifierOutputTarget(7)] * 2


def test_binary_target_needs_a_one_logit_output(explainer):
    """pgc's loss is not a scalar for a binary target on several outputs (it fails); so does ours,
    with a TargetError, and a category other than 0 or 1 is refused rather than read as 0."""
    x = np.zeros((2, 3, 64, 64), np.float32)
    with pytest.raises(T.TargetError, match="needs a one-logit output"):
        explainer(x, targets=[T.BinaryClassifierOutputTarget(1)] * 2)
    with pytest.raises(T.TargetError, match="use 1 .positive. or 0"):
        explainer(x, targets=[T.BinaryClassifierOutputTarget(3), 1])


class _WrongShape:
    """A custom target whose weights do not fit the output."""

    linear = True

    def values(self, z):
        return z[..., 0]

    def cotangent(self, z):
        return np.ones(3)


class _Flat:
    """A constant target: its gradient is exactly zero."""

    linear = False

    def values(self, z):
        return np.zeros(z.shape[:-1])

    def cotangent(self, z):
        return np.zeros(z.shape[-1])


def test_wrong_weight_shapes_raise(explainer):
    x = np.zeros((2, 3, 64, 64), np.float32)
    with pytest.raises(T.TargetError, match=r"weights of shape \(3,\) for an output of shape \(1000,\)"):
        explainer(x, targets=[_WrongShape(), 1])
    with pytest.raises(T.TargetError, match=r"expected \(2, 1000\)"):
        explainer.run_graph(x, np.zeros((2, 10), np.float32))
    with pytest.raises(T.TargetError, match=r"expected \(2, 1000\)"):
        explainer.run_graph(x, np.zeros((1, 1000), np.float32))


class _Weights:
    """A target whose gradient is ``value`` at class 0."""

    def __init__(self, value):
        self.value = value

    def __call__(self, z):
        return z[..., 0]

    def cotangent(self, z):
        row = np.zeros(z.shape[-1])
        row[0] = self.value
        return row


@pytest.mark.parametrize("value", [np.inf, np.nan, 1e39], ids=["inf", "nan", "beyond-float32"])
def test_weights_that_are_not_finite_in_float32_raise(value):
    with pytest.raises(T.TargetError, match="the target of image 1 gives weights that are not finite"):
        T.target_weights([_Weights(1.0), _Weights(value)], np.zeros((2, 10), np.float32), 10)
    assert T.target_weights([_Weights(3e38)], np.zeros((1, 10), np.float32), 10)[0, 0] == np.float32(3e38)


def test_a_zero_gradient_target_is_not_the_top_class(explainer):
    """The graph reads an all-zero target_weights row as "top class"; a target whose gradient is
    zero (a constant, a saturated softmax) must give zero gradients, not the top class's."""
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    inputs = explainer.inputs(x, [_Flat(), 4])
    assert not inputs.gradients[0][0].any()
    assert inputs.gradients[0][1].any()
    cams = explainer(x, targets=[_Flat(), 4], methods=["gradcam", "layercam"]).cams
    assert not cams["gradcam"][0].any() and not cams["layercam"][0].any()
    assert cams["layercam"][1].max() > 0.9
    several = explainer.explain_targets(x, [[_Flat(), 4], [4, _Flat()]], methods=["layercam"])
    assert not several.cams["layercam"][0, 0].any() and not several.cams["layercam"][1, 1].any()
    fours = explainer(x, targets=[4, 4], methods=["layercam"]).cams["layercam"]
    np.testing.assert_allclose(several.cams["layercam"][0, 1], fours[0], atol=1e-5)
    np.testing.assert_allclose(several.cams["layercam"][1, 0], fours[1], atol=1e-5)
    assert fours.min() < 0.1 and fours.max() > 0.9


def test_factorization_leaves_the_callers_activations_alone():
    """pgc's DFF fills NaN in the caller's array in place (Q26); camexport does not."""
    from camexport.methods.factorization import factorize

    acts = np.abs(np.random.default_rng(0).standard_normal((2, 6, 3, 3))).astype(np.float32)
    acts[0, 1, 1, 1] = np.nan
    before = acts.copy()
    concepts, parts = factorize(acts, 2)
    np.testing.assert_array_equal(acts, before)  # NaN included, still there
    assert concepts.shape == (6, 2) and parts.shape == (2, 2, 3, 3)
    assert np.isfinite(parts).all()
