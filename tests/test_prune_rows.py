"""camexport.graph.prune_rows: a graph computes only the rows its outputs read.

Each model's AblationCAM tail (camexport.graph.cut.layer_tail) with and without the pass, run
by onnxruntime on the same random inputs. Tolerance: the pruned outputs equal the whole tail's
within 1e-6 of the largest |output| (the same ops on the same values; only the kernels' blocking
changes with the number of rows). Models, random weights: timm ViT-Tiny at 32 x 32 (2 x 2
patches + the class token: the head reads token 0, the pass prunes the last block to it), timm
Swin at 64 x 64 (the head averages every token: nothing to prune, the graph is unchanged),
torchvision RetinaNet from test_detection (the tail's output is every anchor's row; the top-k
selection is numpy post-processing: nothing to prune). AblationCAM on the pruned ViT tail
against pytorch-grad-cam 1.5.7: max |diff| <= 1e-4 on maps in [0, 1].
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from camexport.artifact import read_plain
from camexport.build import build
from camexport.explain import Explainer
from camexport.graph.builder import GraphFacts
from camexport.graph.cut import layer_tail
from camexport.graph.prune_rows import Rows, plan_rows, prune_rows
from camexport.load import Preprocessing, from_module

RELATIVE = 1e-6
TOLERANCE = 1e-4
VIT_SIZE, VIT_LAYER = 32, "blocks.11.norm1"


def _randomise_affine(model, seed: int = 1):
    """LayerNorm scales/shifts and linear biases away from 1/0 (timm's init), seeded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.uniform_(-0.1, 0.1, generator=generator)
    return model.eval()


def _built(module, name: str, layer: str, size: int, root):
    built = build(from_module(module, name, Preprocessing(size=(size, size))), [layer],
                  methods="ablationcam", out_dir=root / name, input_size=(size, size), overwrite=True)
    return Explainer(built.directory)


def _tails(explainer: Explainer):
    plain = read_plain(explainer.path, explainer.manifest)
    args = (plain, explainer.layers[0]["tensor"], explainer.output_name)
    return layer_tail(*args, rows=False), layer_tail(*args)


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("prune-rows")


@pytest.fixture(scope="session")
def vit(root):
    import timm

    torch.manual_seed(0)
    model = _randomise_affine(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=VIT_SIZE))
    return model, _built(model, "vit_tiny", VIT_LAYER, VIT_SIZE, root)


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options).run(None, feeds)[0]


def _random_feeds(model: onnx.ModelProto, rows: int = 3) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value or rows for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _assert_same_outputs(whole: onnx.ModelProto, pruned: onnx.ModelProto) -> float:
    feeds = _random_feeds(whole)
    expected, found = _run(whole, feeds), _run(pruned, feeds)
    assert found.shape == expected.shape
    gap = float(np.abs(found - expected).max() / np.abs(expected).max())
    assert gap <= RELATIVE, gap
    return gap


def test_vit_tail_computes_the_last_block_for_the_class_token_only(vit):
    _, explainer = vit
    whole, pruned = _tails(explainer)
    assert pruned.frontier == whole.frontier
    _assert_same_outputs(whole.model, pruned.model)
    facts = GraphFacts(pruned.model)
    tokens = 1 + (VIT_SIZE // 16) ** 2
    ops = {node.op_type: node for node in pruned.model.graph.node}
    # after the attention, every op runs on one token: the MLP's Gelu, the last norm
    for op in ("Gelu", "LayerNormalization", "Softmax"):
        assert facts.shape(ops[op].output[0])[-2] == 1, op
    # keys and values keep every token (the scores' last axis)
    assert facts.shape(ops["Softmax"].output[0])[-1] == tokens
    # the residual stream coming from before the layer is sliced where the block reads it
    residual = pruned.frontier[0]
    slices = [n for n in pruned.model.graph.node if n.op_type == "Slice" and n.input[0] == residual]
    assert [n.name.split("/")[-2] for n in slices] == ["rows"]


def test_vit_plan_starts_at_the_head_gather(vit):
    _, explainer = vit
    whole, _ = _tails(explainer)
    plans = plan_rows(whole.model)
    gather = next(k for k, n in enumerate(whole.model.graph.node) if n.op_type == "Gather")
    assert plans[gather].reads[0] == Rows(1, 0, 1) and plans[gather].produces is None


def test_swin_tail_is_left_unchanged(root):
    """Swin's head averages every token (ReduceMean over the token axes): the pass stops there
    and returns the graph itself."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64,
                              window_size=2, depths=(1, 1, 2, 1), embed_dim=24, num_heads=(1, 1, 2, 2))
    explainer = _built(_randomise_affine(model), "swin", "layers.3.blocks.0.norm1", 64, root)
    whole, pruned = _tails(explainer)
    assert pruned.model.SerializeToString() == whole.model.SerializeToString()
    assert prune_rows(whole.model) is whole.model
    feeds = _random_feeds(whole.model)
    np.testing.assert_array_equal(_run(pruned.model, feeds), _run(whole.model, feeds))


def test_detector_tail_is_left_unchanged(root):
    """RetinaNet: the graph outputs every anchor's row; which rows a target reads (top-k, best
    IoU match) is decided in numpy after the run, so the graph has nothing to prune."""
    from test_detection import retinanet

    built = build(from_module(retinanet(), "retinanet", Preprocessing(size=(128, 128))),
                  ["backbone.body.layer4"], methods="ablationcam", out_dir=root / "retinanet",
                  input_size=(128, 128), overwrite=True)
    whole, pruned = _tails(Explainer(built.directory))
    assert pruned.model.SerializeToString() == whole.model.SerializeToString()


def test_unknown_op_stops_the_rows():
    """A Gather of row 0 after Gelu (row-wise) after a custom op: Gelu runs on one row; the
    custom op (here Shape-dependent Expand, no rule) is read whole, with a Slice after it."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Expand", ["x", "shape"], ["e"], name="expand"),
             helper.make_node("Gelu", ["e"], ["g"], name="gelu"),
             helper.make_node("Gather", ["g", "zero"], ["y"], name="gather", axis=1)]
    graph = helper.make_graph(nodes, "g", [x], [y], [helper.make_tensor("zero", TensorProto.INT64, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    pruned = prune_rows(model)
    order = [n.op_type for n in pruned.graph.node]
    assert order == ["Shape", "Expand", "Slice", "Gelu", "Gather"]
    assert GraphFacts(pruned).shape("g") == (None, 1, 4)
    _assert_same_outputs(model, pruned)


def test_vit_ablationcam_after_the_pass_matches_pgc(vit):
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.ablation_layer import AblationLayerVit

    from camexport.eager import resolve_module

    model, explainer = vit
    x = np.random.default_rng(0).standard_normal((2, 3, VIT_SIZE, VIT_SIZE)).astype(np.float32)
    ours = explainer(x, targets=None, methods=["ablationcam"]).cams["ablationcam"]
    assert any("/rows/" in n.name for n in explainer._tails[0][0].model.graph.node)  # the pass ran
    side = VIT_SIZE // 16
    with pgc.AblationCAM(model=model, target_layers=[resolve_module(model, VIT_LAYER)],
                         ablation_layer=AblationLayerVit(),
                         reshape_transform=lambda t: t[:, 1:, :].reshape(t.size(0), side, side, t.size(2))
                         .permute(0, 3, 1, 2)) as cam:
        theirs = cam(input_tensor=torch.tensor(x), targets=None)
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_reshape_that_mixes_the_rows_axis_stops():
    """(n, 4, 6) -> (n, 6, 4) then row 0 of axis 1: output row 0 is not input row 0 of any
    axis, so nothing is pruned; (n, 4, 6) -> (n, 4, 2, 3) keeps axis 1 and is pruned."""
    from onnx import TensorProto, helper

    def model(shape, out):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out)
        nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
                 helper.make_node("Reshape", ["r", "shape"], ["s"], name="reshape"),
                 helper.make_node("Gather", ["s", "zero"], ["y"], name="gather", axis=1)]
        constants = [helper.make_tensor("shape", TensorProto.INT64, [len(shape)], shape),
                     helper.make_tensor("zero", TensorProto.INT64, [], [0])]
        return helper.make_model(helper.make_graph(nodes, "g", [x], [y], constants),
                                 opset_imports=[helper.make_opsetid("", 20)])

    mixed = model([0, 6, 4], ["n", 4])
    assert prune_rows(mixed) is mixed
    kept = model([-1, 4, 2, 3], ["n", 2, 3])
    pruned = prune_rows(kept)
    assert GraphFacts(pruned).shape("r") == (None, 1, 6)
    _assert_same_outputs(kept, pruned)


def test_augmented_graph_is_pruned_and_keeps_the_layer_whole(vit):
    """camexport build prunes the whole graph before differentiating it: the last block runs on
    the class token in the augmented graph too, while the layer (every token) is read whole, and
    its activations and gradients are those of the plain graph (gradients checked against pgc by
    test_methods_parity)."""
    from camexport.artifact import read_artifact

    _, explainer = vit
    model, _ = read_artifact(explainer.path)
    assert any("/rows/" in node.name for node in model.graph.node)
    facts = GraphFacts(model)
    tokens = 1 + (VIT_SIZE // 16) ** 2
    for name in (f"activation/{VIT_LAYER}", f"gradient/{VIT_LAYER}"):
        assert facts.shape(name)[1] == tokens, name
    x = np.random.default_rng(1).standard_normal((2, 3, VIT_SIZE, VIT_SIZE)).astype(np.float32)
    plain = read_plain(explainer.path, explainer.manifest)
    whole = _run(plain, {plain.graph.input[0].name: x})
    outputs = explainer(x, targets=None, methods=["gradcam"]).inputs.outputs
    assert np.abs(outputs - whole).max() <= RELATIVE * np.abs(whole).max()
