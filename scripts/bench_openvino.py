"""GradCAM on OpenVINO's own runtime (``--provider openvino``) against onnxruntime's CPU provider,
on the same artifact, in one process.

    python scripts/bench_openvino.py [--arch resnet50] [--layer layer4] [--size 224] [--batch 8]
        [--repeats 5] [--threads 0] [--json out.json]

A seeded random-weight ``arch`` is built for ``layer`` (GradCAM only); each provider's Explainer
computes GradCAM for one batch (each image's top class): one warm-up (session compilation
included, reported as ``first_s``), then the median of ``repeats`` runs. The CAMs of the two
providers are compared (max |diff|). ``--threads`` 0: every core, both runtimes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import tempfile

import numpy as np
from _bench_common import build_random, machine, measure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", help="write the record here too")
    args = parser.parse_args(argv)
    if args.threads:
        from camexport.runtime import THREADS_VARIABLE

        os.environ[THREADS_VARIABLE] = str(args.threads)  # read by camexport.runtime.session

    from camexport.explain import Explainer

    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    record = {"machine": machine(), "openvino_version": importlib.metadata.version("openvino"),
              "model": args.arch, "layer": args.layer, "size": args.size, "batch": args.batch,
              "threads": args.threads or "all", "method": "gradcam"}
    cams = {}
    with tempfile.TemporaryDirectory() as folder:
        _, built = build_random(args.arch, args.layer, folder, args.size, ["gradcam"])
        for provider in ("cpu", "openvino"):
            explainer = Explainer(built.directory, provider=provider, batch_size=args.batch)
            timing, result = measure(lambda explainer=explainer: explainer(x, None, ["gradcam"]),
                                     args.repeats)
            cams[provider] = result.cams["gradcam"]
            record[provider] = {"first_s": round(timing["warmup_s"], 3),
                                "median_s": round(timing["median_s"], 3), "runs": timing["runs"],
                                "images_per_s": round(args.batch / timing["median_s"], 2),
                                "session": explainer.session.get_providers()[0]}
            explainer.release()
    record["speedup_openvino"] = round(record["cpu"]["median_s"] / record["openvino"]["median_s"], 2)
    record["cam_max_abs_diff"] = float(np.abs(cams["cpu"] - cams["openvino"]).max())
    print(json.dumps(record, indent=1))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(record, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
