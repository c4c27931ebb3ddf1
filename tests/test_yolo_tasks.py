"""Ultralytics YOLO segment and pose models (camexport.yolo): YOLOv8n-seg and YOLOv8n-pose built
from their yaml (random weights, seeded, scores spread as in tests/test_yolo.py), each built by
camexport from Ultralytics' own ONNX export and from its checkpoint (--trust-pickle).

A segment model's rows carry its 32 mask coefficients after the class scores and its graph the
mask prototypes; each detection's mask is Ultralytics' ``process_mask(..., upsample=False)`` (the
prototypes' resolution, 0/1). A pose model's rows carry its 17 decoded keypoints (x, y,
visibility). References: the Ultralytics torch model in float64 on the same letterboxed tensor,
its non_max_suppression and process_mask, torch autograd.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "camexport-ultralytics"))
pytest.importorskip("ultralytics")

from test_yolo import BOX_TOLERANCE, SCORE_TOLERANCE, SIZE, _check_gradients, model_file, sample_images

from camexport.build import build
from camexport.detection import BOX
from camexport.explain import Explainer
from camexport.yolo import spread_random_scores

pytestmark = pytest.mark.xdist_group("yolo")

#: the class branch's last convolutions: a pose model's one class needs a higher bias than the
#: 80-class models' -3 to score some anchors above Ultralytics' conf 0.25
CLASS_BIAS = {"yolov8n-seg": -3.0, "yolov8n-pose": -2.0}
#: mask coefficients against float64 (values up to ~4)
COEFFICIENT_TOLERANCE = 2e-4
#: keypoints against float64, pixels: the raw outputs' float32 round-off times 2 x stride (up to
#: 64); Ultralytics' own float32 model is 1.6e-3 px off its float64 one on these detections
KEYPOINT_TOLERANCE = 5e-3
#: mask pixels whose 0/1 differs from Ultralytics' on the float64 model: only where the mask
#: logit lies within float32 round-off of 0
MASK_LOGIT_EDGE = 1e-3


class Prepared:
    """One model: Ultralytics' torch model (float64), the camexport artifact (GradCAM on the three
    neck outputs) of its ONNX export or of its checkpoint, two letterboxed images."""

    def __init__(self, name: str, source: str, root: str):
        from ultralytics import YOLO

        _, self.x = sample_images()
        self.name, self.task = name, {"seg": "segment", "pose": "pose"}[name.split("-")[1]]
        torch.manual_seed(0)
        yolo = YOLO(f"{name}.yaml")
        spread_random_scores(yolo.model, self.x, class_bias=CLASS_BIAS[name])
        self.path, self.model = model_file(yolo, name, source, root)
        self.necks = [int(i) for i in self.model.model[-1].f]
        self.layers = [f"model.{i}" for i in self.necks]
        options = {"trust_pickle": source == "pt", "input_size": (SIZE, SIZE) if source == "pt" else None}
        self.built = build(self.path, self.layers, "gradcam", out_dir=f"{root}/{name}-{source}", **options)
        self.explainer = Explainer(self.built.directory)

    def torch_outputs(self, x: np.ndarray):
        """Ultralytics' (B, 4 + K + extra, A) rows in float64, and a segment model's prototypes."""
        out = self.model(torch.tensor(x, dtype=torch.float64))[0]
        return out if isinstance(out, (tuple, list)) else (out, None)

    def torch_rows(self, x: np.ndarray) -> torch.Tensor:
        return self.torch_outputs(x)[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("yolo-tasks"))


@pytest.fixture(scope="module", params=[(m, s) for m in CLASS_BIAS for s in ("onnx", "pt")], ids="-".join)
def model(request, root):
    prepared = Prepared(*request.param, root)
    yield prepared
    prepared.explainer.release()


def test_manifest_records_the_task(model):
    spec = model.explainer.manifest["detection"]
    if model.task == "segment":
        assert spec["extra"] == 32
        assert spec["settings"] == {"task": "segment", "mask_channels": 32, "proto_size": [SIZE // 4] * 2}
    else:
        assert spec["classes"] == 1 and spec["extra"] == 51
        assert spec["settings"] == {"task": "pose", "keypoint_shape": [17, 3]}


def test_rows_and_detections_match_ultralytics(model):
    """The graph's rows equal the float64 model's (boxes as xyxy, class scores, then the mask
    coefficients or the keypoints); the numpy NMS replay on them gives exactly what Ultralytics'
    non_max_suppression (nc = the classes: the extra columns are carried, not scored) gives."""
    from ultralytics.utils.nms import non_max_suppression

    spec = model.explainer.detection
    rows = model.explainer.forward(model.x)
    found = model.explainer.detect(model.x)
    with torch.no_grad():
        reference = model.torch_rows(model.x)
    centre, half = reference[:, :2], reference[:, 2:4] / 2
    theirs = torch.cat([centre - half, centre + half, reference[:, 4:]], 1).transpose(1, 2).numpy()
    start = BOX + spec.classes
    assert np.abs(rows[..., :BOX] - theirs[..., :BOX]).max() <= BOX_TOLERANCE
    assert np.abs(rows[..., BOX:start] - theirs[..., BOX:start]).max() <= SCORE_TOLERANCE
    extra = np.abs(rows[..., start:] - theirs[..., start:])
    if model.task == "pose":  # x, y in pixels; the visibility a probability
        xy = np.concatenate([extra[..., 0::3], extra[..., 1::3]], -1)
        detected = max(xy[k, f.anchors].max() for k, f in enumerate(found))
        print(f"{model.name}: keypoints max |diff| {xy.max():.1e} px, of the detections {detected:.1e} px")
        assert xy.max() <= KEYPOINT_TOLERANCE
        assert extra[..., 2::3].max() <= SCORE_TOLERANCE
    else:
        assert extra.max() <= COEFFICIENT_TOLERANCE
    for k, mine in enumerate(found):
        wh = rows[k, :, 2:4] - rows[k, :, :2]
        raw = np.concatenate([rows[k, :, :2] + wh / 2, wh, rows[k, :, 4:]], 1).T[None]
        replayed = non_max_suppression(torch.tensor(raw), conf_thres=0.25, iou_thres=0.7, max_det=300,
                                       nc=spec.classes)[0].numpy()
        print(f"{model.name} image {k}: {len(mine)} detections")
        assert len(replayed) == len(mine) >= 3
        np.testing.assert_array_equal(mine.labels, replayed[:, 5].astype(int))
        np.testing.assert_allclose(mine.boxes, replayed[:, :4], atol=1e-4)
        if model.task == "pose":  # Ultralytics carries the keypoints after box, score, class
            np.testing.assert_allclose(mine.keypoints.reshape(len(mine), -1), replayed[:, 6:], atol=1e-4)


def test_masks_match_ultralytics_process_mask(model):
    """Each detection's mask equals Ultralytics' process_mask(upsample=False) on the float64
    model's prototypes and coefficients of the same anchors and boxes, but for pixels whose mask
    logit is within MASK_LOGIT_EDGE of 0; the prototypes within COEFFICIENT_TOLERANCE."""
    from ultralytics.utils.ops import process_mask

    if model.task != "segment":
        assert all(f.masks is None for f in model.explainer.detect(model.x))
        return
    found = model.explainer.detect(model.x)
    with torch.no_grad():
        reference, protos = model.torch_outputs(model.x)
    ours_protos = model.explainer.task.protos[1]
    assert np.abs(ours_protos - protos.numpy()).max() <= COEFFICIENT_TOLERANCE
    start = BOX + model.explainer.detection.classes
    for k, mine in enumerate(found):
        coefficients = reference[k, start:].T[torch.tensor(mine.anchors)]
        boxes = torch.tensor(mine.boxes)  # process_mask computes in float32 (protos.float())
        theirs = process_mask(protos[k], coefficients.float(), boxes, (SIZE, SIZE), upsample=False).numpy()
        logits = np.einsum("nc,chw->nhw", coefficients.numpy(), protos[k].numpy())
        differ = mine.masks != theirs
        print(f"{model.name} image {k}: {differ.sum()} of {differ.size} mask pixels differ, "
              f"{theirs.sum()} set")
        assert mine.masks.shape == (len(mine), SIZE // 4, SIZE // 4) and mine.masks.dtype == np.uint8
        assert theirs.sum() > 0 and (np.abs(logits[differ]) <= MASK_LOGIT_EDGE).all()


def test_detect_for_methods_takes_the_masks_from_its_head_run(model):
    """`camexport run` detects with the methods to come (Explainer.detect(x, methods=...)): a
    segment model's split head outputs the mask prototypes too, so its masks need no forward of
    their own; they equal those of a plain detect."""
    explainer = model.explainer
    plain = explainer.detect(model.x)
    explainer.task.release()  # the prototypes the plain detect kept
    forwards = []
    original = explainer.forward
    explainer.forward = lambda x: (forwards.append(len(x)), original(x))[1]
    try:
        found = explainer.detect(model.x, methods=["gradcam"])
    finally:
        del explainer.forward
    assert forwards == []
    for mine, theirs in zip(found, plain):
        np.testing.assert_array_equal(mine.anchors, theirs.anchors)
        if model.task == "segment":
            np.testing.assert_array_equal(mine.masks, theirs.masks)
        else:
            assert mine.masks is None


def test_box_score_gradients_match_torch_float64(model):
    """The best detection's class score: its gradient on each neck output equals float64
    autograd through Ultralytics' model (the segment and pose branches read the same outputs)."""
    found = model.explainer.detect(model.x[:1])[0]
    _check_gradients(model, model.x[:1], found, 0, 0.0)


def test_run_stores_and_render_draws_masks_or_keypoints(model, tmp_path):
    """camexport run stores /detections/masks (segment) or /detections/keypoints (pose) as the
    Explainer's detections hold them, padding 0 or NaN; render's image tile changes where they
    are drawn (against a copy of the results without them)."""
    import cv2
    import h5py
    from click.testing import CliRunner

    from camexport.cli import main
    from camexport.render import render_results
    from camexport.store import ResultReader

    data, out = tmp_path / "images.h5", tmp_path / "out.h5"
    with h5py.File(data, "w") as h5:
        h5["images"] = model.x  # preprocessed (letterboxed) already
    found = model.explainer.detect(model.x)
    ran = CliRunner().invoke(main, ["run", str(model.built.directory), "--data", str(data), "--out", str(out),
                                    "--methods", "gradcam", "--detection-threshold", "0.3", "-q"])
    assert ran.exit_code == 0, ran.output
    name = "masks" if model.task == "segment" else "keypoints"
    with ResultReader(out) as results:
        for k, mine in enumerate(found):
            stored, raw = results.detections(k), results.read(f"detections/{name}", k)
            assert len(stored) == len(mine)
            np.testing.assert_array_equal(stored.boxes, mine.boxes)
            np.testing.assert_allclose(getattr(stored, name), getattr(mine, name), atol=1e-6)
            padding = raw[len(mine):]
            assert (padding == 0).all() if name == "masks" else np.isnan(padding).all()
    bare = tmp_path / "bare.h5"
    shutil.copy(out, bare)
    with h5py.File(bare, "r+") as h5:
        del h5[f"detections/{name}"]
    pictures = [cv2.imread(str(render_results(path, tmp_path / label, indices=[0])[0]))
                for path, label in [(out, "drawn"), (bare, "bare")]]
    band = pictures[0].shape[0] - SIZE  # the label above each tile; the image tile comes first
    changed = (pictures[0][band:, :SIZE] != pictures[1][band:, :SIZE]).any(-1)
    assert changed.any()
    assert not (pictures[0][band:, SIZE:] != pictures[1][band:, SIZE:]).any()  # the CAM tiles stay
