"""The models of the foundation coverage table: constructor, input size, usual and mid layer.

Random weights (seeded), except the built-in EfficientNet-Lite0. CNNs run at 64x64 where the
architecture allows (fewer ReLU kinks within float32 round-off of zero, faster tests); VGG and
the transformers at 224 (VGG's adaptive pooling and the transformers' position grids).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from functools import lru_cache, wraps


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


_CACHES = []
_ON_LEAVE = []
_CURRENT = [None]


def one_model_at_a_time(function=None, *, maxsize=None):
    """Cache `function` (first argument: a model name) for the current model only.

    Tests are grouped per model (xdist_group), and one model's torch module, ONNX protos and
    onnxruntime sessions take GBs (vgg16: ~4 GB); the suite runs two workers in 24 GB. Asking
    for another model drops every cache so decorated, in this process, before computing;
    `maxsize` bounds the entries kept for the current model too."""
    if function is None:
        return lambda function: one_model_at_a_time(function, maxsize=maxsize)
    cached = lru_cache(maxsize=maxsize)(function)
    _CACHES.append(cached)

    @wraps(function)
    def wrapper(name, *args):
        switch_to(name)
        return cached(name, *args)

    return wrapper


def on_leave(callback):
    """Call `callback(name)` when the tests move on from model `name` (free sessions, files)."""
    _ON_LEAVE.append(callback)
    return callback


def switch_to(name: str) -> None:
    """Drop the cached objects of the previous model when `name` is another one."""
    previous = _CURRENT[0]
    if previous == name:
        return
    if previous is not None:
        for callback in _ON_LEAVE:
            callback(previous)
    for cached in _CACHES:
        cached.cache_clear()
    _CURRENT[0] = name
    gc.collect()


@one_model_at_a_time
def module(name: str):
    """The torch module for a zoo name (seeded random weights; the built-in is pretrained)."""
    import torch

    from camexport.load import BUILTIN, build_architecture, load

    if name == BUILTIN:
        return load(BUILTIN).module
    torch.manual_seed(0)
    model, _ = build_architecture(name)
    return model.eval()


@one_model_at_a_time
def exported(name: str):
    """(Loaded, plain ONNX) for a zoo name, exported once per test process."""
    from camexport.export import to_onnx
    from camexport.load import Preprocessing, from_module

    entry = BY_NAME[name]
    loaded = from_module(module(name), name, Preprocessing(size=(entry.size, entry.size)))
    return loaded, to_onnx(loaded)


def randomise(model):
    """Non-trivial batch-norm statistics and biases (torchvision initialises them to 0/1), seeded;
    2-D and 3-D layers alike. Returns the model in eval mode."""
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
            elif isinstance(module, torch.nn.modules.conv._ConvNd) and module.bias is not None:
                module.bias.uniform_(-0.1, 0.1, generator=generator)
    return model.eval()
