"""Small graph passes that only change how onnxruntime runs a graph, never its numbers:
output Identities folded into their producers (camexport.graph.cut.without_output_copies) and
a mean's gradient broadcast by a Mul instead of an Expand (Builder.spread)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from camexport.graph.builder import Builder, GraphFacts
from camexport.graph.cut import without_output_copies

FLOAT = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    run = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in run.get_outputs()], run.run(None, feeds)))


def _value(name, shape=("b", 3)):
    return helper.make_tensor_value_info(name, FLOAT, list(shape))


def test_output_identities_become_their_producers_where_that_is_safe():
    """y = relu(x) is read inside the graph and copied to two outputs; the graph input x and the
    output z are copied to one each. The first copy of y is folded (relu writes its name), the
    second stays, as do the copies of the input and of the output; the outputs are the same
    values under the same names, in the same order."""
    nodes = [helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("Neg", ["y"], ["z"]),
             helper.make_node("Identity", ["y"], ["activation/a"]),
             helper.make_node("Identity", ["y"], ["activation/b"]),
             helper.make_node("Identity", ["x"], ["activation/x"]),
             helper.make_node("Identity", ["z"], ["gradient/a"])]
    outputs = ["z", "activation/a", "activation/b", "activation/x", "gradient/a"]
    model = _model(nodes, [_value("x")], [_value(name) for name in outputs])
    folded = without_output_copies(model)

    identities = [(n.input[0], n.output[0]) for n in folded.graph.node if n.op_type == "Identity"]
    assert identities == [("activation/a", "activation/b"), ("x", "activation/x"), ("z", "gradient/a")]
    assert [n.output[0] for n in folded.graph.node if n.op_type == "Relu"] == ["activation/a"]
    assert [o.name for o in folded.graph.output] == outputs
    assert len(model.graph.node) == 6  # the caller's model is left as it was
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    before, after = _run(model, {"x": x}), _run(folded, {"x": x})
    assert list(after) == outputs
    for name in outputs:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_graphs_with_subgraphs_keep_their_output_identities():
    branch = helper.make_graph([helper.make_node("Neg", ["y"], ["w"])], "then", [], [_value("w")])
    nodes = [helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("Cast", ["m"], ["c"], to=TensorProto.BOOL),
             helper.make_node("If", ["c"], ["w"], then_branch=branch, else_branch=branch),
             helper.make_node("Identity", ["y"], ["activation/a"])]
    model = _model(nodes, [_value("x")], [_value("w"), _value("activation/a")])
    assert without_output_copies(model) is model


def _spread_model(shape: list, axes: list[int]) -> tuple[onnx.ModelProto, list[str]]:
    """dX of ReduceMean(X, axes, keepdims) for dY, through the gradient rule's broadcast."""
    reduced = [1 if k in axes else d for k, d in enumerate(shape)]
    model = _model([], [_value("x", shape), _value("dy", reduced)], [])
    builder = Builder(GraphFacts(model), {"x", "dy"})
    out = builder.spread("dy", "x", axes)
    model.graph.node.extend(builder.nodes)
    model.graph.initializer.extend(builder.initializers)
    model.graph.output.append(_value(out, shape))
    return model, [n.op_type for n in builder.nodes]


def test_spread_is_a_mul_by_ones_on_static_axes_and_an_expand_otherwise():
    rng = np.random.default_rng(1)
    dy = rng.standard_normal((2, 3, 1, 1)).astype(np.float32)
    dy[0, 0] = np.nan
    dy[1, 2] = -0.0
    x = np.zeros((2, 3, 4, 5), np.float32)
    static, ops = _spread_model(["b", 3, 4, 5], [2, 3])
    assert ops == ["Mul"]
    dynamic, ops = _spread_model(["b", 3, "h", 5], [2, 3])
    assert ops == ["Shape", "Expand"]
    expected = np.broadcast_to(dy, x.shape)
    for model in (static, dynamic):
        (got,) = _run(model, {"x": x, "dy": dy}).values()
        np.testing.assert_array_equal(got, expected)
        assert np.signbit(got[1, 2]).all()  # -0.0 stays -0.0: dy * 1 is dy, bit for bit
