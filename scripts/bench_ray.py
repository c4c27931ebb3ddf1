"""`camexport run --engine ray` against the local engine, and the cost of the final merge.

    .venv/bin/python scripts/bench_ray.py [--images 256] [--arch resnet50] [--size 224]

Builds a seeded random-weight artifact (GradCAM at layer4), packs N photos from the packaged
samples (repeated) and times, each as a child process of the CLI on the same data:

- the local engine;
- Ray with 1 and 2 workers on a local Ray started once beforehand and joined with --address
  (``ray start`` is a cluster's cost, paid once, not a run's), and 1 worker with Ray started by the
  run itself (what a laptop user sees);
- the merge of the shards into one file (ResultWriter.finish) per shard, from a finished run's
  parts folder kept aside: the driver's serial cost that grows with the dataset (docs/scale-out.md).

Prints a table, images/s and ratios to the local engine, and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import build_random, machine

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"resnet50": "layer4", "resnet18": "layer4", "efficientnet_b0": "features.8"}


def dataset(path: Path, count: int, size: int) -> None:
    from camexport.data import fit, sample_photos
    from camexport.store import write_input

    photos = [fit(p.image, size) for p in sample_photos()]
    write_input(path, ((f"{i}", photos[i % len(photos)], -1) for i in range(count)), (size, size))


def timed_run(artifact: Path, data: Path, out: Path, *extra: str) -> float:
    command = [sys.executable, "-m", "camexport.cli", "run", str(artifact), "--data", str(data),
               "--out", str(out), "--methods", "gradcam", "--batch-size", "16", "-q", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return seconds


def merge_cost(artifact: Path, data: Path, folder: Path) -> dict:
    """Seconds of ResultWriter.finish per shard: a run killed before its final copy (the
    `parts-remove` fault point is after it, so kill at `final-write`), its parts timed merging."""
    from camexport.store import ResultWriter, finished_shards

    out = folder / "merge.h5"
    command = [sys.executable, "-m", "camexport.cli", "run", str(artifact), "--data", str(data),
               "--out", str(out), "--methods", "gradcam", "--batch-size", "16", "-q"]
    subprocess.run(command, env={**os.environ, "CAMEXPORT_FAULT": "final-write:1"},
                   capture_output=True, check=False)
    parts = out.with_name(out.name + ".parts")
    shards = finished_shards(parts)
    record = json.loads((parts / "run.json").read_text())
    writer = ResultWriter(out, record["count"], record["fingerprint"], record["attrs"])
    start = time.perf_counter()
    writer.publish()  # the live view the driver rewrites while a run goes
    view = time.perf_counter() - start
    start = time.perf_counter()
    writer.finish({})
    seconds = time.perf_counter() - start
    return {"shards": len(shards), "samples": record["count"], "seconds": seconds,
            "ms_per_shard": 1000 * seconds / len(shards), "bytes": out.stat().st_size,
            "view_ms_per_shard": 1000 * view / len(shards)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--arch", default="resnet50", choices=sorted(LAYER))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import ray

    folder = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        _, built = build_random(args.arch, LAYER[args.arch], folder, args.size, ["gradcam"])
        artifact = built.directory
        data = folder / "data.h5"
        dataset(data, args.images, args.size)
        rows = {"local": timed_run(artifact, data, folder / "local.h5")}
        rows["ray, 1 worker, Ray started by the run"] = timed_run(
            artifact, data, folder / "ray-own.h5", "--engine", "ray", "--workers", "1",
            "--cpus-per-worker", str(os.cpu_count()))
        ray.init(include_dashboard=False, logging_level="ERROR")
        address = ray.get_runtime_context().gcs_address
        try:
            for workers in (1, 2):
                cpus = max(1, (os.cpu_count() or 1) // workers)
                rows[f"ray, {workers} worker{'s' * (workers > 1)} x {cpus} CPU, cluster running"] = timed_run(
                    artifact, data, folder / f"ray-{workers}.h5", "--engine", "ray", "--address", address,
                    "--workers", str(workers), "--cpus-per-worker", str(cpus))
        finally:
            ray.shutdown()
        merge = merge_cost(artifact, data, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    local = rows["local"]
    print(f"{args.arch} GradCAM, {args.images} images at {args.size}², batch 16, {machine()['cores']} cores")
    print(f"{'engine':<52} {'seconds':>8} {'img/s':>7} {'vs local':>9}")
    for name, seconds in rows.items():
        print(f"{name:<52} {seconds:8.1f} {args.images / seconds:7.1f} {seconds / local:8.2f}x")
    print(f"final merge: {merge['shards']} shards ({merge['samples']} samples, "
          f"{merge['bytes'] / 1e6:.1f} MB) in {merge['seconds']:.2f}s = "
          f"{merge['ms_per_shard']:.2f} ms/shard, "
          f"{merge['bytes'] / 1e6 / merge['seconds']:.0f} MB/s; live view rewrite "
          f"{merge['view_ms_per_shard']:.2f} ms/shard")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "images": args.images, "arch": args.arch,
                                         "seconds": rows, "merge": merge}, indent=2))


if __name__ == "__main__":
    main()
