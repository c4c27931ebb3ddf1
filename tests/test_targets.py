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
]


def _torch_value(target, z):
    if isinstance(target, T.ClassifierOutputTarget):
        return z[target.category]
    if isinstance(target, T.ClassifierOutputSoftmaxTarget):
        return torch.softmax(z, -1)[target.category]
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


def test_bad_targets_raise(tmp_path):
    from camexport.build import build

    torch.manual_seed(0)
    import torchvision

    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    build(str(path), ["layer4"], arch="resnet18", out_dir=tmp_path / "a", input_size=(32, 32))
    explainer = Explainer(tmp_path / "a")
    x = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.raises(T.TargetError, match="out of range"):
        explainer(x, targets=[1, 1000])
    with pytest.raises(T.TargetError, match="1 targets for 2 images"):
        explainer(x, targets=[1])
    with pytest.raises(T.TargetError, match="out of range"):
        explainer(x, targets=[T.FinerWeightedTarget(1, (2, 5000)), 3])
    good = explainer(x, targets=[1, -1])  # negative indices count from the end, as in torch
    assert good.cams["gradcam"].shape == (2, 32, 32)


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
