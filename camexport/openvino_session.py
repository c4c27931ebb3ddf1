"""``--provider openvino``: OpenVINO's own runtime behind the part of ``onnxruntime``'s session
interface camexport uses (``run``, ``get_inputs``, ``get_outputs``, ``get_providers``).

OpenVINO reads the artifact's ONNX graph itself (its ONNX frontend) and compiles it for the CPU
plugin. onnxruntime's OpenVINO execution provider (``onnxruntime-openvino``) would keep the
onnxruntime API, but it is a separate onnxruntime build that cannot be installed beside
``onnxruntime``; ``pip install camexport[openvino]`` adds only OpenVINO's runtime.
:func:`camexport.runtime.session` is the one place that makes these sessions.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from camexport.runtime import ProviderError

log = logging.getLogger(__name__)

#: The device camexport compiles for: OpenVINO's CPU plugin.
DEVICE = "CPU"

#: Compile options. OpenVINO's CPU plugin otherwise computes in bfloat16 on CPUs with AVX512-BF16
#: or AMX (``INFERENCE_PRECISION_HINT`` defaults to bf16 on this machine's AMD EPYC): measured on
#: a random resnet18 at 64x64, activations were then 8e-3 relative off onnxruntime's float32, the
#: layer gradient 3e-3 and the input gradient (FullGrad, Guided Backprop) 0.2; vit_small's gradient
#: 9e-3. With f32 they agree within float32 round-off (~2e-6, tests/test_openvino.py). An fp16
#: artifact then runs in float32 too (its weights widened), where onnxruntime computes in float16.
CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}

#: onnxruntime's names of tensor element types (``NodeArg.type``), by numpy dtype name.
_TYPE_NAMES = {"float32": "float", "float64": "double", "float16": "float16", "bool": "bool"}


@dataclass(frozen=True)
class NodeArg:
    """What ``onnxruntime.NodeArg`` tells of an input or output: its name, shape (ints for fixed
    dimensions, the symbolic name or None for free ones) and type (``"tensor(float)"``)."""

    name: str
    shape: list
    type: str


def _node_arg(value: onnx.ValueInfoProto) -> NodeArg:
    tensor = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
             for d in tensor.shape.dim]
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
    return NodeArg(value.name, shape, f"tensor({_TYPE_NAMES.get(dtype, dtype)})")


def _openvino():
    try:
        import openvino
    except ImportError as err:
        raise ProviderError(
            f"--provider openvino needs OpenVINO's runtime, which is not importable here ({err}); "
            f"install it with `pip install camexport[openvino]`") from err
    return openvino


def require() -> None:
    """ProviderError saying what to install unless OpenVINO's runtime and CPU plugin load."""
    openvino = _openvino()
    devices = _core(openvino).available_devices
    if DEVICE not in devices:
        raise ProviderError(f"OpenVINO {openvino.__version__} has no {DEVICE} device here "
                            f"(devices: {', '.join(devices) or 'none'})")


_CORES: list = []


def _core(openvino):
    if not _CORES:
        _CORES.append(openvino.Core())
    return _CORES[0]


def untie_shared_weights(model) -> int:
    """Give every reader but one of a weight (a Constant of rank 2 or more) of the OpenVINO
    ``model`` its own copy of it, in place; how many copies were made.

    OpenVINO's CPU plugin (2026.4.1) gets a matrix product or convolution wrong when its weight
    constant also feeds another one that reads it in the other layout: ``MatMul(dY, Transpose(W))``
    beside ``MatMul(X, W)``, ``Gemm(dY, W)`` beside ``Gemm(X, W, transB=1)`` and
    ``ConvTranspose(dY, W)`` beside ``Conv(X, W)`` compute with the other product's weight layout
    (1.1 to 1.4 relative error; the same for a graph built with OpenVINO's own opset API, so not
    its ONNX reader, and with every compile option tried). camexport's backward pass is exactly
    that: each linear op's VJP reads the op's own weight. With one copy per reader the weights on
    the backward path are held twice.
    """
    import openvino

    copies = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant" or op.get_output_partial_shape(0).rank.get_length() < 2:
            continue
        for reader in list(op.output(0).get_target_inputs())[1:]:
            copy = openvino.op.Constant(openvino.Tensor(op.get_data().copy()))
            reader.replace_source_output(copy.output(0))
            copies += 1
    return copies


class OpenVINOSession:
    """A compiled OpenVINO model that answers like an ``onnxruntime.InferenceSession``: ``run``
    with output names (None: all) and a feed dict, ``get_inputs``, ``get_outputs`` and
    ``get_providers``. Free dimensions (the batch) stay free: one compiled model serves every
    batch size."""

    #: what ``get_providers`` names (camexport.runtime.PROVIDERS["openvino"])
    NAME = "OpenVINO:CPU"

    def __init__(self, model: onnx.ModelProto | str | Path, threads: int = 0):
        openvino = _openvino()
        core = _core(openvino)
        # inputs and outputs as the ONNX graph declares them (a file's external data not read)
        graph = (model if isinstance(model, onnx.ModelProto)
                 else onnx.load(str(model), load_external_data=False)).graph
        stored = {t.name for t in graph.initializer}
        self._inputs = [_node_arg(v) for v in graph.input if v.name not in stored]
        self._outputs = [_node_arg(v) for v in graph.output]
        config = dict(CONFIG)
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            read = core.read_model(model.SerializeToString() if isinstance(model, onnx.ModelProto)
                                   else str(model))
            copies = untie_shared_weights(read)
            self._compiled = core.compile_model(read, DEVICE, config)
        except RuntimeError as err:  # OpenVINO's errors (an op it cannot convert) are RuntimeErrors
            raise ProviderError(f"OpenVINO {openvino.__version__} could not compile this graph: "
                                f"{str(err).strip().splitlines()[0]}") from err
        log.debug("openvino: compiled with %d shared weights copied", copies)
        self._ports = {name: port for port in self._compiled.outputs for name in port.get_names()}
        missing = [o.name for o in self._outputs if o.name not in self._ports]
        if missing:
            raise ProviderError(f"OpenVINO's compiled graph lacks outputs {missing}")
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()  # one request: runs from several threads take turns

    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [self.NAME]

    def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray],
            run_options=None) -> list[np.ndarray]:
        """The outputs named (every graph output for None), in that order, for ``input_feed``."""
        expected = {i.name for i in self._inputs}
        if set(input_feed) != expected:
            raise ProviderError(f"feed {sorted(input_feed)} for inputs {sorted(expected)}")
        names = [o.name for o in self._outputs] if output_names is None else list(output_names)
        unknown = [name for name in names if name not in self._ports]
        if unknown:
            raise ProviderError(f"no graph outputs {unknown}")
        # share_outputs=False (the default): each result is a copy, not the request's buffer
        with self._lock:
            results = self._request.infer(input_feed)
            return [results[self._ports[name]] for name in names]
