"""Acceptance of the augmented graph on the coverage table (foundation issue).

For each model, ONE augmented graph (dynamic batch) per score function runs under onnxruntime
CPU at batch sizes 1 and 5:
- original outputs equal the plain graph's (max |diff| <= 1e-5, relative to max |output|);
- activations equal torch eager's layer outputs (rtol 1e-4 of the layer's max |value|);
- gradients equal torch.autograd gradients of the same score in float64 (model.double()):
  relative L2 <= 1e-5 and max |diff| <= 1e-4 max |g|.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoo import ZOO, exported, module, one_model_at_a_time

from camexport.build import make_augmented
from camexport.eager import activations_and_gradients
from camexport.graph import activation_name, gradient_name
from camexport.runtime import session

OUTPUT_ATOL = 1e-5
ACTIVATION_RTOL = 1e-4
GRADIENT_REL_L2 = 1e-5
GRADIENT_MAX_REL = 1e-4


@one_model_at_a_time
def plain_session(name: str):
    return session(exported(name)[1])


@one_model_at_a_time(maxsize=1)  # the cases run score by score: one augmented session at a time
def augmented_session(name: str, score: str):
    loaded, plain = exported(name)
    entry = next(m for m in ZOO if m.name == name)
    augmented, manifest = make_augmented(loaded, plain, [entry.usual, entry.mid], ["gradcam"], score)
    return session(augmented), manifest


def _weights(kind: str, batch: int, classes: int, rng) -> np.ndarray:
    weights = np.zeros((batch, classes), np.float32)
    if kind == "onehot":
        weights[np.arange(batch), rng.integers(0, classes, batch)] = 1
    else:  # several classes with arbitrary weights
        for b in range(batch):
            picks = rng.choice(classes, 3, replace=False)
            weights[b, picks] = rng.uniform(-1, 2, 3)
    return weights


CASES = [pytest.param(m.name, score, kind, batch, id=f"{m.name}-{score}-{kind}-b{batch}",
                      marks=pytest.mark.xdist_group(m.name))
         for m in ZOO
         for score, kind, batch in [("logit", "onehot", 1), ("logit", "onehot", 5),
                                    ("logit", "multi", 5), ("softmax", "onehot", 5)]]


@pytest.mark.parametrize("name,score,kind,batch", CASES)
def test_augmented_graph_matches_torch(name, score, kind, batch):
    plain = plain_session(name)
    augmented, manifest = augmented_session(name, score)
    size = next(m.size for m in ZOO if m.name == name)
    rng = np.random.default_rng(batch * 7 + len(kind))
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    input_name = augmented.get_inputs()[0].name
    out_name = manifest["score"]["output"]
    classes = augmented.get_outputs()[0].shape[1]
    weights = _weights(kind, batch, classes, rng)

    names = [o.name for o in augmented.get_outputs()]
    got = dict(zip(names, augmented.run(None, {input_name: x, "target_weights": weights})))
    base = plain.run([out_name], {input_name: x})[0]
    assert np.abs(got[out_name] - base).max() <= OUTPUT_ATOL * max(1.0, np.abs(base).max())

    layers = [layer["requested"] for layer in manifest["layers"]]
    labels = [layer["name"] for layer in manifest["layers"]]
    _, acts32, _ = activations_and_gradients(module(name), x, layers, weights, score)
    _, _, grads64 = activations_and_gradients(module(name), x, layers, weights, score,
                                              dtype=torch.float64)
    for layer, label in zip(layers, labels):
        act, grad = got[activation_name(label)], got[gradient_name(label)]
        ref_act, ref_grad = acts32[layer], grads64[layer]
        assert act.shape == ref_act.shape and grad.shape == ref_grad.shape
        act_err = np.abs(act - ref_act).max() / np.abs(ref_act).max()
        assert act_err <= ACTIVATION_RTOL, f"{label}: activation off by {act_err:.2e}"
        rel_l2 = np.linalg.norm(grad - ref_grad) / np.linalg.norm(ref_grad)
        max_rel = np.abs(grad - ref_grad).max() / np.abs(ref_grad).max()
        assert rel_l2 <= GRADIENT_REL_L2, f"{label}: gradient relative L2 {rel_l2:.2e}"
        assert max_rel <= GRADIENT_MAX_REL, f"{label}: gradient max |diff| {max_rel:.2e} of max |g|"
