"""pytorch-grad-cam 1.5.7 against camexport.compat on the same loop, in one run.

    .venv/bin/python scripts/bench_compat.py                 # resnet50, 64 images, batches of 8
    .venv/bin/python scripts/bench_compat.py --quick         # a minute: 16 images, ScoreCAM on 1
    python scripts/bench_compat.py --device cuda             # pgc on torch CUDA, compat on ORT CUDA

The loop is pgc's README loop with only the import changed: ``cam(input_tensor=batch,
targets=None)`` over the images in batches. Reported per method: the first call of
camexport.compat (export + augment + session, an empty cache), the steady state (every later
batch) of both, their ratio and the max |diff| of the CAMs. ScoreCAM runs on fewer images
(``--scorecam-images``): pgc's ScoreCAM on resnet50 ``layer4`` makes 2048 forwards per image.
Images: the real photos packaged with scikit-image and foolbox, resized to 224. Weights:
random (seeded; no download). JSON in ``results/bench_compat.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
from _bench_common import ROOT, machine


def photos(count: int, size: int):
    import torch

    from camexport.data import fit, preprocess, sample_photos
    from camexport.load import IMAGENET_MEAN, IMAGENET_STD

    images = [fit(p.image, size) for p in sample_photos()]
    images = [images[k % len(images)] for k in range(count)]
    batch = np.stack([preprocess(i, (size, size), IMAGENET_MEAN, IMAGENET_STD) for i in images])
    return torch.from_numpy(np.ascontiguousarray(batch, np.float32))


def loop(cam, x, batch: int) -> tuple[np.ndarray, float, float]:
    """CAMs of ``x`` in batches: (cams, first batch s, seconds per image after it)."""
    maps, times = [], []
    for start in range(0, len(x), batch):
        begin = time.perf_counter()
        maps.append(cam(input_tensor=x[start:start + batch], targets=None))
        times.append(time.perf_counter() - begin)
    later = len(x) - batch
    # one batch only (ScoreCAM on a few images): its time per image is the steady state
    steady = sum(times[1:]) / later if later > 0 else times[0] / len(x)
    return np.concatenate(maps), times[0], steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scorecam-images", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: pgc's model and batches on torch CUDA, camexport.compat's graph on "
                             "onnxruntime's CUDA provider (onnxruntime-gpu)")
    parser.add_argument("--json", default=str(ROOT / "results" / "bench_compat.json"))
    args = parser.parse_args()
    if args.quick:
        args.images, args.scorecam_images = 16, 1
    import pytorch_grad_cam as pgc
    import torch
    import torchvision

    from camexport import compat
    from camexport.compat import engine

    os.environ[engine.CACHE_ENV] = tempfile.mkdtemp(prefix="bench-compat-")  # an empty cache
    os.environ[engine.PROVIDER_ENV] = args.device
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(args.device)
    layers = [model.layer4[-1]]
    x = photos(args.images, args.size).to(args.device)
    report = {"machine": machine(), "model": "resnet50 (random weights)", "layer": "layer4[-1]",
              "size": args.size, "batch": args.batch, "device": args.device, "methods": {}}
    for name, count in (("GradCAM", args.images), ("ScoreCAM", args.scorecam_images)):
        count = max(count, 2 * args.batch) if name == "GradCAM" else count
        images = x[:count]
        batch = min(args.batch, max(1, count // 2))
        reference = getattr(pgc, name)(model=model, target_layers=layers)
        theirs, pgc_first, pgc_steady = loop(reference, images, batch)
        ours, first, steady = loop(getattr(compat, name)(model=model, target_layers=layers), images, batch)
        row = {"images": count, "batch": batch, "pgc_first_batch_s": pgc_first, "pgc_s_per_image": pgc_steady,
               "compat_first_call_s": first, "compat_s_per_image": steady,
               "steady_ratio": pgc_steady / steady, "max_abs_diff": float(np.abs(ours - theirs).max())}
        report["methods"][name] = row
        print(f"{name:9s} {count} images, batches of {batch}: first call {first:.1f} s (pgc's first batch "
              f"{pgc_first:.1f} s); steady {1000 * steady:.0f} ms/image vs pgc {1000 * pgc_steady:.0f} "
              f"ms/image = {row['steady_ratio']:.1f}x; max |diff| {row['max_abs_diff']:.1e}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
