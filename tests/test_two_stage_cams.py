"""Faster R-CNN end to end, as pgc's detection tutorial: `camexport build` of a pickled
torchvision ``fasterrcnn_resnet50_fpn`` (the RPN graph and the augmented box graph in one
artifact), detections replayed in numpy, FasterRCNNBoxScoreTarget through target weights, the
gradient methods on ``backbone.body.layer4``, EigenCAM and AblationCAM on the stacked FPN
levels, against pytorch-grad-cam 1.5.7 on the same torch model and images.

Random weights (seeded), 320 x 320, batch 2, the model's own resize disabled (min_size =
max_size = 320, so torchvision's transform leaves the pixels as they are). Random ResNet-50
weights give 100 detections per image above the default score threshold. Tolerances: CAMs
max |diff| <= 1e-4 (maps in [0, 1]); detections: same labels, scores and boxes within
SCORE_ATOL and BOX_ATOL.
"""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from conftest import give_back_memory
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget as TheirTarget
from pytorch_grad_cam.utils.reshape_transforms import fasterrcnn_reshape_transform

from camexport.build import build
from camexport.detection import DetectionError, FasterRCNNBoxScoreTarget, detection_targets
from camexport.explain import Explainer

SIZE = 320
TOLERANCE = 1e-4
#: detections, ONNX against torch through the whole model: the RPN's proposals agree within
#: 1e-3 px (tests/test_two_stage.py), and the random ResNet-50's features change steeply enough
#: that RoIAlign at boxes 1e-3 px apart moves the box head's outputs further. Measured on these
#: two images: scores 1.1e-4 apart (0.39-0.99), boxes 9.3e-3 px (on the same proposals the box
#: graph agrees within 1e-5 and 1e-3 px: tests/test_two_stage.py)
SCORE_ATOL, BOX_ATOL = 3e-4, 2e-2
TOP = 3
SHIFTS = (0.0, 2.5)
GRADIENT_METHODS = {"gradcam": pgc.GradCAM, "hirescam": pgc.HiResCAM, "gradcam++": pgc.GradCAMPlusPlus,
                    "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM, "eigengradcam": pgc.EigenGradCAM}

pytestmark = pytest.mark.xdist_group("fasterrcnn")


@pytest.fixture(scope="module")
def frcnn(tmp_path_factory):
    import torchvision

    root = tmp_path_factory.mktemp("fasterrcnn")
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=SIZE, max_size=SIZE).eval()
    torch.save(model, root / "model.pt")
    built = build(str(root / "model.pt"), ["backbone.body.layer4"],
                  [*GRADIENT_METHODS, "eigencam", "ablationcam", "dff"], trust_pickle=True,
                  input_size=(SIZE, SIZE), out_dir=root / "artifact")
    stack = build(str(root / "model.pt"), ["backbone"], ["eigencam", "ablationcam"], trust_pickle=True,
                  input_size=(SIZE, SIZE), out_dir=root / "stack")
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).numpy()
    with torch.no_grad():
        theirs = [{k: v.numpy() for k, v in d.items()} for d in model(list(torch.tensor(x)))]
    explainers = {"explainer": Explainer(built.directory), "stack": Explainer(stack.directory)}
    yield {"model": model, **explainers, "x": x, "theirs": theirs, "root": root, "built": built}
    release_explainers(explainers)


def release_explainers(held: dict) -> None:
    """Drop the sessions of the explainers in ``held`` (they make them again when used) and give
    the memory back: a Faster R-CNN explainer's sessions hold GBs, and a test that makes its
    own explainers (the CLI, the drop-in) would otherwise hold both sets (14 GB peak in CI)."""
    for explainer in held.values():
        if isinstance(explainer, Explainer):
            explainer.release()
    give_back_memory()


def test_artifact_holds_the_rpn_graph_and_the_settings(frcnn):
    import json

    from camexport.artifact import read_extra

    manifest = frcnn["built"].manifest
    detection = manifest["detection"]
    assert detection["kind"] == "fasterrcnn" and detection["classes"] == 91
    assert list(detection["level_sizes"]) == [1000]  # the RPN's post_nms_top_n (testing)
    assert set(detection["settings"]) == {"rpn", "box"}  # and "mask" for a Mask R-CNN
    assert set(manifest["graphs"]) == {"rpn"}
    json.dumps(manifest)
    rpn = read_extra(frcnn["built"].directory, "rpn")
    assert [o.name for o in rpn.graph.output][:2] == ["objectness", "rpn_deltas"]
    # a changed RPN graph is refused, naming the rebuild
    path = frcnn["built"].directory / "model.rpn.onnx"
    original = path.read_bytes()
    from camexport.artifact import ArtifactError, verify_artifact

    try:
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(ArtifactError, match="model.rpn.onnx does not match manifest.json"):
            verify_artifact(frcnn["built"].directory)  # what Explainer and inspect open it with
        path.unlink()
        with pytest.raises(ArtifactError, match="model.rpn.onnx, listed in manifest.json, is missing"):
            read_extra(frcnn["built"].directory, "rpn")
    finally:
        path.write_bytes(original)
    verify_artifact(frcnn["built"].directory)


def test_an_rcnn_artifact_may_be_overwritten_and_only_with_overwrite(frcnn):
    """--out naming a Faster R-CNN artifact (its extra graph model.rpn.onnx included) is an
    artifact to replace with --overwrite, refused without it; another file there is foreign."""
    from camexport.artifact import ArtifactError, check_target

    directory = frcnn["built"].directory
    check_target(directory, overwrite=True)
    with pytest.raises(ArtifactError, match="already holds an artifact; pass --overwrite"):
        check_target(directory, overwrite=False)
    stray = directory / "notes.txt"
    stray.write_text("mine")
    try:
        with pytest.raises(ArtifactError, match=r"holding other files \(notes.txt\)"):
            check_target(directory, overwrite=True)
    finally:
        stray.unlink()


def test_detections_match_torchvision(frcnn):
    """The RPN graph, the numpy proposals, the box graph and the numpy post-processing give the
    torchvision model's detections on the same pixels."""
    found = frcnn["explainer"].detect(frcnn["x"])
    for ours, theirs in zip(found, frcnn["theirs"]):
        assert_same_detections(ours, theirs)


def test_detections_are_float32_round_off_from_float64(frcnn):
    """The box gap to torchvision (up to 9e-3 px on 100 detections of a random ResNet-50) is
    float32's: against the same model in float64, camexport's best 10 detections are as far as
    torchvision's own float32 ones, within 3x their distance plus 1e-3 px (measured: camexport
    3.3e-3 px, torchvision float32 1.7e-3 px), and their scores within 1e-5 of float64's."""
    import copy

    model = copy.deepcopy(frcnn["model"]).double()
    with torch.no_grad():
        exact = [{k: v.numpy() for k, v in d.items()}
                 for d in model(list(torch.tensor(frcnn["x"], dtype=torch.float64)))]
    del model

    def distances(boxes, scores, labels, reference):
        """Per detection of the best 10: box and score distance to the nearest reference
        detection of its label."""
        found = []
        for box, score, label in zip(boxes[:10], scores[:10], labels[:10]):
            same = np.flatnonzero(reference["labels"] == label)
            gaps = np.abs(reference["boxes"][same] - box).max(1)
            found.append((gaps.min(), abs(reference["scores"][same[np.argmin(gaps)]] - score)))
        return np.asarray(found)

    for ours, theirs, reference in zip(frcnn["explainer"].detect(frcnn["x"]), frcnn["theirs"], exact):
        mine = distances(ours.boxes, ours.scores, ours.labels, reference)
        torch32 = distances(theirs["boxes"], theirs["scores"], theirs["labels"], reference)
        print(f"best 10 vs float64: camexport boxes {mine[:, 0].max():.1e} px, scores "
              f"{mine[:, 1].max():.1e}; torchvision float32 boxes {torch32[:, 0].max():.1e} px, "
              f"scores {torch32[:, 1].max():.1e}")
        assert mine[:, 0].max() <= 3 * torch32[:, 0].max() + 1e-3
        assert mine[:, 1].max() <= 1e-5


def assert_same_detections(ours, theirs: dict) -> None:
    """Each of our detections is one of torchvision's (``theirs``: its output dict in numpy):
    same count, scores within SCORE_ATOL in order; same label and box within BOX_ATOL, where
    detections whose scores are within SCORE_ATOL may come in either order."""
    assert len(ours) == len(theirs["scores"]) > TOP
    np.testing.assert_allclose(ours.scores, theirs["scores"], atol=SCORE_ATOL, rtol=0)
    unused = np.ones(len(ours), bool)
    for k in range(len(ours)):
        near = (np.abs(theirs["scores"] - ours.scores[k]) <= 2 * SCORE_ATOL) & unused
        near &= theirs["labels"] == ours.labels[k]
        distance = np.where(near, np.abs(theirs["boxes"] - ours.boxes[k]).max(-1), np.inf)
        j = int(np.argmin(distance))
        assert distance[j] <= BOX_ATOL, f"detection {k}: no torchvision detection within {BOX_ATOL} px"
        unused[j] = False


def _targets(frcnn, shift):
    """Both sides' targets: each side's own top detections, moved by ``shift`` px."""
    ours = [FasterRCNNBoxScoreTarget(f.labels[:TOP], f.boxes[:TOP] + shift)
            for f in frcnn["explainer"].detect(frcnn["x"])]
    theirs = [TheirTarget(d["labels"][:TOP], d["boxes"][:TOP] + shift) for d in frcnn["theirs"]]
    return ours, theirs


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("method", list(GRADIENT_METHODS))
def test_gradient_methods_match_pgc(frcnn, method, shift):
    """pgc's tutorial with target_layers=[model.backbone.body.layer4]: the gradient of IoU + score
    of the matched detections flows through the box head and RoIAlign, proposals fixed."""
    model, x = frcnn["model"], frcnn["x"]
    ours_targets, their_targets = _targets(frcnn, shift)
    ours = frcnn["explainer"](x, targets=ours_targets, methods=[method]).cams[method]
    with GRADIENT_METHODS[method](model=model, target_layers=[model.backbone.body.layer4]) as cam:
        theirs = cam(input_tensor=torch.tensor(x), targets=their_targets)
    diff = np.abs(ours - theirs).max()
    print(f"fasterrcnn {method} shift {shift}: max |diff| {diff:.2e}")
    assert ours.max() > 0.99 and ours.std() > 0.05
    assert diff <= TOLERANCE, f"{method}: max |diff| {diff:.2e}"


def test_eigencam_on_the_stacked_fpn_levels_matches_pgc(frcnn):
    """pgc's tutorial verbatim: EigenCAM, target_layers=[model.backbone],
    reshape_transform=fasterrcnn_reshape_transform (its 'pool' level is the last level)."""
    model, x = frcnn["model"], frcnn["x"]
    explainer = frcnn["stack"]
    assert explainer.layers[0]["shape"][1:] == [256 * 5, 5, 5]
    ours = explainer(x, methods=["eigencam"]).cams["eigencam"]
    _, their_targets = _targets(frcnn, 0.0)
    with pgc.EigenCAM(model=model, target_layers=[model.backbone],
                      reshape_transform=fasterrcnn_reshape_transform) as cam:
        theirs = cam(input_tensor=torch.tensor(x), targets=their_targets)
    diff = np.abs(ours - theirs).max()
    print(f"fasterrcnn backbone eigencam: max |diff| {diff:.2e}")
    assert ours.std() > 0.05 and diff <= TOLERANCE


def test_gradients_run_on_the_explained_proposals_only(frcnn):
    """A gradient pass feeds the box graph only the proposals whose rows the targets weigh, and
    gives the same gradients as a pass with unweighted proposals too (the box head is row-wise)."""
    from camexport import two_stage
    from camexport.graph.outputs import TARGET_WEIGHTS, gradient_name

    explainer, x = frcnn["explainer"], frcnn["x"][:1]
    targets, _ = _targets(frcnn, 0.0)
    rows = explainer.forward(x)
    weights = np.asarray([targets[0].for_detector(explainer.detection).cotangent(rows[0])], np.float32)
    assert 0 < (np.abs(weights).reshape(1, rows.shape[1], -1).max(-1) > 0).sum() <= TOP
    session = explainer.session
    assert isinstance(session, two_stage.ProposalSession)
    name = gradient_name(explainer.layers[0]["name"])
    fed = {}
    run = session.inner.run
    session.inner.run = lambda names, feed, *a: (fed.update(feed), run(names, feed, *a))[1]
    try:
        few = session.run([name], {explainer.input_name: x, TARGET_WEIGHTS: weights})[0]
    finally:
        session.inner.run = run
    assert fed[two_stage.PROPOSALS].shape[1] <= TOP
    # against a pass on the weighted proposals among 60 others (not all 1,000: RoIAlign's
    # transpose over every proposal took 4 GB of this test worker's memory)
    feeds = session.source(x, session.source.key(x))
    weighted = np.flatnonzero(np.abs(weights[0]).reshape(weights.shape[1], -1).max(-1) > 0)
    chosen = np.union1d(weighted, np.arange(60))
    full = run([name], {explainer.input_name: x, TARGET_WEIGHTS: weights[:, chosen],
                        **{key: value[:, chosen] for key, value in feeds.items()}})[0]
    assert np.abs(full).max() > 0
    np.testing.assert_allclose(few, full, atol=1e-5 * np.abs(full).max(), rtol=0)


def test_forward_pools_each_proposal_on_its_level_only(frcnn):
    """The plain forward (two_stage.PooledBoxes: the RPN graph's levels, each proposal pooled on
    its own level) gives the whole box graph's rows for every proposal."""
    assert_forward_is_the_whole_box_graph(frcnn["explainer"], frcnn["x"])


def assert_forward_is_the_whole_box_graph(explainer, x: np.ndarray) -> None:
    """Explainer.forward's rows (the fast path) against the whole box graph's on the same
    proposals: equal within 1e-6 where there are proposals, zero past them (padding)."""
    from camexport.two_stage import BOX_ROWS, LEVELS

    source = explainer.task._proposals(explainer)
    source._rows = None  # nothing remembered: the forward runs
    fast = explainer.forward(x)
    feeds = source(x, source.key(x))
    whole = explainer._plain.inner.run([BOX_ROWS], {explainer.input_name: x, **feeds})[0]
    diff = 0.0
    for b in range(len(x)):
        count = int(feeds[LEVELS][b].sum())
        assert count > TOP and not fast[b, count:].any()
        diff = max(diff, float(np.abs(fast[b, :count] - whole[b, :count]).max()))
    print(f"forward from the pooled levels against the whole box graph: max |diff| {diff:.1e}")
    assert diff <= 1e-6


def test_an_image_without_detections_gets_zero_cams(frcnn):
    """No detection at the threshold: no target box, a zero CAM (pgc's tutorial gives the same:
    no score, no gradient), never an error."""
    explainer, x = frcnn["explainer"], frcnn["x"]
    found = explainer.detect(x)
    targets = [detection_targets(f, 2.0, spec=explainer.detection) for f in found]  # scores < 2
    cams = explainer(x, targets=targets, methods=["gradcam"]).cams["gradcam"]
    assert cams.shape == (2, SIZE, SIZE) and not cams.any()


#: AblationCAM's share of channels in the tests (pgc's ratio_channels_to_ablate: the 12 most and
#: 12 least objective of the 1,280 stacked channels; every channel costs a run of the RPN head
#: and the box head on its own proposals, on both sides)
ABLATION_RATIO = 0.01
#: pgc's ablated copies per forward: its Faster R-CNN ablation value is a constant (-1000), so the
#: batch changes no number; pgc's default 32 copies of a Faster R-CNN forward hold GBs
ABLATION_BATCH = 4


def test_ablationcam_on_the_fpn_levels_matches_pgc(frcnn):
    """pgc's tutorial: AblationCAM on model.backbone with AblationLayerFasterRCNN (flat channel
    k of the stack is channel k mod 256 of FPN level k // 256, set to -1000) and
    fasterrcnn_reshape_transform; each ablated copy gets its own proposals (the RPN runs on the
    ablated levels). One image; the weights must vary (not every ablation kills the targets)."""
    from pytorch_grad_cam.ablation_layer import AblationLayerFasterRCNN

    from camexport.methods.perturbation import AblationCAM, ablation_order

    model, x, explainer = frcnn["model"], frcnn["x"][:1], frcnn["stack"]
    ours_targets, their_targets = _targets(frcnn, 0.0)
    method = AblationCAM()
    method.ratio_channels_to_ablate = ABLATION_RATIO
    inputs = explainer.inputs(x, ours_targets[:1])
    chosen = ablation_order(inputs.activations[0][0], ABLATION_RATIO)
    weights = method.weights(inputs, 0)[0][chosen]
    assert len(set(chosen // 256)) >= 3  # channels of several FPN levels
    assert len(np.unique(np.round(weights, 4))) >= 3, weights
    ours = explainer(x, targets=ours_targets[:1], methods=[method]).cams["ablationcam"]
    cam = pgc.AblationCAM(model, [model.backbone], reshape_transform=fasterrcnn_reshape_transform,
                          ablation_layer=AblationLayerFasterRCNN(), ratio_channels_to_ablate=ABLATION_RATIO,
                          batch_size=ABLATION_BATCH)
    theirs = cam(input_tensor=torch.tensor(x), targets=their_targets[:1])
    diff = np.abs(ours - theirs).max()
    print(f"fasterrcnn backbone ablationcam (ratio {ABLATION_RATIO}): max |diff| {diff:.2e}")
    assert ours.std() > 0.05 and diff <= TOLERANCE


def test_level_ablation_equals_whole_ablated_copies(frcnn):
    """two_stage.LevelAblation runs each head on the ablated level only and reuses the image's
    rows for boxes pooled from other levels: the rows equal running each ablated copy of all
    levels through the RPN head, the proposals and the whole box head (graphs cut at all the
    FPN levels), on channels of every level."""
    from camexport import two_stage
    from camexport.artifact import read_extra, read_plain
    from camexport.graph.cut import layer_tail
    from camexport.runtime import session

    explainer, x = frcnn["stack"], frcnn["x"][:1]
    channels = np.array([5, 300, 600, 900, 1100, 1200, 10, 700, 1279, 256])
    ours = explainer.ablate(0, None, channels, None, x)
    ablation, image = explainer.task._ablation, explainer.task._levels[1]
    settings = explainer.detection.settings
    rpn = read_extra(explainer.path, two_stage.RPN_GRAPH, explainer.manifest)
    box = read_plain(explainer.path, explainer.manifest)
    heads = session(layer_tail(rpn, ablation.level_outputs, [two_stage.OBJECTNESS, two_stage.DELTAS],
                               rows=False).model, "cpu")
    pooled = ablation.boxes
    boxes = session(layer_tail(box, [*pooled.names, two_stage.PROPOSALS, two_stage.LEVELS],
                               [two_stage.BOX_ROWS], rows=False).model, "cpu")
    offsets = np.cumsum([0] + [level.shape[1] for level in image.levels])
    for row, channel in enumerate(channels):
        level = int(np.searchsorted(offsets, channel, side="right")) - 1
        copies = [v.copy() for v in image.levels]
        copies[level][0, channel - offsets[level]] = two_stage.FPN_ABLATION_VALUE
        objectness, deltas = heads.run([two_stage.OBJECTNESS, two_stage.DELTAS],
                                       dict(zip(ablation.level_outputs, copies)))
        found = two_stage.proposals(objectness, deltas, settings["rpn"]["image_size"], settings["rpn"])
        padded, weights = two_stage.box_inputs(found, settings["box"])
        feed = {name: copies[at] for name, at in zip(pooled.names, pooled.pooled)}
        rows = boxes.run([two_stage.BOX_ROWS], {**feed, two_stage.PROPOSALS: padded,
                                                two_stage.LEVELS: weights})[0][0]
        assert len(found[0]) > 0 and not ours[row, len(found[0]):].any()
        np.testing.assert_allclose(ours[row, :len(found[0])], rows, atol=1e-6, rtol=0)


def test_ablationcam_off_the_fpn_levels_is_refused_with_the_fix(frcnn):
    with pytest.raises(DetectionError, match="only the FPN levels can be ablated"):
        targets, _ = _targets(frcnn, 0.0)
        frcnn["explainer"](frcnn["x"][:1], targets=targets[:1], methods=["ablationcam"])


def test_dff_runs_without_the_model_tail(frcnn):
    """DFF needs no run from the layer on for its maps (its concept scores would): it runs on a
    two-stage artifact, whose box graph cannot be cut at a layer."""
    cams = frcnn["explainer"](frcnn["x"], methods=["dff"]).cams["dff"]
    assert cams.shape[0] == 2 and np.isfinite(cams).all() and cams.std() > 0


def test_fullgrad_and_fp16_are_refused_at_build(frcnn):
    from camexport.build import BuildError

    root = frcnn["root"]
    with pytest.raises(BuildError, match="FullGrad on a two-stage detector"):
        build(str(root / "model.pt"), ["backbone.body.layer4"], "fullgrad", trust_pickle=True,
              input_size=(SIZE, SIZE), out_dir=root / "fullgrad")
    with pytest.raises(BuildError, match="fp16 is not supported for two-stage"):
        build(str(root / "model.pt"), ["backbone.body.layer4"], "gradcam", trust_pickle=True,
              input_size=(SIZE, SIZE), out_dir=root / "fp16", precision="fp16")


def test_keypoint_rcnn_is_refused():
    from torchvision.models.detection import keypointrcnn_resnet50_fpn

    from camexport.detection import detector_kind

    model = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)
    with pytest.raises(DetectionError, match="not supported yet"):
        detector_kind(model)


def test_run_stores_detections_and_renders_them(frcnn):
    """camexport run on the Faster R-CNN artifact: /detections per image and CAMs of the
    detections scoring at least --detection-threshold; camexport render draws the boxes."""
    import h5py
    from click.testing import CliRunner

    from camexport.cli import main
    from camexport.render import render_results
    from camexport.store import ResultReader

    release_explainers(frcnn)  # `camexport run` makes its own
    explainer, x, root = frcnn["explainer"], frcnn["x"], frcnn["root"]
    data, out = f"{root}/images.h5", f"{root}/out.h5"
    with h5py.File(data, "w") as h5:
        h5["images"] = x
    found = explainer.detect(x)
    threshold = float(np.median([f.scores[TOP] for f in found]))
    ran = CliRunner().invoke(main, ["run", str(frcnn["built"].directory), "--data", data, "--out", out,
                                    "--methods", "gradcam", "--detection-threshold", str(threshold), "-q"])
    assert ran.exit_code == 0, ran.output
    expected = [detection_targets(f, threshold, spec=explainer.detection) for f in found]
    assert all(len(t.labels) for t in expected)
    cams = explainer(x, targets=expected, methods=["gradcam"]).cams["gradcam"]
    with ResultReader(out) as results:
        for b, f in enumerate(found):
            stored = results.detections(b)
            np.testing.assert_array_equal(stored.boxes, f.boxes)
            np.testing.assert_array_equal(stored.labels, f.labels)
            assert results.read("detections/explained", b) == len(expected[b].labels)
        np.testing.assert_allclose(results.cams("gradcam"), cams, atol=1e-6)
    written = render_results(out, f"{root}/overlays", indices=[0])
    assert written and written[0].stat().st_size > 0


@pytest.mark.usefixtures("compat_cache")
def test_pgc_tutorial_through_the_drop_in(frcnn):
    """pgc's tutorial code with camexport.compat's classes in place of pgc's: the torch model's
    own detections as references (a few 1e-3 px off the graph's: the IoU's gradient counts them
    as the same boxes, detection.BOX_TIE), GradCAM on layer4, EigenCAM and AblationCAM (with
    AblationLayerFasterRCNN, one image) on model.backbone with fasterrcnn_reshape_transform (the
    graph's stacked levels are not transformed twice)."""
    from camexport import compat
    from camexport.compat.utils.model_targets import FasterRCNNBoxScoreTarget as DropInTarget
    from camexport.compat.utils.reshape_transforms import fasterrcnn_reshape_transform as drop_in

    release_explainers(frcnn)  # the drop-in makes its own
    model, x = frcnn["model"], torch.tensor(frcnn["x"])
    ours_targets = [DropInTarget(d["labels"][:TOP], d["boxes"][:TOP]) for d in frcnn["theirs"]]
    _, their_targets = _targets(frcnn, 0.0)
    from pytorch_grad_cam.ablation_layer import AblationLayerFasterRCNN as TheirLayer

    from camexport.compat.ablation_layer import AblationLayerFasterRCNN as DropInLayer

    stack = {"reshape_transform": drop_in}
    ablation = {"ratio_channels_to_ablate": ABLATION_RATIO, "batch_size": ABLATION_BATCH}
    runs = ((compat.GradCAM, pgc.GradCAM, [model.backbone.body.layer4], {}, {}, 2),
            (compat.EigenCAM, pgc.EigenCAM, [model.backbone], stack, {}, 2),
            (compat.AblationCAM, pgc.AblationCAM, [model.backbone],
             {**stack, **ablation, "ablation_layer": DropInLayer()},
             {**ablation, "ablation_layer": TheirLayer()}, 1))
    for ours_class, their_class, layers, options, their_options, images in runs:
        with ours_class(model=model, target_layers=layers, **options) as cam:
            ours = cam(input_tensor=x[:images], targets=ours_targets[:images])
        if "reshape_transform" in options:
            their_options = {**their_options, "reshape_transform": fasterrcnn_reshape_transform}
        with their_class(model=model, target_layers=layers, **their_options) as cam:
            theirs = cam(input_tensor=x[:images], targets=their_targets[:images])
        diff = np.abs(ours - theirs).max()
        print(f"fasterrcnn drop-in {ours_class.__name__}: max |diff| {diff:.2e}")
        assert ours.std() > 0.05 and diff <= TOLERANCE, f"{ours_class.__name__}: {diff:.2e}"
