"""All onnxruntime session creation, in one place."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from camexport.errors import CamexportError

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class ProviderError(CamexportError, RuntimeError):
    """An execution provider that this onnxruntime cannot give."""


def require(provider: str) -> str:
    """The execution provider's onnxruntime name, or ProviderError saying what to install."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted not in available:
        raise ProviderError(
            f"{wanted} is not available in this onnxruntime ({', '.join(available)}); install "
            f"onnxruntime-gpu (not beside onnxruntime) on a machine with CUDA for cuda/tensorrt")
    return wanted


def session(model: onnx.ModelProto | str | Path, provider: str = "cpu", threads: int = 0):
    """An ``onnxruntime.InferenceSession`` on exactly ``provider`` (never a silent fallback)."""
    import onnxruntime as ort

    wanted = require(provider)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    providers = [wanted] if provider == "cpu" else [wanted, PROVIDERS["cpu"]]
    result = ort.InferenceSession(source, sess_options=options, providers=providers)
    if result.get_providers()[0] != wanted:
        raise ProviderError(f"onnxruntime could not start {wanted}: got {result.get_providers()}")
    return result
