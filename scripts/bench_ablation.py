"""AblationCAM: camexport (tail graph on onnxruntime) vs pytorch-grad-cam on the same image.

    python scripts/bench_ablation.py [--model resnet50|vit_small] [--size 224] [--json out.json]

resnet50 ``layer4.2`` or vit_small (timm vit_small_patch16_224, ``blocks.11.norm1``, pgc with
AblationLayerVit and the (B, 1+196, D) -> (B, D, 14, 14) reshape), random weights (seeded), one
image, CPU, in one run; prints seconds and the speed-up ratio, and the max |diff| of the two
CAMs. camexport is timed three times: as by default, with the rank-1 ablation tail
(camexport.graph.ablate: where the layer feeds a linear op, one product per run and a rank-1
correction per ablated channel) and the tail's row pruning (camexport.graph.prune_rows: a ViT's
last block for the class token only); with the row pruning alone ("camexport_rows_s", the
copies through the tail); and with neither ("camexport_full_s").
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time

import numpy as np
import torch
from _bench_common import build_random, cpu_name

MODELS = {  # name: (arch, layer)
    "resnet50": ("resnet50", "layer4.2"),
    "vit_small": ("vit_small_patch16_224", "blocks.11.norm1"),
}


def _camexport(directory: str, x: np.ndarray, rows: bool, rank_one: bool = True) -> tuple[float, np.ndarray]:
    """Seconds of one AblationCAM call (after a warm-up that builds the sessions) and its CAM."""
    from camexport import explain
    from camexport.graph.cut import layer_tail

    original = explain.layer_tail
    explain.layer_tail = functools.partial(layer_tail, rows=rows)
    try:
        explainer = explain.Explainer(directory)
        if not rank_one:
            explainer._ablation_tail = lambda layer, axis: None
        explainer(x, targets=None, methods=["ablationcam"])  # warm-up: sessions and tail graph
        start = time.perf_counter()
        cam = explainer(x, targets=None, methods=["ablationcam"]).cams["ablationcam"]
        return time.perf_counter() - start, cam
    finally:
        explain.layer_tail = original


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--json")
    args = parser.parse_args()

    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.ablation_layer import AblationLayerVit

    from camexport.eager import resolve_module

    arch, layer_name = MODELS[args.model]
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        model, built = build_random(arch, layer_name, folder, args.size, "ablationcam")
        ours_s, ours = _camexport(built.directory, x, rows=True)
        rows_s, rows = _camexport(built.directory, x, rows=True, rank_one=False)
        full_s, full = _camexport(built.directory, x, rows=False, rank_one=False)
    options = {}
    if args.model == "vit_small":
        side = args.size // 16
        options = {"ablation_layer": AblationLayerVit(), "reshape_transform": lambda t: t[:, 1:, :].reshape(
            t.size(0), side, side, t.size(2)).permute(0, 3, 1, 2)}
    with pgc.AblationCAM(model=model, target_layers=[resolve_module(model, layer_name)], **options) as cam:
        start = time.perf_counter()
        theirs = cam(input_tensor=torch.tensor(x), targets=None)
        theirs_s = time.perf_counter() - start
    report = {
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "model": arch, "layer": layer_name, "size": args.size, "images": 1,
        "camexport_s": round(ours_s, 3), "camexport_rows_s": round(rows_s, 3),
        "camexport_full_s": round(full_s, 3), "pgc_s": round(theirs_s, 3),
        "speedup": round(theirs_s / ours_s, 1), "speedup_rows": round(theirs_s / rows_s, 1),
        "speedup_full": round(theirs_s / full_s, 1),
        "max_abs_diff": float(np.abs(ours - theirs).max()),
        "max_abs_diff_rows": float(np.abs(rows - theirs).max()),
        "max_abs_diff_vs_rows": float(np.abs(ours - rows).max()),
        "max_abs_diff_full": float(np.abs(full - theirs).max()),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
