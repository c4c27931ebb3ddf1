"""Memory stays flat: peak RSS of `camexport run` on 200 and on 2,000 images.

    .venv/bin/python scripts/bench_memory.py [--sizes 200 2000] [--methods gradcam,eigencam]

Builds (or reuses) the EfficientNet-Lite0 artifact, writes an input dataset of N packaged photos
(repeated, at 224x224) and runs the CLI in a child process per size; the child reports its own
peak RSS (VmHWM of /proc/self/status, which starts afresh at exec, unlike ru_maxrss that keeps the
parent's high-water mark from the fork). Prints a table and the ratio largest/smallest, and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dataset(path: Path, count: int) -> None:
    from camexport.data import fit, sample_photos
    from camexport.store import write_input

    photos = [fit(p.image, 224) for p in sample_photos()]
    write_input(path, ((f"{i}", photos[i % len(photos)], -1) for i in range(count)), (224, 224))


#: Runs the CLI with the given arguments, then prints the process's own peak RSS in kB.
CHILD = """
import sys
from camexport.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    if exit.code:
        raise
status = open("/proc/self/status").read()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
"""


def peak_rss_mb(arguments: list[str]) -> tuple[float, float]:
    begin = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *arguments], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"camexport {' '.join(arguments)} failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.split()[-1]) / 1024, time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--methods", default="gradcam,eigencam")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "efficientnet-lite0"))
    parser.add_argument("--json", default=str(ROOT / "results" / "bench_memory.json"))
    args = parser.parse_args()
    artifact = Path(args.artifact)
    from camexport.artifact import ArtifactError, verify_artifact

    try:
        verify_artifact(artifact)
    except ArtifactError:  # absent, incomplete or stale: (re)built; only artifact files are replaced
        from camexport.build import build

        build("efficientnet-lite0", ["bn2"], methods=args.methods.split(","), out_dir=artifact,
              overwrite=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for count in args.sizes:
            data = Path(folder) / f"in{count}.h5"
            dataset(data, count)
            command = ["run", str(artifact), "--data", str(data),
                       "--out", str(Path(folder) / f"out{count}.h5"), "--methods", args.methods,
                       "--batch-size", str(args.batch_size), "-q"]
            rss, seconds = peak_rss_mb(command)
            rows.append({"images": count, "peak_rss_mb": round(rss, 1), "seconds": round(seconds, 1),
                         "images_per_s": round(count / seconds, 2)})
            print(f"{count:>6} images: peak RSS {rss:8.1f} MB, {seconds:7.1f} s "
                  f"({count / seconds:.1f} img/s)")
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"peak RSS {rows[-1]['images']} / {rows[0]['images']} images: {ratio:.3f} "
          f"({'flat' if ratio <= 1.10 else 'NOT flat'}: target within 10 %)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "ratio": ratio, "methods": args.methods,
                                           "batch_size": args.batch_size}, indent=2))


if __name__ == "__main__":
    main()
