"""camexport.two_stage, step 1 of two-stage detectors: the RPN graph and the numpy proposals.

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
