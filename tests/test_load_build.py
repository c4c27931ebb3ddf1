"""Loading every accepted model format, `camexport build`/`inspect`, and their errors."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import onnx
import pytest
import torch
import torchvision
from click.testing import CliRunner
from onnx import TensorProto, helper

from camexport.artifact import AUGMENTED_FILE, MANIFEST_FILE, PLAIN_FILE
from camexport.build import build
from camexport.cli import main
from camexport.eager import activations_and_gradients
from camexport.graph import GradientError, augment, get_manifest
from camexport.graph.locate import LayerError
from camexport.runtime import ProviderError, check_graph, session

SIZE = 64


@pytest.fixture(scope="session")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="session")
def files(resnet18, tmp_path_factory):
    """resnet18 saved in every format camexport reads."""
    root = tmp_path_factory.mktemp("models")
    example = torch.randn(2, 3, SIZE, SIZE)
    paths = {"state_dict": root / "r18.pt", "pickle": root / "r18.full.pt",
             "torchscript": root / "r18.ts.pt", "program": root / "r18.pt2"}
    torch.save(resnet18.state_dict(), paths["state_dict"])
    torch.save(resnet18, paths["pickle"])
    torch.jit.trace(resnet18, example).save(str(paths["torchscript"]))
    program = torch.export.export(resnet18, (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    torch.export.save(program, str(paths["program"]))
    return paths


def _check_against_torch(graph_path, module, layer_label, layer_module):
    """The artifact's graph runs at batch 1 and 3 and matches torch eager."""
    model = onnx.load(str(graph_path))
    run = session(model)
    input_name = run.get_inputs()[0].name
    for batch in (1, 3):
        rng = np.random.default_rng(batch)
        x = rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
        weights = np.eye(1000, dtype=np.float32)[rng.integers(0, 1000, batch)]
        names = [o.name for o in run.get_outputs()]
        got = dict(zip(names, run.run(None, {input_name: x, "target_weights": weights})))
        outputs, _, grads = activations_and_gradients(module, x, [layer_module], weights,
                                                      dtype=torch.float64)
        assert np.abs(got[names[0]] - outputs).max() <= 1e-4 * np.abs(outputs).max()
        grad = got[f"gradient/{layer_label}"]
        ref = grads[layer_module]
        assert np.linalg.norm(grad - ref) / np.linalg.norm(ref) <= 1e-5


@pytest.mark.parametrize("kind,options,layer,label", [
    ("state_dict", ["--arch", "resnet18"], "layer4[-1]", "layer4.1"),
    ("pickle", ["--trust-pickle"], "layer4.1", "layer4.1"),
    ("torchscript", [], "layer4", "layer4"),
    ("program", [], "layer4.1", "layer4.1"),
])
def test_build_each_format(kind, options, layer, label, files, resnet18, tmp_path):
    out = tmp_path / "artifact"
    result = CliRunner().invoke(main, ["build", str(files[kind]), "--layer", layer, "--out", str(out),
                                       "--input-size", str(SIZE), str(SIZE), *options])
    assert result.exit_code == 0, result.output
    assert re.search(r"built .* in \d+\.\d+s", result.output)
    for name in (AUGMENTED_FILE, PLAIN_FILE, MANIFEST_FILE):
        assert (out / name).is_file()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    # manifest.json: the graph's manifest plus the graph's own digest (camexport.artifact)
    graph_sha256 = manifest.pop("graph_sha256")
    assert graph_sha256 == hashlib.sha256((out / AUGMENTED_FILE).read_bytes()).hexdigest()
    assert manifest == get_manifest(onnx.load(str(out / AUGMENTED_FILE)))
    assert manifest["layers"][0]["name"] == label
    expected = {"program": "exported_program", "pickle": "pickled_module"}.get(kind, kind)
    assert manifest["source"]["kind"] == expected
    _check_against_torch(out / AUGMENTED_FILE, resnet18, label, "layer4")


def test_pickled_module_refused_by_default(files, tmp_path):
    out = tmp_path / "artifact"
    result = CliRunner().invoke(main, ["build", str(files["pickle"]), "--layer", "layer4", "--out", str(out)])
    assert result.exit_code != 0
    assert "--trust-pickle" in result.output and "arbitrary code" in result.output
    assert not out.exists()


def test_state_dict_needs_arch_and_matching_weights(files, tmp_path):
    out = tmp_path / "artifact"
    runner = CliRunner()
    missing = runner.invoke(main, ["build", str(files["state_dict"]), "--layer", "layer4", "--out", str(out)])
    assert missing.exit_code != 0 and "--arch" in missing.output
    wrong = runner.invoke(main, ["build", str(files["state_dict"]), "--arch", "resnet34", "--layer",
                                 "layer4", "--out", str(out)])
    assert wrong.exit_code != 0 and "do not fit --arch resnet34" in wrong.output
    unknown = runner.invoke(main, ["build", str(files["state_dict"]), "--arch", "resnet_9000", "--layer",
                                   "layer4", "--out", str(out)])
    assert unknown.exit_code != 0 and "unknown --arch" in unknown.output
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".pt", ".onnx", ".pt2"])
def test_truncated_file_gives_clear_error_and_writes_nothing(files, tmp_path, suffix):
    source = {".pt": files["state_dict"], ".pt2": files["program"]}.get(suffix)
    if source is None:  # a real ONNX file, cut in half
        source = tmp_path / "whole.onnx"
        model = helper.make_model(helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        ))
        onnx.save(model, str(source))
    data = source.read_bytes()
    broken = tmp_path / f"broken{suffix}"
    broken.write_bytes(data[: len(data) // 2])
    out = tmp_path / "artifact"
    result = CliRunner().invoke(main, ["build", str(broken), "--arch", "resnet18", "--layer", "layer4",
                                       "--out", str(out)])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert re.search(r"truncated|corrupt|not a|does not load", result.output), result.output
    assert not out.exists()


def test_unknown_layer_lists_closest_names(files, tmp_path):
    out = tmp_path / "artifact"
    result = CliRunner().invoke(main, ["build", str(files["state_dict"]), "--arch", "resnet18",
                                       "--layer", "layer4.7", "--out", str(out),
                                       "--input-size", str(SIZE), str(SIZE)])
    assert result.exit_code != 0
    assert "no layer named 'layer4.7'" in result.output
    assert "layer4.1" in result.output and "layer4.0" in result.output
    assert not out.exists()


def test_module_called_twice_is_ambiguous():
    from zoo import exported

    _, plain = exported("resnet50")
    from camexport.graph.locate import resolve

    with pytest.raises(LayerError, match=r"hands 3 tensors.*Pass one tensor name"):
        resolve(plain, "layer4.2.relu")


def _tiny_graph(op: str) -> onnx.ModelProto:
    """x -> Conv -> (layer 'feat') -> op -> ReduceMean -> Gemm -> logits."""
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        onnx.numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "fc"),
        onnx.numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["feat"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(op, ["feat"], ["bent"], name="the_odd_one"),
        helper.make_node("ReduceMean", ["bent", "axes"], ["pooled"], keepdims=0, name="pool"),
        helper.make_node("Gemm", ["pooled", "fc"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(nodes, "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_op_without_rule_names_op_node_and_layer():
    with pytest.raises(GradientError) as err:
        augment(_tiny_graph("Cos"), {"feat": "feat"})
    message = str(err.value)
    assert "'Cos'" in message and "'the_odd_one'" in message and "feat" in message


def test_onnx_file_with_tensor_name_layer(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny_graph("Sigmoid"), str(path))
    result = CliRunner().invoke(main, ["build", str(path), "--layer", "feat", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    model = onnx.load(str(tmp_path / "a" / AUGMENTED_FILE))
    assert {n.domain for n in model.graph.node} <= {""}
    # gradient of sum(w * logits) w.r.t. feat, against finite differences of the plain graph
    plain = session(_tiny_graph("Sigmoid"))
    run = session(model)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    weights = rng.standard_normal((2, 5)).astype(np.float32)
    grad, feat = run.run(["gradient/feat", "activation/feat"], {"x": x, "target_weights": weights})
    sigmoid = 1 / (1 + np.exp(-feat.astype(np.float64)))
    fc = onnx.numpy_helper.to_array(_tiny_graph("Sigmoid").graph.initializer[1]).astype(np.float64)
    expected = (weights.astype(np.float64) @ fc.T)[:, :, None, None] * sigmoid * (1 - sigmoid) / 64
    assert np.abs(grad - expected).max() <= 1e-6 * np.abs(expected).max() + 1e-9
    assert plain is not None


def test_inspect_lists_layers_and_artifact(files, tmp_path):
    runner = CliRunner()
    listing = runner.invoke(main, ["inspect", str(files["state_dict"]), "--arch", "resnet18"])
    assert listing.exit_code == 0, listing.output
    assert re.search(r"layer4\.1\s+\(N, 512, 7, 7\)", listing.output)
    out = tmp_path / "a"
    build(str(files["state_dict"]), ["layer3"], arch="resnet18", out_dir=out)
    shown = runner.invoke(main, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.output)
    names = [name for name, _ in info["outputs"]]
    assert names == ["linear", "score", "activation/layer3", "gradient/layer3"]
    assert [name for name, _ in info["inputs"]] == ["x", "target_weights"]
    assert info["manifest"]["layers"][0]["shape"] == [None, 256, 14, 14]


def test_build_without_maxpool_indices_gives_the_same_gradients(files, tmp_path):
    """--no-maxpool-indices (TensorRT has no MaxPool Indices output): no MaxPool node of the
    augmented graph has a second output, and the input gradient through resnet18's stem MaxPool
    (FullGrad's) equals the default rule's to float32 round-off (the same gradients summed in
    another order: measured max |diff| 1.9e-9 on values up to 1.1e-2)."""
    runner = CliRunner()
    built = {}
    for flag in ([], ["--no-maxpool-indices"]):
        out = tmp_path / ("compare" if flag else "indices")
        result = runner.invoke(main, ["build", str(files["state_dict"]), "--arch", "resnet18", "--layer",
                                      "layer4", "--methods", "fullgrad", "--input-size", "64", "64",
                                      "--out", str(out), "-q", *flag])
        assert result.exit_code == 0, result.output
        model = onnx.load(str(out / AUGMENTED_FILE))
        outputs = [len([o for o in n.output if o]) for n in model.graph.node if n.op_type == "MaxPool"]
        assert (max(outputs) == 1) if flag else (2 in outputs)
        assert get_manifest(model)["maxpool_gradient"] == ("comparison" if flag else "indices")
        built[bool(flag)] = model
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    weights = np.eye(1000, dtype=np.float32)[[3, 7]]
    ran = [session(built[key]).run(["gradient/input"], {"x": x, "target_weights": weights})[0]
           for key in (False, True)]
    assert np.abs(ran[0]).max() > 0
    print(f"maxpool by comparison: max |diff| {np.abs(ran[1] - ran[0]).max():.1e} "
          f"of {np.abs(ran[0]).max():.1e}")
    np.testing.assert_allclose(ran[1], ran[0], rtol=0, atol=1e-6 * np.abs(ran[0]).max())
    # the CUDA provider gets MaxPool's Indices wrong (measured on an H200, runtime.check_graph):
    # the Indices graph is refused there with the fix, the comparison graph is not
    check_graph(built[False], "cpu")
    check_graph(built[True], "cuda")
    with pytest.raises(ProviderError, match="--no-maxpool-indices"):
        check_graph(built[False], "cuda")


class _TwoHeads(torch.nn.Module):
    """A model with a tuple output: class logits and a 4-value regression head."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU())
        self.classes = torch.nn.Linear(16, 10)
        self.boxes = torch.nn.Linear(16, 4)

    def forward(self, x):
        pooled = self.features(x).mean(dim=(2, 3))
        return self.classes(pooled), self.boxes(pooled)


def test_output_picks_which_output_the_score_uses(tmp_path):
    """--output NAME on a model with several outputs: the score reads that output, the gradients
    are those of torch's second head, every output stays a graph output; an unknown name is a
    clear error naming the outputs."""
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    torch.save(model, tmp_path / "two.pt")
    first = build(str(tmp_path / "two.pt"), ["features.3"], trust_pickle=True, input_size=(16, 16),
                  out_dir=tmp_path / "first")
    names = first.manifest["outputs"]
    assert len(names) == 2 and first.manifest["score"]["output"] == names[0]
    second = build(str(tmp_path / "two.pt"), ["features.3"], trust_pickle=True, input_size=(16, 16),
                   out_dir=tmp_path / "second", output=names[1])
    assert second.manifest["score"]["output"] == names[1]
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    weights = np.float32([[1, 0, 0, 0], [0, 0, 2, -1]])
    ran = session(onnx.load(str(second.graph_path))).run(None, {"x": x, "target_weights": weights})
    got = dict(zip([o.name for o in onnx.load(str(second.graph_path)).graph.output], ran))

    class Second(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, batch):
            return self.inner(batch)[1]

    outputs, _, grads = activations_and_gradients(Second(), x, ["inner.features.3"], weights)
    np.testing.assert_allclose(got[names[1]], outputs, atol=1e-5)
    np.testing.assert_allclose(got["gradient/features.3"], grads["inner.features.3"], atol=1e-5)
    assert np.abs(grads["inner.features.3"]).max() > 1e-3
    with pytest.raises(ValueError, match="has no output 'nope'"):
        build(str(tmp_path / "two.pt"), ["features.3"], trust_pickle=True, input_size=(16, 16),
              out_dir=tmp_path / "bad", output="nope")


class _OneValuePerImage(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))[:, 0]


def test_rank_one_output_is_refused_with_the_fix(tmp_path):
    """A model returning (batch,) (pgc only explains it with BinaryClassifierOutputTarget) gets a
    clear error naming the fix, and no artifact."""
    torch.save(_OneValuePerImage().eval(), tmp_path / "one.pt")
    with pytest.raises(ValueError, match=r"one value per image \(batch,\).*unsqueeze\(1\)"):
        build(str(tmp_path / "one.pt"), ["features.1"], trust_pickle=True, input_size=(16, 16),
              out_dir=tmp_path / "one")
    assert not (tmp_path / "one").exists()
