"""The models of the foundation coverage table: constructor, input size, usual and mid layer.

Random weights (seeded), except the built-in EfficientNet-Lite0. CNNs run at 64x64 where the
architecture allows (fewer ReLU kinks within float32 round-off of zero, faster tests); VGG and
the transformers at 224 (VGG's adaptive pooling and the transformers' position grids).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class ZooModel:
    name: str
    size: int
    usual: str
    mid: str


ZOO = [
    ZooModel("resnet18", 64, "layer4[-1]", "layer2"),
    ZooModel("resnet50", 64, "layer4.2", "layer3.1"),
    ZooModel("vgg16", 64, "features[-1]", "features.10"),
    ZooModel("densenet121", 64, "features[-1]", "features.denseblock3"),
    ZooModel("mobilenet_v2", 64, "features[-1]", "features.7"),
    ZooModel("mobilenet_v3_large", 64, "features[-1]", "features.10"),
    ZooModel("efficientnet_b0", 64, "features[-1]", "features.5"),
    ZooModel("convnext_tiny", 64, "features[-1]", "features.5"),
    ZooModel("deit_tiny_patch16_224", 224, "blocks[-1].norm1", "blocks.5"),
    ZooModel("vit_small_patch16_224", 224, "blocks[-1].norm1", "blocks.8"),
    ZooModel("swin_tiny_patch4_window7_224", 224, "layers[-1].blocks[-1].norm1", "layers.2"),
    ZooModel("efficientnet-lite0", 64, "bn2", "blocks.4"),
]

BY_NAME = {m.name: m for m in ZOO}


@lru_cache(maxsize=3)
def module(name: str):
    """The torch module for a zoo name (seeded random weights; the built-in is pretrained)."""
    import torch

    from camexport.load import BUILTIN, build_architecture, load

    if name == BUILTIN:
        return load(BUILTIN).module
    torch.manual_seed(0)
    model, _ = build_architecture(name)
    return model.eval()


@lru_cache(maxsize=2)
def exported(name: str):
    """(Loaded, plain ONNX) for a zoo name, exported once per test process."""
    from camexport.export import to_onnx
    from camexport.load import Preprocessing, from_module

    entry = BY_NAME[name]
    loaded = from_module(module(name), name, Preprocessing(size=(entry.size, entry.size)))
    return loaded, to_onnx(loaded)
