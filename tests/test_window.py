"""Windowed tails (camexport.graph.window): a sparse cotangent's convolutions computed on the
window its support spans equal the pruned tail's, at every position (edges and corners
included), for kernels, pads and dilations of several sizes, through element-wise factors
that the target does not reach, and where a windowed value must be padded back to its frame."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from camexport.graph.builder import GraphFacts
from camexport.graph.sparse import _Walk, prune_zeros, support_of
from camexport.graph.window import window_tail

SIZE = 11
#: float32 round-off of the same sums over another extent (onnxruntime picks kernels by size)
RELATIVE = 1e-5


def _tail(last: str) -> object:
    """A reverse pass on a 11 x 11 frame: the cotangent ``src`` (B, 4, 11, 11) through a 1x1 Conv,
    a factor sigmoid(F) * (1 - sigmoid(F)) of an input F that the target does not reach, a
    dilated 3x3 Conv with asymmetric pads, a residual Add of two windowed branches, a 5x5 Conv;
    ``last``: "conv" ends there, "reduce" reads the result with a ReduceSum over channels (not
    windowed: the window is padded back first)."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(size=(6, 4, 1, 1)), "w2": rng.normal(size=(6, 6, 3, 3)),
               "w3": rng.normal(size=(5, 6, 5, 5)), "one": np.ones((), np.float32),
               "axes": np.array([1], np.int64)}
    nodes = [
        helper.make_node("Conv", ["src", "w1"], ["a"]),
        helper.make_node("Sigmoid", ["F"], ["s"]),
        helper.make_node("Sub", ["one", "s"], ["s1"]),
        helper.make_node("Mul", ["s", "s1"], ["ds"]),
        helper.make_node("Mul", ["a", "ds"], ["b"]),
        helper.make_node("Conv", ["b", "w2"], ["c"], pads=[2, 1, 2, 3], dilations=[2, 1]),
        helper.make_node("Neg", ["c"], ["d"]),
        helper.make_node("Add", ["c", "d"], ["e0"]),
        helper.make_node("Add", ["e0", "c"], ["e"]),
        helper.make_node("Conv", ["e", "w3"], ["out" if last == "conv" else "g"], pads=[2, 2, 2, 2]),
    ]
    if last == "reduce":
        nodes.append(helper.make_node("ReduceSum", ["g", "axes"], ["out"], keepdims=1))
    graph = helper.make_graph(
        nodes, "tail",
        [helper.make_tensor_value_info("src", TensorProto.FLOAT, ["B", 4, SIZE, SIZE]),
         helper.make_tensor_value_info("F", TensorProto.FLOAT, ["B", 6, SIZE, SIZE])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32 if k != "axes" else np.int64), k)
         for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("last", ["conv", "reduce"])
def test_windowed_tail_equals_the_pruned_tail_at_every_position(last):
    model = _tail(last)
    facts = GraphFacts(model)
    rng = np.random.default_rng(1)
    f = rng.normal(size=(2, 6, SIZE, SIZE)).astype(np.float32)
    whole = _session(model)
    windowed_sessions = {}
    for row in range(SIZE):
        for column in range(SIZE):
            src = np.zeros((2, 4, SIZE, SIZE), np.float32)
            src[0, 1, row, column] = 1.5
            src[1, 3, row, column] = -0.5
            box = support_of(src)
            walk = _Walk(model, "src", box, facts)
            windowed = window_tail(prune_zeros(model, "src", box, facts).model, walk.support, facts)
            assert windowed is not None
            windows = [n for n in windowed.model.graph.node if n.op_type == "Conv"]
            assert len(windows) == 3 and all(not any(a.name == "pads" for a in n.attribute) for n in windows)
            key = tuple(n.name for n in windowed.model.graph.node)
            run = windowed_sessions.setdefault(key, _session(windowed.model))
            expected = whole.run(["out"], {"src": src, "F": f})[0]
            feed = {"src": src, "F": f, **windowed.feeds(walk.support)}
            got = run.run(["out"], {i.name: feed[i.name] for i in run.get_inputs()})[0]
            assert got.shape == expected.shape
            scale = np.abs(expected).max()
            assert scale > 0
            np.testing.assert_allclose(got, expected, rtol=0, atol=RELATIVE * scale,
                                       err_msg=f"position {(row, column)}")
            assert (got[expected == 0] == 0).all()
    # one windowed graph serves every position (its window origins are inputs)
    assert len(windowed_sessions) == 1


def test_a_support_too_wide_is_not_windowed():
    """A cotangent nonzero over more than a quarter of the frame: no window (None)."""
    model = _tail("conv")
    src = np.zeros((1, 4, SIZE, SIZE), np.float32)
    src[0, 0, 1:9, 2:10] = 1
    box = support_of(src)
    walk = _Walk(model, "src", box)
    assert window_tail(prune_zeros(model, "src", box).model, walk.support) is None
