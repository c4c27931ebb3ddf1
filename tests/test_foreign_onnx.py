"""ONNX graphs camexport did not export: PaddlePaddle (rapidocr's text detector and orientation
classifier, opset 11/12, batch-norm not folded), torch's legacy TorchScript exporter, a
tf2onnx-style NHWC graph at opsets 11-21, and a model saved with external data.

Gradients are checked against finite differences of the plain graph cut at the layer: the layer
tensor becomes an input of a float64 copy (onnx's reference evaluator), and the graph's
float32 gradient g (onnxruntime) must give <g, v> = (s(a + eps v) - s(a - eps v)) / 2 eps along
a random direction v and along g itself, with s = sum(target_weights * output). The augmented
graph itself, run in float64 by the reference evaluator, must agree with the float32 one.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from rule_harness import _reference

from camexport.artifact import AUGMENTED_FILE
from camexport.cli import main
from camexport.eager import activations_and_gradients
from camexport.export import pin_input_shape
from camexport.graph.augment import augment, upgrade_opset
from camexport.graph.builder import GraphFacts
from camexport.graph.locate import pick_layer
from camexport.graph.rules import MAXPOOL_WITHOUT_INDICES
from camexport.runtime import session

#: Central-difference step along a direction scaled to the layer's RMS, in float64: small, so
#: that the step rarely crosses a kink (near-tied MaxPool windows flip at 1e-5, measured on the
#: classifier) while float64 round-off stays ~1e-9 of the score.
EPS = 1e-7
#: |<g, v> - fd| / |fd|: the graph's float32 backward against the float64 difference quotient.
FD_RTOL = 1e-4
#: Relative L2 of the float32 (onnxruntime) gradient against the float64 augmented graph's.
F32_RTOL = 1e-5


def _rapidocr(name: str) -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    assert spec is not None, "install rapidocr-onnxruntime==1.4.4 --no-deps (scripts/setup.sh)"
    return Path(spec.submodule_search_locations[0]) / "models" / name


CLS = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
DET = "ch_PP-OCRv4_det_infer.onnx"


def _as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` that computes in float64: float weights, Constant values, Casts to
    float and the graph's value types become float64."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph

    def widen(tensor):
        if tensor.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(tensor).astype(np.float64)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))

    for tensor in graph.initializer:
        widen(tensor)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                widen(attribute.t)
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.DOUBLE
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    del graph.value_info[:]
    return result


def _cut_at(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """``model`` with ``tensor`` fed as an input (its producer writes to a dead name)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for node in result.graph.node:
        for k, name in enumerate(node.output):
            if name == tensor:
                node.output[k] = f"{tensor}/cut"
    result.graph.input.append(helper.make_tensor_value_info(tensor, TensorProto.DOUBLE, None))
    return result


def _build(model_path, *options) -> tuple[onnx.ModelProto, str]:
    """Build with the CLI; the augmented graph and the CLI's output."""
    out = Path(model_path).parent / f"artifact-{Path(model_path).stem}-{abs(hash(options))}"
    result = CliRunner().invoke(main, ["build", str(model_path), "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    return onnx.load(str(out / AUGMENTED_FILE)), result.output


def _run(model: onnx.ModelProto, x: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    run = session(model)
    names = [o.name for o in run.get_outputs()]
    return dict(zip(names, run.run(None, {run.get_inputs()[0].name: x, "target_weights": weights})))


def _float32_errors(augmented: onnx.ModelProto, got: dict, x, weights, tensors) -> list[float]:
    """Relative L2 of each ``gradient/<tensor>`` in ``got`` against the float64 graph's."""
    reference = _reference(_as_float64(augmented))
    names = [f"gradient/{t}" for t in tensors]
    exact = reference.run(names, {augmented.graph.input[0].name: x.astype(np.float64),
                                  "target_weights": weights.astype(np.float64)})
    return [float(np.linalg.norm(got[n] - e) / np.linalg.norm(e)) for n, e in zip(names, exact)]


def _fd_errors(plain: onnx.ModelProto, tensor: str, x, weights, activation, gradient) -> list[float]:
    """Relative errors of <g, v> against central differences of the plain graph cut at
    ``tensor``, along a random direction and along g."""
    cut = _reference(_as_float64(_cut_at(upgrade_opset(plain), tensor)))
    feeds = {plain.graph.input[0].name: x.astype(np.float64)}
    a = activation.astype(np.float64)
    rms = np.sqrt(np.mean(a * a))

    def score(value):
        return float(np.sum(weights * cut.run(None, {**feeds, tensor: value})[0]))

    rng = np.random.default_rng(7)
    errors = []
    for v in (rng.standard_normal(a.shape), gradient.astype(np.float64)):
        v = v * rms / np.sqrt(np.mean(v * v))
        fd = (score(a + EPS * v) - score(a - EPS * v)) / (2 * EPS)
        errors.append(abs(float(np.sum(gradient * v)) - fd) / abs(fd))
    return errors


# -- PaddlePaddle exports (rapidocr) -----------------------------------------------------------

@pytest.mark.xdist_group("foreign_onnx")
def test_paddle_classifier_auto_layer_matches_finite_differences(tmp_path):
    """The orientation classifier (opset 11, BatchNormalization, HardSigmoid, Clip, MaxPool,
    Softmax on a Flatten) at 48x192: auto-picked layer, outputs equal to the original graph's."""
    source = tmp_path / CLS
    source.write_bytes(_rapidocr(CLS).read_bytes())
    augmented, output = _build(source, "--input-size", "48", "192")
    assert "no --layer given: using hardswish_17.tmp_0 (N, 200, 2, 96)" in output
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 48, 192)).astype(np.float32)
    weights = rng.standard_normal((2, 2)).astype(np.float32)
    got = _run(augmented, x, weights)
    plain = onnx.load(str(source))
    expected = session(plain).run(None, {"x": x})[0]
    out_name = plain.graph.output[0].name
    assert np.abs(got[out_name] - expected).max() <= 1e-6  # the same float32 graph, upgraded
    tensor = "hardswish_17.tmp_0"
    errors = _fd_errors(plain, tensor, x, weights, got[f"activation/{tensor}"],
                        got[f"gradient/{tensor}"])
    assert max(errors) <= FD_RTOL, errors
    assert max(_float32_errors(augmented, got, x, weights, [tensor])) <= F32_RTOL
    # the opt-in MaxPool rule without Indices gives the same gradient (measured: 0)
    indexless = augment(pin_input_shape(plain, (48, 192)), {tensor: tensor},
                        overrides=MAXPOOL_WITHOUT_INDICES)
    assert all(len(n.output) == 1 for n in indexless.graph.node if n.op_type == "MaxPool")
    again = _run(indexless, x, weights)[f"gradient/{tensor}"]
    assert np.abs(again - got[f"gradient/{tensor}"]).max() <= 1e-6 * np.abs(again).max()


@pytest.mark.xdist_group("foreign_onnx")
def test_paddle_detector_segmentation_output_matches_finite_differences(tmp_path):
    """The DB text detector (opset 12, Resize nearest, ConvTranspose, HardSigmoid, batch-norm)
    at 64x64: its (N, 1, H, W) probability map is scored with target_weights shaped like it.
    Two layers: a backbone stage (through six Resize) and the auto-picked head map."""
    source = tmp_path / DET
    source.write_bytes(_rapidocr(DET).read_bytes())
    layers = ["p2o.Add.229", "p2o.Concat.1"]
    augmented, _ = _build(source, "--input-size", "64", "64", *[o for t in layers
                                                                 for o in ("--layer", t)])
    plain = onnx.load(str(source))
    facts = GraphFacts(upgrade_opset(pin_input_shape(plain, (64, 64))))
    assert pick_layer(pin_input_shape(plain, (64, 64)), facts) == "batch_norm_1.tmp_4"  # (N, 24, 32, 32)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    weights = rng.standard_normal((2, 1, 64, 64)).astype(np.float32)
    got = _run(augmented, x, weights)
    expected = session(plain).run(None, {"x": x})[0]
    assert np.abs(got[plain.graph.output[0].name] - expected).max() <= 1e-6
    assert np.allclose(got["score"], np.sum(weights * expected, axis=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    for tensor in layers:
        errors = _fd_errors(plain, tensor, x, weights, got[f"activation/{tensor}"],
                            got[f"gradient/{tensor}"])
        assert max(errors) <= FD_RTOL, (tensor, errors)
    # 1e-2 before the Sigmoid rule stopped reading Y (1 - Y) off onnxruntime's Sigmoid
    assert max(_float32_errors(augmented, got, x, weights, layers)) <= F32_RTOL


def test_inspect_check_lists_tail_ops(tmp_path):
    """--check on the classifier: every tail op has a rule (exit 0); on a graph with LRN on the
    tail it names the op and exits 1."""
    runner = CliRunner()
    ok = runner.invoke(main, ["inspect", str(_rapidocr(CLS)), "--check", "--input-size", "48", "192"])
    assert ok.exit_code == 0, ok.output
    assert "tail from hardswish_17.tmp_0 (N, 200, 2, 96)" in ok.output
    lines = {line.split()[0]: line.split()[1:] for line in ok.output.splitlines()[1:] if line.strip()}
    assert lines["MaxPool"] == ["1", "rule"] and lines["Softmax"] == ["1", "rule"]
    assert "Shape" not in lines  # the driver never walks ops without gradient
    path = tmp_path / "lrn.onnx"
    onnx.save(_nhwc_model(13, lrn=True), str(path))
    bad = runner.invoke(main, ["inspect", str(path), "--check", "--layer", "features"])
    assert bad.exit_code == 1
    assert "LRN" in bad.output and "MISSING" in bad.output and "no gradient rule for LRN" in bad.output


# -- torch's legacy (TorchScript) exporter ---------------------------------------------------------

@pytest.mark.xdist_group("foreign_onnx")
def test_torch_legacy_export_matches_torch_eager(tmp_path):
    """resnet18 (random weights, 64x64) through torch.onnx.export(dynamo=False): the layer by
    tensor name, and the auto-picked layer is the same tensor (layer4's last ReLU)."""
    torch.manual_seed(0)
    module = torchvision.models.resnet18().eval()
    path = tmp_path / "r18_legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is the point
        torch.onnx.export(module, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False,
                          opset_version=13, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    tensors = {"layer4": "/layer4/layer4.1/relu_1/Relu_output_0",
               "layer3": "/layer3/layer3.1/relu_1/Relu_output_0"}
    assert pick_layer(onnx.load(str(path))) == tensors["layer4"]
    augmented, _ = _build(path, *[o for t in tensors.values() for o in ("--layer", t)])
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    weights = np.eye(1000, dtype=np.float32)[[3, 500]]
    got = _run(augmented, x, weights)
    outputs, acts, grads = activations_and_gradients(module, x, list(tensors), weights,
                                                     dtype=torch.float64)
    assert np.abs(got["logits"] - outputs).max() <= 1e-4 * np.abs(outputs).max()
    for module_path, tensor in tensors.items():  # measured: 5e-6 and 4e-7 (layer3)
        assert np.abs(got[f"activation/{tensor}"] - acts[module_path]).max() <= 1e-4
        grad, ref = got[f"gradient/{tensor}"], grads[module_path]
        assert np.abs(grad - ref).max() <= 1e-4 * np.abs(ref).max()


# -- a tf2onnx-style NHWC graph, opsets 11-21 ----------------------------------------------------

def _nhwc_model(opset: int, lrn: bool = False) -> onnx.ModelProto:
    """NHWC input -> Transpose -> Conv -> BatchNormalization -> Relu -> (Softmax over C*H*W at
    opset < 13, the old 2-D coercion; over C from 13) x Relu -> GlobalAveragePool -> Reshape
    -> Gemm, as tf2onnx writes a small Keras classifier."""
    rng = np.random.default_rng(opset)
    channels = 6

    def init(name, *shape, low=-1.0):
        return numpy_helper.from_array(rng.uniform(low, 1.0, shape).astype(np.float32), name)

    inits = [init("w", channels, 3, 3, 3), init("bias", channels), init("scale", channels, low=0.5),
             init("shift", channels), init("mean", channels), init("var", channels, low=0.5),
             init("dense", channels, 5), init("dense_bias", 5),
             numpy_helper.from_array(np.array([-1, channels], np.int64), "flat")]
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w", "bias"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", "scale", "shift", "mean", "var"], ["bn"],
                         epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["features"]),
        helper.make_node("Softmax", ["features"], ["attention"], axis=1),
        helper.make_node("Mul", ["features", "attention"], ["attended"]),
        *([helper.make_node("LRN", ["attended"], ["normed"], size=3)] if lrn else []),
        helper.make_node("GlobalAveragePool", ["normed" if lrn else "attended"], ["pooled"]),
        helper.make_node("Reshape", ["pooled", "flat"], ["flattened"]),
        helper.make_node("Gemm", ["flattened", "dense", "dense_bias"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "keras", [helper.make_tensor_value_info(
        "image", TensorProto.FLOAT, ["N", 12, 12, 3])], [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 15 else 10
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_nhwc_graph_each_opset_matches_finite_differences(opset, tmp_path):
    """Layers ``features`` (Relu output, before the Softmax) and ``attended`` (the auto-picked
    last spatial map); at opset 11 the Softmax spans C*H*W and must keep doing so after the
    upgrade to opset 17."""
    model = _nhwc_model(opset)
    path = tmp_path / f"nhwc{opset}.onnx"
    onnx.save(model, str(path))
    assert pick_layer(model) == "attended"
    augmented, _ = _build(path, "--layer", "features", "--layer", "attended")
    rng = np.random.default_rng(opset)
    x = rng.standard_normal((3, 12, 12, 3)).astype(np.float32)
    weights = rng.standard_normal((3, 5)).astype(np.float32)
    got = _run(augmented, x, weights)
    expected = session(model).run(None, {"image": x})[0]
    assert np.abs(got["logits"] - expected).max() <= 1e-6
    for tensor in ("features", "attended"):
        errors = _fd_errors(model, tensor, x, weights, got[f"activation/{tensor}"],
                            got[f"gradient/{tensor}"])
        assert max(errors) <= FD_RTOL, (tensor, errors)
    errors = _float32_errors(augmented, got, x, weights, ["features", "attended"])
    assert max(errors) <= F32_RTOL, errors


def test_external_data_model_builds(tmp_path):
    """A model saved with its weights in a side file loads, builds, and computes the same; its
    NHWC input's free height and width (-1 batch, as paddle writes it) are pinned by
    --input-size."""
    model = _nhwc_model(17)
    folder = tmp_path / "external"
    folder.mkdir()
    saved = _nhwc_model(17)
    dims = saved.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[1].dim_param, dims[2].dim_param = -1, "height", "width"
    onnx.save(saved, str(folder / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    assert (folder / "weights.bin").stat().st_size > 600  # the weights left the .onnx file
    augmented, _ = _build(folder / "model.onnx", "--layer", "features", "--input-size", "12", "12")
    pinned = augmented.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in pinned] == ["batch", 12, 12, 3]
    x = np.random.default_rng(5).standard_normal((2, 12, 12, 3)).astype(np.float32)
    weights = np.eye(5, dtype=np.float32)[[1, 4]]
    got = _run(augmented, x, weights)
    assert np.abs(got["logits"] - session(model).run(None, {"image": x})[0]).max() <= 1e-6
    errors = _fd_errors(model, "features", x, weights, got["activation/features"],
                        got["gradient/features"])
    assert max(errors) <= FD_RTOL, errors
