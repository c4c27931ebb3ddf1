"""AblationCAM: camexport (tail graph on onnxruntime) vs pytorch-grad-cam on the same image.

    python scripts/bench_ablation.py [--size 224] [--json out.json]

resnet50 (random weights, seeded), layer4.2, one image, CPU, in one run; prints seconds and the
speed-up ratio, and the max |diff| of the two CAMs.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import numpy as np
import torch
import torchvision


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--json")
    args = parser.parse_args()

    import pytorch_grad_cam as pgc

    from camexport.build import build
    from camexport.explain import Explainer

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        torch.save(model.state_dict(), f"{folder}/r50.pt")
        built = build(f"{folder}/r50.pt", ["layer4.2"], arch="resnet50", methods="ablationcam",
                      out_dir=f"{folder}/art", input_size=(args.size, args.size))
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
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
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
