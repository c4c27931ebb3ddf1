"""The RoiAlign rule: with the boxes held fixed, RoiAlign is linear in X, and its transpose is a
weighted scatter-add of dY into X's shape.

Box r's bin (ph, pw) averages (mode "avg") or takes the largest of (mode "max") the samples of a
grid_h x grid_w grid; each sample is a bilinear read of the 4 pixels of X[batch[r]] around it.
The rule rebuilds every sample's pixel indices and weights inside the graph from the rois tensor
(a constant or a run-time input), following onnx's reference (onnx/reference/ops/op_roi_align.py)
to the letter: a sample outside [-1, size] weighs 0, its coordinate is clamped to [0, size - 1],
low = floor, high = min(low + 1, size - 1). The weights factor into a row part and a column part,
so each axis is built alone as (R, P, G, 2) and the two meet once as
(R, C, Ph, Pw, Gy, Gx, 2, 2). sampling_ratio 0 (grid = ceil(box size / output size), per box)
builds the largest grid among the boxes and gives each box's unused samples weight 0.
Boxes and batch indices get no cotangent (torchvision detaches the proposals).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from camexport.graph.rules.table import attr, rule

#: axes of the joint layout (R, C, Ph, Pw, Gy, Gx, ky, kx) that a row / column factor lacks
_ROW_AXES, _COLUMN_AXES = [1, 3, 5, 7], [1, 2, 4, 6]


def _axis(b, node, coordinate: int, size: int, pooled: int):
    """Pixel index along one axis (x: ``coordinate`` 0, y: 1) and bilinear weight, both
    (R, P, G, 2) (low then high neighbour), with the grid and unused-sample mask of :func:`_grid`."""
    rois = node.input[1]
    half_pixel = attr(node, "coordinate_transformation_mode", "half_pixel") == "half_pixel"
    scale = b.const(attr(node, "spatial_scale", 1.0), rois)
    offset = b.const(0.5 if half_pixel else 0.0, rois)
    ends = [b.op("Sub", b.op("Mul", b.op("Gather", rois, b.ints([k]), axis=1), scale), offset)
            for k in (coordinate, coordinate + 2)]
    start = b.op("Reshape", ends[0], b.ints([-1, 1, 1, 1]))
    extent = b.op("Reshape", b.op("Sub", ends[1], ends[0]), b.ints([-1, 1, 1, 1]))
    if not half_pixel:  # output_half_pixel forces malformed boxes to 1 x 1
        extent = b.op("Max", extent, b.const(1.0, rois))
    bin_size = b.op("Div", extent, b.const(float(pooled), rois))
    grid, steps, used, unused = _grid(b, node, bin_size)
    bins = b.op("Mul", b.const(np.arange(pooled).reshape(1, -1, 1, 1), rois), bin_size)
    within = b.op("Div", b.op("Mul", b.op("Add", steps, b.const(0.5, rois)), bin_size),
                  b.op("Max", grid, b.const(1.0, rois)))
    at = b.op("Add", b.op("Add", start, bins), within)
    valid = b.op("And", b.op("GreaterOrEqual", at, b.const(-1.0, rois)),
                 b.op("LessOrEqual", at, b.const(float(size), rois)))
    valid = valid if used is None else b.op("And", valid, used)
    last = b.const(float(size - 1), rois)
    at = b.op("Min", b.op("Max", at, b.const(0.0, rois)), last)
    low = b.op("Floor", at)
    high_weight = b.op("Sub", at, low)
    index = b.op("Concat", low, b.op("Min", b.op("Add", low, b.const(1.0, rois)), last), axis=-1)
    weight = b.op("Concat", b.op("Sub", b.const(1.0, rois), high_weight), high_weight, axis=-1)
    weight = b.op("Where", valid, weight, b.const(0.0, rois))
    return b.op("Cast", index, to=TensorProto.INT64), weight, grid, unused


def _grid(b, node, bin_size: str):
    """Samples per bin along one axis: the grid size (a constant for sampling_ratio > 0, else
    ceil(bin size) per box, (R, 1, 1, 1)), the sample numbers 0..G-1 (1, 1, G, 1) with G the
    largest grid, and, for sampling_ratio 0, which samples a box uses (boolean) and the same as an
    additive mask (0 used, -inf unused; None for sampling_ratio > 0)."""
    rois, ratio = node.input[1], attr(node, "sampling_ratio", 0)
    if ratio > 0:
        return (b.const(float(ratio), rois), b.const(np.arange(ratio).reshape(1, 1, -1, 1), rois),
                None, None)
    grid = b.op("Max", b.op("Ceil", bin_size), b.const(0.0, rois))
    most = b.reduce("ReduceMax", b.op("Concat", b.op("Reshape", grid, b.ints([-1])),
                                      b.const([1.0], rois), axis=0), [0], keepdims=False)
    steps = b.op("Range", b.array(np.array(0, np.int64)), b.op("Cast", most, to=TensorProto.INT64),
                 b.array(np.array(1, np.int64)))
    steps = b.op("Reshape", b.op("Cast", steps, to=b.facts.dtype(rois)), b.ints([1, 1, -1, 1]))
    used = b.op("Less", steps, grid)
    return grid, steps, used, b.op("Where", used, b.const(0.0, rois), b.const(-np.inf, rois))


@rule("RoiAlign", since=16)
def _roi_align(b, node, dys):
    """Y[r, c, ph, pw] = mean (max) over the bin's samples s of sum_k w_sk X[batch[r], c, p_sk]
    (max: of max_k w_sk X[...]), boxes fixed: dX = ScatterAdd(zeros, p_sk, dY w_sk / count)
    (max: at the chosen (s, k) only)."""
    x = node.input[0]
    if not b.needs(x):
        return [None] * len(node.input)
    height, width = b.facts.static_dim(x, 2), b.facts.static_dim(x, 3)
    rows, row_weight, grid_h, unused_h = _axis(b, node, 1, height, attr(node, "output_height", 1))
    cols, col_weight, grid_w, unused_w = _axis(b, node, 0, width, attr(node, "output_width", 1))
    index = b.op("Add", b.op("Add", _plane_offsets(b, node),
                             b.op("Mul", b.unsqueeze(rows, _ROW_AXES), b.ints([width]))),
                 b.unsqueeze(cols, _COLUMN_AXES))
    weight = b.op("Mul", b.unsqueeze(row_weight, _ROW_AXES), b.unsqueeze(col_weight, _COLUMN_AXES))
    dy = b.unsqueeze(dys[0], [4, 5, 6, 7])
    if attr(node, "mode", "avg") == "max":
        unused = None if unused_h is None else b.op("Add", b.unsqueeze(unused_h, _ROW_AXES),
                                                   b.unsqueeze(unused_w, _COLUMN_AXES))
        updates = b.op("Mul", dy, _largest(b, x, index, weight, unused))
    else:
        count = b.op("Max", b.op("Mul", grid_h, grid_w), b.const(1.0, x))
        count = b.op("Reshape", count, b.ints([-1] + [1] * 7)) if unused_h is not None else count
        updates = b.op("Mul", dy, b.op("Div", weight, count))
    zero = numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(b.facts.dtype(x))))
    flat = b.op("ScatterElements", b.op("ConstantOfShape", b.op("Reshape", b.op("Size", x),
                                                                  b.ints([-1])), value=zero),
                b.op("Reshape", index, b.ints([-1])), b.op("Reshape", updates, b.ints([-1])),
                axis=0, reduction="add")
    return [b.op("Reshape", flat, b.shape_of(x)), None, None]


def _plane_offsets(b, node) -> str:
    """Flat offset of plane X[batch[r], c] for every (r, c), shaped (R, C, 1, 1, 1, 1, 1, 1)."""
    x, batch = node.input[0], node.input[2]
    shape = b.shape_of(x)
    channels = b.op("Gather", shape, b.array(np.array(1, np.int64)))
    planes = b.op("Add", b.op("Mul", b.unsqueeze(batch, [1]), channels),
                  b.unsqueeze(b.op("Range", b.array(np.array(0, np.int64)), channels,
                                   b.array(np.array(1, np.int64))), [0]))
    plane = b.reduce("ReduceProd", b.op("Slice", shape, b.ints([2]), b.ints([4])), [0])
    return b.unsqueeze(b.op("Mul", planes, plane), [2, 3, 4, 5, 6, 7])


def _largest(b, x: str, index: str, weight: str, unused: str | None) -> str:
    """Max mode: ``weight`` kept only at each bin's largest w_sk X[p_sk], over samples s then
    corners k in the reference's order (the first one on ties), zero elsewhere."""
    values = b.op("Mul", b.op("Gather", b.op("Reshape", x, b.ints([-1])), index), weight)
    if unused is not None:
        values = b.op("Add", values, unused)
    values = b.op("Reshape", values, b.ints([0, 0, 0, 0, -1]))  # (Gy, Gx, ky, kx) in order
    choice = b.op("ArgMax", values, axis=4, keepdims=1)
    candidates = b.op("Range", b.array(np.array(0, np.int64)),
                      b.op("Gather", b.shape_of(values), b.array(np.array(4, np.int64))),
                      b.array(np.array(1, np.int64)))
    chosen = b.op("Reshape", b.op("Equal", candidates, choice), b.shape_of(index))
    return b.op("Where", chosen, weight, b.const(0.0, x))
