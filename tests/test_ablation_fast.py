"""camexport.graph.ablate: AblationCAM's tail with rank-1 updates.

The rank-1 tail (one product of the layer per run, a rank-1 correction per ablated channel)
against the plain tail on the ablated copies, run by onnxruntime. Tolerances: model outputs
within 1e-5 of the largest |output| (the corrected product sums the same terms in another
order: float32 round-off of |v W[c]|, v ~ -1e7, reaches the outputs damped by the rest of the
tail), CAMs (maps in [0, 1]) within 1e-5. Cases: small ONNX graphs (MatMul, Gemm with transB
and alpha, a 1 x 1 Conv, the product carried through bias, Reshape, Transpose, Slice and
Squeeze, a reader of the layer that is not linear next to a linear one, a
value from before the layer read whole), the graphs the rewrite must refuse, timm ViT-Tiny at
32 x 32 (random weights; blocks.11.norm1 feeds the q/k/v projection: applies) and a small CNN
(a conv layer read by ReLU: falls back; a ReLU read by a 1 x 1 conv and a residual Add:
applies).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_prune_rows import _built, _randomise_affine

from camexport.graph.ablate import ABLATED_CHANNELS, ABLATED_VALUES, ablation_tail
from camexport.methods.inputs import ablated_copies

RELATIVE = 1e-5
CAM_TOLERANCE = 1e-5


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options).run(None, feeds)[0]


def _graph(nodes, inputs: dict, output: str, constants: dict) -> onnx.ModelProto:
    """A model with float inputs ``inputs`` (name -> shape, "n" the batch) and one output."""
    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()]
    out = helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", values, [out],
                              [numpy_helper.from_array(v, k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


RNG = np.random.default_rng(0)
W = RNG.standard_normal((6, 5)).astype(np.float32)
CASES = {  # name: (nodes, inputs, constants)
    "matmul": ([helper.make_node("MatMul", ["a", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
               {"a": ["n", 4, 6]}, {"w": W}),
    "gemm transB alpha": ([helper.make_node("Gemm", ["a", "wt", "bias"], ["m"], transB=1, alpha=0.5,
                                            beta=2.0),
                           helper.make_node("Tanh", ["m"], ["y"])],
                          {"a": ["n", 6]},
                          {"wt": W.T.copy(), "bias": RNG.standard_normal(5).astype(np.float32)}),
    "conv 1x1": ([helper.make_node("Conv", ["a", "k", "kb"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                 {"a": ["n", 6, 3, 4]}, {"k": RNG.standard_normal((5, 6, 1, 1)).astype(np.float32),
                                         "kb": RNG.standard_normal(5).astype(np.float32)}),
    # the product through its bias, a head split, a transpose, a slice and a squeeze (a ViT's q/k/v)
    "layout chain": ([helper.make_node("MatMul", ["a", "w6"], ["m"]),
                      helper.make_node("Add", ["m", "b6"], ["l"]),
                      helper.make_node("Reshape", ["l", "split"], ["h"]),
                      helper.make_node("Transpose", ["h"], ["t"], perm=[2, 0, 3, 1, 4]),
                      helper.make_node("Slice", ["t", "one", "two", "zero"], ["k"]),
                      helper.make_node("Squeeze", ["k", "zero"], ["ks"]),
                      helper.make_node("Slice", ["ks", "zero", "one", "two"], ["q"]),
                      helper.make_node("MatMul", ["q", "kt"], ["y0"]),
                      helper.make_node("Tanh", ["y0"], ["y"])],
                     {"a": ["n", 4, 6]},
                     {"w6": RNG.standard_normal((6, 12)).astype(np.float32),
                      "b6": RNG.standard_normal(12).astype(np.float32),
                      "split": np.array([-1, 4, 3, 2, 2], np.int64),
                      "kt": RNG.standard_normal((2, 3)).astype(np.float32),
                      "zero": np.array([0], np.int64), "one": np.array([1], np.int64),
                      "two": np.array([2], np.int64)}),
    # the product as a MatMul's right operand (a ViT's attention P v): never materialised
    "right operand": ([helper.make_node("MatMul", ["a", "w"], ["m"]),
                       helper.make_node("Exp", ["f"], ["p"]),
                       helper.make_node("MatMul", ["p", "m"], ["y0"]),
                       helper.make_node("Tanh", ["y0"], ["y"])],
                      {"a": ["n", 4, 6], "f": ["n", 3, 4]}, {"w": W}),
    # A also read by a residual Add, and a value from before the layer read whole by a Mul
    "residual": ([helper.make_node("MatMul", ["a", "w"], ["m"]), helper.make_node("Relu", ["m"], ["r"]),
                  helper.make_node("MatMul", ["r", "wb"], ["back"]),
                  helper.make_node("Add", ["a", "back"], ["s"]),
                  helper.make_node("Mul", ["s", "f"], ["y"])],
                 {"a": ["n", 4, 6], "f": ["n", 4, 6]}, {"w": W, "wb": W.T.copy()}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rank_one_tail_equals_the_copies(case):
    nodes, inputs, constants = CASES[case]
    model = _graph(nodes, inputs, "y", constants)
    axis = 1 if case.startswith("conv") else -1
    fast = ablation_tail(model, "a", axis)
    assert fast is not None
    a = RNG.standard_normal([1 if d == "n" else d for d in inputs["a"]]).astype(np.float32)
    channels = np.array([0, 5, 2, 2, 3], np.int64)
    values = np.float32(a.min()) - np.float32(1e7) * np.arange(1, 6, dtype=np.float32)
    others = {name: RNG.standard_normal([1, *shape[1:]]).astype(np.float32)
              for name, shape in inputs.items() if name != "a"}
    copies = ablated_copies(a, axis % a.ndim, channels, values)
    expected = _run(model, {"a": copies, **{k: np.repeat(v, len(channels), 0) for k, v in others.items()}})
    found = _run(fast, {"a": a, ABLATED_CHANNELS: channels, ABLATED_VALUES: values, **others})
    assert found.shape == expected.shape
    assert np.abs(found - expected).max() <= RELATIVE * np.abs(expected).max()
    made = {name for node in fast.graph.node for name in node.output}
    if case == "layout chain":  # carried to q: no copy of the product or of its layouts
        assert made.isdisjoint({"m", "l", "h", "t", "k", "ks"}) and "q" in made
    if case == "right operand":
        assert "m" not in made


def test_refused_structures_fall_back():
    """No linear reader (Relu), a MatMul whose weights are not constant, the ablated axis not
    the one the op contracts, a 3 x 3 or strided Conv: ablation_tail returns None (the caller
    runs the copies)."""
    relu = _graph([helper.make_node("Relu", ["a"], ["y"])], {"a": ["n", 4, 6]}, "y", {})
    assert ablation_tail(relu, "a", -1) is None
    computed = _graph([helper.make_node("MatMul", ["a", "b"], ["y"])],
                      {"a": ["n", 4, 6], "b": ["n", 6, 5]}, "y", {})
    assert ablation_tail(computed, "a", -1) is None
    matmul = _graph(CASES["matmul"][0], CASES["matmul"][1], "y", CASES["matmul"][2])
    assert ablation_tail(matmul, "a", 1) is None
    assert ablation_tail(matmul, "a", 2) is not None
    kernel = {"k": RNG.standard_normal((5, 6, 3, 3)).astype(np.float32)}
    for attrs, constants in (({}, kernel), ({"strides": [2, 2]}, {"k": kernel["k"][..., :1, :1]})):
        conv = _graph([helper.make_node("Conv", ["a", "k"], ["y"], **attrs)], {"a": ["n", 6, 5, 5]}, "y",
                      constants)
        assert ablation_tail(conv, "a", 1) is None


def _with_and_without(explainer, x, **options):
    """AblationCAM of the rank-1 tail, then of the copies through the tail (the rewrite off)."""
    fast = explainer(x, methods=["ablationcam"], **options).cams["ablationcam"]
    used = dict(explainer._ablation)
    explainer.release()
    explainer._ablation_tail = lambda layer, axis: None
    try:
        slow = explainer(x, methods=["ablationcam"], **options).cams["ablationcam"]
    finally:
        del explainer._ablation_tail
        explainer.release()
    return fast, slow, used


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ablation-fast")


def test_vit_rank_one_tail_matches_the_copies(root):
    import timm

    torch.manual_seed(0)
    model = _randomise_affine(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32))
    explainer = _built(model, "vit_tiny", "blocks.11.norm1", 32, root)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    fast, slow, used = _with_and_without(explainer, x)
    assert next(iter(used.values())) is not None  # the rank-1 tail ran
    assert np.abs(fast - slow).max() <= CAM_TOLERANCE
    # the residual stream enters at batch 1 and is repeated after its class-token Slice
    graph = ablation_tail(explainer._tail(0)[0].model, explainer.layers[0]["tensor"], 2).graph
    residual = explainer._tail(0)[0].frontier[0]
    readers = [n for n in graph.node if residual in n.input]
    assert [n.op_type for n in readers] == ["Slice"]
    assert any(n.op_type == "Expand" and n.input[0] == readers[0].output[0] for n in graph.node)
    # the outputs themselves, all 192 channels in one call
    inputs = explainer.inputs(x[:1])
    raw = inputs.raw_activations[0]
    channels = np.arange(raw.shape[-1])
    values = np.float32(raw.min()) - np.float32(1e7) * (channels + 1).astype(np.float32)
    found = explainer.ablate(0, raw, channels, values, x[:1])
    expected = explainer.tail(0, ablated_copies(raw, 2, channels, values), x[:1])
    assert np.abs(found - expected).max() <= RELATIVE * np.abs(expected).max()


class SmallCNN(torch.nn.Module):
    """conv1 -> ReLU -> conv2 -> ReLU -> 1 x 1 conv3 (+ a residual of conv2) -> ReLU -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 12, 3, padding=1, stride=2)
        self.act = torch.nn.ReLU()
        self.conv3 = torch.nn.Conv2d(12, 12, 1)
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.fc = torch.nn.Linear(48, 10)

    def forward(self, x):
        x = self.act(self.conv2(torch.relu(self.conv1(x))))
        x = torch.relu(self.conv3(x) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.parametrize("layer, applies", [("conv2", False), ("act", True)])
def test_cnn_falls_back_or_applies(layer, applies, root):
    """conv2's output is read by ReLU: the copies run through the tail (same CAM); the ReLU's
    output is read by the 1 x 1 conv3 (rank-1 tail) and by the residual Add (the copies, in
    the graph)."""
    torch.manual_seed(0)
    explainer = _built(SmallCNN().eval(), f"cnn-{layer}", layer, 16, root)
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    fast, slow, used = _with_and_without(explainer, x)
    assert (next(iter(used.values())) is not None) == applies
    assert np.abs(fast - slow).max() <= CAM_TOLERANCE
