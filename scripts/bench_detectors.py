"""Detectors: camexport against pytorch-grad-cam 1.5.7, and against a plain forward.

    .venv/bin/python scripts/bench_detectors.py                 # both parts (~5 min on 2 cores)
    .venv/bin/python scripts/bench_detectors.py --only faster-rcnn --images 4 --size 416

Faster R-CNN (pgc's own detection tutorial): torchvision ``fasterrcnn_resnet50_fpn`` with random
weights (torch.manual_seed(0); no hub is reachable), its resize disabled (min_size = max_size =
--size), the packaged photos resized to --size x --size. Per image, as the tutorial does: the
detections, then GradCAM on ``backbone.body.layer4`` with FasterRCNNBoxScoreTarget of that
image's top 3 detections (each side its own). pgc runs the torch model (torch threads = cores);
camexport the artifact's RPN graph, numpy proposals and the box graph on onnxruntime. Median
seconds per image after one warm-up image; max |diff| of the two sides' CAMs.

YOLO: YOLOv8n from its yaml (random weights, seeded, made to give detections by
camexport.yolo.spread_random_scores, as the tests do), Ultralytics' own ONNX export at
--yolo-size, built by camexport for the three neck outputs. Per letterboxed photo: camexport
GradCAM of the top detection (detections, then the gradient pass) against one plain onnxruntime
forward of Ultralytics' export itself (the issue's goal: <= 1.3x).

Each side runs in its own child process, one after the other. Writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _bench_common import ROOT, cores, machine, run_child

TOP = 3


def _photos(size: int, count: int, letterbox: bool) -> np.ndarray:
    from camexport.data import preprocess, sample_photos

    photos = sample_photos()[:count]
    return np.stack([preprocess(p.image, (size, size), (0, 0, 0), (1, 1, 1),
                                resize="letterbox" if letterbox else "stretch") for p in photos])


def _timed(call):
    begin = time.perf_counter()
    result = call()
    return time.perf_counter() - begin, result


# -- Faster R-CNN ---------------------------------------------------------------------------

def faster_prepare(work: Path, size: int, images: int) -> dict:
    import torch
    import torchvision

    from camexport.build import build

    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=size, max_size=size).eval()
    torch.save(model, work / "fasterrcnn.pt")
    elapsed, _ = _timed(lambda: build(str(work / "fasterrcnn.pt"), ["backbone.body.layer4"], "gradcam",
                                      trust_pickle=True, input_size=(size, size),
                                      out_dir=work / "fasterrcnn", overwrite=True))
    np.save(work / "faster-images.npy", _photos(size, images, letterbox=False))
    return {"build_s": elapsed}


def faster_camexport(work: Path) -> dict:
    from camexport.detection import FasterRCNNBoxScoreTarget
    from camexport.explain import Explainer

    explainer = Explainer(work / "fasterrcnn")
    x = np.load(work / "faster-images.npy")

    def one(image):
        found = explainer.detect(image)[0]
        target = FasterRCNNBoxScoreTarget(found.labels[:TOP], found.boxes[:TOP])
        return explainer(image, targets=[target], methods=["gradcam"]).cams["gradcam"][0]

    return _per_image(x, one, work / "faster-camexport.npy")


def faster_pgc(work: Path) -> dict:
    import pytorch_grad_cam as pgc
    import torch
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    torch.set_num_threads(cores())
    model = torch.load(work / "fasterrcnn.pt", weights_only=False).eval()
    x = np.load(work / "faster-images.npy")

    def one(image):
        tensor = torch.tensor(image)
        with torch.no_grad():
            found = model(list(tensor))[0]
        target = FasterRCNNBoxScoreTarget(found["labels"][:TOP].numpy(), found["boxes"][:TOP].numpy())
        with pgc.GradCAM(model=model, target_layers=[model.backbone.body.layer4]) as cam:
            return cam(input_tensor=tensor, targets=[target])[0]

    return _per_image(x, one, work / "faster-pgc.npy")


def _per_image(x: np.ndarray, one, out: Path) -> dict:
    one(x[:1])  # warm-up: sessions, allocators
    times, cams = [], []
    for k in range(len(x)):
        elapsed, cam = _timed(lambda k=k: one(x[k:k + 1]))
        times.append(elapsed)
        cams.append(cam)
    np.save(out, np.stack(cams))
    return {"median_s": float(np.median(times)), "times_s": times}


# -- YOLO -------------------------------------------------------------------------------------

def yolo_prepare(work: Path, size: int, images: int) -> dict:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(work / "ultralytics"))
    import torch
    from ultralytics import YOLO

    from camexport.build import build
    from camexport.yolo import spread_random_scores

    x = _photos(size, images, letterbox=True)
    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml")
    detect = yolo.model.model[-1]
    spread_random_scores(yolo.model, x)
    here = os.getcwd()
    os.chdir(work)
    try:
        exported = Path(yolo.export(format="onnx", imgsz=size, simplify=False, verbose=False))
    finally:
        os.chdir(here)
    exported = exported if exported.is_absolute() else work / exported
    layers = [f"model.{i}" for i in detect.f]
    build(str(exported), layers, "gradcam", out_dir=work / "yolo", overwrite=True)
    np.save(work / "yolo-images.npy", x)
    return {"export": str(exported), "layers": layers}


def yolo_camexport(work: Path, exported: str) -> dict:
    from camexport.detection import FasterRCNNBoxScoreTarget
    from camexport.explain import Explainer
    from camexport.runtime import session

    explainer = Explainer(work / "yolo")
    plain = session(exported)
    name = plain.get_inputs()[0].name
    x = np.load(work / "yolo-images.npy")

    def gradcam(image):
        found = explainer.detect(image)[0]
        target = FasterRCNNBoxScoreTarget(found.labels[:1], found.boxes[:1])
        return explainer(image, targets=[target], methods=["gradcam"]).cams["gradcam"]

    record = {}
    for label, call in (("forward", lambda image: plain.run(None, {name: image})),
                        ("gradcam", gradcam)):
        call(x[:1])
        times = [_timed(lambda k=k, call=call: call(x[k:k + 1]))[0] for k in range(len(x))]
        record[label] = {"median_s": float(np.median(times)), "times_s": times}
    return record


# -- the parent ---------------------------------------------------------------------------------

def _child(args) -> None:
    work = Path(args.work)
    result = {"faster-camexport": lambda: faster_camexport(work),
              "faster-pgc": lambda: faster_pgc(work),
              "yolo-camexport": lambda: yolo_camexport(work, args.export)}[args.child]()
    (work / f"{args.child}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["faster-rcnn", "yolo"])
    parser.add_argument("--images", type=int, default=6, help="photos per part (default 6)")
    parser.add_argument("--size", type=int, default=320, help="Faster R-CNN input side (default 320)")
    parser.add_argument("--yolo-size", type=int, default=640, help="YOLO input side (default 640)")
    parser.add_argument("--keep", help="work directory to keep (default: a temporary one)")
    parser.add_argument("--json", default=str(ROOT / "results" / "bench_detectors.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-detectors-"))
    work.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    report = {"machine": machine(), "images": args.images}

    def child(name, *extra):
        run_child([*me, "--child", name, "--work", str(work), *extra])
        return json.loads((work / f"{name}.json").read_text())

    if args.only in (None, "faster-rcnn"):
        prepared = faster_prepare(work, args.size, args.images)
        ours, theirs = child("faster-camexport"), child("faster-pgc")
        diff = float(np.abs(np.load(work / "faster-camexport.npy") - np.load(work / "faster-pgc.npy")).max())
        report["faster_rcnn"] = {"size": args.size, **prepared, "camexport": ours, "pgc": theirs,
                                 "ratio": theirs["median_s"] / ours["median_s"], "max_abs_diff": diff}
        print(f"Faster R-CNN resnet50-fpn {args.size}x{args.size}, GradCAM of the top {TOP} detections "
              f"per image (detections + CAM), {args.images} photos: camexport {ours['median_s']:.3f} s, "
              f"pgc {theirs['median_s']:.3f} s per image = {report['faster_rcnn']['ratio']:.2f}x; "
              f"max |diff| {diff:.1e}")
    if args.only in (None, "yolo"):
        prepared = yolo_prepare(work, args.yolo_size, args.images)
        ours = child("yolo-camexport", "--export", prepared["export"])
        ratio = ours["gradcam"]["median_s"] / ours["forward"]["median_s"]
        report["yolo"] = {"size": args.yolo_size, **prepared, **ours, "x_forward": ratio}
        print(f"YOLOv8n {args.yolo_size}x{args.yolo_size}, GradCAM of the top detection on "
              f"{', '.join(prepared['layers'])} per image: {ours['gradcam']['median_s']:.3f} s, one "
              f"plain forward of Ultralytics' export {ours['forward']['median_s']:.3f} s = "
              f"{ratio:.2f}x (goal <= 1.3x)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
