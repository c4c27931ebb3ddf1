"""Named exceptions: rule tables that replace the standard ones (guided ReLU, MaxPool without Indices)."""

from __future__ import annotations

import numpy as np
from onnx import helper

from camexport.graph.rules.linear import explicit_pads
from camexport.graph.rules.table import attr

# -- named exceptions: rule tables that replace the standard ones ---------------------------

def _guided_relu(b, node, dys):
    """Guided ReLU (Springenberg et al. 2015): dX = Where(X > 0 and dY > 0, dY, 0)."""
    x, dy = node.input[0], dys[0]
    zero = b.const(0, x)
    passes = b.op("And", b.op("Greater", x, zero), b.op("Greater", dy, zero))
    return [b.op("Where", passes, dy, zero)]


#: Guided Backprop: every Relu node (functional ReLUs included, unlike pgc; reference Q25).
GUIDED_RULES = {"Relu": _guided_relu}


def _max_pool_by_comparison(b, node, dys):
    """Y = max over each window, without MaxPool's Indices output (TensorRT has none):
    P_k = X at window offset k (X padded with -inf), first_k = (P_k == Y) and no earlier offset
    matched (row-major, so ties go to the first max, as torch and the Indices rule);
    dX = ConvTranspose(Where(first_k, dY, 0) stacked over k, one-hot kernels, group = C)."""
    x, y = node.input[0], node.output[0]
    kernel = list(attr(node, "kernel_shape"))
    n, (channels, *sizes), (_, *outs) = len(kernel), b.facts.shape(x)[1:], b.facts.shape(y)[1:]
    strides = list(attr(node, "strides", [1] * n))
    dilations = list(attr(node, "dilations", [1] * n))
    pads = explicit_pads(b, node, x, kernel, strides, dilations)
    ends = [(o - 1) * s + (k - 1) * d + 1 - size - p  # ceil_mode windows may overhang
            for o, s, k, d, size, p in zip(outs, strides, kernel, dilations, sizes, pads)]
    padded = b.op("Pad", x, b.ints([0, 0, *pads[:n], 0, 0, *[max(e, 0) for e in ends]]),
                  b.const(-np.inf, x))
    offsets = list(np.ndindex(*kernel))
    patches = [b.unsqueeze(b.op("Slice", padded, b.ints([o * d for o, d in zip(at, dilations)]),
                                b.ints([o * d + (m - 1) * s + 1 for o, d, m, s in
                                        zip(at, dilations, outs, strides)]),
                                b.ints(range(2, 2 + n)), b.ints(strides)), [2]) for at in offsets]
    hits = b.op("Equal", b.op("Concat", *patches, axis=2), b.unsqueeze(y, [2]))
    count = b.op("CumSum", b.op("Cast", hits, to=b.facts.dtype(x)), b.array(np.array(2, np.int64)))
    first = b.op("And", hits, b.op("Equal", count, b.const(1, x)))
    masked = b.op("Where", first, b.unsqueeze(dys[0], [2]), b.const(0, x))
    stacked = b.op("Reshape", masked, b.ints([0, channels * len(offsets), *outs]))
    onehot = np.zeros([channels * len(offsets), 1, *kernel],
                      dtype=helper.tensor_dtype_to_np_dtype(b.facts.dtype(x)))
    for k, at in enumerate(offsets):
        onehot[k::len(offsets), 0][(slice(None), *at)] = 1
    canvas = b.op("ConvTranspose", stacked, b.array(onehot), strides=strides, dilations=dilations,
                  group=channels, kernel_shape=kernel)  # covers the padded X up to the last window
    if min(ends) < 0:
        canvas = b.op("Pad", canvas, b.ints([0] * (n + 2) + [0, 0, *[max(-e, 0) for e in ends]]))
    return [b.op("Slice", canvas, b.ints(pads[:n]), b.ints([p + size for p, size in zip(pads, sizes)]),
                 b.ints(range(2, 2 + n)))]


#: MaxPool differentiated without its Indices output, for runtimes that lack it (TensorRT);
#: exact like the default rule, ties included. Opt in with ``augment(..., overrides=...)``.
MAXPOOL_WITHOUT_INDICES = {"MaxPool": _max_pool_by_comparison}
