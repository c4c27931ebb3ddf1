"""torchvision's other Faster R-CNN, ``fasterrcnn_resnet50_fpn_v2`` (a ResNet-50 FPN with
batch-normalised FPN and RPN convolutions and a four-convolution box head), built from a
state_dict with ``--arch`` as a user with their own weights would: detections against the torch
model and GradCAM against pytorch-grad-cam 1.5.7 on the same model and image.

Random weights (seeded), 320 x 320, the model's own resize disabled in the torch model that the
state_dict comes from (min_size = max_size = 320; the artifact never resizes). Tolerances as in
tests/test_two_stage_cams.py: CAMs 1e-4, detections SCORE_ATOL / BOX_ATOL."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget as TheirTarget
from test_two_stage_cams import BOX_ATOL, SCORE_ATOL, SIZE, TOLERANCE, TOP

from camexport.build import build
from camexport.detection import FasterRCNNBoxScoreTarget
from camexport.explain import Explainer

ARCH = "fasterrcnn_resnet50_fpn_v2"

pytestmark = pytest.mark.xdist_group("fasterrcnn-v2")


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    import torchvision

    root = tmp_path_factory.mktemp("fasterrcnn-v2")
    torch.manual_seed(0)
    model = torchvision.models.get_model(ARCH, weights=None, weights_backbone=None,
                                         min_size=SIZE, max_size=SIZE).eval()
    torch.save(model.state_dict(), root / "weights.pth")
    built = build(str(root / "weights.pth"), ["backbone.body.layer4"], "gradcam", arch=ARCH,
                  input_size=(SIZE, SIZE), out_dir=root / "artifact")
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).numpy()
    with torch.no_grad():
        theirs = {k: v.numpy() for k, v in model(list(torch.tensor(x)))[0].items()}
    return {"model": model, "explainer": Explainer(built.directory), "x": x, "theirs": theirs,
            "built": built}


def test_v2_detections_match_torchvision(v2):
    found = v2["explainer"].detect(v2["x"])[0]
    theirs = v2["theirs"]
    assert v2["built"].manifest["detection"]["kind"] == "fasterrcnn"
    assert len(found) == len(theirs["scores"]) > TOP
    print(f"{ARCH} detections: scores max |diff| {np.abs(found.scores - theirs['scores']).max():.1e}, "
          f"top {TOP} boxes {np.abs(found.boxes[:TOP] - theirs['boxes'][:TOP]).max():.1e} px")
    np.testing.assert_array_equal(found.labels[:TOP], theirs["labels"][:TOP])
    np.testing.assert_allclose(found.scores, theirs["scores"], atol=SCORE_ATOL, rtol=0)
    np.testing.assert_allclose(found.boxes[:TOP], theirs["boxes"][:TOP], atol=BOX_ATOL, rtol=0)


def test_v2_gradcam_matches_pgc(v2):
    model, x, explainer = v2["model"], v2["x"], v2["explainer"]
    found = explainer.detect(x)[0]
    ours = explainer(x, targets=[FasterRCNNBoxScoreTarget(found.labels[:TOP], found.boxes[:TOP])],
                     methods=["gradcam"]).cams["gradcam"]
    target = TheirTarget(v2["theirs"]["labels"][:TOP], v2["theirs"]["boxes"][:TOP])
    with pgc.GradCAM(model=model, target_layers=[model.backbone.body.layer4]) as cam:
        theirs = cam(input_tensor=torch.tensor(x), targets=[target])
    diff = np.abs(ours - theirs).max()
    print(f"{ARCH} gradcam: max |diff| {diff:.2e}")
    assert ours.max() > 0.99 and ours.std() > 0.05
    assert diff <= TOLERANCE, f"max |diff| {diff:.2e}"
