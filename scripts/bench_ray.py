"""`camexport run --engine ray` against the local engine, and the cost of the final merge.

    .venv/bin/python scripts/bench_ray.py [--images 256] [--arch resnet50] [--size 224]

Builds a seeded random-weight artifact (GradCAM at layer4), packs N photos from the packaged
samples (repeated) and times, each as a child process of the CLI on the same data:

- the local engine;
- Ray with 1 and 2 workers on a local Ray started once beforehand and joined with --address
  (``ray start`` is a cluster's cost, paid once, not a run's), and 1 worker with Ray started by the
  run itself (what a laptop user sees);
- the merge of the shards into one file (ResultWriter.finish) per shard, from a finished run's
  parts folder kept aside: the driver's serial cost that grows with the dataset (docs/scale-out.md);
- Ray's own floor, in a child process on the running cluster: importing Ray, joining it and a
  Ray Data pipeline of the same shape as the run's (the same ranges and blocks, a pool of one
  actor) over a callable that does nothing, then the same with an actor that imports camexport
  (what any actor of the run must do): the fixed cost of one Ray run before any CAM is computed.

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


def floor(address: str, ranges: int, blocks: int, import_camexport: bool) -> None:
    """One child process: import Ray, join ``address``, run a one-actor Ray Data pipeline of
    ``ranges`` ranges in ``blocks`` blocks over a callable that does nothing (its actor importing
    camexport.run when ``import_camexport``), as camexport.ray_engine shapes the run's. The token
    mode is set as camexport.ray_engine.import_ray sets it (imported here it would import
    camexport, which this floor leaves out)."""
    if Path.home().joinpath(".ray", "auth_token").is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    import ray.data

    class Idle:
        def __init__(self):
            if import_camexport:
                import camexport.run  # noqa: F401

        def __call__(self, batch):
            return batch

    ray.init(address=address, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [{"start": 16 * i, "stop": 16 * i + 16} for i in range(ranges)]
    pipeline = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        Idle, batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
        num_cpus=os.cpu_count())
    assert len(list(pipeline.iter_rows())) == ranges
    ray.shutdown()


def timed_floor(address: str, ranges: int, import_camexport: bool) -> float:
    from camexport.ray_engine import BLOCKS_PER_WORKER, RANGES_PER_BLOCK

    blocks = min(ranges, max(BLOCKS_PER_WORKER, -(-ranges // RANGES_PER_BLOCK)))
    command = [sys.executable, __file__, "--floor", address, "--ranges", str(ranges), "--blocks", str(blocks)]
    if import_camexport:
        command.append("--import-camexport")
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--arch", default="resnet50", choices=sorted(LAYER))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--floor", help=argparse.SUPPRESS)
    parser.add_argument("--ranges", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--import-camexport", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        floor(args.floor, args.ranges, args.blocks, args.import_camexport)
        return
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
            ranges = -(-args.images // 16)
            floors = {"Ray's floor: import, join, 1-actor pipeline doing nothing":
                      timed_floor(address, ranges, False),
                      "Ray's floor, the actor importing camexport": timed_floor(address, ranges, True)}
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
    for name, seconds in floors.items():
        print(f"{name:<60} {seconds:8.1f} s = {100 * seconds / local:.0f} % of the local run")
    print(f"final merge: {merge['shards']} shards ({merge['samples']} samples, "
          f"{merge['bytes'] / 1e6:.1f} MB) in {merge['seconds']:.2f}s = "
          f"{merge['ms_per_shard']:.2f} ms/shard, "
          f"{merge['bytes'] / 1e6 / merge['seconds']:.0f} MB/s; live view rewrite "
          f"{merge['view_ms_per_shard']:.2f} ms/shard")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "images": args.images, "arch": args.arch,
                                         "seconds": rows, "ray_floor_seconds": floors,
                                         "merge": merge}, indent=2))


if __name__ == "__main__":
    main()
