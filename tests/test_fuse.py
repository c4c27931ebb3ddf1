"""Fused CAM heads (camexport/graph/fuse.py), the float16 export and the deployment example.

One seeded resnet18 at 64x64 is built once through the CLI with every fusable method on two
layers: ``layer4`` (2x2 positions, 512 channels: EigenCAM works on the positions' Gram matrix)
and ``layer1`` (16x16 positions, 64 channels: on the channels' Gram matrix).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
import torchvision
from click.testing import CliRunner
from onnx import TensorProto, helper

from camexport.artifact import read_artifact
from camexport.build import build
from camexport.cli import main
from camexport.explain import Explainer
from camexport.graph.fuse import cam_name, fuse, is_head_node
from camexport.layout import infer_layout
from camexport.methods import FUSABLE as HEADS
from camexport.methods import method
from camexport.methods.inputs import CamInputs
from camexport.methods.pipeline import aggregate, layer_map, to_channel_first
from camexport.precision import measure_drift, to_float16
from camexport.runtime import session

pytestmark = pytest.mark.xdist_group("fuse")

SIZE = 64
LAYERS = ("layer4", "layer1")
GRADIENT_METHODS = [m for m in HEADS if m != "eigencam"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fused_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().eval().state_dict(), root / "r18.pt")
    out = root / "r18-fused"
    args = ["build", str(root / "r18.pt"), "--arch", "resnet18", "--input-size", str(SIZE), str(SIZE),
            "--out", str(out), "-q", "--fuse", ",".join(HEADS)]
    for layer in LAYERS:
        args += ["--layer", layer]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "fused head cam/eigencam/layer1 (float32)" in result.output
    return out


@pytest.fixture(scope="session")
def images():
    return np.random.default_rng(0).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    run = session(model)
    names = [o.name for o in run.get_outputs()]
    return dict(zip(names, run.run(None, {run.get_inputs()[0].name: x, "target_weights": weights})))


@pytest.fixture(scope="session")
def fused(fused_artifact, images):
    """(graph, manifest, outputs on the batch with each image's top class, explainer)."""
    model, manifest = read_artifact(fused_artifact)
    outputs = _run(model, images, np.zeros((len(images), 1000), np.float32))
    return model, manifest, outputs, Explainer(fused_artifact)


def _single_layer(inputs: CamInputs, layer: int) -> CamInputs:
    return CamInputs(x=inputs.x, outputs=inputs.outputs, targets=inputs.targets,
                     activations=[inputs.activations[layer]], gradients=[inputs.gradients[layer]])


def test_heads_table_matches_the_methods():
    """Fused heads use the registry's names and the offline methods' epsilons."""
    from camexport.graph import fuse as heads
    from camexport.methods import METHODS, gradient, pipeline

    assert set(HEADS) <= set(METHODS)
    assert (heads.NORM_EPS, heads.GRADCAM_PP_EPS, heads.XGRADCAM_EPS) == (
        pipeline.NORM_EPS, gradient.GRADCAM_PP_EPS, gradient.XGRADCAM_EPS)


def test_manifest_and_graph(fused):
    model, manifest, outputs, _ = fused
    expected = [cam_name(m, layer) for m in HEADS for layer in (*LAYERS, None)]
    assert manifest["fused"]["outputs"] == expected
    assert manifest["fused"]["methods"] == list(HEADS)
    assert manifest["fused"]["dtype"] == "float32"
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    for name in expected:
        assert outputs[name].shape == (4, SIZE, SIZE) and outputs[name].dtype == np.float32
        # pgc's final n(): min exactly 0, max m / (m + 1e-7) just under 1
        assert outputs[name].min(axis=(1, 2)).max() == 0.0
        np.testing.assert_allclose(outputs[name].max(axis=(1, 2)), 1.0, atol=2e-6)


# tolerance: max |delta| of final maps in [0, 1]; measured 1.4e-6 at most (ordering of float32
# sums; numpy sums spatial axes pairwise, onnxruntime does not)
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_heads_match_offline_methods(fused, images, name):
    _, _, outputs, explainer = fused
    offline = explainer(images, None, [name]).cams[name]
    np.testing.assert_allclose(outputs[cam_name(name)], offline, rtol=0, atol=1e-4)
    inputs = explainer.inputs(images)
    for layer, label in enumerate(LAYERS):
        single = method(name)(_single_layer(inputs, layer))
        np.testing.assert_allclose(outputs[cam_name(name, label)], single, rtol=0, atol=1e-4)


def test_gradient_heads_with_class_targets(fused, images):
    model, _, _, explainer = fused
    classes = [3, 7, 11, 500]
    outputs = _run(model, images, np.eye(1000, dtype=np.float32)[classes])
    offline = explainer(images, classes, GRADIENT_METHODS).cams
    for name in GRADIENT_METHODS:
        np.testing.assert_allclose(outputs[cam_name(name)], offline[name], rtol=0, atol=1e-4,
                                   err_msg=name)


def _eigen_maps(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 SVD projection per image with the fused sign (sum_c v_c >= 0), and whether
    numpy's own (LAPACK, float32: what pgc and the offline EigenCAM use) sign agrees with it."""
    maps, agrees = [], []
    for item in acts:
        rows = item.reshape(item.shape[0], -1).T
        _, _, vt32 = np.linalg.svd(rows - rows.mean(axis=0), full_matrices=False)
        rows = rows.astype(np.float64) - rows.astype(np.float64).mean(axis=0)
        _, _, vt = np.linalg.svd(rows, full_matrices=False)
        v = vt[0] if vt[0].sum() >= 0 else -vt[0]
        maps.append((rows @ v).reshape(item.shape[1:]))
        agrees.append(vt32[0].sum() >= 0)
    return np.asarray(maps, np.float32), np.asarray(agrees)


def test_eigencam_head_sign_convention_and_parity(fused, images):
    _, _, outputs, explainer = fused
    inputs = explainer.inputs(images)
    per_layer, agree = [], np.ones(len(images), bool)
    for layer, label in enumerate(LAYERS):
        maps, agrees = _eigen_maps(inputs.activations[layer])
        per_layer.append(layer_map(maps, (SIZE, SIZE)))
        agree &= agrees
        # the fused sign convention, against a float64 SVD: measured 3.6e-7
        np.testing.assert_allclose(outputs[cam_name("eigencam", label)], aggregate([per_layer[-1]]),
                                   rtol=0, atol=1e-5)
        # the opposite sign gives another map: the convention is really tested
        flipped = aggregate([layer_map(-maps, (SIZE, SIZE))])
        assert np.abs(outputs[cam_name("eigencam", label)] - flipped).max() > 0.3
    np.testing.assert_allclose(outputs[cam_name("eigencam")], aggregate(per_layer), rtol=0, atol=1e-5)
    # where numpy's LAPACK sign is the convention's, the head is the offline EigenCAM (pgc's)
    assert agree.sum() >= 1
    offline = explainer(images, None, ["eigencam"]).cams["eigencam"]
    np.testing.assert_allclose(outputs[cam_name("eigencam")][agree], offline[agree], rtol=0, atol=1e-5)


def test_eigencam_squarings(fused, images):
    """2**k-th power of the Gram matrix: k = 4 is not converged on these layers (measured
    max |delta| 5.7e-3 on layer4, whose s2/s1 reach 0.88), k = 6 is (2.4e-7; 1e-5 is first
    reached at k = 5 on layer1, s2/s1 <= 0.82, and k = 6 on layer4)."""
    model, manifest, _, explainer = fused
    inputs = explainer.inputs(images)
    expected = [aggregate([layer_map(_eigen_maps(a)[0], (SIZE, SIZE))]) for a in inputs.activations]
    errors = {}
    for squarings in (4, 6):
        few, _ = fuse(_without_heads(model), manifest["layers"], ["eigencam"],
                      squarings=squarings)
        got = _run(few, images, np.zeros((len(images), 1000), np.float32))
        errors[squarings] = max(np.abs(got[cam_name("eigencam", label)] - want).max()
                                for label, want in zip(LAYERS, expected))
    assert errors[4] > 1e-3
    assert errors[6] <= 1e-5


def test_uint8_heads(fused, images):
    model, manifest, outputs, _ = fused
    quantised, entry = fuse(_without_heads(model), manifest["layers"], ["gradcam", "eigencam"],
                            uint8=True)
    assert entry["dtype"] == "uint8"
    got = _run(quantised, images, np.zeros((len(images), 1000), np.float32))
    for name in entry["outputs"]:
        assert got[name].dtype == np.uint8
        # round(255 cam): at most one level from the float head (rounding of near-halves)
        delta = np.abs(got[name].astype(np.int16) - np.round(outputs[name] * 255).astype(np.int16))
        assert delta.max() <= 1
        assert got[name].max() == 255


def _without_heads(augmented_and_fused: onnx.ModelProto) -> onnx.ModelProto:
    """The augmented graph without its fused heads (fuse() refuses nothing, but adding heads
    twice would duplicate output names)."""
    model = onnx.ModelProto()
    model.CopyFrom(augmented_and_fused)
    keep = [n for n in model.graph.node if not is_head_node(n)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    outputs = [o for o in model.graph.output if not o.name.startswith("cam/")]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    return model


def test_resize_matches_opencv():
    """ONNX Resize (linear, half_pixel, no antialias) against cv2.resize INTER_LINEAR on maps in
    [0, 1], up and down: measured max |delta| 1.1e-6 (12x20 -> 13x9), 1.2e-7 for 2x2 -> 64x64."""
    graph = helper.make_graph(
        [helper.make_node("Resize", ["x", "", "", "s"], ["y"], mode="linear",
                          coordinate_transformation_mode="half_pixel")], "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, "h", "w"]),
         helper.make_tensor_value_info("s", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    run = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    rng = np.random.default_rng(0)
    for (h, w), (height, width), tolerance in [((2, 2), (64, 64), 5e-7), ((7, 7), (224, 224), 5e-7),
                                               ((3, 5), (37, 61), 1e-6), ((9, 9), (7, 7), 1e-6),
                                               ((12, 20), (13, 9), 2e-6)]:
        maps = rng.random((3, h, w), dtype=np.float32)
        got = run.run(None, {"x": maps[:, None], "s": np.array([3, 1, height, width])})[0][:, 0]
        want = np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in maps])
        assert np.abs(got - want).max() <= tolerance, (h, w, height, width)


def _layout_model(shape: tuple[int, ...]) -> onnx.ModelProto:
    """A stand-in augmented graph whose activation/gradient for layer "l" are inputs."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 32, 32]),
              helper.make_tensor_value_info("a", TensorProto.FLOAT, ["b", *shape[1:]]),
              helper.make_tensor_value_info("g", TensorProto.FLOAT, ["b", *shape[1:]])]
    nodes = [helper.make_node("Identity", ["a"], ["activation/l"]),
             helper.make_node("Identity", ["g"], ["gradient/l"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", *shape[1:]])
               for n in ("activation/l", "gradient/l")]
    return helper.make_model(helper.make_graph(nodes, "stand-in", inputs, outputs),
                             opset_imports=[helper.make_opsetid("", 20)])


# token (ViT, one class token, 4x4 grid) and channel-last (Swin) layers, reshaped in the graph as
# pgc's reshape transforms: same tolerance as the CNN heads
@pytest.mark.parametrize("shape", [(2, 17, 24), (2, 4, 4, 24)], ids=["tokens", "NHWC"])
def test_token_and_channel_last_layers(shape):
    rng = np.random.default_rng(1)
    acts = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    grads = rng.standard_normal(shape).astype(np.float32) * np.float32(1e-2)
    layout = infer_layout((None, *shape[1:]))
    model, _ = fuse(_layout_model(shape), [{"name": "l", "layout": layout}], list(HEADS))
    run = session(model)
    x = np.zeros((shape[0], 3, 32, 32), np.float32)
    got = dict(zip([o.name for o in run.get_outputs()], run.run(None, {"x": x, "a": acts, "g": grads})))
    inputs = CamInputs(x=x, outputs=np.zeros((shape[0], 10), np.float32), targets=[None] * shape[0],
                       activations=[to_channel_first(acts, layout)],
                       gradients=[to_channel_first(grads, layout)])
    for name in GRADIENT_METHODS:
        np.testing.assert_allclose(got[cam_name(name, "l")], method(name)(inputs), rtol=0, atol=1e-4,
                                   err_msg=name)
    maps, _ = _eigen_maps(inputs.activations[0])
    np.testing.assert_allclose(got[cam_name("eigencam", "l")],
                               aggregate([layer_map(maps, (32, 32))]), rtol=0, atol=1e-5)


def test_unsupported_layouts_and_methods_are_refused():
    with pytest.raises(ValueError, match="fused heads support NCHW"):
        fuse(_layout_model((2, 3, 4, 4, 4)), [{"name": "l", "layout": {"kind": "NCDHW"}}], ["gradcam"])
    with pytest.raises(ValueError, match="cannot fuse"):
        fuse(_layout_model((2, 8, 4, 4)), [{"name": "l", "layout": {"kind": "NCHW"}}], ["scorecam"])
    # refused before the model is even loaded
    with pytest.raises(ValueError, match=r"cannot fuse \['scorecam'\]"):
        build("no-such-model.pt", ["layer4"], fuse="gradcam,scorecam")


def test_float16_runs_on_cpu_within_drift(fused, images):
    """Model, backward pass and activations in float16, heads and I/O in float32. Measured on this
    random-weight resnet18 (4 images, 21 heads): max |delta| 1.7e-2 (a layer1 head; 1.1e-2 at
    most for the two-layer heads), min per-image correlation 0.99953."""
    model, manifest, _, _ = fused
    with pytest.raises(ValueError, match="before fusing"):
        to_float16(model)
    unfused = _without_heads(model)
    reference, _ = fuse(unfused, manifest["layers"], list(HEADS))
    half, _ = fuse(to_float16(unfused), manifest["layers"], list(HEADS))
    read_by_model = {name for node in half.graph.node if not is_head_node(node) for name in node.input}
    read_by_heads = {name for node in half.graph.node if is_head_node(node) for name in node.input}
    weights = {t.name: t.data_type for t in half.graph.initializer if len(t.dims) > 1}
    assert {weights[name] for name in weights.keys() & read_by_model} == {TensorProto.FLOAT16}
    assert {weights[name] for name in weights.keys() & read_by_heads} == {TensorProto.FLOAT}
    assert {o.type.tensor_type.elem_type for o in half.graph.output} == {TensorProto.FLOAT}
    report = measure_drift(reference, half, batch=4)
    heads = {name: entry for name, entry in report.items() if name.startswith("cam/")}
    assert len(heads) == len(HEADS) * 3
    for name, entry in heads.items():
        assert entry["max_abs"] <= 5e-2, name
        assert entry["correlation_min"] >= 0.999, name
    assert max(entry["max_abs"] for entry in heads.values()) > 1e-4  # really another precision


@pytest.fixture(scope="session")
def deploy_artifact(fused_artifact, tmp_path_factory):
    """A one-layer float16 artifact with uint8 GradCAM and EigenCAM heads, built by the CLI."""
    out = tmp_path_factory.mktemp("deploy") / "r18-uint8"
    result = CliRunner().invoke(main, [
        "build", str(fused_artifact.parent / "r18.pt"), "--arch", "resnet18", "--layer", "layer4",
        "--input-size", str(SIZE), str(SIZE), "--out", str(out), "-q", "--fuse", "gradcam,eigencam",
        "--fuse-uint8", "--precision", "fp16"])
    assert result.exit_code == 0, result.output
    assert "fused head cam/eigencam/layer4 (uint8)" in result.output
    assert "fp16 drift cam/gradcam/layer4: max |delta|" in result.output
    return out


def test_float16_uint8_build(deploy_artifact, images):
    model, manifest = read_artifact(deploy_artifact)
    assert manifest["precision"] == "fp16" and manifest["fused"]["dtype"] == "uint8"
    # drift of uint8 heads is in levels of 1/255 (measured 1 level)
    assert manifest["fp16_drift"]["cam/gradcam/layer4"]["max_abs"] <= 5
    assert manifest["fp16_drift"]["cam/eigencam/layer4"]["correlation_min"] >= 0.999
    outputs = _run(model, images, np.zeros((len(images), 1000), np.float32))
    assert outputs["cam/gradcam/layer4"].dtype == np.uint8
    assert outputs["cam/gradcam/layer4"].max(axis=(1, 2)).tolist() == [255] * len(images)


def test_deploy_example_without_torch(deploy_artifact, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(2)
    sizes = {"webcam.jpg": (480, 640), "small.png": (120, 90)}
    for name, (height, width) in sizes.items():
        cv2.imwrite(str(frames / name), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    out = tmp_path / "overlays"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "deploy_example.py"),
                             str(deploy_artifact), str(frames), "--out", str(out)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch loaded: False; camexport loaded: False" in result.stdout
    line = next(row for row in result.stdout.splitlines() if row.startswith("third-party modules"))
    modules = line.split(": ", 1)[1].split(", ")
    assert set(modules) <= {"cv2", "numpy", "onnxruntime"}
    written = sorted(out.iterdir())
    assert len(written) == len(sizes) * 2
    for path in written:
        height, width = sizes["webcam.jpg" if path.name.startswith("webcam") else "small.png"]
        assert cv2.imread(str(path)).shape == (height, width, 3)
