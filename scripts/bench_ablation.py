"""AblationCAM: camexport (tail graph on onnxruntime) vs pytorch-grad-cam on the same image.

    python scripts/bench_ablation.py [--size 224] [--json out.json]

resnet50 (random weights, seeded), layer4.2, one image, CPU, in one run; prints seconds and the
speed-up ratio, and the max |diff| of the two CAMs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from _bench_common import build_random, cpu_name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--json")
    args = parser.parse_args()

    import pytorch_grad_cam as pgc

    from camexport.explain import Explainer

    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        model, built = build_random("resnet50", "layer4.2", folder, args.size, "ablationcam")
        explainer = Explainer(built.directory)
        explainer(x, targets=None, methods=["ablationcam"])  # warm-up: sessions and tail graph
        start = time.perf_counter()
        ours = explainer(x, targets=None, methods=["ablationcam"]).cams["ablationcam"]
        ours_s = time.perf_counter() - start
    with pgc.AblationCAM(model=model, target_layers=[model.layer4[2]]) as cam:
        start = time.perf_counter()
        theirs = cam(input_tensor=torch.tensor(x), targets=None)
        theirs_s = time.perf_counter() - start
    report = {
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "model": "resnet50", "layer": "layer4.2", "size": args.size, "images": 1,
        "camexport_s": round(ours_s, 3), "pgc_s": round(theirs_s, 3),
        "speedup": round(theirs_s / ours_s, 1), "max_abs_diff": float(np.abs(ours - theirs).max()),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
