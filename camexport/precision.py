"""float16 export of an augmented graph, and the drift it brings against float32.

The model, its backward pass and every activation run in float16; the graph's inputs and outputs
stay float32 (``keep_io_types``). Fused CAM heads (:mod:`camexport.graph.fuse`) are added after
the conversion, on its float32 outputs, and stay float32: their 1e-7 epsilons and GradCAM++'s
G^3 underflow in float16 (the converter's block list does not help: it rounds every value
between two blocked nodes through float16), and a head is a small part of the cost. Conversion
by ``onnxruntime.transformers.float16`` (shipped with onnxruntime), whose output is then sorted
back into topological order so that ``onnx.checker`` accepts it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from camexport.errors import CamexportError
from camexport.graph.augment import TARGET_WEIGHTS
from camexport.graph.fuse import is_head_node

PRECISIONS = ("fp32", "fp16")


class PrecisionError(CamexportError, ValueError):
    """A float16 conversion that cannot be made as asked."""


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of ``model`` with float32 inputs, outputs and fused heads."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as err:  # pragma: no cover - onnxruntime is a build extra
        raise PrecisionError("--precision fp16 needs onnxruntime (pip install -e .[cpu])") from err
    if any(is_head_node(node) for node in model.graph.node):
        # the converter rounds every value between two float32 nodes through float16
        raise PrecisionError("convert to float16 before fusing CAM heads, not after")
    source = onnx.ModelProto()
    source.CopyFrom(model)
    half = convert_float_to_float16(source, keep_io_types=True)
    _sort_topologically(half.graph)
    onnx.checker.check_model(half)
    return half


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so that every node follows the producers of its inputs."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at node {waiting[0].name!r}")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)


def drift(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> dict:
    """Per float output: max |delta| and, per image, the Pearson correlation (mean and min over
    the images whose maps are not constant) of ``candidate`` against ``reference``."""
    report = {}
    for name, want in reference.items():
        got = candidate[name]
        if want.dtype.kind not in "fu":
            continue
        want, got = want.astype(np.float64), got.astype(np.float64)
        entry = {"max_abs": float(np.abs(want - got).max()) if want.size else 0.0}
        if want.ndim >= 2:
            correlations = [np.corrcoef(w.ravel(), g.ravel())[0, 1] for w, g in zip(want, got)
                            if w.std() > 0 and g.std() > 0]
            if correlations:
                entry["correlation_mean"] = float(np.mean(correlations))
                entry["correlation_min"] = float(np.min(correlations))
        report[name] = entry
    return report


def measure_drift(reference: onnx.ModelProto, candidate: onnx.ModelProto, batch: int = 2,
                  seed: int = 0) -> dict:
    """:func:`drift` of ``candidate`` against ``reference`` on one seeded batch: the image is
    standard normal (a preprocessed input), ``target_weights`` all zero (each image's top class)."""
    from camexport.runtime import session

    rng = np.random.default_rng(seed)
    feeds = {}
    for value in reference.graph.input:
        if value.name in {t.name for t in reference.graph.initializer}:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch
                for d in value.type.tensor_type.shape.dim]
        if value.name == TARGET_WEIGHTS:
            feeds[value.name] = np.zeros(dims, np.float32)
        else:
            feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    results = []
    for model in (reference, candidate):
        run = session(model)
        names = [o.name for o in run.get_outputs()]
        results.append(dict(zip(names, run.run(None, feeds))))
    return drift(*results)
