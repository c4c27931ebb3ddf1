"""camexport.two_stage: the RPN graph and the numpy proposals (step 1); the box graph, its
numpy post-processing and its gradients with the proposals held fixed (step 2).

Faster R-CNN with random seeded weights at 320 x 320, batch 2. The reference proposals are
torchvision's own ``model.rpn`` (eval) on the backbone features of the normalised image, so the
model's resize never runs. MobileNet-V3's random initialisation makes features ~1e-8 (every
objectness logit ~0, every score tied at 0.5), so its BatchNorm statistics are set from a
calibration batch first; ResNet-50's random features are usable as they are.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from camexport import two_stage
from camexport.export import _dynamo
from camexport.runtime import session

SIZE = (320, 320)
#: relative error of the ONNX graph's outputs against the torch wrapper (max |diff| / max |ref|)
OUTPUT_RTOL = 1e-5
#: box coordinates, px: the numpy replay against torchvision on the same head outputs (only
#: float32 exp and rounding differ: measured 1.2e-4 px)
REPLAY_ATOL = 1e-3
#: scores this many float32 ulps apart count as tied (torch's and numpy's sigmoid round apart)
TIE_ULPS = 2


def _calibrate(model, images) -> None:
    """BatchNorm running statistics := the statistics of ``images`` (a cumulative average over
    one batch)."""
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.backbone.train()
    with torch.no_grad():
        model.backbone(images)
    model.eval()


@pytest.fixture(scope="module", params=["fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn"])
def case(request):
    import torchvision
    from torchvision.models.detection.image_list import ImageList

    torch.manual_seed(0)
    model = getattr(torchvision.models.detection, request.param)(weights=None, weights_backbone=None)
    graph = two_stage.rpn_graph(model, SIZE)
    x = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    normalised = (x - graph.mean) / graph.std
    if "mobilenet" in request.param:
        _calibrate(model, normalised)
    with torch.no_grad():
        outputs = [t.numpy() for t in graph(x)]
        reference, _ = model.rpn(ImageList(normalised, [SIZE] * len(x)), model.backbone(normalised))
    plain = _dynamo(graph, (x,), ({0: torch.export.Dim("batch", min=1, max=4096)},))
    two_stage.name_outputs(plain, graph.output_names)
    onnx_outputs = session(plain, threads=2).run(None, {plain.graph.input[0].name: x.numpy()})
    return {"graph": graph, "plain": plain, "torch": outputs, "onnx": onnx_outputs,
            "reference": [r.numpy() for r in reference], "model": model, "normalised": normalised}


def _assert_equal_up_to_ties(ours, theirs, scores, atol):
    """Row k of ``ours`` equals row k of ``theirs`` within ``atol``, except among rows whose
    ``scores`` (best first) tie, which may come in any order: torchvision's final sort in
    batched_nms is not stable, and its sigmoid may round a score 1 ulp off numpy's, so scores
    within TIE_ULPS ulps count as tied. There each of ours must match a distinct one of theirs."""
    assert ours.shape == theirs.shape
    gaps = -np.diff(scores) > TIE_ULPS * np.spacing(scores[1:])
    for group in np.split(np.arange(len(scores)), np.flatnonzero(gaps) + 1):
        distance = np.abs(ours[group, None] - theirs[None, group]).max(-1)
        nearest = distance.argmin(1)
        assert sorted(nearest) == list(range(len(group))), f"tied proposals at {group}"
        assert distance[np.arange(len(group)), nearest].max() <= atol


def test_graph_outputs_match_the_torch_wrapper(case):
    graph, plain = case["graph"], case["plain"]
    assert [o.name for o in plain.graph.output] == list(graph.output_names)
    levels = graph.settings["feature_sizes"]
    anchors = sum(h * w * len(s) * len(r) for (h, w), s, r in
                  zip(levels, graph.settings["anchor_sizes"], graph.settings["aspect_ratios"]))
    assert case["torch"][0].shape == (2, anchors) and case["torch"][1].shape == (2, anchors, 4)
    assert [list(o.shape[-2:]) for o in case["torch"][2:]] == levels
    for ours, theirs in zip(case["onnx"], case["torch"]):
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= OUTPUT_RTOL * np.abs(theirs).max()


def test_settings_are_json_and_anchors_match_torchvision(case):
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    settings = json.loads(json.dumps(case["graph"].settings))
    generator = AnchorGenerator(tuple(map(tuple, settings["anchor_sizes"])),
                                tuple(map(tuple, settings["aspect_ratios"])))
    features = [torch.zeros(1, 1, h, w) for h, w in settings["feature_sizes"]]
    theirs = generator(ImageList(torch.zeros(1, 3, *SIZE), [SIZE]), features)[0].numpy()
    np.testing.assert_array_equal(np.concatenate(two_stage.anchors(settings, SIZE)), theirs)


def test_numpy_proposals_replay_torchvision(case):
    """On the torch wrapper's head outputs: torchvision's proposals, same count, same boxes."""
    settings = case["graph"].settings
    objectness, deltas = case["torch"][:2]
    boxes = two_stage.proposals(objectness, deltas, SIZE, settings)
    assert len(boxes) == len(case["reference"])
    for k, theirs in enumerate(case["reference"]):
        ours, scores, _ = two_stage.select(objectness[k], deltas[k], settings)
        np.testing.assert_array_equal(ours, boxes[k])
        assert ours.shape == theirs.shape and len(ours) > 10
        _assert_equal_up_to_ties(ours, theirs, scores, REPLAY_ATOL)


def test_proposals_from_the_onnx_graph_match_torchvision(case):
    """On the ONNX graph's outputs: the same anchors as on torch's, so torchvision's proposals;
    each box within what the graph's float error in its deltas moves it (exp(dw) x width, up to
    724 px wide anchors: a 2e-6 error in a delta moves a corner by ~0.01 px), plus REPLAY_ATOL."""
    settings = case["graph"].settings
    torch_objectness, torch_deltas = case["torch"][:2]
    onnx_objectness, onnx_deltas = case["onnx"][:2]
    cells = np.concatenate(two_stage.anchors(settings, SIZE))
    for k, theirs in enumerate(case["reference"]):
        reference, _, picked = two_stage.select(torch_objectness[k], torch_deltas[k], settings)
        ours, _, ours_picked = two_stage.select(onnx_objectness[k], onnx_deltas[k], settings)
        assert len(ours) == len(theirs)
        assert set(ours_picked) == set(picked)
        ours = ours[np.argsort(ours_picked)]
        order = np.argsort(picked)
        reference, picked = reference[order], picked[order]
        widths = (cells[picked, 2:] - cells[picked, :2])[:, [0, 1, 0, 1]]
        wh = np.minimum(torch_deltas[k, picked, 2:], settings["bbox_xform_clip"])[:, [0, 1, 0, 1]]
        error = np.abs(onnx_deltas[k, picked] - torch_deltas[k, picked])
        bound = widths * (error[:, [0, 1, 0, 1]] + 0.5 * np.exp(wh) * error[:, [2, 3, 2, 3]] * 1.01)
        assert (np.abs(ours - reference) <= bound + REPLAY_ATOL).all()


def test_few_proposals_take_the_coordinate_trick_nms(case):
    """At most 1,000 boxes (pre_nms_top_n 100 per level), torchvision's batched_nms offsets the
    boxes by level instead of running NMS per level; the replay does the same."""
    from torchvision.models.detection.image_list import ImageList

    model, normalised = case["model"], case["normalised"]
    settings = {**case["graph"].settings, "pre_nms_top_n": 100}
    saved = dict(model.rpn._pre_nms_top_n)
    model.rpn._pre_nms_top_n["testing"] = 100
    try:
        with torch.no_grad():
            reference, _ = model.rpn(ImageList(normalised, [SIZE] * len(normalised)),
                                     model.backbone(normalised))
    finally:
        model.rpn._pre_nms_top_n.update(saved)
    objectness, deltas = case["torch"][:2]
    assert 100 * len(settings["feature_sizes"]) * 4 <= two_stage.VANILLA_NMS_NUMEL
    for k, theirs in enumerate(reference):
        ours, scores, _ = two_stage.select(objectness[k], deltas[k], settings)
        assert len(ours) > 10
        _assert_equal_up_to_ties(ours, theirs.numpy(), scores, REPLAY_ATOL)


# -- step 2: the box graph ------------------------------------------------------------------

#: class probabilities, absolute: the ONNX box graph against torchvision's roi_heads
SCORE_ATOL = 1e-5
#: box coordinates, px, of every (proposal, class) row between two float32 computations (ONNX
#: and torch, or torch at another batch size): 2e-5 of the image side. Random box deltas make
#: boxes up to the image's size, and exp(dw) x width amplifies a 1e-7 relative feature error
#: (measured: up to 3.2e-3 px on ResNet-50's 91 x 176 rows, 1.5e-5 px on MobileNet). The
#: detections themselves (best classes after NMS) stay within REPLAY_ATOL.
ROW_ATOL = 2e-5 * max(SIZE)
#: layer gradients of the box graph against float64 torch autograd (max |diff| / max |ref|)
GRADIENT_RTOL = 1e-5
#: the layer whose gradient is checked, per model: the FPN's input from the last stage
LAYERS = {"fasterrcnn_mobilenet_v3_large_fpn": "backbone.body.16",
          "fasterrcnn_resnet50_fpn": "backbone.body.layer4"}


@pytest.fixture(scope="module")
def boxes(case):
    """The box graph exported on the RPN's reference proposals, run by onnxruntime; the score
    threshold is set to keep ~0.2 % of the (proposal, class) pairs (random weights give every
    class ~1/91), and torchvision's roi_heads run with it on the same proposals."""
    model, normalised = case["model"], case["normalised"]
    graph = two_stage.box_graph(model, SIZE)
    x = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    proposals = [r for r in case["reference"]]
    padded, weights = two_stage.box_inputs(proposals, graph.settings)
    inputs = (x, torch.from_numpy(padded), torch.from_numpy(weights))
    with torch.no_grad():
        rows = graph(*inputs)[0].numpy()
    probabilities = np.concatenate([rows[k, :len(p), 1:, 4].ravel() for k, p in enumerate(proposals)])
    threshold = float(np.quantile(probabilities, 0.998))
    model.roi_heads.score_thresh = threshold
    graph.settings["score_thresh"] = threshold
    with torch.no_grad():
        features = model.backbone(normalised)
        reference, _ = model.roi_heads(features, [torch.from_numpy(p) for p in proposals],
                                       [SIZE] * len(proposals))
    batch, count = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("count", min=1, max=4096)
    plain = _dynamo(graph, inputs, ({0: batch}, {0: batch, 1: count}, {0: batch, 1: count}))
    two_stage.name_outputs(plain, graph.output_names)
    names = [i.name for i in plain.graph.input]
    onnx_rows = session(plain, threads=2).run(None, dict(zip(names, [t.numpy() for t in inputs])))[0]
    return {"graph": graph, "plain": plain, "inputs": inputs, "proposals": proposals, "rows": rows,
            "onnx": onnx_rows, "reference": reference, "model": model}


def test_levels_match_torchvision_level_mapper(case, boxes):
    from torchvision.ops.poolers import LevelMapper

    settings = boxes["graph"].settings
    mapper = LevelMapper(settings["level_min"], settings["level_max"], settings["canonical_scale"],
                         settings["canonical_level"])
    proposals = boxes["proposals"]
    # proposals of every size: the RPN's, and squares on both sides of each level's boundary
    sides = np.float32(224) * np.float32(2.0) ** np.arange(-4, 3, dtype=np.float32)
    squares = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], 1)
    squares = np.concatenate([squares, squares * np.float32(0.999), squares * np.float32(1.001)])
    for boxes_ in [*proposals, squares]:
        theirs = mapper([torch.from_numpy(boxes_)]).numpy()
        np.testing.assert_array_equal(two_stage.levels_of(boxes_, settings), theirs)
    # ResNet-50's FPN pools 4 levels (strides 4-32); MobileNet's two are both at stride 32
    used = np.unique(two_stage.levels_of(np.concatenate(proposals), settings))
    assert (len(used) > 1) == (settings["level_min"] < settings["level_max"])


def test_box_graph_rows_match_torch_and_onnx(boxes):
    """The ONNX graph's rows equal the torch wrapper's; padding rows are ignored."""
    ours, theirs = boxes["onnx"], boxes["rows"]
    assert ours.shape == theirs.shape and ours.shape[-1] == 5
    for k, p in enumerate(boxes["proposals"]):
        error = np.abs(ours[k, :len(p)] - theirs[k, :len(p)])
        assert error[..., :4].max() <= ROW_ATOL and error[..., 4].max() <= SCORE_ATOL


@pytest.mark.parametrize("source", ["torch", "onnx"])
def test_detections_match_torchvision_roi_heads(boxes, source):
    """On the same proposals: torchvision's detections, same count and labels, boxes within
    1e-3 px, scores within SCORE_ATOL (ties in any order)."""
    rows = boxes["rows"] if source == "torch" else boxes["onnx"]
    settings = boxes["graph"].settings
    total = 0
    for k, theirs in enumerate(boxes["reference"]):
        found = two_stage.detections(rows[k], settings, len(boxes["proposals"][k]))
        assert len(found) == len(theirs["scores"])
        total += len(found)
        np.testing.assert_allclose(found.scores, theirs["scores"].numpy(), atol=SCORE_ATOL, rtol=0)
        ours = np.concatenate([found.boxes, found.labels[:, None]], 1)
        reference = np.concatenate([theirs["boxes"].numpy(), theirs["labels"].numpy()[:, None]], 1)
        _assert_equal_up_to_ties(ours, reference, found.scores, REPLAY_ATOL)
        # each detection's flat row index names its proposal and class
        proposal, label = found.anchors // rows.shape[2], found.anchors % rows.shape[2]
        np.testing.assert_array_equal(label, found.labels)
        np.testing.assert_allclose(rows[k, proposal, label, :4], found.boxes)
    assert total > 4


def test_box_rows_of_a_subset_of_proposals_are_the_same(boxes):
    """The box head is row-wise: the explained detections' proposals alone give their rows (what
    lets a gradient pass run on those few proposals)."""
    rows, settings = boxes["rows"], boxes["graph"].settings
    found = two_stage.detections(rows[0], settings, len(boxes["proposals"][0]))
    chosen = np.unique(found.anchors // rows.shape[2])[:5]
    padded, weights = two_stage.box_inputs([boxes["proposals"][0][chosen]], settings)
    with torch.no_grad():
        subset = boxes["graph"](boxes["inputs"][0][:1], torch.from_numpy(padded),
                                torch.from_numpy(weights))[0].numpy()
    # the same numbers up to float32 round-off of another batch shape
    np.testing.assert_allclose(subset[0, ..., :4], rows[0, chosen, ..., :4], atol=ROW_ATOL, rtol=0)
    np.testing.assert_allclose(subset[0, ..., 4], rows[0, chosen, ..., 4], atol=1e-6, rtol=0)


def test_box_graph_gradients_match_float64_autograd(case, boxes, request):
    """d(sum of weighted rows)/d(layer) through RoIAlign (the rule with run-time boxes), the box
    head and the decoding, proposals held fixed: camexport's augmented graph against torch
    autograd in float64 on the same inputs, on 6 proposals of each image."""
    import copy

    from camexport.graph.augment import augment
    from camexport.graph.locate import resolve
    from camexport.graph.outputs import gradient_name

    name = case["model"].__class__.__name__
    layer = LAYERS[request.node.callspec.params["case"]]
    plain, graph = boxes["plain"], boxes["graph"]
    label, tensor = resolve(plain, layer)
    augmented = augment(plain, {label: tensor}, output=two_stage.BOX_ROWS)
    chosen = [p[:: max(1, len(p) // 6)][:6] for p in boxes["proposals"]]
    padded, levels = two_stage.box_inputs(chosen, graph.settings)
    x = boxes["inputs"][0]
    shape = (len(x), padded.shape[1], boxes["rows"].shape[2], 5)
    target = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    names = [i.name for i in augmented.graph.input]
    feeds = dict(zip(names, [x.numpy(), padded, levels, target]))
    ours = session(augmented, threads=2).run([gradient_name(label)], feeds)[0]

    double = copy.deepcopy(graph).double()
    module = double.get_submodule(layer)
    kept = {}

    def keep(_, __, out):
        out.retain_grad()
        kept["a"] = out

    hook = module.register_forward_hook(keep)
    try:
        rows = double(x.double(), torch.from_numpy(padded).double(), torch.from_numpy(levels).double())[0]
        (rows * torch.from_numpy(target).double()).sum().backward()
    finally:
        hook.remove()
    theirs = kept["a"].grad.numpy()
    assert ours.shape == theirs.shape
    error = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"{name} {layer}: box graph gradient error {error:.2e}")
    assert np.abs(theirs).max() > 0 and error <= GRADIENT_RTOL
