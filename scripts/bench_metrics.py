"""ROADCombined, camexport against pytorch-grad-cam 1.5.7 on the same CAMs and model, same run;
and how much of the default pipeline's run is ROAD.

    .venv/bin/python scripts/bench_metrics.py [--arch resnet18] [--size 224] [--images 16]
                                               [--methods gradcam,eigencam,gradcam++]
                                               [--pipeline [--limit N] [--skip-road]]

Goal: camexport ≥ 3× pgc. A seeded random-weight torchvision model is built into an artifact;
its CAMs of ``--methods`` for the first ``--images`` packaged photos (each image's top class) are
scored with ROADCombined (default thresholds 10..90, the probability of the class:
ClassifierOutputSoftmaxTarget) by ``camexport.metrics.evaluate`` through the artifact's plain
graph in this process, then by pgc's ``ROADCombined`` on the torch model in a child process
(torch.set_num_threads(cores)), one after the other, never at once. Both draw the imputer noise
from numpy.random.default_rng(seed) per method (pgc's torch.randn_like patched), so the scores
are compared too (max |diff|: the two runtimes' float32 round-off).

``--pipeline`` also times README's first command, the default job (pipelines/efficientnet_lite0.sh:
pretrained EfficientNet-Lite0, 14 methods, the 23 packaged photos, road-combined:20,40,60,80,
batch 8), in this process, with the time spent inside the metric calls measured: the ROAD share.
It builds the artifact into a temporary folder (a minute) unless --artifact gives one.

Run it on a quiet machine (``uptime``: load below 1); it prints the load before it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import ROOT, build_random, cores, machine

LAYER = {"resnet18": "layer4", "resnet50": "layer4", "efficientnet_b0": "features.8"}


def _pgc_child(arguments: Path) -> None:
    """The pgc side, alone in its process: ROADCombined per method, timed, scores saved."""
    import torch
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from camexport.load import build_architecture

    spec = json.loads(arguments.read_text())
    torch.set_num_threads(spec["threads"])
    case = np.load(spec["case"])
    module, _ = build_architecture(spec["arch"])
    module.load_state_dict(torch.load(spec["weights"], weights_only=True))
    module.eval()
    x = torch.from_numpy(case["x"])
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in case["classes"]]
    metric = ROADCombined(percentiles=spec["percentiles"])
    seconds, scores = {}, {}
    for method in spec["methods"]:
        generator = np.random.default_rng(spec["seed"])
        torch.randn_like = lambda t, g=generator: torch.from_numpy(  # the same draws as ours
            g.standard_normal(tuple(t.shape), dtype=np.float32))
        begin = time.perf_counter()
        scores[method] = np.asarray(metric(x, case[f"cams/{method}"], targets, module)).tolist()
        seconds[method] = time.perf_counter() - begin
    Path(spec["out"]).write_text(json.dumps({"seconds": seconds, "scores": scores}))


def _road_combined(args, folder: Path) -> None:
    from camexport.data import fit, preprocess, sample_photos
    from camexport.explain import Explainer
    from camexport.metrics import ROAD_PERCENTILES, evaluate
    from camexport.targets import ClassifierOutputSoftmaxTarget

    methods = args.methods.split(",")
    _, built = build_random(args.arch, LAYER[args.arch], folder, args.size, methods)
    explainer = Explainer(built.directory)
    prep = explainer.manifest["preprocessing"]
    photos = [fit(p.image, args.size) for p in sample_photos()][: args.images]
    x = np.stack([preprocess(p, prep["size"], prep["mean"], prep["std"]) for p in photos])
    result = explainer(x, methods=methods)
    classes = result.outputs.argmax(axis=1)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    percentiles = (ROAD_PERCENTILES if args.percentiles is None
                   else [int(p) for p in args.percentiles.split(",")])
    metric = "road-combined:" + ",".join(map(str, percentiles))
    case = folder / "case.npz"
    np.savez(case, x=x, classes=classes, **{f"cams/{m}": result.cams[m] for m in methods})

    evaluate(metric, x[:1], result.cams[methods[0]][:1], targets[:1], explainer.forward)  # warm sessions
    ours, mine = {}, {}
    for method in methods:
        begin = time.perf_counter()
        mine[method] = evaluate(metric, x, result.cams[method], targets, explainer.forward, seed=args.seed)
        ours[method] = time.perf_counter() - begin

    spec = folder / "pgc.json"
    spec.write_text(json.dumps({"case": str(case), "arch": args.arch, "methods": methods,
                                "weights": str(folder / f"{args.arch}.pt"), "percentiles": list(percentiles),
                                "seed": args.seed, "threads": cores(), "out": str(folder / "pgc-out.json")}))
    subprocess.run([sys.executable, __file__, "--pgc-child", str(spec)], check=True)
    theirs = json.loads((folder / "pgc-out.json").read_text())

    print(f"ROADCombined {percentiles} on {len(x)} images x {len(methods)} methods, {args.arch} at "
          f"{args.size}², {cores()} cores ({machine()['cpu']})")
    print(f"{'method':<12} {'camexport s':>11} {'pgc s':>8} {'pgc/ours':>9} {'max |diff|':>11}")
    for method in methods:
        diff = np.abs(mine[method] - np.float32(theirs["scores"][method])).max()
        print(f"{method:<12} {ours[method]:11.2f} {theirs['seconds'][method]:8.2f} "
              f"{theirs['seconds'][method] / ours[method]:9.2f} {diff:11.2e}")
    total_ours, total_theirs = sum(ours.values()), sum(theirs["seconds"].values())
    print(f"{'all':<12} {total_ours:11.2f} {total_theirs:8.2f} {total_theirs / total_ours:9.2f}   "
          f"(goal: >= 3)")


def _pipeline(args, folder: Path) -> None:
    """The default job in this process, the time inside the metric calls measured."""
    from camexport import metrics
    from camexport.build import build
    from camexport.data import pack as pack_images
    from camexport.data import write_samples
    from camexport.run import RunConfig, run

    script = (ROOT / "pipelines" / "efficientnet_lite0.sh").read_text()
    methods = script.split("METHODS=${METHODS:-", 1)[1].split("}", 1)[0]
    road = script.split("METRICS=${METRICS:-", 1)[1].split("}", 1)[0]
    artifact = Path(args.artifact) if args.artifact else folder / "lite0"
    if not args.artifact:
        begin = time.perf_counter()
        build("efficientnet-lite0", ["bn2"], methods=methods, out_dir=artifact)
        print(f"built the default artifact in {time.perf_counter() - begin:.0f}s")
    write_samples(folder / "photos")
    pack_images(str(folder / "photos"), folder / "photos.h5", size=224, labels="names")

    spent = [0.0]
    original = metrics.evaluate

    def timed(*a, **k):
        begin = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            spent[0] += time.perf_counter() - begin

    metrics.evaluate = timed
    try:
        config = RunConfig(artifact, folder / "photos.h5", folder / "default.h5", methods=methods.split(","),
                           metrics=[road], batch_size=8, limit=args.limit)
        summary = run(config)
    finally:
        metrics.evaluate = original
    share = 100 * spent[0] / summary.seconds
    print(f"default job: {summary.computed} photos x {len(methods.split(','))} methods in "
          f"{summary.seconds:.1f}s, {spent[0]:.1f}s of it in {road} ({share:.0f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", choices=sorted(LAYER))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--methods", default="gradcam,eigencam,gradcam++")
    parser.add_argument("--percentiles", help="ROADCombined thresholds (default pgc's 10..90)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipeline", action="store_true", help="also time the default job's ROAD share")
    parser.add_argument("--artifact",
                        help="--pipeline: an efficientnet-lite0 artifact built as the default job's")
    parser.add_argument("--limit", type=int, help="--pipeline: only the first N photos (default all 23)")
    parser.add_argument("--skip-road", action="store_true",
                        help="--pipeline alone, no ROADCombined comparison")
    parser.add_argument("--pgc-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pgc_child:
        _pgc_child(args.pgc_child)
        return
    print(f"load average {os.getloadavg()[0]:.2f} (quiet: below 1)")
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as folder:
        if not args.skip_road:
            _road_combined(args, Path(folder))
        if args.pipeline:
            _pipeline(args, Path(folder))


if __name__ == "__main__":
    main()
