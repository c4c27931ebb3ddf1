"""camexport.compat's utility modules (utils.image, utils.svd_on_activations, utils.find_layers,
ablation_layer) against pytorch-grad-cam 1.5.7 on the same inputs: numbers, not shapes.

Tolerances, per case (measured differences are 0 everywhere but the seeded ARPACK case):
- exact (array_equal / torch.equal) for every uint8 image, the preprocessing tensors, the 2-D
  and 3-D scaling, the SVD projections (pgc's sign is numpy's LAPACK's, deterministic: the same
  LAPACK call gives the same sign, so no sign is aligned), the dense KPCA projection, the
  legend strings, the modules found or replaced and the ablated tensors;
- KPCA through ARPACK (more than 200 positions), pgc's global numpy state seeded as camexport
  seeds its solver (reference Q30): exact for the first image, ARPACK_TOL for the next (pgc's
  start vector comes from the moved-on global state, camexport's from the seed again).
Small random arrays, a random-weight resnet18 for the module tree; no export.
"""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict

import cv2
import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import ablation_layer as pgc_ablation
from pytorch_grad_cam.utils import find_layers as pgc_find
from pytorch_grad_cam.utils import image as pgc_image
from pytorch_grad_cam.utils import svd_on_activations as pgc_svd

from camexport.compat import ablation_layer as ablation
from camexport.compat.utils import find_layers, image, svd_on_activations
from camexport.render import RenderError

pytestmark = pytest.mark.xdist_group("compat")

#: max |diff| allowed where the two sides may round differently (maps in [0, 1], float32)
SCALE_TOL = 1e-6
#: KPCA through ARPACK from another start vector: max |diff| / max |projection| (measured 1.1e-6)
ARPACK_TOL = 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def pgc_colormap(monkeypatch):
    """pgc 1.5.7 reads its default colours with ``plt.cm.get_cmap``, which matplotlib 3.9 removed:
    give it back to pgc for the comparison (test only)."""
    import matplotlib
    from matplotlib import pyplot

    monkeypatch.setattr(pyplot.cm, "get_cmap", matplotlib.colormaps.get_cmap, raising=False)
    monkeypatch.setitem(matplotlib.rcParams, "legend.fontsize", matplotlib.rcParams["legend.fontsize"])


# -- utils.image -------------------------------------------------------------------------------
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.mark.parametrize("kind", ["uint8", "float32", "float64", "grey"])
def test_preprocess_image(rng, kind):
    """uint8 is divided by 255 (default float dtype), float is not and keeps its dtype."""
    raw = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    img, (mean, std) = {"uint8": (raw, IMAGENET), "float32": (np.float32(raw) / 255, IMAGENET),
                        "float64": (raw / 255, IMAGENET), "grey": (raw[:, :, 0], ([0.5], [0.5]))}[kind]
    ours, theirs = image.preprocess_image(img, mean, std), pgc_image.preprocess_image(img, mean, std)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    if img.ndim == 3:
        assert torch.equal(image.preprocess_image(img), pgc_image.preprocess_image(img))  # defaults


def test_preprocess_image_defaults_and_bad_dtype(rng):
    img = rng.random((6, 5, 3)).astype(np.float32)
    assert torch.equal(image.preprocess_image(img), pgc_image.preprocess_image(img))
    with pytest.raises(TypeError, match="uint8"):
        image.preprocess_image(np.int32(img * 255))
    with pytest.raises(TypeError):
        pgc_image.preprocess_image(np.int32(img * 255))
    with pytest.raises(ValueError, match="one value per channel"):  # pgc: torch's broadcast error
        image.preprocess_image(img[:, :, :2])
    with pytest.raises(RuntimeError):
        pgc_image.preprocess_image(img[:, :, :2])
    with pytest.raises(ValueError, match="one value per channel"):  # pgc: the same torch error
        image.preprocess_image(img[:, :, :1])
    with pytest.raises(RuntimeError):
        pgc_image.preprocess_image(img[:, :, :1])


def test_deprocess_image(rng):
    for grad in (rng.normal(size=(12, 10, 3)).astype(np.float32), rng.normal(size=(3, 7, 5)) * 40):
        ours = image.deprocess_image(grad)
        assert ours.dtype == np.uint8 and np.array_equal(ours, pgc_image.deprocess_image(grad))


@pytest.mark.parametrize("use_rgb", [False, True])
@pytest.mark.parametrize("colormap", [cv2.COLORMAP_JET, cv2.COLORMAP_VIRIDIS])
@pytest.mark.parametrize("image_weight", [0.0, 0.3, 0.5, 1.0])
def test_show_cam_on_image(rng, use_rgb, colormap, image_weight):
    img = rng.random((32, 40, 3)).astype(np.float32)
    mask = rng.random((32, 40)).astype(np.float32)
    ours = image.show_cam_on_image(img, mask, use_rgb, colormap, image_weight)
    assert np.array_equal(ours, pgc_image.show_cam_on_image(img, mask, use_rgb, colormap, image_weight))


def test_show_cam_on_image_defaults_float64(rng):
    """pgc's defaults (BGR heatmap, JET, weight 0.5) on a float64 image."""
    img, mask = rng.random((20, 24, 3)), rng.random((20, 24)).astype(np.float32)
    assert np.array_equal(image.show_cam_on_image(img, mask), pgc_image.show_cam_on_image(img, mask))


def test_show_cam_on_image_errors(rng):
    """pgc raises a bare Exception; camexport a ValueError (RenderError) naming the fix."""
    img, mask = rng.random((8, 8, 3)).astype(np.float32), rng.random((8, 8)).astype(np.float32)
    with pytest.raises(RenderError, match="divide a uint8 image by 255"):
        image.show_cam_on_image(img * 255, mask)
    with pytest.raises(Exception):  # noqa: B017 (pgc's own type)
        pgc_image.show_cam_on_image(img * 255, mask)
    for weight in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\].*image's share"):
            image.show_cam_on_image(img, mask, image_weight=weight)
        with pytest.raises(Exception):  # noqa: B017
            pgc_image.show_cam_on_image(img, mask, image_weight=weight)


def test_scale_cam_image(rng):
    """2-D maps with and without a (W, H) size (OpenCV bilinear), volumes with a (W, H, D) size
    (scipy zoom) and at their own size, integer maps (float64 division, as pgc)."""
    maps = rng.random((3, 7, 9)).astype(np.float32) * 5 - 1
    volumes = rng.random((2, 4, 5, 6)).astype(np.float32)
    cases = [(maps, None), (maps, (20, 15)), (maps, (9, 7)), (maps, (4, 3)), (volumes, (12, 10, 8)),
             (volumes, (6, 5, 4)), (np.float64(maps), (11, 6)), (rng.integers(0, 9, (2, 5, 5)), None)]
    for cam, size in cases:
        ours, theirs = image.scale_cam_image(cam, size), pgc_image.scale_cam_image(cam, size)
        assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape, size
        assert np.abs(ours - theirs).max() <= SCALE_TOL, size
        assert np.array_equal(ours, theirs), size  # measured: identical


def test_scale_accross_batch_and_channels(rng):
    tensor = rng.random((2, 3, 7, 9)).astype(np.float32)
    for size in ((20, 15), (9, 7)):
        ours = image.scale_accross_batch_and_channels(tensor, size)
        assert ours.shape == (2, 3, size[1], size[0])
        assert np.array_equal(ours, pgc_image.scale_accross_batch_and_channels(tensor, size))


def test_create_labels_legend(rng):
    scores = rng.random((4, 10))
    scores[0, 3] = scores[0, 5]  # a tie: the same order as pgc's
    labels = {k: f"name{k}, alias{k}, more, extra" for k in range(10)}
    for top_k in (1, 2, 3):
        ours = image.create_labels_legend(scores, labels, top_k)
        assert ours == pgc_image.create_labels_legend(scores, labels, top_k)
    assert image.create_labels_legend(scores, labels)[0].count("\n") == 1


@pytest.mark.parametrize("components", [3, 7])
def test_show_factorization_on_image(rng, pgc_colormap, components):
    """Default gist_rainbow colours, ties between components, weight 0.3; the caller's
    explanations are left as given (pgc zeroes them outside each argmax, Q26)."""
    img = rng.random((48, 64, 3))
    explanations = rng.random((components, 48, 64)).astype(np.float32)
    explanations[:, :5, :5] = 0.25
    given = explanations.copy()
    ours = image.show_factorization_on_image(img, explanations, image_weight=0.3)
    assert np.array_equal(explanations, given)
    assert np.array_equal(ours, pgc_image.show_factorization_on_image(img, given.copy(), image_weight=0.3))


def test_show_factorization_on_image_colors(rng):
    img = rng.random((16, 20, 3)).astype(np.float32)
    explanations = rng.random((3, 16, 20))
    colors = [np.array([0.2, 0.5, 0.9]), (1.0, 0.0, 0.0), [0, 1, 0, 1]]
    ours = image.show_factorization_on_image(img, explanations, colors)
    assert np.array_equal(ours, pgc_image.show_factorization_on_image(img, explanations.copy(), colors))


def test_show_factorization_on_image_with_legend(rng, pgc_colormap):
    """The legend beside the image, rasterised by matplotlib: the shape and the image half
    exactly (measured: the legend half is identical too, on the Agg backend)."""
    import matplotlib

    img = rng.random((48, 64, 3))
    explanations = rng.random((5, 48, 64)).astype(np.float32)
    labels = [f"concept {k}\nclass:{k / 10:.2f}" for k in range(5)]
    fontsize = matplotlib.rcParams["legend.fontsize"]
    ours = image.show_factorization_on_image(img, explanations, concept_labels=labels)
    assert matplotlib.rcParams["legend.fontsize"] == fontsize  # no global state changed
    theirs = pgc_image.show_factorization_on_image(img, explanations.copy(), concept_labels=labels)
    assert ours.shape == theirs.shape == (48, 128, 3)
    assert np.array_equal(ours[:, :64], theirs[:, :64])
    assert ours[:, 64:].std() > 0  # something drawn
    if matplotlib.get_backend().lower() == "agg":  # pgc draws on pyplot's backend, camexport on Agg
        assert np.array_equal(ours, theirs)


def test_show_factorization_without_matplotlib(rng, monkeypatch):
    img = rng.random((8, 8, 3))
    explanations = rng.random((2, 8, 8))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        image.show_factorization_on_image(img, explanations)
    colored = image.show_factorization_on_image(img, explanations, colors=[(1, 0, 0), (0, 0, 1)])
    assert colored.shape == (8, 8, 3)


# -- utils.svd_on_activations --------------------------------------------------------------------
def _activations(rng, shape=(4, 16, 7, 7)):
    acts = rng.normal(size=shape).astype(np.float32)
    acts[0, 3, 2, 2] = np.nan
    return acts


@pytest.mark.parametrize("name", ["get_2d_projection", "get_2d_projection_with_sign_correction"])
def test_2d_projection(rng, name):
    """The same numbers and the same sign (pgc's is numpy's LAPACK's, not random), NaN as 0,
    the caller's array untouched; float64 and volumes too."""
    for acts in (_activations(rng), np.float64(_activations(rng)), _activations(rng, (2, 6, 3, 4, 5))):
        given = acts.copy()
        ours = getattr(svd_on_activations, name)(acts)
        assert ours.dtype == np.float32
        assert np.array_equal(ours, getattr(pgc_svd, name)(acts))
        assert np.array_equal(acts, given, equal_nan=True)


def test_2d_projection_kernel(rng):
    """Up to 200 positions (dense solver): the same numbers, any kernel."""
    acts = _activations(rng)
    assert np.array_equal(svd_on_activations.get_2d_projection_kernel(acts),
                          pgc_svd.get_2d_projection_kernel(acts))
    assert np.array_equal(svd_on_activations.get_2d_projection_kernel(acts, "rbf", 0.1),
                          pgc_svd.get_2d_projection_kernel(acts, kernel="rbf", gamma=0.1))


def test_2d_projection_kernel_arpack(rng):
    """Above 200 positions ARPACK starts from a random vector: camexport's is seeded with 0,
    pgc's drawn from numpy's global state (Q30), so seed that with 0 for the comparison."""
    acts = _activations(rng, (2, 8, 15, 15))
    ours = svd_on_activations.get_2d_projection_kernel(acts)
    state = np.random.get_state()
    try:
        np.random.seed(0)
        theirs = pgc_svd.get_2d_projection_kernel(acts)
    finally:
        np.random.set_state(state)
    assert np.array_equal(ours[0], theirs[0])  # the same start vector
    # the next image: camexport starts again from seed 0, pgc from the global state moved on
    assert np.abs(ours - theirs).max() <= ARPACK_TOL * np.abs(theirs).max()
    assert np.array_equal(ours, svd_on_activations.get_2d_projection_kernel(acts))  # deterministic


# -- utils.find_layers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


def _tree(model):
    return [(name, type(module).__name__) for name, module in model.named_modules(remove_duplicate=False)]


def test_find_layers(resnet):
    kinds = [torch.nn.Conv2d, torch.nn.BatchNorm2d]
    ours = find_layers.find_layer_types_recursive(resnet, kinds)
    theirs = pgc_find.find_layer_types_recursive(resnet, kinds)
    assert len(ours) == 40 and [id(m) for m in ours] == [id(m) for m in theirs]
    assert find_layers.find_layer_types_recursive(resnet, [torch.nn.Module]) == []  # exact types only

    def relu_or_pool(module):
        return isinstance(module, (torch.nn.ReLU, torch.nn.MaxPool2d))

    ours = find_layers.find_layer_predicate_recursive(resnet, relu_or_pool)
    theirs = pgc_find.find_layer_predicate_recursive(resnet, relu_or_pool)
    assert len(ours) == 10 and [id(m) for m in ours] == [id(m) for m in theirs]


def test_replace_layers(resnet):
    ours, theirs = copy.deepcopy(resnet), copy.deepcopy(resnet)
    new = torch.nn.Identity()
    assert find_layers.replace_layer_recursive(ours, ours.layer4[-1].conv2, new)
    assert pgc_find.replace_layer_recursive(theirs, theirs.layer4[-1].conv2, new)
    assert ours.layer4[-1].conv2 is new and _tree(ours) == _tree(theirs)
    assert not find_layers.replace_layer_recursive(ours, torch.nn.Conv2d(1, 1, 1), new)
    assert not pgc_find.replace_layer_recursive(theirs, torch.nn.Conv2d(1, 1, 1), new)

    gelu = torch.nn.GELU()
    assert find_layers.replace_all_layer_type_recursive(ours, (torch.nn.ReLU, torch.nn.BatchNorm2d), gelu) \
        is pgc_find.replace_all_layer_type_recursive(theirs, (torch.nn.ReLU, torch.nn.BatchNorm2d), gelu)
    assert _tree(ours) == _tree(theirs) and "ReLU" not in {kind for _, kind in _tree(ours)}
    assert ours.layer1[0].bn1 is gelu and ours.relu is gelu
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs.eval()(x))


# -- ablation_layer ------------------------------------------------------------------------------
def _ablate(layer, acts_numpy, cached, b, ratio, chunks):
    """Drive a layer as pgc's AblationCAM does: the channel list, then chunk after chunk."""
    indices = np.array(layer.activations_to_be_ablated(acts_numpy[b], ratio))
    outputs = []
    for n in chunks:
        layer.set_next_batch(input_batch_index=b, activations=cached, num_channels_to_ablate=n)
        outputs.append(copy.deepcopy(layer(torch.zeros(n))))
        layer.indices = layer.indices[n:]
    return indices, outputs


def _equal(a, b):
    if isinstance(a, dict):
        return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    return a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("case", ["negative", "relu", "vit"])
def test_ablation_layer(rng, case):
    """Chunks of 5 then 3 rows: the minimum rule (0 when the minimum is 0, else m - (i+1) 1e7
    per row), the channel axis (1, or the last one across every token for ViT)."""
    if case == "vit":
        cached = torch.from_numpy(rng.normal(size=(2, 10, 8)).astype(np.float32))
        acts = cached.numpy().transpose(0, 2, 1)[:, :, 1:].reshape(2, 8, 3, 3)  # as the reshape gives
        ours, theirs = ablation.AblationLayerVit(), pgc_ablation.AblationLayerVit()
    else:
        cached = torch.from_numpy(rng.normal(size=(2, 8, 4, 5)).astype(np.float32))
        if case == "relu":
            cached = torch.relu(cached)
        acts = cached.numpy().copy()
        ours, theirs = ablation.AblationLayer(), pgc_ablation.AblationLayer()
    for b in (0, 1):
        ours_indices, ours_out = _ablate(ours, acts, cached, b, 1.0, (5, 3))
        theirs_indices, theirs_out = _ablate(theirs, acts, cached, b, 1.0, (5, 3))
        assert ours_indices.dtype == theirs_indices.dtype and np.array_equal(ours_indices, theirs_indices)
        assert all(_equal(a, c) for a, c in zip(ours_out, theirs_out, strict=True))
    if case == "relu":
        assert ours_out[0].min() == 0
    else:  # row 4 of the first chunk: m - 5e7 in float32 steps
        assert ours_out[0].min() < cached[1].min() - 4.9e7


def test_ablation_layer_leaves_its_activations(rng):
    """A second call gives the same tensor (pgc ablates its prepared copy in place)."""
    cached = torch.from_numpy(rng.normal(size=(1, 4, 3, 3)).astype(np.float32))
    layer = ablation.AblationLayer()
    layer.activations_to_be_ablated(cached[0].numpy())
    layer.set_next_batch(0, cached, 4)
    assert torch.equal(layer(None), layer(None))
    assert torch.equal(layer.activations, cached.repeat(4, 1, 1, 1))
    with pytest.raises(RuntimeError, match="set_next_batch"):
        ablation.AblationLayer()(None)
    layer.set_next_batch(0, cached, 5)
    with pytest.raises(RuntimeError, match="4 channel indices"):
        layer(None)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_ablation_channel_selection(rng, ratio):
    """The experimental selection: pgc's list up to ratio 0.5; above, each channel once, at its
    first place in pgc's list (reference Q16). The objectiveness mask is pgc's."""
    acts = rng.normal(size=(2, 16, 6, 6)).astype(np.float32)
    acts[1] = np.abs(acts[1]) * (np.arange(16)[:, None, None] % 3)  # some channels constant (NaN scores)
    ours, theirs = ablation.AblationLayer(), pgc_ablation.AblationLayer()
    for item in acts:
        with np.errstate(invalid="ignore", divide="ignore"):
            expected = theirs.activations_to_be_ablated(item, ratio)
            assert np.array_equal(ours.objectiveness_mask_from_svd(item),
                                  theirs.objectiveness_mask_from_svd(item))
            assert np.array_equal(ours.objectiveness_mask_from_svd(item, 0.3),
                                  theirs.objectiveness_mask_from_svd(item, 0.3))
        got = ours.activations_to_be_ablated(item, ratio)
        assert got.dtype == expected.dtype and got is ours.indices
        assert got.tolist() == list(dict.fromkeys(expected.tolist()))
        if ratio <= 0.5:
            assert np.array_equal(got, expected)


def test_ablation_layer_faster_rcnn(rng):
    """FPN levels: flat channel k -> level k // 256, channel k % 256, set to -1000."""
    sizes = {"0": 8, "1": 4, "2": 2, "3": 1, "pool": 1}
    cached = OrderedDict((key, torch.from_numpy(rng.normal(size=(2, 256, s, s)).astype(np.float32)))
                         for key, s in sizes.items())
    picked = np.int32([3, 300, 555, 1023, 1279, 0, 767])
    outputs = []
    for layer in (ablation.AblationLayerFasterRCNN(), pgc_ablation.AblationLayerFasterRCNN()):
        layer.indices = picked.copy()
        layer.set_next_batch(1, cached, 5)
        first = copy.deepcopy(layer(None))
        layer.indices = layer.indices[5:]
        layer.set_next_batch(1, cached, 2)
        outputs.append((first, copy.deepcopy(layer(None))))
    assert all(_equal(a, b) for a, b in zip(outputs[0], outputs[1], strict=True))
    assert outputs[0][0]["pool"][4, 255].eq(-1000).all() and outputs[0][0]["0"][0, 3].eq(-1000).all()
