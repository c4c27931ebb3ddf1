"""torch -> plain ONNX with torch's own exporter, batch axis dynamic.

The dynamo exporter keeps every node's module path (``pkg.torch.onnx.name_scopes``), which
:mod:`camexport.graph.locate` turns into layer names; it also folds batch-norm into convolutions.
TorchScript modules go through the legacy exporter, whose node names carry the module path.
"""

from __future__ import annotations

import logging
import warnings

import onnx

from camexport.errors import CamexportError
from camexport.load import Loaded

log = logging.getLogger(__name__)

OPSET = 20


class ExportError(CamexportError):
    """torch could not export the model to ONNX."""


def to_onnx(loaded: Loaded, example_batch: int = 2) -> onnx.ModelProto:
    """The plain ONNX graph of ``loaded`` (an ONNX model as it is, its input's free spatial
    dims pinned to ``loaded.preprocessing.size``: see :func:`pin_input_shape`)."""
    if loaded.onnx_model is not None:
        return pin_input_shape(loaded.onnx_model, loaded.preprocessing.size)
    import torch

    if loaded.program is not None:
        return _dynamo(loaded.program, (), None)
    module = loaded.module
    # (H, W) for images, (D, H, W) for volumes and clips (a 5-D input)
    # from a generator of its own: an export leaves torch's global random state as it was
    example = torch.randn(example_batch, loaded.preprocessing.channels, *loaded.preprocessing.size,
                          generator=torch.Generator().manual_seed(0))
    if isinstance(module, torch.jit.ScriptModule):
        return _legacy(module, example)
    batch = torch.export.Dim("batch", min=1, max=4096)
    return _dynamo(module, (example,), ({0: batch},))


def pin_input_shape(model: onnx.ModelProto, size: tuple[int, ...]) -> onnx.ModelProto:
    """The model with its image input's symbolic height and width set to ``size``.

    Gradient rules need static spatial sizes, and graphs from other exporters often leave them
    free (PaddlePaddle, tf2onnx). The image is the first graph input; NHWC is assumed when its
    last axis is a static 1, 3 or 4 and axis 1 is not. Negative dim values (some exporters
    write -1 for "any") become symbolic dims, batch included. A model whose sizes are static is
    returned unchanged; one with changed dims is a copy.
    """
    inputs = [i for i in model.graph.input
              if i.name not in {t.name for t in model.graph.initializer}]
    values = [*inputs, *model.graph.output, *model.graph.value_info]
    free = {v.name for v in values for d in v.type.tensor_type.shape.dim
            if d.HasField("dim_value") and d.dim_value < 0}
    image = inputs[0].type.tensor_type.shape.dim if inputs else []
    static = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in image]
    spatial = {}
    if len(static) == 4:
        channels_last = static[3] in (1, 3, 4) and static[1] not in (1, 3, 4)
        axes = (1, 2) if channels_last else (2, 3)
        spatial = {a: int(n) for a, n in zip(axes, size[-2:]) if static[a] is None}
    if not free and not spatial:
        return model
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    by_name = {v.name: v for v in [*pinned.graph.input, *pinned.graph.output,
                                    *pinned.graph.value_info]}
    for name in free:
        for k, dim in enumerate(by_name[name].type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.dim_param = "batch" if k == 0 else f"{name}_d{k}"
    dims = by_name[inputs[0].name].type.tensor_type.shape.dim
    for axis, length in spatial.items():
        dims[axis].dim_value = length
    if spatial:
        log.warning("input %r has free spatial dims: pinned to %s by --input-size (224 224 "
                    "unless given)", inputs[0].name, " ".join(str(n) for n in size[-2:]))
    return pinned


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
