"""The same quantities as the augmented graph, from torch eager (hooks and autograd).

This is the reference side of parity: ``activations_and_gradients`` returns each layer's output
and the gradient of ``sum_b score_b`` with respect to it, exactly as the graph defines them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def score_function(name: str):
    import torch

    return {
        "logit": lambda z: z,
        "softmax": lambda z: torch.softmax(z, dim=-1),
        "log_softmax": lambda z: torch.log_softmax(z, dim=-1),
    }[name]


def resolve_module(module, layer: str):
    """The submodule that ``layer`` names (pgc indexing such as ``layer4[-1]`` allowed)."""
    from camexport.graph.locate import normalise

    path = normalise(layer, [name for name, _ in module.named_modules() if name])
    return module.get_submodule(path)


def activations_and_gradients(
    module,
    x: np.ndarray,
    layers: Sequence[str],
    target_weights: np.ndarray,
    score: str = "logit",
    dtype=None,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(outputs, activations, gradients) of ``module`` on ``x``, by torch autograd.

    ``dtype`` (e.g. ``torch.float64``) runs a copy in that precision. Each layer's activation is
    its true output, before any later in-place op.
    """
    import copy

    import torch

    model = copy.deepcopy(module)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    dtype = dtype or torch.float32
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def hook(_module, _inputs, output, layer=layer):
            # the rest of the model gets a copy, so a later in-place op (ReLU(inplace=True),
            # F.relu(..., inplace=True)) cannot change the captured value (reference Q4)
            captured[layer] = output
            return output.clone()
        handles.append(resolve_module(model, layer).register_forward_hook(hook))
    try:
        inputs = torch.as_tensor(x, dtype=dtype)
        outputs = model(inputs)
        weights = torch.as_tensor(target_weights, dtype=dtype)
        total = (score_function(score)(outputs) * weights).sum()
        grads = torch.autograd.grad(total, [captured[layer] for layer in layers])
    finally:
        for handle in handles:
            handle.remove()
    return (outputs.detach().numpy(),
            {layer: captured[layer].detach().numpy() for layer in layers},
            {layer: g.detach().numpy() for layer, g in zip(layers, grads)})


def eager_inputs(module, x: np.ndarray, layers: Sequence[str], targets=None):
    """:class:`~camexport.methods.inputs.CamInputs` from torch eager (float32 hooks and autograd),
    so the same method code runs on the source model: the eager side of parity."""
    import torch

    from camexport.layout import infer_layout
    from camexport.methods.inputs import CamInputs
    from camexport.methods.pipeline import to_channel_first
    from camexport.targets import as_targets, target_weights

    module = module.eval()
    x = np.ascontiguousarray(x, dtype=np.float32)

    def forward(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.as_tensor(batch)).numpy()

    first = forward(x)
    resolved = as_targets(targets, first)
    weights = target_weights(resolved, first, first.shape[1:])
    outputs, acts, grads = activations_and_gradients(module, x, layers, weights)
    layouts = [infer_layout((None, *acts[layer].shape[1:]), x.shape[2:]) for layer in layers]
    return CamInputs(
        x=x, outputs=outputs, targets=resolved,
        activations=[to_channel_first(acts[layer], lay) for layer, lay in zip(layers, layouts)],
        gradients=[to_channel_first(grads[layer], lay) for layer, lay in zip(layers, layouts)],
        raw_activations=[acts[layer] for layer in layers], layouts=layouts, forward=forward)
