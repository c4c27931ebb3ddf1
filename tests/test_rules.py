"""Every registered gradient rule, checked by the one harness in rule_harness.py."""

import numpy as np
import pytest
from rule_harness import Case, check, check_jvp

from camexport.graph.forward import JVP_RULES
from camexport.graph.rules import MAXPOOL_WITHOUT_INDICES, RULES

F = np.float64
S = (2, 3, 4, 5)  # a small NCHW shape

CASES = [
    Case("Identity", [S]),
    Case("Dropout", [S]),
    Case("Cast", [S], {"to": 11}, name="Cast"),
    Case("Relu", [S]),
    Case("LeakyRelu", [S], {"alpha": 0.1}),
    Case("Sigmoid", [S]),
    # saturated: onnxruntime's float32 Sigmoid is exact to ~1e-7 absolute only, so a rule
    # reading Y (1 - Y) off its output is off by ~100 % here; the rule works from X
    Case("Sigmoid", [S], low=-30, high=-12, name="Sigmoid-saturated"),
    Case("Tanh", [S]),
    Case("Exp", [S]),
    Case("Log", [S], low=0.5, high=2.0),
    Case("Sqrt", [S], low=0.5, high=2.0),
    Case("Neg", [S]),
    Case("Abs", [S]),
    Case("Reciprocal", [S], low=0.5, high=2.0),
    Case("Erf", [S]),
    Case("Softplus", [S]),
    Case("Pow", [S, np.array(3.0)], low=0.5, high=2.0),
    Case("HardSigmoid", [S], {"alpha": 1 / 6, "beta": 0.5}, low=-5, high=5),
    Case("HardSwish", [S], low=-5, high=5),
    Case("Clip", [S, np.array(0.0), np.array(6.0)], low=-3, high=9),
    Case("Clip", [S, np.array(-0.5), None], name="Clip-min-only"),
    Case("Gelu", [S]),
    Case("Gelu", [S], {"approximate": "tanh"}, name="Gelu-tanh"),
    Case("Softmax", [S], {"axis": -1}),
    Case("Softmax", [S], {"axis": 1}, name="Softmax-axis1"),
    Case("LogSoftmax", [S], {"axis": -1}),
    Case("Add", [S, (3, 1, 5)], name="Add-broadcast"),
    Case("Add", [S, np.ones((1, 3, 1, 1))], name="Add-const"),
    Case("Sum", [S, S, (5,)]),
    Case("Sub", [(3, 1, 5), S]),
    Case("Mul", [S, (1, 3, 4, 1)]),
    Case("Div", [S, (4, 5)], low=0.5, high=2.0),
    Case("Mean", [S, S]),
    Case("Where", [np.random.default_rng(3).random(S) > 0.5, S, (5,)]),
    Case("Expand", [(3, 1, 5), np.array([2, 3, 4, 5])]),
    Case("MatMul", [(2, 3, 4, 5), (2, 3, 5, 6)]),
    Case("MatMul", [(2, 3, 4, 5), (5, 6)], name="MatMul-2d-right"),
    Case("Gemm", [(3, 4), (4, 5), (5,)]),
    Case("Gemm", [(4, 3), (5, 4), (1, 5)], {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0},
         name="Gemm-transposed"),
    Case("Conv", [(2, 4, 7, 6), np.random.default_rng(4).standard_normal((6, 2, 3, 3))],
         {"group": 2, "strides": [2, 2], "pads": [1, 0, 1, 1]}, name="Conv-grouped-strided"),
    Case("Conv", [(2, 3, 9, 9), np.random.default_rng(5).standard_normal((4, 3, 3, 3)),
                  np.ones(4)], {"dilations": [2, 2], "pads": [2, 1, 2, 2]},
         name="Conv-dilated-bias"),
    Case("Conv", [(2, 3, 8, 9), np.random.default_rng(7).standard_normal((4, 3, 3, 2))],
         {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, name="Conv-same-upper"),
    # stride 1: dX is a Conv of dY with the kernel rearranged (channels swapped per group, taps
    # reversed, pads d(k-1) - p); pads beyond the kernel's reach keep the ConvTranspose
    Case("Conv", [(2, 4, 7, 6), np.random.default_rng(10).standard_normal((6, 2, 3, 2))],
         {"group": 2, "pads": [1, 0, 2, 1]}, name="Conv-grouped-stride1-asymmetric"),
    Case("Conv", [(2, 5, 8, 8), np.random.default_rng(11).standard_normal((5, 1, 5, 5))],
         {"group": 5, "auto_pad": "SAME_UPPER"}, name="Conv-depthwise-same-upper"),
    Case("Conv", [(2, 3, 11), np.random.default_rng(12).standard_normal((4, 3, 3))],
         {"pads": [1, 1], "dilations": [3]}, name="Conv-1d-stride1-dilated"),
    Case("Conv", [(2, 3, 6, 6), np.random.default_rng(13).standard_normal((4, 3, 3, 3))],
         {"pads": [3, 1, 1, 3]}, name="Conv-pads-beyond-the-kernel"),
    Case("Conv", [(2, 3, 11), np.random.default_rng(6).standard_normal((4, 3, 4))],
         {"strides": [3]}, name="Conv-1d"),
    Case("ConvTranspose", [(2, 4, 3, 4), np.random.default_rng(8).standard_normal((4, 3, 2, 2))],
         {"strides": [2, 2]}, name="ConvTranspose-stride2"),
    Case("ConvTranspose", [(2, 4, 5, 5), np.random.default_rng(9).standard_normal((4, 2, 3, 3)),
                           np.ones(4)], {"group": 2, "strides": [2, 2], "pads": [1, 0, 1, 1],
                                         "output_padding": [1, 0]},
         name="ConvTranspose-grouped-padded"),
    Case("Resize", [(2, 3, 4, 5), None, None, np.array([2, 3, 8, 15])],
         {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
         name="Resize-nearest-x2x3"),
    Case("Resize", [(2, 3, 4, 5), None, None, np.array([2, 3, 16, 12])],
         {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
         name="Resize-bilinear-half-pixel"),  # torch bilinear, align_corners=False
    Case("Resize", [(2, 3, 4, 5), None, None, np.array([2, 3, 7, 9])],
         {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
         name="Resize-bilinear-align-corners"),
    Case("Resize", [(2, 3, 9, 8), None, None, np.array([2, 3, 4, 3])],
         {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
         name="Resize-bilinear-downscale"),
    Case("Resize", [(2, 3, 4, 5), None, None, np.array([2, 3, 8, 7])],
         {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
          "nearest_mode": "round_prefer_ceil"}, name="Resize-nearest-half-pixel"),
    Case("AveragePool", [(2, 3, 6, 6)], {"kernel_shape": [2, 2], "strides": [2, 2]}),
    Case("AveragePool", [(2, 3, 7, 7)], {"kernel_shape": [3, 3], "strides": [2, 2],
                                         "pads": [1, 1, 1, 1]}, name="AveragePool-pad-excl"),
    Case("AveragePool", [(2, 3, 7, 7)], {"kernel_shape": [3, 3], "strides": [2, 2],
                                         "pads": [1, 1, 1, 1], "count_include_pad": 1},
         name="AveragePool-pad-incl"),
    Case("AveragePool", [(2, 3, 8, 7)], {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1,
                                         "pads": [1, 0, 1, 0]}, name="AveragePool-ceil-excl"),
    Case("AveragePool", [(2, 3, 8, 7)], {"kernel_shape": [3, 3], "strides": [2, 3], "ceil_mode": 1,
                                         "pads": [1, 1, 1, 1], "count_include_pad": 1},
         name="AveragePool-ceil-incl"),
    Case("AveragePool", [(2, 3, 9)], {"kernel_shape": [2], "strides": [2], "ceil_mode": 1},
         name="AveragePool-ceil-1d"),
    Case("MaxPool", [(2, 3, 7, 7)], {"kernel_shape": [3, 3], "strides": [2, 2],
                                     "pads": [1, 1, 1, 1]}),
    Case("MaxPool", [(2, 3, 7, 7)], {"kernel_shape": [3, 3], "strides": [2, 2],
                                     "pads": [1, 1, 1, 1]}, overrides=MAXPOOL_WITHOUT_INDICES,
         name="MaxPool-no-indices"),
    Case("MaxPool", [(2, 3, 8, 7)], {"kernel_shape": [2, 3], "strides": [3, 2], "ceil_mode": 1,
                                     "dilations": [2, 1]}, overrides=MAXPOOL_WITHOUT_INDICES,
         name="MaxPool-no-indices-ceil-dilated"),
    Case("MaxPool", [(2, 3, 9)], {"kernel_shape": [2], "strides": [2]},
         overrides=MAXPOOL_WITHOUT_INDICES, name="MaxPool-no-indices-1d"),
    Case("GlobalAveragePool", [(2, 3, 4, 5)]),
    Case("ReduceMean", [S, np.array([2, 3])], {"keepdims": 0}),
    Case("ReduceSum", [S, np.array([1])]),
    Case("ReduceL2", [S, np.array([-1])], {"keepdims": 0}),
    Case("ReduceL2", [S, np.array([1, 2])], name="ReduceL2-keepdims"),
    Case("ReduceSumSquare", [S, np.array([2])]),
    Case("BatchNormalization", [S, np.array([1.0, 2.0, 0.5]), np.zeros(3), np.array([0.1, 0.2, 0.3]),
                                np.array([1.0, 0.5, 2.0])]),
    Case("LayerNormalization", [(2, 4, 6), np.linspace(0.5, 1.5, 6), np.zeros(6)], {"axis": -1}),
    Case("LayerNormalization", [(2, 4, 6), np.linspace(0.5, 1.5, 24).reshape(4, 6)], {"axis": 1},
         name="LayerNormalization-2axes"),
    Case("InstanceNormalization", [(2, 4, 6), np.linspace(0.5, 1.5, 4), np.linspace(-1, 1, 4)],
         {"epsilon": 1e-5}),
    Case("InstanceNormalization", [(2, 3, 4, 5), np.linspace(0.5, 1.5, 3), np.zeros(3)],
         name="InstanceNormalization-2d"),
    Case("Reshape", [S, np.array([2, -1])]),
    Case("Flatten", [S], {"axis": 1}),
    Case("Squeeze", [(2, 1, 5), np.array([1])]),
    Case("Unsqueeze", [(2, 5), np.array([1])]),
    Case("Transpose", [S], {"perm": [0, 2, 3, 1]}),
    Case("Concat", [S, (2, 2, 4, 5), np.ones((2, 1, 4, 5))], {"axis": 1}),
    Case("Split", [S, np.array([2, 3])], {"axis": -1}, outputs=2),
    Case("Slice", [S, np.array([1, 0]), np.array([4, 5]), np.array([2, 3]), np.array([1, 2])]),
    Case("Slice", [S, np.array([-3]), np.array([100]), np.array([1])], name="Slice-negative-start"),
    Case("Gather", [S, np.array(1)], {"axis": 2}, name="Gather-scalar"),
    Case("Gather", [S, np.array([0, 3, 0])], {"axis": 3}, name="Gather-repeated"),
    Case("Gather", [S, np.array([[2, -1], [0, 2]])], {"axis": 1}, name="Gather-2d-negative"),
    Case("Gather", [(20,), np.array([[3, 7, 3], [19, 0, 1]])], {"axis": 0}, name="Gather-flat"),
    Case("GatherND", [S, np.array([[[0, 1], [1, 2]], [[0, 1], [0, 0]]])], name="GatherND-repeated"),
    Case("GatherND", [(3, 4), np.array([[2], [0], [2], [-1]] * 50)], name="GatherND-many-repeats"),
    Case("Pad", [S, np.array([0, 1, 2, 0, 0, 0, 1, 3])]),
]

# RoiAlign: 5 boxes on 2 images of a 10 x 12 map (spatial_scale 0.5), two partly outside it; the
# boxes are constants here (the harness differentiates every graph input), run-time inputs below
ROIS = np.array([[1.0, 2.5, 13.3, 9.1], [-3.2, -1.7, 6.4, 20.9], [10.1, 4.3, 27.0, 17.6],
                 [0.7, 0.2, 3.1, 2.4], [16.6, 12.2, 30.5, 25.7]])
ROI_BATCH = np.array([0, 1, 1, 0, 1])
ROI_X = (2, 3, 10, 12)
CASES += [
    Case("RoiAlign", [ROI_X, ROIS, ROI_BATCH], {"output_height": 3, "output_width": 4,
                                                "sampling_ratio": 2, "spatial_scale": 0.5},
         name="RoiAlign-avg-sr2"),  # torchvision's MultiScaleRoIAlign, aligned=True
    Case("RoiAlign", [ROI_X, ROIS, ROI_BATCH],
         {"output_height": 3, "output_width": 2, "sampling_ratio": 1, "spatial_scale": 0.5,
          "coordinate_transformation_mode": "output_half_pixel"}, name="RoiAlign-avg-sr1-output-half"),
    Case("RoiAlign", [ROI_X, np.vstack([ROIS, [[8.0, 6.0, 5.0, 6.0], [2.0, 2.0, 2.0, 2.0]]]),
                      np.array([0, 1, 1, 0, 1, 1, 0])],
         {"output_height": 2, "output_width": 3, "sampling_ratio": 0, "spatial_scale": 0.5},
         name="RoiAlign-avg-adaptive-degenerate"),  # grid ceil(size / output) per box, 0 for two
    Case("RoiAlign", [ROI_X, ROIS, ROI_BATCH],
         {"output_height": 2, "output_width": 3, "sampling_ratio": 0, "spatial_scale": 0.5,
          "coordinate_transformation_mode": "output_half_pixel"},
         name="RoiAlign-avg-adaptive-output-half"),
    Case("RoiAlign", [ROI_X, ROIS, ROI_BATCH], {"mode": "max", "output_height": 3, "output_width": 4,
                                                "sampling_ratio": 2, "spatial_scale": 0.5},
         name="RoiAlign-max-sr2"),
    Case("RoiAlign", [ROI_X, ROIS, ROI_BATCH], {"mode": "max", "output_height": 2, "output_width": 3,
                                                "sampling_ratio": 0, "spatial_scale": 0.5},
         name="RoiAlign-max-adaptive"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rule(case):
    check(case)


def test_every_rule_has_a_case():
    covered = {case.op for case in CASES}
    missing = sorted(set(RULES) - covered)
    assert not missing, f"rules without a test case: {missing}"


# -- forward mode (ShapleyCAM): the same table of cases, for ops with a JVP rule ---------------

def _linear_in_tangents(case: Case) -> bool:
    """Products of two differentiated inputs are curved: no forward-mode rule takes them."""
    if case.op in ("Mul", "Div", "MatMul", "Gemm"):
        return all(isinstance(spec, np.ndarray) or spec is None for spec in case.inputs[1:])
    return case.op != "Where"


JVP_CASES = [case for case in CASES
             if case.op in JVP_RULES and _linear_in_tangents(case) and case.overrides is None]
JVP_CASES += [
    Case("Mul", [S, np.linspace(0.5, 1.5, 5)], name="Mul-const"),
    Case("Div", [S, np.linspace(0.5, 1.5, 5)], name="Div-const"),
    Case("MatMul", [(2, 3, 4, 5), np.ones((5, 6))], name="MatMul-const"),
    Case("Where", [np.random.default_rng(3).random(S) > 0.5, S, np.zeros(5)], name="Where-const"),
    Case("Sub", [S, np.ones(5)], name="Sub-const"),
    Case("Gemm", [(3, 4), np.linspace(-1, 1, 20).reshape(4, 5), np.ones(5)], {"alpha": 0.5},
         name="Gemm-const"),
]


@pytest.mark.parametrize("case", JVP_CASES, ids=lambda c: c.id)
def test_jvp_rule(case):
    check_jvp(case)


def test_every_jvp_rule_has_a_case():
    missing = sorted(set(JVP_RULES) - {case.op for case in JVP_CASES})
    assert not missing, f"forward-mode rules without a test case: {missing}"


def test_guided_relu_rule():
    """Guided ReLU passes dY only where both the input and dY are positive."""
    import onnx
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    from camexport.graph.autodiff import differentiate
    from camexport.graph.builder import Builder, GraphFacts
    from camexport.graph.rules import GUIDED_RULES

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [4, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    facts = GraphFacts(model)
    builder = Builder(facts, {"x", "y", "dy"})
    grads = differentiate(model, facts, builder, {"y": "dy"}, ["x"], overrides=GUIDED_RULES)
    model.graph.node.extend(builder.nodes)
    model.graph.initializer.extend(builder.initializers)
    model.graph.input.append(helper.make_tensor_value_info("dy", TensorProto.DOUBLE, [4, 5]))
    model.graph.output.append(helper.make_tensor_value_info(grads["x"], TensorProto.DOUBLE, [4, 5]))
    onnx.checker.check_model(model)
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    got = ReferenceEvaluator(model).run([grads["x"]], {"x": x, "dy": dy})[0]
    np.testing.assert_array_equal(got, np.where((x > 0) & (dy > 0), dy, 0))


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [1, 1], "ceil_mode": 1},
], ids=["overlapping-padded", "blocks", "stride1"])
def test_maxpool_ties_go_to_the_first_max_as_in_torch(attrs):
    """Inputs drawn from {0, 1, 2} tie in most windows: both MaxPool rules (Indices, and
    comparison without Indices) send each window's cotangent to its first max in row-major order,
    exactly as torch's max_pool2d backward. Integer values keep every sum exact: equality."""
    import onnxruntime as ort
    import torch
    from rule_harness import backward_model

    shape = (2, 3, 7, 8)
    rng = np.random.default_rng(11)
    x = rng.integers(0, 3, shape).astype(np.float32)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    pads = attrs.get("pads", [0, 0, 0, 0])
    y = torch.nn.functional.max_pool2d(xt, attrs["kernel_shape"], attrs["strides"], pads[:2],
                                       ceil_mode=bool(attrs.get("ceil_mode", 0)))
    u = rng.integers(-3, 4, tuple(y.shape)).astype(np.float32)
    y.backward(torch.tensor(u, dtype=torch.float64))
    for overrides in (None, MAXPOOL_WITHOUT_INDICES):
        model, _, _ = backward_model(Case("MaxPool", [shape], attrs, overrides=overrides), np.float32)
        run = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        grad = run.run(["grad0"], {"in0": x, "seed_out0": u})[0]
        np.testing.assert_array_equal(grad, xt.grad.numpy().astype(np.float32))


@pytest.mark.parametrize("aligned,sampling_ratio", [(True, 2), (False, 2), (True, 1), (True, 0),
                                                     (False, 0)])
def test_roialign_matches_torchvision_with_boxes_as_inputs(aligned, sampling_ratio):
    """Boxes and batch indices are run-time graph inputs (proposals from numpy), with a
    symbolic box count; one backward graph serves two different box sets. dX equals the autograd
    gradient of torchvision.ops.roi_align (aligned=True is half_pixel) to 1e-10 in float64, and
    onnxruntime's float32 run of the same graph to float32 round-off."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import helper
    from onnx.reference import ReferenceEvaluator
    from torchvision.ops import roi_align

    from camexport.graph.autodiff import differentiate
    from camexport.graph.builder import Builder, GraphFacts

    shape, out, scale = (2, 4, 13, 17), (7, 5), 0.25
    attrs = {"output_height": out[0], "output_width": out[1], "sampling_ratio": sampling_ratio,
             "spatial_scale": scale,
             "coordinate_transformation_mode": "half_pixel" if aligned else "output_half_pixel"}

    def backward(elem):
        node = helper.make_node("RoiAlign", ["x", "rois", "batch"], ["y"], name="roi", **attrs)
        graph = helper.make_graph([node], "g", [
            helper.make_tensor_value_info("x", elem, list(shape)),
            helper.make_tensor_value_info("rois", elem, ["boxes", 4]),
            helper.make_tensor_value_info("batch", onnx.TensorProto.INT64, ["boxes"])],
            [helper.make_tensor_value_info("y", elem, ["boxes", shape[1], *out])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
        facts = GraphFacts(model)
        builder = Builder(facts, {"x", "rois", "batch", "y", "dy"})
        grads = differentiate(model, facts, builder, {"y": "dy"}, ["x"])
        model.graph.node.extend(builder.nodes)
        model.graph.initializer.extend(builder.initializers)
        model.graph.input.append(helper.make_tensor_value_info("dy", elem, ["boxes", shape[1], *out]))
        model.graph.output.append(helper.make_tensor_value_info(grads["x"], elem, list(shape)))
        onnx.checker.check_model(model, full_check=True)
        return model, grads["x"]

    model64, dx = backward(onnx.TensorProto.DOUBLE)
    model32, _ = backward(onnx.TensorProto.FLOAT)
    reference = ReferenceEvaluator(model64)
    session = ort.InferenceSession(model32.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(12)
    x = rng.standard_normal(shape)
    for boxes in (9, 4):  # image of 52 x 68 pixels; boxes may stick out of it
        corner = rng.uniform([-10, -10], [60, 45], (boxes, 2))
        rois = np.hstack([corner, corner + rng.uniform(1, 40, (boxes, 2))])
        batch = rng.integers(0, shape[0], boxes)
        dy = rng.standard_normal((boxes, shape[1], *out))
        xt = torch.tensor(x, requires_grad=True)
        y = roi_align(xt, torch.tensor(np.hstack([batch[:, None], rois])), out, scale,
                      sampling_ratio, aligned)
        y.backward(torch.tensor(dy))
        expected = xt.grad.numpy()
        feeds = {"x": x, "rois": rois, "batch": batch, "dy": dy}
        got = reference.run([dx], feeds)[0]
        assert np.abs(got - expected).max() <= 1e-10 * np.abs(expected).max()
        got32 = session.run([dx], {k: v.astype(np.float32) if v.dtype == np.float64 else v
                                   for k, v in feeds.items()})[0]
        assert np.linalg.norm(got32 - expected) <= 1e-5 * np.linalg.norm(expected)


@pytest.mark.parametrize("name, transposed", [("Conv-grouped-stride1-asymmetric", False),
                                              ("Conv-depthwise-same-upper", False),
                                              ("Conv-1d-stride1-dilated", False),
                                              ("Conv-dilated-bias", False),
                                              ("Conv-pads-beyond-the-kernel", True),
                                              ("Conv-grouped-strided", True)])
def test_stride1_conv_backward_is_a_conv(name, transposed):
    """A stride-1 Conv's dX is a Conv of dY (faster in onnxruntime than ConvTranspose); strided
    ones and pads beyond the kernel's reach keep the ConvTranspose (each case's values: test_rule)."""
    from rule_harness import backward_model

    case = next(c for c in CASES if c.id == name)
    model, _, _ = backward_model(case, np.float32)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("ConvTranspose") == int(transposed)
    assert ops.count("Conv") == 1 + int(not transposed)
