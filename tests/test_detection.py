"""Object detection: torchvision RetinaNet and FCOS split at the head outputs, pgc's
FasterRCNNBoxScoreTarget (best-IoU match, IoU + score) through target_weights, the FPN levels
stacked as pgc's fasterrcnn_reshape_transform for EigenCAM on the backbone.

Models: RetinaNet and FCOS on a ResNet-18 FPN (P3-P7), 5 classes, random weights (seeded; the
class logits' prior bias replaced so that scores exceed the score threshold), input 128 x 128 (96
for FCOS), the models' own resize disabled (min_size = max_size = the input size) so torch and
the graph see the same pixels. Tolerance: max |diff| <= 1e-4 on maps in [0, 1]; gradients
<= 1e-4 relative to their largest value.
"""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget as TheirTarget
from zoo import one_model_at_a_time

from camexport.build import build
from camexport.detection import (
    BOX,
    DetectionError,
    FasterRCNNBoxScoreTarget,
    box_iou,
    check_layers,
    detection_targets,
    detector_graph,
    detector_kind,
    nms,
)
from camexport.explain import Explainer

TOLERANCE = 1e-4
LAYERS = ["backbone.body.layer4", "backbone.body.layer3"]
GRADIENT_METHODS = {"gradcam": pgc.GradCAM, "hirescam": pgc.HiResCAM, "gradcam++": pgc.GradCAMPlusPlus,
                    "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM, "eigengradcam": pgc.EigenGradCAM}
#: reference boxes: the detections themselves (pgc's tutorial: IoU 1, no gradient through the
#: box) and the same boxes moved 2.5 px (the IoU's gradient flows into the box regression)
SHIFTS = (0.0, 2.5)
TOP = 3

pytestmark = pytest.mark.xdist_group("retinanet")


def _fpn():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                               returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))


def retinanet(size: int = 128):
    from torchvision.models.detection import RetinaNet

    torch.manual_seed(0)
    model = RetinaNet(_fpn(), num_classes=5, min_size=size, max_size=size).eval()
    with torch.no_grad():  # the prior bias (-4.6) keeps every random score under 0.05
        model.head.classification_head.cls_logits.weight.normal_(0, 0.05)
        model.head.classification_head.cls_logits.bias.fill_(-1.0)
    return model


def fcos(size: int = 96):
    from torchvision.models.detection import FCOS

    torch.manual_seed(0)
    model = FCOS(_fpn(), num_classes=5, min_size=size, max_size=size).eval()
    with torch.no_grad():  # scores above 0.2 and boxes wider than a pixel
        model.head.classification_head.cls_logits.weight.normal_(0, 0.05)
        model.head.classification_head.cls_logits.bias.fill_(0.0)
        model.head.regression_head.bbox_reg.bias.fill_(1.0)
    return model


@one_model_at_a_time
def prepared(name: str, root: str):
    """(torch model, explainer, two images); "retinanet-layer3": one layer, for the perturbation
    methods (pgc's multi-layer AblationCAM fails on this pair of layers with an IndexError)."""
    model = fcos() if name == "fcos" else retinanet()
    size = 96 if name == "fcos" else 128
    path = f"{root}/{name}.pt"
    torch.save(model, path)
    methods = ",".join([*GRADIENT_METHODS, "eigencam", "scorecam", "ablationcam"])
    layers = LAYERS[1:] if name == "retinanet-layer3" else LAYERS
    # overwrite: a model the tests come back to after another one is prepared again
    built = build(path, layers, methods, trust_pickle=True, input_size=(size, size), out_dir=f"{root}/{name}",
                  overwrite=True)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)).numpy()
    return model, Explainer(built.directory), x


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("detection"))


def _torch_detections(model, x):
    with torch.no_grad():
        return [{k: v.numpy() for k, v in d.items()} for d in model(list(torch.tensor(x)))]


def _targets(explainer, model, x, shift):
    """Both sides' targets: the top detections of each image (each side's own), moved by ``shift``."""
    ours = [FasterRCNNBoxScoreTarget(f.labels[:TOP], f.boxes[:TOP] + shift) for f in explainer.detect(x)]
    theirs = [TheirTarget(d["labels"][:TOP], d["boxes"][:TOP] + shift) for d in _torch_detections(model, x)]
    return ours, theirs


def _modules(model):
    return [model.backbone.body.layer4, model.backbone.body.layer3]


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_detections_match_torchvision(name, root):
    """Post-processing in numpy (threshold, per-level top-k, class-wise NMS) gives torchvision's
    detections from the graph's rows."""
    model, explainer, x = prepared(name, root)
    for found, theirs in zip(explainer.detect(x), _torch_detections(model, x)):
        assert len(found) == len(theirs["scores"]) > TOP
        np.testing.assert_array_equal(found.labels, theirs["labels"])
        np.testing.assert_allclose(found.boxes, theirs["boxes"], atol=2e-4)  # pixels
        np.testing.assert_allclose(found.scores, theirs["scores"], atol=1e-5)


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("method", list(GRADIENT_METHODS))
def test_gradient_methods_match_pgc(method, shift, root):
    model, explainer, x = prepared("retinanet", root)
    ours_targets, their_targets = _targets(explainer, model, x, shift)
    ours = explainer(x, targets=ours_targets, methods=[method]).cams[method]
    with GRADIENT_METHODS[method](model=model, target_layers=_modules(model)) as cam:
        theirs = cam(input_tensor=torch.tensor(x), targets=their_targets)
    assert ours.max() > 0.99 and ours.std() > 0.05
    diff = np.abs(ours - theirs).max()
    print(f"retinanet {method} shift {shift}: max |diff| {diff:.2e}")
    assert diff <= TOLERANCE, f"{method}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_target_gradients_match_torch(name, root):
    """The layer gradients of pgc's target equal torch autograd's, and moving the reference
    boxes changes them (the IoU's gradient reaches the box regression); with the detections
    as their own references the box part of the cotangent is 0 (torch's max/min pass
    half of the gradient to each tied side)."""
    model, explainer, x = prepared(name, root)
    gradients = {}
    for shift in SHIFTS:
        ours_targets, their_targets = _targets(explainer, model, x[:1], shift)
        kept = {}

        def keep(module, args, out, kept=kept):
            out.retain_grad()
            kept["a"] = out

        hook = model.backbone.body.layer3.register_forward_hook(keep)
        try:
            loss = their_targets[0](model(list(torch.tensor(x[:1])))[0])
            loss.backward()
        finally:
            hook.remove()
            model.zero_grad()
        theirs = kept["a"].grad.numpy()
        ours = explainer.inputs(x[:1], ours_targets).gradients[1]
        error = np.abs(ours - theirs).max() / np.abs(theirs).max()
        print(f"{name} shift {shift}: gradient error {error:.2e}")
        assert error <= TOLERANCE
        gradients[shift] = ours
        bound = ours_targets[0].for_detector(explainer.detection)
        rows = explainer.forward(x[:1])[0]
        cotangent = bound.cotangent(rows)
        # FCOS boxes one anchor for several classes: a reference whose best-IoU detection is the
        # same box with another label scores nothing (pgc's Q27)
        matched = len(bound.matches(rows))
        assert 1 <= matched <= TOP and (cotangent[:, 4:] != 0).sum() == matched
        box_part = np.abs(cotangent[:, :4]).max()
        assert box_part < 1e-12 if shift == 0.0 else box_part > 1e-3
    change = np.abs(gradients[SHIFTS[1]] - gradients[0.0]).max() / np.abs(gradients[0.0]).max()
    assert change > 1e-2


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_perturbation_methods_match_pgc(method, root):
    """Every masked or ablated copy is post-processed again and re-matched, as pgc does.
    The layer ends in a ReLU, so the ablation value is 0 (see the next test for min - 1e7)."""
    model, explainer, x = prepared("retinanet-layer3", root)
    x = x[:1]
    ours_targets, their_targets = _targets(explainer, model, x, 2.5)
    ours = explainer(x, targets=ours_targets, methods=[method]).cams[method]
    cls = pgc.ScoreCAM if method == "scorecam" else pgc.AblationCAM
    with cls(model=model, target_layers=_modules(model)[1:]) as cam:
        theirs = cam(input_tensor=torch.tensor(x), targets=their_targets)
    assert ours.max() > 0.99 and ours.std() > 0.05
    diff = np.abs(ours - theirs).max()
    print(f"retinanet {method}: max |diff| {diff:.2e}")
    assert diff <= TOLERANCE


def test_ablation_below_the_minimum_saturates_the_detector(root):
    """Why AblationCAM is compared on ReLU layers only: on a layer whose minimum is not 0, pgc
    ablates with min - 1e7, which saturates the scores of thousands of anchors to exactly 1.0.
    Which of those tied detections survive top-k and NMS is then decided by the sort's order
    on ties (unspecified in torch; camexport keeps anchor order), not by the model."""
    model, _, x = prepared("retinanet", root)
    graph = detector_graph(model, (128, 128))
    layer = graph.backbone.fpn.layer_blocks[1]
    hook = layer.register_forward_hook(lambda m, a, out: torch.cat(
        [out[:, :1] * 0 + (out.min() - 1e7), out[:, 1:]], dim=1))
    try:
        with torch.no_grad():
            rows = graph(torch.tensor(x[:1]))[0][0].numpy()
    finally:
        hook.remove()
    tied = (rows[:, 4:] == 1.0).sum()
    print(f"scores exactly 1.0 after ablation: {tied}")
    assert tied > graph.spec.detections_per_img


def test_eigencam_on_the_stacked_fpn_levels_matches_pgc(root):
    """pgc's detection tutorial: EigenCAM on target_layers=[model.backbone] with
    fasterrcnn_reshape_transform (|level| resized to the coarsest level, concatenated); the
    transform's 'pool' level is the last level of any FPN (here 'p7')."""
    model = retinanet(384)
    path = f"{root}/retinanet384.pt"
    torch.save(model, path)
    built = build(path, ["backbone"], "eigencam,scorecam", trust_pickle=True, input_size=(384, 384),
                  out_dir=f"{root}/retinanet384")
    layer = built.manifest["layers"][0]
    assert layer["tensor"] == "fpn_stack" and layer["shape"][1:] == [256 * 5, 3, 3]
    explainer = Explainer(built.directory)
    x = torch.rand(1, 3, 384, 384, generator=torch.Generator().manual_seed(2)).numpy()

    def reshape(levels):
        size = list(levels.values())[-1].shape[-2:]
        return torch.cat([torch.nn.functional.interpolate(torch.abs(v), size, mode="bilinear")
                          for v in levels.values()], dim=1)

    found = explainer.detect(x)[0]
    ours = explainer(x, targets=[FasterRCNNBoxScoreTarget(found.labels[:TOP], found.boxes[:TOP])],
                     methods=["eigencam"]).cams["eigencam"]
    free = explainer(x, methods=["eigencam"]).cams["eigencam"]  # no target needed
    theirs_detections = _torch_detections(model, x)[0]
    with pgc.EigenCAM(model=model, target_layers=[model.backbone], reshape_transform=reshape) as cam:
        theirs = cam(input_tensor=torch.tensor(x), targets=[
            TheirTarget(theirs_detections["labels"][:TOP], theirs_detections["boxes"][:TOP])])
    diff = np.abs(ours - theirs).max()
    print(f"retinanet backbone eigencam: max |diff| {diff:.2e}")
    assert ours.std() > 0.05 and diff <= TOLERANCE
    np.testing.assert_array_equal(free, ours)


def test_methods_the_stack_cannot_serve_are_refused():
    with pytest.raises(DetectionError, match="gradcam, ablationcam cannot use it"):
        check_layers([("backbone", "fpn_stack")], ["eigencam", "gradcam", "ablationcam"])
    check_layers([("backbone", "fpn_stack"), ("backbone.body.layer4", "relu_16")], ["eigencam", "scorecam"])


def test_faster_rcnn_is_a_two_stage_detector():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3)
    assert detector_kind(model) == "fasterrcnn"


def test_detector_state_dicts_load_by_arch_without_downloads():
    from torchvision.models import resnet18
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    from camexport.load import build_architecture

    module, _ = build_architecture("retinanet_resnet50_fpn")
    assert detector_kind(module) == "retinanet"
    assert detector_kind(resnet18()) is None
    with pytest.raises(DetectionError, match="SSD"):
        detector_kind(ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None))


def test_run_stores_detections_and_explains_them(root):
    """camexport run on a detector: per image the detections (padded to detections_per_img),
    and CAMs of the detections scoring at least --detection-threshold (pgc's tutorial target);
    --targets CLASS keeps that class's detections only; metrics score that target."""
    import h5py
    from click.testing import CliRunner

    from camexport.cli import main
    from camexport.metrics import evaluate
    from camexport.store import ResultReader

    _, explainer, x = prepared("retinanet", root)
    data = f"{root}/det.h5"
    with h5py.File(data, "w") as h5:
        h5["images"] = x
    found = explainer.detect(x)
    threshold = float(np.median([f.scores[5] for f in found]))
    for targets, category in (("pred", None), (str(int(found[0].labels[0])), int(found[0].labels[0]))):
        out = f"{root}/det-{targets}.h5"
        ran = CliRunner().invoke(main, ["run", f"{root}/retinanet", "--data", data, "--out", out,
                                        "--methods", "gradcam,eigencam", "--targets", targets,
                                        "--metrics", "drop-in-confidence",
                                        "--detection-threshold", str(threshold), "-q"])
        assert ran.exit_code == 0, ran.output
        expected = [detection_targets(f, threshold, category, spec=explainer.detection) for f in found]
        assert any(len(t.labels) for t in expected)
        cams = explainer(x, targets=expected, methods=["gradcam", "eigencam"]).cams
        drop = evaluate("drop-in-confidence", x, cams["gradcam"], expected, explainer.forward, seed=0)
        with ResultReader(out) as results:
            assert not results.has("outputs")
            most = explainer.detection.detections_per_img
            assert results.storage("detections/boxes").shape == (2, most, 4)
            for b, f in enumerate(found):
                count = results.read("detections/count", b)
                assert count == len(f)
                stored = results.detections(b)
                np.testing.assert_array_equal(stored.boxes, f.boxes)
                np.testing.assert_array_equal(stored.scores, f.scores)
                np.testing.assert_array_equal(stored.labels, f.labels)
                assert np.isnan(results.read("detections/scores", b)[count:]).all()
            assert (results.targets() == (-1 if category is None else category)).all()
            for name in ("gradcam", "eigencam"):
                np.testing.assert_allclose(results.cams(name), cams[name], atol=1e-6)
            # the metrics score the same target (IoU + score of the matched detections)
            np.testing.assert_allclose(results.metric("drop-in-confidence", "gradcam"), drop, rtol=1e-5)
    _renders_the_explained_boxes(out, root, expected[0], x.shape[-1])


def _renders_the_explained_boxes(results, root, target, size):
    """camexport render on detector results draws the explained boxes on every tile."""
    import cv2

    from camexport.render import BOX_COLOUR, render_results

    written = render_results(results, f"{root}/overlays", indices=[0])
    picture = cv2.cvtColor(cv2.imread(str(written[0])), cv2.COLOR_BGR2RGB)
    x1, y1 = np.clip(np.round(target.bounding_boxes[0][:2]).astype(int), 0, size - 1)
    band = 22  # the label band above each tile
    for tile in range(3):  # the image, gradcam, eigencam
        corner = picture[band + y1, tile * size + x1]
        assert tuple(corner) == BOX_COLOUR, (tile, corner)


def test_tail_reads_the_lateral_levels_of_its_own_image(root):
    """The tail after backbone.body.layer3 also reads values computed before it (the FPN's
    lateral from layer2, the image's size): they come from the image given, remembered for the
    next call on the same image (AblationCAM's chunks) and recomputed for another image."""
    _, explainer, x = prepared("retinanet-layer3", root)
    nothing = FasterRCNNBoxScoreTarget([], np.zeros((0, 4)))  # activations need no target
    activations = explainer.inputs(x[:1], [nothing]).raw_activations[0]
    first = explainer.tail(0, activations, x[:1])
    again = explainer.tail(0, activations, x[:1])
    other = explainer.tail(0, activations, x[1:2])
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, explainer.forward(x[:1]), atol=1e-4)
    assert np.abs(other - first).max() > 1e-3


def test_inspect_checks_a_detector_tail(root):
    """camexport inspect --check exports a detector the way build does (up to its head outputs)."""
    from click.testing import CliRunner

    from camexport.cli import main

    prepared("fcos", root)
    ran = CliRunner().invoke(main, ["inspect", f"{root}/fcos.pt", "--trust-pickle", "--check",
                                    "--layer", "backbone.body.layer4", "--input-size", "96", "96"])
    assert ran.exit_code == 0, ran.output
    assert "to detections" in ran.output and "InstanceNormalization" in ran.output
    assert "MISSING" not in ran.output


def _greedy_nms(boxes, scores, threshold):
    """torchvision's rule spelled out: best first, drop every later box whose IoU with a kept
    one exceeds the threshold (a NaN IoU, degenerate boxes, drops too, as the kept loop does)."""
    order = np.argsort(-scores, kind="stable")
    dropped = np.zeros(len(order), bool)
    keep = []
    for position, index in enumerate(order):
        if dropped[position]:
            continue
        keep.append(index)
        for later in range(position + 1, len(order)):
            iou = box_iou(boxes[index], boxes[order[later]])[0, 0]
            dropped[later] |= not iou <= threshold
    return np.asarray(keep, np.int64)


def test_nms_keeps_what_greedy_suppression_keeps():
    """camexport's NMS (blocks of the best boxes still alive decided among themselves, then
    against the rest; stopping at ``limit``) keeps exactly the boxes of plain greedy
    suppression, in its order: random boxes with tied scores and degenerate (zero-area) boxes,
    three thresholds, blocks of 64 (the default) and of 7 (many blocks); with ``limit``, its
    first boxes."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(0, 200))
        corner = rng.uniform(0, 100, (n, 2)).astype(np.float32)
        size = rng.uniform(0, 30, (n, 2)).astype(np.float32)
        if trial % 4 == 0:
            size[: n // 3] = 0
        boxes = np.concatenate([corner, corner + size], axis=1)
        scores = (rng.integers(0, 10, n) if trial % 2 else rng.random(n)).astype(np.float32)
        for threshold in (0.3, 0.5, 0.7):
            expected = _greedy_nms(boxes, scores, threshold)
            np.testing.assert_array_equal(nms(boxes, scores, threshold), expected)
            np.testing.assert_array_equal(nms(boxes, scores, threshold, limit=5), expected[:5])
            np.testing.assert_array_equal(nms(boxes, scores, threshold, block=7), expected)
            np.testing.assert_array_equal(nms(boxes, scores, threshold, limit=9, block=7), expected[:9])


def test_postprocessing_reuses_the_detections_of_the_same_rows_only():
    """The rows just post-processed come back within one explanation (the detections, then the
    box target matching them): their detections are reused, as a copy the caller may add masks
    or keypoints to; other rows are post-processed afresh."""
    from camexport.detection import postprocess
    from camexport.yolo import yolo_spec

    rng = np.random.default_rng(3)
    spec = yolo_spec(3, 40, (64, 64), ["level"])
    centre = rng.uniform(8, 56, (40, 2))
    rows = np.concatenate([centre - 4, centre + 4, rng.uniform(0, 1, (40, 3))], axis=1).astype(np.float32)
    first = postprocess(rows, spec)
    first.keypoints = np.zeros(1)
    again = postprocess(rows.copy(), spec)
    assert again is not first and again.keypoints is None
    np.testing.assert_array_equal(again.anchors, first.anchors)
    changed = rows.copy()
    changed[first.anchors[0], BOX:] = 0  # the best detection's scores gone
    assert first.anchors[0] not in postprocess(changed, spec).anchors
