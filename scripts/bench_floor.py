"""ScoreCAM and the perturbation metrics against their floor: the same plain forwards, alone.

    .venv/bin/python scripts/bench_floor.py [--arch resnet18] [--size 224] [--images 2]

ScoreCAM is B·C forwards of masked images and ROAD is forwards of imputed images: nothing
camexport does around those forwards (upsampling, masking, imputing, softmax) should cost more
than 10 % on top of them. For each, this script times camexport's call, then the floor: the same
count of plain onnxruntime forwards of the same artifact at the same inner batch size, on
ready-made inputs. Also the inner batch: ScoreCAM's forwards timed at batch 8/16/32/64, per image.

Seeded random-weight torchvision model, the packaged photos. Prints the table and the ratios.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import build_random, machine

LAYER = {"resnet18": "layer4", "resnet50": "layer4", "efficientnet_b0": "features.8"}


def seconds(call, repeats: int = 2) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", choices=sorted(LAYER))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--road-percentiles", default="20,40,60,80")
    args = parser.parse_args()

    from camexport.data import fit, preprocess, sample_photos
    from camexport.explain import Explainer
    from camexport.methods.perturbation import ScoreCAM
    from camexport.metrics import evaluate

    folder = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    _, built = build_random(args.arch, LAYER[args.arch], folder, args.size, ["gradcam", "scorecam"])
    explainer = Explainer(built.directory)
    prep = explainer.manifest["preprocessing"]
    photos = [fit(p.image, args.size) for p in sample_photos()][: args.images]
    x = np.stack([preprocess(p, prep["size"], prep["mean"], prep["std"]) for p in photos])
    explainer.forward(x)  # sessions made before timing
    rows = []

    # ScoreCAM: one forward per channel whose map is not constant (+1 per image for the constant ones)
    result = explainer(x, methods=["gradcam"])
    acts = result.inputs.activations[0]
    flat = acts.reshape(*acts.shape[:2], -1)
    constant = (flat.max(axis=2) == flat.min(axis=2))
    masked = int((~constant).sum() + constant.any(axis=1).sum())
    inner = ScoreCAM.batch_size
    chunks = sum(math.ceil(((~c).sum() + c.any()) / inner) for c in constant)
    probe = np.repeat(x[:1], inner, axis=0)
    camexport_s = seconds(lambda: explainer(x, methods=["scorecam"]), repeats=1)
    floor_s = seconds(lambda: [explainer.forward(probe) for _ in range(chunks)], repeats=1)
    rows.append((f"ScoreCAM ({masked} masked images, batch {inner})", camexport_s, floor_s))

    # ROAD combined: 2 x percentiles imputed images per image, in one batched set of forwards
    cams = result.cams["gradcam"]
    targets = list(result.targets)
    percentiles = [int(p) for p in args.road_percentiles.split(",")]
    metric = f"road-combined:{args.road_percentiles}"
    count = 2 * len(percentiles) * len(x) + len(x)
    imputed = np.repeat(x[:1], count, axis=0)
    camexport_s = seconds(lambda: evaluate(metric, x, cams, targets, explainer.forward))
    floor_s = seconds(lambda: explainer.forward(imputed))
    rows.append((f"ROADCombined {args.road_percentiles} ({count} forwards)", camexport_s, floor_s))

    print(f"{args.arch} at {args.size}², {len(x)} photos, {machine()['cores']} cores")
    print(f"{'what':<52} {'camexport s':>11} {'floor s':>8} {'ratio':>6}")
    for name, mine, floor in rows:
        print(f"{name:<52} {mine:11.2f} {floor:8.2f} {mine / floor:6.2f}")

    print("ScoreCAM's inner batch, plain forwards, ms per masked image:")
    for batch in (8, 16, 32, 64):
        tile = np.repeat(x[:1], batch, axis=0)
        explainer.forward(tile)
        repeats = max(1, 64 // batch)
        per = seconds(lambda tile=tile, repeats=repeats: [explainer.forward(tile) for _ in range(repeats)])
        print(f"  batch {batch:>2}: {1000 * per / max(batch, 64):6.1f}")


if __name__ == "__main__":
    main()
