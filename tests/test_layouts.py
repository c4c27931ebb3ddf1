"""Layer layouts recorded in the manifest (how methods reshape a layer as pgc's reshape_transform
would): token grids of non-square inputs, class/distillation tokens, channel-last maps."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from camexport.build import build
from camexport.explain import Explainer
from camexport.layout import infer_layout
from camexport.methods.pipeline import to_channel_first


@pytest.mark.parametrize("shape,size,expected", [
    ((None, 197, 384), (224, 224), {"kind": "tokens", "grid": [14, 14], "prefix_tokens": 1}),
    # DeiT distilled
    ((None, 198, 192), (224, 224), {"kind": "tokens", "grid": [14, 14], "prefix_tokens": 2}),
    ((None, 281, 192), (224, 320), {"kind": "tokens", "grid": [14, 20], "prefix_tokens": 1}),
    ((None, 50, 768), (224, 224), {"kind": "tokens", "grid": [7, 7], "prefix_tokens": 1}),  # patch 32
    ((None, 196, 64), None, {"kind": "tokens", "grid": [14, 14], "prefix_tokens": 0}),
    ((None, 7, 7, 768), (224, 224), {"kind": "NHWC", "grid": [7, 7]}),  # Swin
    ((None, 512, 7, 9), (224, 288), {"kind": "NCHW", "grid": [7, 9]}),
    ((None, 283, 192), (224, 320), {"kind": "tokens", "grid": None, "prefix_tokens": None}),
])
def test_infer_layout(shape, size, expected):
    assert infer_layout(shape, size) == expected


def test_a_token_layer_without_a_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="no square grid"):
        to_channel_first(np.zeros((1, 283, 8), np.float32), infer_layout((None, 283, 8), (224, 320)))


@pytest.mark.xdist_group("deit_tiny_wide")
def test_vit_on_a_non_square_input_matches_pgc(tmp_path):
    """deit_tiny at 224 x 320: 1 + 14 x 20 tokens, reshaped as pgc's reshape_transform with (14, 20)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=(224, 320)).eval()
    torch.save(model, tmp_path / "wide.pt")
    built = build(str(tmp_path / "wide.pt"), ["blocks.11.norm1"], trust_pickle=True,
                  input_size=(224, 320), out_dir=tmp_path / "wide")
    assert built.manifest["layers"][0]["layout"] == {"kind": "tokens", "grid": [14, 20], "prefix_tokens": 1}
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 320)).astype(np.float32)
    ours = Explainer(built.directory)(x, targets=[3, 9], methods=["gradcam", "eigencam"])

    def reshape(t):
        return t[:, 1:, :].reshape(t.size(0), 14, 20, t.size(2)).permute(0, 3, 1, 2)

    for name, cls in (("gradcam", pgc.GradCAM), ("eigencam", pgc.EigenCAM)):
        with cls(model=model, target_layers=[model.blocks[11].norm1], reshape_transform=reshape) as cam:
            theirs = cam(input_tensor=torch.tensor(x), targets=[ClassifierOutputTarget(c) for c in (3, 9)])
        assert ours.cams[name].shape == theirs.shape == (2, 224, 320)
        diff = np.abs(ours.cams[name] - theirs).max()
        print(f"deit_tiny 224x320 {name}: max |diff| {diff:.2e}")
        assert diff <= 1e-4, f"{name}: max |diff| {diff:.2e}"
