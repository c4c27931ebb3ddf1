"""torch -> plain ONNX with torch's own exporter, batch axis dynamic.

The dynamo exporter keeps every node's module path (``pkg.torch.onnx.name_scopes``), which
:mod:`camexport.graph.locate` turns into layer names; it also folds batch-norm into convolutions.
TorchScript modules go through the legacy exporter, whose node names carry the module path.
"""

from __future__ import annotations

import logging
import warnings

import onnx

from camexport.load import Loaded

log = logging.getLogger(__name__)

OPSET = 20


class ExportError(Exception):
    """torch could not export the model to ONNX."""


def to_onnx(loaded: Loaded, example_batch: int = 2) -> onnx.ModelProto:
    """The plain ONNX graph of ``loaded`` (an ONNX model is returned as it is)."""
    if loaded.onnx_model is not None:
        return loaded.onnx_model
    import torch

    if loaded.program is not None:
        return _dynamo(loaded.program, (), None)
    module = loaded.module
    # (H, W) for images, (D, H, W) for volumes and clips (a 5-D input)
    example = torch.randn(example_batch, 3, *loaded.preprocessing.size)
    if isinstance(module, torch.jit.ScriptModule):
        return _legacy(module, example)
    batch = torch.export.Dim("batch", min=1, max=4096)
    return _dynamo(module, (example,), ({0: batch},))


def _dynamo(module, args, dynamic_shapes) -> onnx.ModelProto:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET,
                                        dynamic_shapes=dynamic_shapes, verbose=False,
                                        optimize=True)
        except Exception as err:
            raise ExportError(f"torch.onnx.export (dynamo) failed: {type(err).__name__}: {err}") from err
    return program.model_proto


def _legacy(module, example) -> onnx.ModelProto:
    import io

    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        except Exception as err:
            raise ExportError(f"torch.onnx.export (TorchScript) failed: {err}") from err
    return onnx.load_from_string(buffer.getvalue())
