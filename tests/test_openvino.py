"""``--provider openvino`` (camexport.openvino_session, OpenVINO's own runtime on the CPU) against
onnxruntime's CPU provider on the same artifacts.

Artifacts, small and built once: a random resnet18 at 64x64 (layers layer4 and layer1, FullGrad
and Guided Backprop input gradients through the stem MaxPool's Indices, three fused heads), its
float16 twin with uint8 heads, the pretrained EfficientNet-Lite0 at 64x64, a random vit_small at
64x64 (16 patches), and PaddlePaddle's text-orientation classifier and DB text detector
(rapidocr's ONNX files, opset 11/12).

Both runtimes compute in float32 (openvino_session.CONFIG), so every float output of the
augmented graph must agree within float32 round-off, except where a piecewise-linear op (ReLU,
MaxPool, Where) decides differently on an input within round-off of its kink: then the two
gradients are those of two different pieces. So each case's input is the first draw of its
seeded generator on which every boolean tensor of the graph (those decisions) is the same under
both runtimes (tests/test_graph_parity.py does the same against torch), a stated property of
the input, checked on the machine that runs the test.
"""

from __future__ import annotations

import subprocess
import sys
from functools import cache
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest
from cli_helper import cli
from onnx import TensorProto, helper

openvino = pytest.importorskip(
    "openvino", reason="OpenVINO's runtime is not installed: pip install camexport[openvino]")

from camexport.artifact import read_artifact
from camexport.explain import Explainer
from camexport.runtime import PROVIDERS, ProviderError, check_graph, session
from camexport.store import ResultReader

pytestmark = pytest.mark.xdist_group("openvino")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
#: Each float32 output of a graph (model outputs, activations, gradients, fused heads): relative
#: L2 of openvino - onnxruntime, and max |openvino - onnxruntime| / max |onnxruntime|, the bounds
#: tests/test_graph_parity.py sets against torch's float64. Measured: 3.1e-6 and 3.1e-6 at most
#: (EfficientNet-Lite0's activations; resnet18's input gradients through the MaxPool 1.4e-6).
REL_L2 = 1e-5
MAX_REL = 1e-4
#: (relative L2, max relative) where a case needs other bounds than (REL_L2, MAX_REL), and why.
CASE_BOUNDS = {
    # the DB detector's gradients come back through a Sigmoid saturated on random images (its
    # map below 1.3e-4, the gradients ~1e-8): measured 1.1e-5 and 1.3e-5 on this input (5e-6 on
    # another); against the float64 graph, onnxruntime's are 1.8e-6 and OpenVINO's 3.4e-6 off
    "paddle-det": (3e-5, MAX_REL),
}
#: max |openvino - onnxruntime| of CAM maps (in [0, 1]) through the Explainer and the CLI: the
#: maps' normalisation by their range and GradCAM++'s squared and cubed gradients magnify float32
#: round-off. Measured 3.2e-5 at most (EfficientNet-Lite0's GradCAM++), most methods below 5e-6.
CAM_ATOL = 1e-4
#: The float16 artifact: onnxruntime computes its graph in float16, OpenVINO in float32 (its
#: weights widened; openvino_session.CONFIG), so they differ by float16 round-off, not float32's.
#: Measured: activations 2.7e-4 relative, layer gradient 2.7e-6; uint8 heads 1 level at most.
FP16_RTOL = 2e-3
FP16_LEVELS = 1
#: The DB detector's probability map (Sigmoid) is compared in absolute terms: onnxruntime's float32
#: Sigmoid is exact to ~1e-7 absolute only (camexport.graph.rules.elementwise, _sigmoid), and on
#: random inputs the map lies below 1.3e-4 (measured 9.4e-8 absolute). The score sums it with
#: the target weights: the same bound per unit of sum |weights|.
SIGMOID_ATOL = 1e-6
#: Draws of a case's generator tried for an input on which the runtimes decide alike.
DRAWS = 10

LITE0_METHODS = "gradcam,gradcam++,eigencam,fullgrad"
RESNET_METHODS = ["gradcam", "hirescam", "gradcam++", "xgradcam", "layercam", "eigencam",
                  "eigengradcam", "fullgrad", "guidedbackprop"]


def _resnet18(root: Path, name: str, **options) -> Path:
    import torch
    import torchvision

    from camexport.build import build
    from camexport.load import Preprocessing, from_module

    torch.manual_seed(0)
    module = torchvision.models.resnet18().eval()
    loaded = from_module(module, "resnet18", Preprocessing(size=(SIZE, SIZE)))
    return build(loaded, out_dir=root / name, **options).directory


def _lite0(root: Path) -> Path:
    cli("build", "efficientnet-lite0", "--layer", "bn2", "--layer", "blocks.4", "--methods",
        LITE0_METHODS, "--input-size", SIZE, SIZE, "--out", root / "lite0", "-q")
    return root / "lite0"


def _vit_small(root: Path) -> Path:
    import timm
    import torch

    from camexport.build import build
    from camexport.load import Preprocessing, from_module

    torch.manual_seed(0)
    module = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=SIZE).eval()
    loaded = from_module(module, "vit_small_patch16_224", Preprocessing(size=(SIZE, SIZE)))
    return build(loaded, ["blocks[-1].norm1"], out_dir=root / "vit").directory


def _paddle(root: Path, name: str, size: tuple[int, int], layers: list[str]) -> Path:
    import importlib.util

    from camexport.build import build

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        pytest.skip("rapidocr-onnxruntime is not installed (scripts/setup.sh)")
    source = root / name
    source.write_bytes((Path(spec.submodule_search_locations[0]) / "models" / name).read_bytes())
    return build(str(source), layers, input_size=size, out_dir=root / f"{source.stem}-cam").directory


#: name: how to build it
BUILDS = {
    "resnet18": lambda root: _resnet18(
        root, "resnet18", layers=["layer4", "layer1"], methods=["gradcam", "fullgrad", "guidedbackprop"],
        fuse=["gradcam", "gradcam++", "eigencam"]),
    "resnet18-fp16": lambda root: _resnet18(
        root, "resnet18-fp16", layers=["layer4"], fuse=["gradcam", "eigencam"], fuse_uint8=True,
        precision="fp16"),
    "efficientnet-lite0": lambda root: _lite0(root),
    "vit_small": _vit_small,
    "paddle-cls": lambda root: _paddle(root, "ch_ppocr_mobile_v2.0_cls_infer.onnx", (48, 192), []),
    "paddle-det": lambda root: _paddle(root, "ch_PP-OCRv4_det_infer.onnx", (SIZE, SIZE),
                                       ["p2o.Add.229", "p2o.Concat.1"]),
}
FLOAT32 = [name for name in BUILDS if name != "resnet18-fp16"]


@pytest.fixture(scope="session")
def artifact(tmp_path_factory):
    """name -> the artifact's directory, built on first use."""
    root = tmp_path_factory.mktemp("openvino")
    return cache(lambda name: BUILDS[name](root))


def _with_decisions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The graph with every boolean tensor it computes (ReLU masks, Where conditions) and every
    MaxPool's Indices as extra outputs, and their names."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in inferred.graph.value_info}
    outputs = {o.name for o in model.graph.output}
    indices = {node.output[1] for node in model.graph.node
               if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]}
    names = [name for name, value in known.items() if name not in outputs and
             (value.type.tensor_type.elem_type == TensorProto.BOOL or name in indices)]
    result = onnx.ModelProto()
    result.CopyFrom(model)
    result.graph.output.extend(known[name] for name in names)
    return result, names


@cache
def _probe(directory: Path):
    """(decision names, onnxruntime session, openvino session, image input name, sample shape,
    target row shape) of the artifact's graph with its decisions as outputs."""
    model, _ = read_artifact(directory)
    probe, decisions = _with_decisions(model)
    image = next(i for i in model.graph.input if i.name != "target_weights")
    sample = tuple(d.dim_value for d in image.type.tensor_type.shape.dim[1:])
    weights = next(i for i in model.graph.input if i.name == "target_weights")
    per_sample = tuple(d.dim_value for d in weights.type.tensor_type.shape.dim[1:])
    return (decisions, session(probe, "cpu"), session(probe, "openvino"), image.name, sample,
            per_sample)


def _agreeing_run(directory: Path, batch: int, seed: int = 0, agree: bool = True):
    """(feed, onnxruntime outputs, openvino outputs) of the first draw on which both runtimes take
    the same decisions (with ``agree``); outputs by name, the graph's own only."""
    decisions, cpu, ov, image, sample, per_sample = _probe(directory)
    rng = np.random.default_rng(seed)
    names = [o.name for o in cpu.get_outputs()]
    for _ in range(DRAWS):
        feed = {image: rng.standard_normal((batch, *sample)).astype(np.float32),
                "target_weights": rng.standard_normal((batch, *per_sample)).astype(np.float32)}
        expected = dict(zip(names, cpu.run(None, feed)))
        got = dict(zip(names, ov.run(None, feed)))
        if not agree or all(np.array_equal(expected[d], got[d]) for d in decisions):
            own = [name for name in names if name not in decisions]
            return feed, {n: expected[n] for n in own}, {n: got[n] for n in own}
    raise AssertionError(f"{directory.name}: on each of {DRAWS} inputs the runtimes decide a kink apart")


def _max_rel(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - expected).max() / max(np.abs(expected).max(), 1e-30))


def _rel_l2(got: np.ndarray, expected: np.ndarray) -> float:
    difference = got.astype(np.float64) - expected
    return float(np.linalg.norm(difference) / max(np.linalg.norm(expected.astype(np.float64)), 1e-30))


def _assert_close(got: np.ndarray, expected: np.ndarray, what: str,
                  bounds: tuple[float, float] = (REL_L2, MAX_REL)) -> None:
    errors = _rel_l2(got, expected), _max_rel(got, expected)
    assert errors[0] <= bounds[0] and errors[1] <= bounds[1], (what, errors)


# -- the session itself -------------------------------------------------------------------------

def test_session_answers_like_onnxruntime(artifact):
    """Inputs and outputs as onnxruntime names them (dynamic batch kept), the provider's name."""
    model, _ = read_artifact(artifact("resnet18"))
    cpu, ov = session(model, "cpu"), session(model, "openvino")
    for ours, theirs in ((ov.get_inputs(), cpu.get_inputs()), (ov.get_outputs(), cpu.get_outputs())):
        assert [(a.name, a.shape, a.type) for a in ours] == [(a.name, a.shape, a.type) for a in theirs]
    assert ov.get_providers() == [PROVIDERS["openvino"]] == ["OpenVINO:CPU"]
    assert ov._compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    x = np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    feed = {"x": x, "target_weights": np.zeros((3, 1000), np.float32)}
    both = ov.run(["score", "linear"], feed)
    assert [a.shape for a in both] == [(3,), (3, 1000)]
    one = ov.run(["score"], {"x": x[:1], "target_weights": feed["target_weights"][:1]})[0]
    assert abs(one[0] - both[0][0]) <= REL_L2 * abs(both[0][0])  # another batch size, same model
    with pytest.raises(ProviderError, match="no graph outputs"):
        ov.run(["nothing"], feed)


def test_missing_openvino_names_the_extra(monkeypatch):
    import builtins

    from camexport import openvino_session

    real = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    with pytest.raises(ProviderError, match=r"pip install camexport\[openvino\]"):
        openvino_session.require()


def test_shared_weights_are_untied():
    """The CPU plugin's bug that openvino_session.untie_shared_weights works around: a weight read
    by MatMul(X, W) and by Transpose(W) -> MatMul. Without the copies, measured 1.16 relative."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("W", TensorProto.FLOAT, (16, 16), rng.standard_normal(256))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]),
         helper.make_node("Transpose", ["W"], ["t"], perm=[1, 0]),
         helper.make_node("MatMul", ["g", "t"], ["z"])], "shared",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 16]) for n in ("x", "g")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    feed = {n: rng.standard_normal((4, 16)).astype(np.float32) for n in ("x", "g")}
    expected = session(model, "cpu").run(None, feed)
    for got, value in zip(session(model, "openvino").run(None, feed), expected):
        _assert_close(got, value, "product")


def test_sigmoid_is_exact_where_onnxruntime_is_not():
    """Why the detector's map is compared in absolute terms: against float64, OpenVINO's Sigmoid
    is 2.7e-7 relative on [-20, 10] (measured), onnxruntime's 1e-5 on [-5, 10] and worse below."""
    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"])], "sigmoid",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = np.linspace(-20, 10, 30001, dtype=np.float32)
    exact = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert np.max(np.abs(session(model, "openvino").run(None, {"x": x})[0] - exact) / exact) <= 1e-6
    assert np.max(np.abs(session(model, "cpu").run(None, {"x": x})[0] - exact) / exact) > 1e-6


# -- augmented graphs ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", FLOAT32)
def test_graph_outputs_match_onnxruntime(artifact, name):
    """Every output of the augmented graph (model outputs, activations, gradients, the input
    gradients through MaxPool's Indices, fused heads) at batch 2 and 1, with random target rows."""
    directory = artifact(name)
    model, manifest = read_artifact(directory)
    check_graph(model, "openvino")  # MaxPool's Indices are not refused: OpenVINO gets them right
    model_output = manifest["score"]["output"]
    for batch in (2, 1):
        feed, expected, got = _agreeing_run(directory, batch)
        weights = np.abs(feed["target_weights"]).reshape(batch, -1)
        for output, value in expected.items():
            assert got[output].dtype == value.dtype and got[output].shape == value.shape, output
            error = np.abs(got[output] - value).max()
            if name == "paddle-det" and output in (model_output, "score"):  # (module docstring)
                assert error <= SIGMOID_ATOL * (1 if output == model_output else weights.sum(1).max())
            elif output == "score":  # sum of w y over the classes: relative to sum |w y|
                scale = (weights * np.abs(expected[model_output]).reshape(batch, -1)).sum(1)
                assert np.all(np.abs(got[output] - value) <= REL_L2 * scale), output
            else:
                _assert_close(got[output], value, output, CASE_BOUNDS.get(name, (REL_L2, MAX_REL)))


def test_float16_artifact_within_float16_round_off(artifact):
    directory = artifact("resnet18-fp16")
    _, expected, got = _agreeing_run(directory, 2, agree=False)
    for output, value in expected.items():
        assert got[output].dtype == value.dtype, output
        if value.dtype == np.uint8:
            assert np.abs(got[output].astype(int) - value).max() <= FP16_LEVELS, output
        else:
            assert _max_rel(got[output], value) <= FP16_RTOL, (output, _max_rel(got[output], value))


# -- CAM maps through the Explainer and the CLI -------------------------------------------------

def test_explainer_cams_match(artifact):
    directory = artifact("resnet18")
    feed, *_ = _agreeing_run(directory, 2)
    x = feed["x"]
    cpu, ov = Explainer(directory, "cpu"), Explainer(directory, "openvino")
    assert ov.provider_name == "OpenVINO:CPU"
    expected = cpu(x, [3, 7], RESNET_METHODS)
    got = ov(x, [3, 7], RESNET_METHODS)
    _assert_close(got.outputs, expected.outputs, "outputs")
    _assert_close(ov.forward(x[:1]), cpu.forward(x[:1]), "plain graph")  # ScoreCAM's passes
    for method in RESNET_METHODS:
        error = np.abs(got.cams[method] - expected.cams[method]).max()
        assert error <= CAM_ATOL * max(1.0, np.abs(expected.cams[method]).max()), (method, error)


@pytest.mark.parametrize("name", ["vit_small", "paddle-cls"])
def test_explainer_gradcam_matches(artifact, name):
    directory = artifact(name)
    feed, *_ = _agreeing_run(directory, 2)
    image = next(k for k in feed if k != "target_weights")
    methods = ["gradcam", "gradcam++", "layercam"]
    expected = Explainer(directory, "cpu")(feed[image], None, methods)
    got = Explainer(directory, "openvino")(feed[image], None, methods)
    for method in methods:
        assert np.abs(got.cams[method] - expected.cams[method]).max() <= CAM_ATOL, method


def test_cli_run_matches(artifact, tmp_path):
    """``camexport run --provider openvino`` on EfficientNet-Lite0: the same CAMs, outputs and
    targets as ``--provider cpu``; the provider recorded in the results."""
    directory = artifact("efficientnet-lite0")
    feed, *_ = _agreeing_run(directory, 3)
    data = tmp_path / "images.h5"
    with h5py.File(data, "w") as h5:
        h5["images"] = feed["x"]
    results = {}
    for provider in ("cpu", "openvino"):
        out = tmp_path / f"{provider}.h5"
        cli("run", directory, "--data", data, "--out", out, "--methods", LITE0_METHODS,
            "--provider", provider, "--batch-size", 2, "-q")
        results[provider] = ResultReader(out)
    cpu, ov = results["cpu"], results["openvino"]
    with cpu, ov:
        assert ov.attrs["provider"] == "OpenVINO:CPU"
        np.testing.assert_array_equal(ov.targets(), cpu.targets())
        _assert_close(ov.outputs(), cpu.outputs(), "outputs")
        for method in LITE0_METHODS.split(","):
            assert np.abs(ov.cams(method) - cpu.cams(method)).max() <= CAM_ATOL, method


def test_deploy_example_on_openvino(artifact, tmp_path):
    """scripts/deploy_example.py --runtime openvino: OpenVINO, numpy and OpenCV only; the same
    uint8 overlays as with onnxruntime but for a level of the float16 graph's round-off."""
    import cv2

    directory = artifact("resnet18-fp16")
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(2)
    cv2.imwrite(str(frames / "frame.png"), rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    written = {}
    for runtime in ("onnxruntime", "openvino"):
        out = tmp_path / runtime
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "deploy_example.py"), str(directory),
                                 str(frames), "--out", str(out), "--runtime", runtime],
                                check=False, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        line = next(row for row in result.stdout.splitlines() if row.startswith("third-party modules"))
        modules = set(line.split(": ", 1)[1].split(", "))
        assert runtime in modules and ({"onnxruntime", "openvino"} - {runtime}).isdisjoint(modules)
        assert "torch" not in modules and "camexport" not in modules
        written[runtime] = {p.name: cv2.imread(str(p)) for p in sorted(out.iterdir())}
    assert written["openvino"].keys() == written["onnxruntime"].keys() and len(written["openvino"]) == 2
    for name, image in written["openvino"].items():
        assert image.shape == (90, 120, 3)
        assert np.abs(image.astype(int) - written["onnxruntime"][name]).mean() <= 1, name
