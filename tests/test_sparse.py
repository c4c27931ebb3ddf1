"""Sparse targets (camexport.graph.sparse): the support rules against brute force, and the
pruned tail against the whole one, value for value."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from camexport.graph.sparse import END, _Walk, prune_zeros, support_of


def _model(nodes, inputs, output, initializers=()):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), name) for name, v in initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _box_of(value: np.ndarray) -> tuple:
    """The hull of the nonzero entries of ``value`` on each axis after the batch axis."""
    return support_of(value)[1:]


# (name, nodes, source shape, other inputs, initializers, exact): one op each on "src" -> "out"
CASES = [
    ("reshape-merge", [helper.make_node("Reshape", ["src", "shape"], ["out"])], (2, 4, 6, 5), [],
     [("shape", np.array([2, 24, 5], np.int64))], False),
    ("reshape-split", [helper.make_node("Reshape", ["src", "shape"], ["out"])], (2, 4, 30), [],
     [("shape", np.array([2, 4, 1, 6, 5], np.int64))], False),
    ("transpose", [helper.make_node("Transpose", ["src"], ["out"], perm=[0, 2, 3, 1])], (2, 3, 5, 7),
     [], [], True),
    ("slice", [helper.make_node("Slice", ["src", "s", "e", "a"], ["out"])], (2, 6, 9), [],
     [("s", np.array([2, 1], np.int64)), ("e", np.array([5, -2], np.int64)),
      ("a", np.array([1, 2], np.int64))], True),
    ("pad", [helper.make_node("Pad", ["src", "p"], ["out"])], (2, 3, 4, 5), [],
     [("p", np.array([0, 0, 1, 2, 0, 0, 3, 1], np.int64))], True),
    ("concat", [helper.make_node("Concat", ["src", "other"], ["out"], axis=2)], (2, 3, 4),
     [("other", (2, 3, 5))], [], True),
    ("conv3x3", [helper.make_node("Conv", ["src", "w"], ["out"], pads=[1, 1, 1, 1])], (2, 3, 9, 8), [],
     [("w", np.ones((4, 3, 3, 3), np.float32))], False),
    ("conv-dilated", [helper.make_node("Conv", ["src", "w"], ["out"], pads=[2, 0, 2, 0], dilations=[2, 1])],
     (2, 3, 9, 8), [], [("w", np.ones((4, 3, 3, 1), np.float32))], False),
    ("convtranspose", [helper.make_node("ConvTranspose", ["src", "w"], ["out"], strides=[2, 3],
                                        pads=[1, 0, 1, 2], output_padding=[1, 0], dilations=[1, 2])],
     (2, 3, 7, 5), [], [("w", np.ones((3, 4, 3, 3), np.float32))], False),
    ("reducesum", [helper.make_node("ReduceSum", ["src", "axes"], ["out"], keepdims=1)], (2, 5, 6), [],
     [("axes", np.array([1], np.int64))], False),
    ("mul-broadcast", [helper.make_node("Mul", ["src", "other"], ["out"])], (2, 1, 6),
     [("other", (2, 4, 6))], [], False),
    ("add", [helper.make_node("Slice", ["src", "s", "e", "a"], ["cut"]),
             helper.make_node("Pad", ["cut", "p"], ["moved"]),
             helper.make_node("Add", ["src", "moved"], ["out"])], (2, 4, 6), [],
     [("s", np.array([1], np.int64)), ("e", np.array([6], np.int64)), ("a", np.array([2], np.int64)),
      ("p", np.array([0, 0, 0, 0, 0, 1], np.int64))], True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_support_rules_cover_the_nonzero_values(case):
    """For random boxes of the source, the rule's box holds every nonzero value of the output
    (run by onnxruntime on values zero outside the box); ops that only move values (slice,
    pad, transpose, concat) give the exact hull."""
    name, nodes, shape, others, initializers, exact = case
    rng = np.random.default_rng(0)
    model = _model(nodes, [("src", shape), *others], "out", initializers)
    for trial in range(40):
        box, region = [(0, END)], [slice(None)]
        for dim in shape[1:]:
            lo = int(rng.integers(0, dim))
            hi = int(rng.integers(lo + 1, dim + 1))
            box.append((lo, hi))
            region.append(slice(lo, hi))
        source = np.zeros(shape, np.float32)
        source[tuple(region)] = rng.uniform(0.5, 1.5, shape).astype(np.float32)[tuple(region)]
        feed = {"src": source, **{other: rng.uniform(0.5, 1.5, s).astype(np.float32) for other, s in others}}
        out = _run(model, feed)[0]
        predicted = _Walk(model, "src", tuple(box)).support["out"]
        assert predicted is not None, name
        if not out.any():
            assert any(lo >= hi for lo, hi in predicted), (name, trial, predicted)
            continue
        actual = _box_of(out)
        for (lo, hi), (plo, phi) in zip(actual, predicted[1:]):
            assert plo <= lo and hi <= phi, (name, trial, actual, predicted)
        if exact:
            assert tuple(predicted[1:]) == tuple(actual), (name, trial, actual, predicted)


NAMES = ("both", "first", "second", "eb")


def test_zero_cases_are_found_and_pruned_exactly():
    """A two-branch tail: weights (B, 10) sliced into a 4-column branch (MatMul into a Conv, a
    "level") and a 6-column one (Mul by a frontier value); the sum of both and each alone are
    outputs. With weights in one branch only, the other branch's heavy ops go, its output is
    reported zero, and every other output equals the whole graph's exactly."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Slice", ["w", "s0", "e0", "ax"], ["a"]),
        helper.make_node("Slice", ["w", "s1", "e1", "ax"], ["b"]),
        helper.make_node("MatMul", ["a", "m"], ["am"]),
        helper.make_node("Reshape", ["am", "shape"], ["a4"]),
        helper.make_node("Conv", ["a4", "k"], ["first"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["b", "f"], ["bf"]),
        helper.make_node("MatMul", ["bf", "m6"], ["b6"]),
        helper.make_node("Reshape", ["b6", "shape"], ["second"]),
        helper.make_node("Exp", ["b"], ["eb"]),  # not linear: computed even where b is zero
        helper.make_node("Add", ["first", "second"], ["both"]),
    ]
    ints = {"s0": [0], "e0": [4], "ax": [1], "s1": [4], "e1": [10], "shape": [-1, 2, 4, 4]}
    constants = {name: np.array(v, np.int64) for name, v in ints.items()}
    constants.update({name: rng.normal(size=size).astype(np.float32)
                      for name, size in (("m", (4, 32)), ("m6", (6, 32)), ("k", (2, 2, 3, 3)))})
    graph = helper.make_graph(
        nodes, "tail", [helper.make_tensor_value_info("w", TensorProto.FLOAT, ["B", 10]),
                        helper.make_tensor_value_info("f", TensorProto.FLOAT, ["B", 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in NAMES],
        [numpy_helper.from_array(v, k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = onnx.shape_inference.infer_shapes(model)
    f = rng.normal(size=(3, 6)).astype(np.float32)
    names = NAMES
    cases = (([1], {"second"}, 1), ([5, 7], {"first"}, 2), ([2, 6], set(), 0),
             ([], {"both", "first", "second"}, 3))
    for columns, zero, removed in cases:
        w = np.zeros((3, 10), np.float32)
        w[:, columns] = rng.normal(size=(3, len(columns)))
        whole = dict(zip(names, _run(model, {"w": w, "f": f})))
        pruned = prune_zeros(model, "w", support_of(w))
        assert set(pruned.zeros) == zero and pruned.removed == removed, columns
        kept = [o.name for o in pruned.model.graph.output]
        feed = {"w": w, "f": f}
        got = dict(zip(kept, _run(pruned.model, {i.name: feed[i.name] for i in pruned.model.graph.input})))
        for name in names:
            if name in zero:
                assert not np.any(whole[name]), name
            else:
                np.testing.assert_array_equal(got[name], whole[name])
