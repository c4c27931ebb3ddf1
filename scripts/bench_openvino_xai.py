"""camexport's GradCAM on OpenVINO beside OpenVINO XAI 1.1.0's in-graph maps, same ONNX model.

    python scripts/bench_openvino_xai.py [--arch resnet50] [--venv /tmp/ovxai-venv]
        [--repeats 5] [--threads 1] [--json out.json]

OpenVINO XAI (PyPI ``openvino-xai``) is the other explainer that puts its maps into the model
graph: white-box ReciproCAM (one forward pass, then the head re-run on h*w masked copies of the
last feature map; gradient-free) and ActivationMap (the channel mean of that map). 1.1.0 pins
``openvino-dev==2024.4`` and numpy 1.x, so it cannot share camexport's environment; this script
makes a separate venv for it once (``python3 -m venv`` + ``pip install openvino-xai==1.1.0``,
cached at ``--venv``) and runs that half as a child process in it.

Both halves get the same files: the model exported once to ONNX here (camexport.export.to_onnx:
dynamo exporter, opset 20, batch dynamic) and the same preprocessed images (the packaged sample
photos, camexport.data.sample_photos(), resized to 224x224). camexport builds its artifact from
that ONNX (``--fuse gradcam``, layer auto-picked as OpenVINO XAI does) and runs it on OpenVINO's
own runtime (``--provider openvino``); OpenVINO XAI reads the ONNX with its own OpenVINO
(``ov.Core().read_model``) and inserts its branch.

Timed, per image, at batch 1 (one call per image) and batch 8 (one call for 8 images):
  - camexport fused GradCAM: one ``session.run`` of ``model.cam.onnx`` -> (B, 224, 224) maps;
  - camexport GradCAM through ``Explainer`` (pruned graph + numpy CAM code);
  - OpenVINO XAI ReciproCAM and ActivationMap: ``Explainer(...)(x, targets=[class],
    output_size=(224, 224), colormap=False)`` -> a 224x224 uint8 map. OpenVINO XAI 1.1.0 explains
    one image per call (its Explanation refuses a batch; ReciproCAM's graph tiles a batch-1 feature
    map), so its "batch 8" is 8 calls, the way a user would run it (the attempt at a real batch is
    recorded);
  - each runtime's plain forward pass, for scale.
The table shows the best of the timed calls (least disturbed by other load on a shared machine);
``--json`` records the medians too.
Every image explains its top class (camexport: all-zero target row; OpenVINO XAI: the class
camexport's logits give, passed as ``targets``). Both OpenVINO runtimes compile with
``INFERENCE_PRECISION_HINT=f32`` (camexport's setting; OpenVINO's CPU default is bf16 on CPUs with
AVX512-BF16/AMX) and ``INFERENCE_NUM_THREADS=--threads``; ``--ovxai-precision default`` leaves
OpenVINO XAI's compile as the library does it. ``--repeats`` timed runs after one warm-up.

Map similarity is only reported: Pearson r per photo of the 224x224 maps (ReciproCAM vs
camexport GradCAM, ActivationMap vs GradCAM); they are different methods. ``--arch resnet50`` has
seeded random weights (camexport ships no ResNet-50 weights); ``--arch efficientnet-lite0`` is
camexport's built-in model with its packaged ImageNet weights.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

OVXAI_REQUIREMENT = "openvino-xai==1.1.0"
BATCHES = (1, 8)

# The half that runs inside the OpenVINO XAI venv. argv: work folder (inputs.npz, model.onnx,
# config.json in it; results.json and *.npy written back).
CHILD = textwrap.dedent('''
    import importlib.metadata
    import json, statistics, sys, time, traceback
    from pathlib import Path

    import numpy as np
    import openvino as ov
    import openvino_xai as xai
    from openvino_xai import Task
    from openvino_xai.explainer import ExplainMode
    from openvino_xai.common.parameters import Method
    from openvino_xai.explainer.utils import get_postprocess_fn
    from openvino_xai.inserter.model_parser import IRParserCls, ModelType

    work = Path(sys.argv[1])
    config = json.loads((work / "config.json").read_text())
    data = np.load(work / "inputs.npz")
    x, classes = data["x"], data["classes"]
    repeats = config["repeats"]
    compile_config = {"INFERENCE_NUM_THREADS": config["threads"]}
    if config["precision"] == "f32":
        compile_config["INFERENCE_PRECISION_HINT"] = "f32"
    core = ov.Core()
    result = {"openvino": ov.__version__, "openvino_xai": importlib.metadata.version("openvino-xai"),
              "numpy": np.__version__, "methods": {}, "errors": {}}

    def best_and_median(call):
        call()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times), statistics.median(times)

    def ms_per_image(timings):
        return {"best": {b: 1e3 * t[0] / b for b, t in timings.items()},
                "median": {b: 1e3 * t[1] / b for b, t in timings.items()}}

    def add_batch(a):  # preprocess_fn: the images are already preprocessed (C, H, W) or (B, C, H, W)
        return a[None] if a.ndim == 3 else a

    model = core.read_model(str(work / "model.onnx"))
    try:
        target = IRParserCls.get_target_node(model, ModelType.CNN, None)
        result["target_layer"] = f"{target.get_friendly_name()} {list(target.get_output_partial_shape(0))}"
    except Exception as err:
        result["target_layer"] = f"not found: {err}"

    # plain forward, for scale
    plain = core.compile_model(model, "CPU", compile_config)
    logits = np.concatenate([plain(x[i:i + 1])[0] for i in range(len(x))])
    result["top_class_agrees"] = int((logits.argmax(1) == classes).sum())
    timings = {}
    for batch in config["batches"]:
        chunk = x[:batch]
        timings[batch] = best_and_median(lambda chunk=chunk: plain(chunk))
    result["methods"]["forward"] = {"mode": "plain", "ms_per_image": ms_per_image(timings)}

    def explainer_for(method):
        mode = "whitebox"
        try:
            explainer = xai.Explainer(model=model, task=Task.CLASSIFICATION, preprocess_fn=add_batch,
                                      explain_mode=ExplainMode.WHITEBOX, explain_method=method)
        except Exception as err:
            result["errors"][method.value + " whitebox"] = f"{type(err).__name__}: {err}"
            mode = "blackbox (AISE)"
            explainer = xai.Explainer(model=model, task=Task.CLASSIFICATION, preprocess_fn=add_batch,
                                      postprocess_fn=get_postprocess_fn(),
                                      explain_mode=ExplainMode.BLACKBOX)
        if mode == "whitebox" and config["precision"] == "f32":
            # the library compiles with OpenVINO's default hint (bf16 on AVX512-BF16/AMX CPUs):
            # the same inserted model, compiled as camexport compiles
            explainer.method._model_compiled = core.compile_model(explainer.method._model, "CPU",
                                                                  compile_config)
        return explainer, mode

    def explain(explainer, image, k):
        explanation = explainer(image, targets=[int(k)], output_size=(x.shape[2], x.shape[3]),
                                resize=True, colormap=False)
        return next(iter(explanation.saliency_map.values()))  # (H, W) uint8

    for method in (Method.RECIPROCAM, Method.ACTIVATIONMAP):
        name = {"reciprocam": "ReciproCAM", "activationmap": "ActivationMap"}[method.value]
        try:
            explainer, mode = explainer_for(method)
            maps = np.stack([explain(explainer, x[i], classes[i]) for i in range(len(x))])
            np.save(work / f"{name}.npy", maps)
            timings = {}
            for batch in config["batches"]:
                def run(batch=batch):
                    for i in range(batch):
                        explain(explainer, x[i], classes[i])
                timings[batch] = best_and_median(run)
            try:  # does one call take a real batch?
                explainer(x[:2], targets=[int(classes[0])], output_size=(x.shape[2], x.shape[3]),
                          colormap=False)
                batched = "accepted"
            except Exception as err:
                lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
                batched = f"refused: {type(err).__name__}: {' / '.join(lines[-2:])[:240]}"
            result["methods"][name] = {"mode": mode, "ms_per_image": ms_per_image(timings),
                                       "batch_of_2_in_one_call": batched}
        except Exception as err:
            result["errors"][name] = traceback.format_exc()
    (work / "results.json").write_text(json.dumps(result, indent=1))
''')


def ensure_venv(venv: Path, log) -> tuple[Path | None, str]:
    """The venv's python with openvino-xai importable (made once): (python or None, notes)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", ("import openvino, openvino_xai, importlib.metadata as m; print("
                                 "m.version('openvino-xai'), openvino.__version__, m.version('numpy'))")]

    def usable() -> str | None:
        if not python.exists():
            return None
        done = subprocess.run(probe, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    found = usable()
    if found and found.split()[0] == OVXAI_REQUIREMENT.split("==")[1]:
        return python, f"cached venv {venv} (openvino-xai, openvino, numpy: {found})"
    log(f"making the OpenVINO XAI venv at {venv} (python3 -m venv; pip install {OVXAI_REQUIREMENT})")
    start = time.perf_counter()
    steps = [["python3", "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", OVXAI_REQUIREMENT]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
            return None, f"`{' '.join(step)}` failed (exit {done.returncode}):\n" + "\n".join(tail)
    found = usable()
    if not found:
        done = subprocess.run(probe, capture_output=True, text=True, check=False)
        return None, f"installed, but openvino_xai does not import:\n{done.stderr.strip()[-2000:]}"
    return python, (f"made venv {venv} in {time.perf_counter() - start:.0f} s "
                    f"(openvino-xai, openvino, numpy: {found})")


def load_model(arch: str, seed: int = 0):
    """(camexport Loaded, description) for ``arch``: the built-in pretrained EfficientNet-Lite0
    or a seeded random-weight torchvision/timm model."""
    import torch

    from camexport.load import BUILTIN, build_architecture, from_module, load

    if arch == BUILTIN:
        return load(BUILTIN), "EfficientNet-Lite0, packaged ImageNet weights"
    torch.manual_seed(seed)
    module, preprocessing = build_architecture(arch)
    return from_module(module.eval(), arch, preprocessing), f"{arch}, random weights (seed {seed})"


def ms_per_image(call, batch: int, repeats: int) -> tuple[float, float]:
    """(best, median) ms per image of ``repeats`` timed calls after one warm-up."""
    call()  # warm-up (compilation of shapes, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times) / batch, 1e3 * statistics.median(times) / batch


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50",
                        help="torchvision/timm name (random weights) or efficientnet-lite0 (pretrained)")
    parser.add_argument("--venv", type=Path, default=Path("/tmp/ovxai-venv"),
                        help="OpenVINO XAI's venv, made here once and reused")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="OpenVINO inference threads, both sides")
    parser.add_argument("--ovxai-precision", choices=("f32", "default"), default="f32",
                        help="f32: compile OpenVINO XAI's model as camexport does; default: as the "
                             "library does (OpenVINO's own hint)")
    parser.add_argument("--keep", type=Path, help="keep the work folder (ONNX, artifact, maps) here")
    parser.add_argument("--json", type=Path, help="write the record here too")
    args = parser.parse_args(argv)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, "1")

    from camexport.runtime import THREADS_VARIABLE

    os.environ[THREADS_VARIABLE] = str(args.threads)  # camexport.runtime.session reads it

    def log(message: str) -> None:
        print(f"[bench_openvino_xai] {message}", file=sys.stderr, flush=True)

    record: dict = {"arch": args.arch, "threads": args.threads, "repeats": args.repeats,
                    "ovxai_precision": args.ovxai_precision}
    python, notes = ensure_venv(args.venv, log)
    record["ovxai_venv"] = notes
    log(notes)

    import onnx

    from camexport.build import build
    from camexport.data import preprocess, sample_photos
    from camexport.explain import Explainer
    from camexport.export import to_onnx
    from camexport.runtime import session

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ovxai-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    loaded, described = load_model(args.arch)
    record["model"] = described
    prep = loaded.preprocessing
    onnx_path = work / "model.onnx"
    onnx.save(to_onnx(loaded), str(onnx_path))
    photos = sample_photos()
    x = np.stack([preprocess(p.image, prep.size, prep.mean, prep.std) for p in photos])
    record["photos"] = len(photos)
    log(f"{described}: ONNX {onnx_path.stat().st_size / 2**20:.0f} MB, {len(photos)} photos")

    built = build(str(onnx_path), [], methods=["gradcam"], fuse=["gradcam"],
                  out_dir=work / "artifact", input_size=tuple(prep.size), overwrite=True)
    manifest = built.manifest
    head = next(o for o in manifest["fused"]["outputs"] if o.startswith("cam/gradcam/"))
    record["camexport_layer"] = head.split("/", 2)[2]
    record["openvino"] = importlib.metadata.version("openvino")

    # the OpenVINO sessions, dropped before the child runs
    sessions = {"fused": session(built.graph_path, "openvino"), "plain": session(onnx_path, "openvino")}
    fused, plain = sessions["fused"], sessions["plain"]
    inputs = [i for i in fused.get_inputs() if i.name != "target_weights"]
    image_input = inputs[0].name
    classes_count = next(i for i in fused.get_inputs() if i.name == "target_weights").shape[1]
    output = manifest["score"]["output"]

    def run_fused(batch_x):
        zeros = np.zeros((len(batch_x), classes_count), np.float32)  # all-zero row: top class
        return fused.run([output, head], {image_input: batch_x, "target_weights": zeros})

    # maps and classes of every photo, batch 1 at a time
    results = [run_fused(x[i:i + 1]) for i in range(len(x))]
    logits = np.concatenate([r[0] for r in results])
    gradcam = np.concatenate([r[1] for r in results])
    classes = logits.argmax(1)
    explainer = Explainer(built.directory, provider="openvino", batch_size=max(BATCHES))
    explained = np.concatenate([explainer(x[i:i + 1], None, ["gradcam"]).cams["gradcam"]
                                for i in range(len(x))])
    plain_input = plain.get_inputs()[0].name

    timed = {"camexport fused GradCAM": lambda b: run_fused(x[:b]),
             "camexport GradCAM (Explainer)": lambda b: explainer(x[:b], None, ["gradcam"]),
             "forward only (camexport's OpenVINO)": lambda b: plain.run(None, {plain_input: x[:b]})}
    ms: dict[str, dict[int, float]] = {}  # best of the repeats (the machine may be shared)
    medians: dict[str, dict[int, float]] = {}
    for name, call in timed.items():
        ms[name], medians[name] = {}, {}
        for batch in BATCHES:
            if len(x) < batch:
                continue
            ms[name][batch], medians[name][batch] = ms_per_image(
                lambda call=call, batch=batch: call(batch), batch, args.repeats)
        log(f"{name}: best {ms[name]}, median {medians[name]}")
    explainer.release()
    sessions.clear()

    # the OpenVINO XAI half
    ovxai: dict = {}
    if python is None:
        record["ovxai_error"] = notes
    else:
        np.savez(work / "inputs.npz", x=x, classes=classes)
        (work / "config.json").write_text(json.dumps(
            {"repeats": args.repeats, "threads": args.threads, "batches": list(BATCHES),
             "precision": args.ovxai_precision}))
        (work / "child.py").write_text(CHILD)
        env = {**os.environ, "PYTHONNOUSERSITE": "1"}
        env.pop("PYTHONPATH", None)
        start = time.perf_counter()
        done = subprocess.run([str(python), str(work / "child.py"), str(work)], env=env,
                              capture_output=True, text=True, check=False)
        record["ovxai_child_s"] = round(time.perf_counter() - start, 1)
        if done.returncode != 0 or not (work / "results.json").exists():
            record["ovxai_error"] = (f"child exited {done.returncode}:\n"
                                     + "\n".join(done.stderr.strip().splitlines()[-20:]))
        else:
            ovxai = json.loads((work / "results.json").read_text())
            record["ovxai"] = {k: v for k, v in ovxai.items() if k != "methods"}
            if ovxai["errors"]:
                log(f"OpenVINO XAI errors: {ovxai['errors']}")
    for method, found in ovxai.get("methods", {}).items():
        label = ("forward only (OpenVINO XAI's OpenVINO)" if method == "forward"
                 else f"OpenVINO XAI {method} ({found['mode']})")
        ms[label] = {int(b): t for b, t in found["ms_per_image"]["best"].items()}
        medians[label] = {int(b): t for b, t in found["ms_per_image"]["median"].items()}
        if "batch_of_2_in_one_call" in found:
            record.setdefault("ovxai_batch_call", {})[method] = found["batch_of_2_in_one_call"]
    record["ms_per_image"] = {name: {str(b): round(t, 2) for b, t in by.items()} for name, by in ms.items()}
    record["ms_per_image_median"] = {name: {str(b): round(t, 2) for b, t in by.items()}
                                     for name, by in medians.items()}

    # similarity (reported, never asserted)
    similarity = {"camexport Explainer vs fused GradCAM, max |diff|":
                  float(np.abs(explained - gradcam).max())}
    for method in ("ReciproCAM", "ActivationMap"):
        path = work / f"{method}.npy"
        if path.exists():
            maps = np.load(path)
            r = np.array([pearson(maps[i], gradcam[i]) for i in range(len(x))])
            similarity[f"{method} vs camexport GradCAM, Pearson r"] = {
                "mean": round(float(np.nanmean(r)), 4), "median": round(float(np.nanmedian(r)), 4),
                "min": round(float(np.nanmin(r)), 4), "max": round(float(np.nanmax(r)), 4),
                "per_photo": {p.name: round(float(v), 4) for p, v in zip(photos, r)}}
    record["similarity"] = similarity

    print_table(record, ms)
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if "ovxai_error" not in record else 1


def print_table(record: dict, ms: dict[str, dict[int, float]]) -> None:
    reference = ms["camexport fused GradCAM"]
    print(f"\n{record['model']}, 224x224, {record['photos']} sample photos, "
          f"{record['threads']} OpenVINO thread(s), ms per image: best of {record['repeats']} "
          f"timed calls (medians in --json)")
    ovxai = record.get("ovxai", {})
    print(f"camexport: OpenVINO {record['openvino']}, layer {record['camexport_layer']}")
    if ovxai:
        print(f"OpenVINO XAI {ovxai['openvino_xai']}: OpenVINO {ovxai['openvino'].split('-')[0]}, "
              f"numpy {ovxai['numpy']}, target layer {ovxai['target_layer']}, "
              f"precision {record['ovxai_precision']}, top class agrees on "
              f"{ovxai['top_class_agrees']}/{record['photos']} photos")
    header = (f"{'method':<44} {'runtime':<16} {'ms/img b1':>10} {'ms/img b8':>10} "
              f"{'x fused b1':>10} {'x fused b8':>10}")
    print(header)
    print("-" * len(header))
    for name, by in ms.items():
        runtime = (f"OpenVINO {ovxai.get('openvino', '?').split('-')[0]}" if "OpenVINO XAI" in name
                   else f"OpenVINO {record['openvino']}")
        cells = [f"{by[b]:10.1f}" if b in by else f"{'-':>10}" for b in BATCHES]
        ratios = [f"{by[b] / reference[b]:10.2f}" if b in by and b in reference else f"{'-':>10}"
                  for b in BATCHES]
        print(f"{name:<44} {runtime:<16} {' '.join(cells)} {' '.join(ratios)}")
    for method, answer in record.get("ovxai_batch_call", {}).items():
        print(f"OpenVINO XAI {method}, 2 images in one call: {answer}")
    print("\nmap similarity (different methods: reported, not asserted)")
    for name, value in record["similarity"].items():
        if isinstance(value, dict):
            print(f"  {name}: mean {value['mean']}, median {value['median']}, "
                  f"min {value['min']}, max {value['max']}")
        else:
            print(f"  {name}: {value:.2e}")
    if "ovxai_error" in record:
        print(f"\nOpenVINO XAI could not run: {record['ovxai_error']}")


if __name__ == "__main__":
    raise SystemExit(main())
