"""All session creation, in one place: onnxruntime's execution providers, and OpenVINO's own
runtime for ``openvino`` (camexport.openvino_session, a session with the same interface)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx

from camexport.errors import CamexportError

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    # not an onnxruntime provider: OpenVINO's own runtime (camexport.openvino_session)
    "openvino": "OpenVINO:CPU",
}


#: Threads of each session when set (a Ray worker given N CPUs sets N; default: every core).
THREADS_VARIABLE = "CAMEXPORT_THREADS"

#: options of the CUDA provider: float32 as on the CPU. onnxruntime's CUDA provider otherwise uses
#: TF32 tensor cores for convolutions and matrix products on Ampere and later GPUs: measured on an
#: H200 (scripts/gpu/cuda_parity.py), resnet50's activations were then 1.6e-3 relative off the CPU
#: provider's and GradCAM maps up to 1.7e-3, EfficientNet-Lite0's 6.8e-3 and 2.5e-3.
CUDA_OPTIONS = {"use_tf32": "0"}


class ProviderError(CamexportError, RuntimeError):
    """An execution provider that this onnxruntime (or OpenVINO) cannot give."""


def require(provider: str) -> str:
    """The execution provider's onnxruntime name, or ProviderError saying what to install."""
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if provider == "openvino":
        from camexport import openvino_session

        openvino_session.require()
        return PROVIDERS[provider]
    import onnxruntime as ort

    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted not in available:
        raise ProviderError(
            f"{wanted} is not available in this onnxruntime ({', '.join(available)}); install "
            f"onnxruntime-gpu (not beside onnxruntime) on a machine with CUDA for cuda/tensorrt")
    return wanted


def session(model: onnx.ModelProto | str | Path, provider: str = "cpu", threads: int = 0,
            spin: bool | str = True, arena: bool = True):
    """An ``onnxruntime.InferenceSession`` on exactly ``provider`` (never a silent fallback); for
    ``openvino``, an :class:`~camexport.openvino_session.OpenVINOSession` that answers the same.
    ``spin``: True: the session's threads spin on for more work when a run ends (onnxruntime's
    default, tens of ms). False: they never spin, for sessions run in turn with one whose threads
    spin on (the spinning ones would slow each other): AblationCAM's tail run after the graph, on
    vit_small 218 -> 148 ms per image, 2 cores (a session run alone loses up to 8 % on small runs
    without spinning). "run": they spin within a run and sleep when it ends, for sessions run in
    turn only with each other (neither slows the next, and no run wakes its threads once per
    parallel section): a YOLOv8n detection's GradCAM, head and tail, 75.2 -> 69.6 ms and 66.6 ->
    64.4 ms (medians of 24 runs paired with False); after a spinning session, False is faster
    (the AblationCAM tail above, 177 vs 187 ms, paired likewise).
    ``arena`` False: no CPU memory arena (each run's buffers are freed when it ends, instead of
    the arena keeping its peak for the session's life), for the many small sessions one
    artifact holds (a Faster R-CNN's per-level cuts: camexport.two_stage.PooledBoxes)."""
    wanted = require(provider)
    if provider == "openvino":
        from camexport.openvino_session import OpenVINOSession

        return OpenVINOSession(model, threads or int(os.environ.get(THREADS_VARIABLE) or 0))
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or int(os.environ.get(THREADS_VARIABLE) or 0)
    if threads:
        options.intra_op_num_threads = threads
    if spin == "run":
        options.add_session_config_entry("session.force_spinning_stop", "1")
    elif not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = arena
    if isinstance(model, onnx.ModelProto):
        from camexport.graph.cut import without_output_copies

        source = without_output_copies(model).SerializeToString()
    else:
        source = str(model)
    providers = [wanted] if provider == "cpu" else [wanted, PROVIDERS["cpu"]]
    if provider == "cuda":
        providers[0] = (wanted, CUDA_OPTIONS)
    result = ort.InferenceSession(source, sess_options=options, providers=providers)
    if result.get_providers()[0] != wanted:
        raise ProviderError(f"onnxruntime could not start {wanted}: got {result.get_providers()}")
    return result


def check_graph(model: onnx.ModelProto, provider: str) -> None:
    """Refuse a graph whose numbers ``provider`` is known to get wrong, naming the fix.

    MaxPool's Indices output on the CUDA provider: measured on an H200 with onnxruntime-gpu
    1.31.1 (scripts/gpu/cuda_parity.py), resnet50's input gradient through its stem MaxPool was
    wrong (FullGrad maps 0.21 off the CPU provider's, Guided Backprop 8 % of its range), while
    the graph built with ``--no-maxpool-indices`` agreed (4.9e-4 and 2.3e-7). TensorRT has no
    Indices output at all. OpenVINO's CPU plugin gets it right: measured with OpenVINO 2026.4.1
    (tests/test_openvino.py), resnet's input gradient through the stem MaxPool with Indices is
    1.4e-6 relative off the CPU provider's, as without Indices.
    """
    if provider in ("cpu", "openvino"):
        return
    read = {name for node in model.graph.node for name in node.input}
    for node in model.graph.node:
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1] in read:
            raise ProviderError(
                f"this graph differentiates MaxPool ({node.name}) through its Indices output, which "
                f"onnxruntime's {provider} provider gets wrong; rebuild the artifact with "
                f"`camexport build ... --no-maxpool-indices` (build(..., maxpool_indices=False)) for "
                f"{provider}")

