"""pytorch-grad-cam 1.5.7 against camexport (onnxruntime), per CAM method, in one run.

    .venv/bin/python scripts/bench.py                    # everything on CPU (~40 min on 2 idle cores)
    .venv/bin/python scripts/bench.py --no-pgc-slow      # without pgc's ScoreCAM/AblationCAM (~25 min)
    .venv/bin/python scripts/bench.py --quick            # smoke test: small inputs, no slow pgc runs
    .venv/bin/python scripts/bench.py --models resnet50 --methods gradcam,eigencam --quick
    .venv/bin/python scripts/bench.py --provider cuda    # pgc on torch CUDA, camexport on ORT CUDA

Same machine, same preprocessed images (camexport.data.sample_photos, preprocessed with
camexport.data.preprocess at the model's size with the artifact manifest's mean and std), same
batch, targets None (each image's top class) on both sides. Models: resnet50 ``layer4.2`` and
vit_small (timm vit_small_patch16_224, ``blocks.11.norm1``; pgc gets the reshape transform
(B, 1+196, D) -> (B, D, 14, 14) without the class token) with random weights after
torch.manual_seed(0), and the built-in EfficientNet-Lite0 ``bn2``.

Protocol: each side runs in its own child process, one after the other, never at once: pgc
with torch.set_num_threads(cores), camexport with onnxruntime's default intra-op threads and
without importing torch. Per method: one warm-up call, then --repeats timed calls, median. The
GradCAM family and EigenCAM run on a batch of --batch-size images; ScoreCAM and AblationCAM on
--slow-images images (default 1), each library with its own default inner batch (pgc: ScoreCAM
16 masked images, AblationCAM 32 ablated copies; camexport: ScoreCAM 64 masked images made at
once and run at the inner batch Explainer.forward picks by measurement (camexport.tuning: 8, 16,
32 or 64), AblationCAM 256); their timed runs stop after --slow-budget seconds, and on CPU a warm-up
longer than --cold-limit seconds is itself the single timed run (runs=1): pgc's resnet50
ScoreCAM and AblationCAM take minutes each. A method that fails on camexport is reported
(ERROR) and not run on pgc; the JSON is rewritten after each model.
"six" is "all six gradient methods together": one camexport call that computes the six
GradCAM-family maps from one graph run; its pgc column is the sum of the six pgc medians (pgc
runs one forward and backward per method). Its target is against one plain forward.

Columns: ratio = pgc s / camexport s; x fwd = camexport s / one plain onnxruntime forward
(model.plain.onnx) of the same images, timed again right before the method (--repeats runs,
median: this VM's speed drifts by up to 25 % within a run; a forward timed minutes earlier made
Lite0's six methods read 1.38x), for ScoreCAM / its floor: the same plain forwards it runs (one
per non-constant channel, one per image for the constant ones) on ready-made inputs, in the same
chunks; max|d| = max |camexport CAM - pgc CAM| (maps in [0, 1]).
Memory (Linux): "peak MB" is the peak RSS of that side's process during that method's calls
(VmHWM, reset before each method through /proc/self/clear_refs). It is the whole process
(imports, model or sessions, allocator arenas, plus what the method needs at its peak), not the
method's increment alone; "loaded MB" in the JSON is the same process right before the first
method. Each child's peak RSS over its whole life (the highest VmHWM it saw, read inside it:
wait4's ru_maxrss would include the parent's memory image at fork) is printed per model. On
CUDA, pgc also records torch.cuda.max_memory_allocated per method; onnxruntime's device memory
is not measured.

Scaling (when resnet50 is among --models): camexport GradCAM throughput (images/s) on resnet50
vs batch size (1, 8, 32, 64) and image size (224, 384) in one child, with the plain forward
beside it; each point stops timing after --scaling-budget seconds (at least one run after its
warm-up).

Writes JSON (default results/bench.json).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _bench_common import (
    ROOT,
    cores,
    machine,
    measure,
    peak_rss_mb,
    process_peak_rss_mb,
    reset_peak_rss,
    rss_mb,
    run_child,
    save_random,
)

from camexport.load import BUILTIN

GRADIENT_FAMILY = ("gradcam", "hirescam", "gradcamelementwise", "gradcam++", "xgradcam", "layercam")
SLOW = ("ablationcam", "scorecam")
SIX = "six"  # the row "all six gradient methods together"
METHODS = (*GRADIENT_FAMILY, "eigencam", *SLOW, SIX)
PGC_CLASSES = {"gradcam": "GradCAM", "hirescam": "HiResCAM", "gradcamelementwise": "GradCAMElementWise",
               "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "layercam": "LayerCAM",
               "eigencam": "EigenCAM", "ablationcam": "AblationCAM", "scorecam": "ScoreCAM"}
#: issue 5's targets on CPU: ("ratio", v): pgc s / camexport s >= v; ("forward", v):
#: camexport s <= v x one plain onnxruntime forward of the same images.
#: ScoreCAM's "forward" is its floor: the same count of plain forwards (issue 19).
TARGETS = {**{m: (("ratio", 5.0),) for m in GRADIENT_FAMILY}, "eigencam": (("ratio", 3.0),),
           "ablationcam": (("ratio", 100.0),), "scorecam": (("ratio", 3.0), ("forward", 1.1)),
           SIX: (("forward", 1.15),)}


@dataclass(frozen=True)
class Setup:
    arch: str | None  # torchvision/timm constructor (random weights); None: the built-in model
    layer: str
    resizable: bool = True  # False: a fixed input size (ViT's position embeddings)
    native_size: int = 224


MODELS = {
    "resnet50": Setup("resnet50", "layer4.2"),
    "efficientnet-lite0": Setup(None, "bn2"),
    "vit_small": Setup("vit_small_patch16_224", "blocks.11.norm1", resizable=False),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- inputs ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _photos():
    from camexport.data import sample_photos

    return sample_photos()


def photo_batch(count: int, size: int, preprocessing: dict) -> np.ndarray:
    """``count`` packaged photos (cycled in their order), preprocessed at size x size."""
    from camexport.data import preprocess

    photos = _photos()
    return np.stack([preprocess(photos[i % len(photos)].image, (size, size), preprocessing["mean"],
                                preprocessing["std"]) for i in range(count)]).astype(np.float32)


# -- artifacts ---------------------------------------------------------------------------------
def _reusable(directory: Path, sha: str, layer: str, size: int, methods: list[str]) -> bool:
    from camexport.artifact import ArtifactError, verify_artifact

    try:
        _, manifest = verify_artifact(directory)
    except ArtifactError:
        return False
    return (manifest["source"]["sha256"] == sha and manifest["layers"][0]["requested"] == layer
            and manifest["preprocessing"]["size"] == [size, size]
            and set(methods) <= set(manifest["methods"]))


def prepare(name: str, size: int, methods: list[str], work: Path) -> dict:
    """The artifact of model ``name`` at ``size`` for ``methods`` (reused from ``work`` when its
    manifest matches): {"artifact", "weights", "arch", "layer", "layout", "preprocessing"}."""
    from camexport.build import build
    from camexport.load import load, sha256

    setup = MODELS[name]
    folder = work / name
    directory = folder / f"artifact-{size}"
    if setup.arch is None:
        weights, sha = BUILTIN, load(BUILTIN).sha256
    else:
        _, path = save_random(setup.arch, folder)
        weights, sha = str(path), sha256(path)
    if _reusable(directory, sha, setup.layer, size, methods):
        log(f"[{name}] reusing {directory}")
    else:
        log(f"[{name}] building {setup.layer} at {size}x{size} ({','.join(methods)}) ...")
        start = time.perf_counter()
        build(weights, [setup.layer], arch=setup.arch, methods=methods, out_dir=directory,
              input_size=(size, size), overwrite=True)
        log(f"[{name}] built in {time.perf_counter() - start:.0f} s")
    manifest = json.loads((directory / "manifest.json").read_text())
    return {"artifact": str(directory), "weights": weights, "arch": setup.arch, "layer": setup.layer,
            "layout": manifest["layers"][0]["layout"], "preprocessing": manifest["preprocessing"]}


# -- the child processes -------------------------------------------------------------------------
class _Phases:
    """Times calls with :func:`measure` and reads the peak RSS of each (and, for torch on CUDA,
    the peak of torch's device allocator)."""

    def __init__(self, spec: dict, label: str, cuda=None):
        self.spec, self.label, self.cuda = spec, label, cuda

    def __call__(self, name: str, call, slow: bool = False):
        """Time ``call``; ``slow`` (ScoreCAM, AblationCAM) applies the cold limit and the budget
        of slow methods."""
        reset_peak_rss()
        if self.cuda is not None:
            self.cuda.reset_peak_memory_stats()
        before = rss_mb()
        try:
            record, result = measure(call, self.spec["repeats"],
                                     self.spec.get("cold_limit_s") if slow else None,
                                     self.spec.get("slow_budget_s") if slow else self.spec.get("budget_s"))
        except Exception as err:  # noqa: BLE001 (onnxruntime raises bare Exception subclasses; one
            # failing method is recorded and must not lose the rest of a long run)
            record, result = {"error": f"{type(err).__name__}: {str(err)[:500]}", "median_s": None,
                              "runs": 0, "cold": False}, None
        record.update(rss_before_mb=before, peak_rss_mb=peak_rss_mb())
        if self.cuda is not None:
            record["cuda_peak_allocated_mb"] = self.cuda.max_memory_allocated() / 2 ** 20
        if "error" in record:
            log(f"  {self.label} {name:<22} FAILED: {record['error']}")
        else:
            runs = "1 cold run" if record["cold"] else f"median of {record['runs']}"
            log(f"  {self.label} {name:<22} {record['median_s']:9.3f} s ({runs}), "
                f"peak RSS {record['peak_rss_mb'] or float('nan'):.0f} MB")
        return record, result


def _arrays(spec: dict) -> dict[str, np.ndarray]:
    with np.load(spec["inputs"]) as data:
        return {key: data[key] for key in data.files}


def camexport_side(spec: dict) -> tuple[dict, dict]:
    from camexport.explain import Explainer

    explainer = Explainer(spec["artifact"], provider=spec["provider"])
    arrays = _arrays(spec)
    phases = _Phases(spec, f"camexport {spec['model']}")
    record = {"providers": explainer.session.get_providers(),
              "threads": "onnxruntime default intra-op threads", "rss_loaded_mb": rss_mb(),
              "torch_imported": "torch" in sys.modules, "forward": {}, "methods": {}}
    cams = {}
    for key, x in arrays.items():
        record["forward"][key], _ = phases(f"forward [{len(x)} images]", lambda x=x: explainer.forward(x))
    for name in spec["methods"]:
        x = arrays["slow" if name in SLOW else "batch"]
        # the forward again right before the method: the x fwd column compares the two at the
        # same moment (this VM's speed drifts by up to 25 % over a long run)
        adjacent = None if name in SLOW else measure(lambda x=x: explainer.forward(x), spec["repeats"])[0]
        if name == SIX:
            record["methods"][name], maps = phases(name, lambda x=x: explainer(
                x, targets=None, methods=list(GRADIENT_FAMILY)).cams)
            cams.update({f"{SIX}:{method}": value for method, value in (maps or {}).items()})
        else:
            record["methods"][name], cams[name] = phases(name, lambda x=x, name=name: explainer(
                x, targets=None, methods=[name]).cams[name], slow=name in SLOW)
        if adjacent is not None and record["methods"][name].get("median_s"):
            record["methods"][name]["adjacent_forward_s"] = adjacent["median_s"]
        if cams.get(name) is None:
            cams.pop(name, None)
        if name == "scorecam" and cams.get(name) is not None:
            record.setdefault("floors", {})[name] = scorecam_floor(explainer, x, phases)
    record["forward_inner_batch"] = explainer._forward_batches.size
    return record, cams


def scorecam_floor(explainer, x: np.ndarray, phases) -> dict:
    """ScoreCAM's floor: the plain forwards it runs (one per channel whose map is not constant,
    one per image for the constant ones), in the same chunks (ScoreCAM.batch_size masked images
    handed to Explainer.forward, which splits them at its measured inner batch), on ready-made
    inputs: everything ScoreCAM does but the forwards is what the ratio to this floor shows."""
    from camexport.methods.perturbation import ScoreCAM

    acts = explainer(x, targets=None, methods=["eigencam"]).inputs.activations[0]
    flat = acts.reshape(*acts.shape[:2], -1)
    constant = flat.max(axis=2) == flat.min(axis=2)
    counts = (~constant).sum(axis=1) + constant.any(axis=1)
    made = ScoreCAM.batch_size
    chunks = [int(min(made, n - start)) for n in counts for start in range(0, n, made)]
    tile = np.ascontiguousarray(np.repeat(x[:1], ScoreCAM.batch_size, axis=0))
    record, _ = phases("scorecam floor", lambda: [explainer.forward(tile[:n]) for n in chunks], slow=True)
    inner = explainer._forward_batches.size
    record.update(images=int(counts.sum()), forwards=sum(-(-n // inner) for n in chunks), inner_batch=inner)
    return record


def _reshape_transform(layout: dict):
    """pgc's reshape_transform for a layer layout (as camexport.methods.pipeline.to_channel_first)."""
    if layout["kind"] == "tokens":
        (height, width), prefix = layout["grid"], layout["prefix_tokens"]
        return lambda t: t[:, prefix:, :].reshape(t.size(0), height, width, t.size(2)).permute(0, 3, 1, 2)
    if layout["kind"] == "NHWC":
        return lambda t: t.permute(0, 3, 1, 2)
    return None


def pgc_side(spec: dict) -> tuple[dict, dict]:
    import pytorch_grad_cam as pgc
    import torch
    from pytorch_grad_cam.ablation_layer import AblationLayerVit

    from camexport.eager import resolve_module
    from camexport.load import load

    torch.set_num_threads(spec["threads"])
    device = torch.device("cpu" if spec["provider"] == "cpu" else "cuda")
    model = load(spec["weights"], arch=spec["arch"]).module.eval().to(device)
    layer = resolve_module(model, spec["layer"])
    reshape = _reshape_transform(spec["layout"])
    tensors = {key: torch.from_numpy(x).to(device) for key, x in _arrays(spec).items()}
    phases = _Phases(spec, f"pgc       {spec['model']}", torch.cuda if device.type == "cuda" else None)
    record = {"device": str(device), "threads": torch.get_num_threads(), "rss_loaded_mb": rss_mb(),
              "forward": {}, "methods": {}}
    if device.type == "cuda":
        record["device_name"] = torch.cuda.get_device_name(device)

    def forward(x):
        with torch.no_grad():
            return model(x).cpu()

    cams = {}
    for key, x in tensors.items():
        record["forward"][key], _ = phases(f"forward [{len(x)} images]", lambda x=x: forward(x))
    for name in spec["methods"]:
        x = tensors["slow" if name in SLOW else "batch"]
        options = {}
        if name == "ablationcam" and spec["layout"]["kind"] == "tokens":
            options["ablation_layer"] = AblationLayerVit()
        with getattr(pgc, PGC_CLASSES[name])(model=model, target_layers=[layer],
                                             reshape_transform=reshape, **options) as cam:
            record["methods"][name], cams[name] = phases(
                name, lambda x=x, cam=cam: cam(input_tensor=x, targets=None), slow=name in SLOW)
        if cams[name] is None:
            del cams[name]
    return record, cams


def scaling_side(spec: dict) -> tuple[dict, dict]:
    from camexport.explain import Explainer

    def at_size(size: int, artifact: str) -> list[dict]:
        batches = spec["batches"]
        explainer = Explainer(artifact, provider=spec["provider"], batch_size=max(batches))
        images = photo_batch(max(batches), size, explainer.manifest["preprocessing"])
        phases = _Phases(spec, f"scaling   resnet50 {size}x{size}")
        points = []
        for batch in batches:
            x = np.ascontiguousarray(images[:batch])
            gradcam, _ = phases(f"gradcam [{batch}]", lambda x=x: explainer(
                x, targets=None, methods=["gradcam"]).cams["gradcam"])
            forward, _ = phases(f"forward [{batch}]", lambda x=x: explainer.forward(x))
            points.append({"size": size, "batch": batch, "gradcam": gradcam, "forward": forward,
                           "gradcam_images_per_s":
                               batch / gradcam["median_s"] if gradcam["median_s"] else None,
                           "forward_images_per_s":
                               batch / forward["median_s"] if forward["median_s"] else None})
        return points

    return {"points": [point for size, artifact in spec["artifacts"].items()
                       for point in at_size(int(size), artifact)]}, {}


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    side = {"camexport": camexport_side, "pgc": pgc_side, "scaling": scaling_side}[spec["side"]]
    record, cams = side(spec)
    record["process_peak_rss_mb"] = process_peak_rss_mb()
    np.savez(spec["out"] + ".npz", **cams)
    Path(spec["out"] + ".json").write_text(json.dumps(record))


def spawn(spec: dict, work: Path) -> tuple[dict, dict, float]:
    """Run one side in a child process: (its record, its CAMs, its seconds)."""
    stem = work / f"{spec['side']}-{spec.get('model', 'resnet50')}"
    spec = {**spec, "out": str(stem)}
    Path(f"{stem}.spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "TQDM_DISABLE": "1"}  # pgc's ScoreCAM/AblationCAM progress bars
    seconds = run_child([sys.executable, str(Path(__file__).resolve()), "--child",
                               f"{stem}.spec.json"], env)
    with np.load(f"{stem}.npz") as data:
        cams = {key: data[key] for key in data.files}
    return json.loads(Path(f"{stem}.json").read_text()), cams, seconds


# -- the parent ------------------------------------------------------------------------------------
def _max_diff(ours: dict, theirs: dict, pairs: list[tuple[str, str]]) -> float | None:
    diffs = [float(np.abs(ours[a] - theirs[b]).max()) for a, b in pairs if a in ours and b in theirs]
    return max(diffs) if diffs else None


def _row(method: str, count: int, mine: dict | None, other: dict | None, floor: dict | None,
         diff: float | None = None, note: str | None = None) -> dict:
    """One table row; ``mine``/``other``: camexport's and pgc's phase records (None: not run; a
    record with "error": it failed), ``floor``: camexport's plain forward of the same images."""
    mine_s = (mine or {}).get("median_s")
    other_s = (other or {}).get("median_s")
    ratio = other_s / mine_s if mine_s and other_s else None
    x_forward = mine_s / floor["median_s"] if mine_s and floor and floor.get("median_s") else None
    target, result = None, None
    if method in TARGETS:
        texts, verdicts = [], []
        for kind, value in TARGETS[method]:
            text, measured = ((f">={value:g}x", None if ratio is None else ratio >= value) if kind == "ratio"
                              else (f"<={value:g}x fwd", None if x_forward is None else x_forward <= value))
            texts.append(text)
            verdicts.append(measured)
        target = " ".join(texts)
        known = [v for v in verdicts if v is not None]
        result = "ERROR" if (mine or {}).get("error") else (
            None if not known else ("PASS" if all(known) else "MISS"))
    errors = {side: record["error"] for side, record in (("camexport", mine), ("pgc", other))
              if record and record.get("error")}
    return {"method": method, "images": count, "camexport_s": mine_s, "pgc_s": other_s, "ratio": ratio,
            "x_forward": x_forward, "target": target, "result": result, "max_abs_diff": diff,
            "camexport_peak_rss_mb": (mine or {}).get("peak_rss_mb"),
            "pgc_peak_rss_mb": (other or {}).get("peak_rss_mb"),
            "camexport_runs": (mine or {}).get("runs"), "pgc_runs": (other or {}).get("runs"),
            "errors": errors or None, "note": note}


def model_rows(methods: list[str], ours: dict, theirs: dict, our_cams: dict, their_cams: dict,
               images: dict[str, int]) -> list[dict]:
    rows = [_row("forward", count, ours["forward"][key], theirs["forward"].get(key), ours["forward"][key],
                 note="plain onnxruntime forward (the floor); pgc column: torch no_grad forward")
            for key, count in images.items()]
    for name in methods:
        key = "slow" if name in SLOW else "batch"
        if name == SIX:
            family = [theirs["methods"].get(m) for m in GRADIENT_FAMILY]
            timed = all(r and r.get("median_s") for r in family)
            other = {"median_s": sum(r["median_s"] for r in family), "runs": None,
                     "peak_rss_mb": max(r["peak_rss_mb"] or 0 for r in family)} if timed else None
            diff = _max_diff(our_cams, their_cams, [(f"{SIX}:{m}", m) for m in GRADIENT_FAMILY])
            note = "one camexport call, six maps; pgc column: the sum of its six medians"
        else:
            other, note = theirs["methods"].get(name), None
            diff = _max_diff(our_cams, their_cams, [(name, name)])
        floor = ours["forward"][key]
        adjacent = (ours["methods"].get(name) or {}).get("adjacent_forward_s")
        if adjacent:
            floor = {"median_s": adjacent}
        if name in ours.get("floors", {}):  # ScoreCAM: its own count of plain forwards
            floor = ours["floors"][name]
            note = f"x fwd: against {floor['forwards']} plain forwards ({floor['images']} images)"
        rows.append(_row(name, images[key], ours["methods"].get(name), other, floor, diff, note))
    return rows


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _times(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def print_table(results: dict) -> None:
    header = (f"{'model':<19}{'method':<20}{'imgs':>4}{'pgc s':>10}{'camexport s':>12}{'ratio':>9}"
              f"{'x fwd':>8}  {'target':<13}{'result':<7}{'max|d|':>9}{'pgc MB':>8}{'cx MB':>7}  runs")
    print(header)
    print("-" * len(header))
    for name, model in results["models"].items():
        for row in model["rows"]:
            runs = f"{_fmt(row['pgc_runs'], 'd')}/{_fmt(row['camexport_runs'], 'd')}"
            print(f"{name:<19}{row['method']:<20}{row['images']:>4}{_fmt(row['pgc_s'], '10.3f'):>10}"
                  f"{_fmt(row['camexport_s'], '12.3f'):>12}"
                  f"{_fmt(row['ratio'], '.1f') + ('x' if row['ratio'] else ''):>9}"
                  f"{_times(row['x_forward']):>8}  {row['target'] or '-':<13}{row['result'] or 'n/a':<7}"
                  f"{_fmt(row['max_abs_diff'], '9.1e'):>9}{_fmt(row['pgc_peak_rss_mb'], '8.0f'):>8}"
                  f"{_fmt(row['camexport_peak_rss_mb'], '7.0f'):>7}  {runs}")
        for row in model["rows"]:
            for side, error in (row["errors"] or {}).items():
                print(f"{'':<19}{row['method']} failed on {side}: {error[:300]}")
        peaks = model["process_peak_rss_mb"]
        print(f"{'':<19}process peak RSS: pgc {_fmt(peaks.get('pgc'), '.0f')} MB, "
              f"camexport {_fmt(peaks.get('camexport'), '.0f')} MB (each child over its whole life)")


def print_scaling(scaling: dict) -> None:
    print("\ncamexport GradCAM throughput, resnet50 layer4.2 (images/s; plain forward beside it)")
    print(f"{'size':>6}{'batch':>7}{'gradcam img/s':>15}{'forward img/s':>15}{'gradcam/fwd':>13}"
          f"{'peak MB':>9}")
    for point in scaling["points"]:
        gradcam, forward = point["gradcam_images_per_s"], point["forward_images_per_s"]
        print(f"{point['size']:>6}{point['batch']:>7}{_fmt(gradcam, '15.2f'):>15}{_fmt(forward, '15.2f'):>15}"
              f"{_fmt(forward / gradcam if gradcam and forward else None, '13.2f'):>13}"
              f"{_fmt(point['gradcam']['peak_rss_mb'], '9.0f'):>9}")


def _list(text: str, allowed, what: str) -> list[str]:
    from camexport.methods import canonical_methods

    chosen = []
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            continue
        name = raw
        if what == "method" and raw not in allowed:
            try:
                name = canonical_methods(raw)[0]
            except ValueError as err:
                raise SystemExit(str(err)) from err
        if name not in allowed:
            raise SystemExit(f"unknown {what} {raw!r}; choose from {', '.join(allowed)}")
        chosen.append(name)
    return list(dict.fromkeys(chosen))


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def save(results: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2))


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: %(default)s")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: %(default)s")
    parser.add_argument("--batch-size", type=int, help="images per call, GradCAM family and EigenCAM "
                        "(default 8; --quick 2)")
    parser.add_argument("--slow-images", type=int, default=1, help="images for ScoreCAM and AblationCAM")
    parser.add_argument("--repeats", type=int, help="timed runs after the warm-up (default 5; --quick 1)")
    parser.add_argument("--size", type=int, help="input size of the resizable models (default 224; "
                        "--quick 64); vit_small stays at 224")
    parser.add_argument("--cold-limit", type=float,
                        help="ScoreCAM/AblationCAM: a warm-up longer than this many seconds is the only "
                        "timed run (default 30 on CPU; off on GPU, where a warm-up may build engines)")
    parser.add_argument("--slow-budget", type=float, default=60.0,
                        help="ScoreCAM/AblationCAM: stop timed runs after this many seconds (at least one)")
    parser.add_argument("--no-pgc-slow", action="store_true",
                        help="skip pgc's ScoreCAM and AblationCAM (minutes each on resnet50)")
    parser.add_argument("--no-pgc", action="store_true",
                        help="camexport only (the six-methods-vs-forward target needs no pgc)")
    parser.add_argument("--no-scaling", action="store_true",
                        help="skip the scaling section (run only when resnet50 is among --models)")
    parser.add_argument("--scaling-batches", help="default 1,8,32,64; --quick 1,2")
    parser.add_argument("--scaling-sizes", help="default 224,384; --quick 64,96")
    parser.add_argument("--scaling-budget", type=float, default=15.0,
                        help="seconds of timed runs per scaling point (after its warm-up)")
    parser.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                        help="camexport's onnxruntime provider; pgc runs on torch CUDA unless cpu")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 64x64 CNN inputs, batch 2, 1 repeat, no pgc ScoreCAM/AblationCAM")
    parser.add_argument("--keep", help="build artifacts in this folder and reuse them on later runs "
                        "(default: a temporary folder)")
    parser.add_argument("--json", default=str(ROOT / "results" / "bench.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    args.batch_size = args.batch_size or (2 if quick else 8)
    args.repeats = args.repeats or (1 if quick else 5)
    args.size = args.size or (64 if quick else 224)
    args.scaling_batches = _ints(args.scaling_batches or ("1,2" if quick else "1,8,32,64"))
    args.scaling_sizes = _ints(args.scaling_sizes or ("64,96" if quick else "224,384"))
    args.pgc_slow = not (args.no_pgc_slow or quick)
    if args.cold_limit is None and args.provider == "cpu":
        args.cold_limit = 30.0  # off (None) on GPU
    if args.child is None:
        args.models = _list(args.models, list(MODELS), "model")
        args.methods = _list(args.methods, list(METHODS), "method")
    return args


def main() -> None:
    args = parse()
    if args.child:
        child(args.child)
        return
    import inspect

    from camexport.explain import Explainer
    from camexport.methods import method

    began = time.perf_counter()
    threads = cores()
    explainer_batch = inspect.signature(Explainer).parameters["batch_size"].default
    settings = {"models": args.models, "methods": args.methods, "batch_size": args.batch_size,
                "slow_images": args.slow_images, "repeats": args.repeats, "size": args.size,
                "cold_limit_s": args.cold_limit, "slow_budget_s": args.slow_budget,
                "pgc": not args.no_pgc, "pgc_slow": args.pgc_slow, "quick": args.quick,
                "provider": args.provider, "targets": None,
                "inner_batches": {"pgc": {"scorecam": 16, "ablationcam": 32},
                                  "camexport": {"scorecam": f"{method('scorecam').batch_size} masked "
                                                            "images made at once, forwards at the "
                                                            "measured inner batch",
                                                "ablationcam": method("ablationcam").batch_size,
                                                "forward": explainer_batch}},
                "threads": {"torch": f"set_num_threads({threads}) (= cores)",
                            "onnxruntime": "default intra-op threads"}}
    load_start = os.getloadavg()
    where = ("CPU" if args.provider == "cpu"
             else f"pgc on torch CUDA, camexport on onnxruntime {args.provider}")
    info = machine()
    print(f"camexport vs pytorch-grad-cam {info['versions'].get('grad-cam', '?')}: {where}; "
          f"{info['cpu']}, {threads} cores; torch.set_num_threads({threads}), onnxruntime at its "
          f"default intra-op threads; the two sides run one after the other on the same cores")
    if load_start[0] > 0.5 * threads:
        log(f"warning: 1-min load average {load_start[0]:.1f} on {threads} cores: other work is running. "
            f"A multi-threaded forward stalls when another process holds one of its cores (torch "
            f"resnet50 with 2 threads: 2.2 s instead of 0.04 s, measured here), so timings are noise")
    results = {"benchmark": "scripts/bench.py",
               "created": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": info, "settings": settings, "models": {}, "scaling": None,
               "memory": "peak MB: peak RSS (VmHWM) of that side's child process during that method's "
                         "calls, reset before each method: whole process, not the increment; "
                         "process peak: the child's peak RSS over its whole life (read inside it)"}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.keep) if args.keep else Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        runs = Path(temporary)
        for name in args.models:
            size = args.size if MODELS[name].resizable else MODELS[name].native_size
            methods = ([m for m in args.methods if m != SIX]
                       + (list(GRADIENT_FAMILY) if SIX in args.methods else [])
                       + (["eigencam"] if "scorecam" in args.methods else []))  # ScoreCAM's floor
            spec = prepare(name, size, list(dict.fromkeys(methods)), work)
            images = {"batch": args.batch_size}
            if any(m in SLOW for m in args.methods):
                images["slow"] = args.slow_images
            arrays = {key: photo_batch(count, size, spec["preprocessing"]) for key, count in images.items()}
            np.savez(runs / f"{name}-inputs.npz", **arrays)
            common = {**spec, "model": name, "inputs": str(runs / f"{name}-inputs.npz"),
                      "repeats": args.repeats, "cold_limit_s": args.cold_limit,
                      "slow_budget_s": args.slow_budget,
                      "provider": args.provider, "threads": threads}
            log(f"[{name}] {size}x{size}, {args.batch_size} images per call "
                f"({args.slow_images} for ScoreCAM/AblationCAM)")
            ours, our_cams, our_s = spawn({**common, "side": "camexport", "methods": args.methods}, runs)
            failed = [m for m, r in ours["methods"].items() if r.get("error")]
            if failed:
                log(f"[{name}] pgc skips {', '.join(failed)}: camexport failed on it, no ratio to take")
            pgc_methods = [m for m in args.methods
                           if m != SIX and m not in failed and (args.pgc_slow or m not in SLOW)]
            theirs, their_cams, their_s = {"methods": {}, "forward": {}}, {}, None
            if not args.no_pgc:
                theirs, their_cams, their_s = spawn({**common, "side": "pgc", "methods": pgc_methods}, runs)
            results["models"][name] = {
                "layer": spec["layer"], "size": size, "images": images, "layout": spec["layout"],
                "rows": model_rows(args.methods, ours, theirs, our_cams, their_cams, images),
                "process_peak_rss_mb": {"pgc": theirs.get("process_peak_rss_mb"),
                                        "camexport": ours["process_peak_rss_mb"]},
                "child_seconds": {"pgc": their_s, "camexport": our_s},
                "raw": {"camexport": ours, "pgc": theirs}}
            save(results, args.json)
        if not args.no_scaling and "resnet50" in args.models:
            artifacts = {}
            for size in args.scaling_sizes:
                artifacts[str(size)] = prepare("resnet50", size, ["gradcam"], work)["artifact"]
            scaling, _, seconds = spawn({"side": "scaling", "artifacts": artifacts, "provider": args.provider,
                                         "batches": args.scaling_batches, "repeats": min(args.repeats, 3),
                                         "budget_s": args.scaling_budget}, runs)
            results["scaling"] = {**scaling, "model": "resnet50", "layer": "layer4.2",
                                  "seconds": seconds}
    counts = {}
    for model in results["models"].values():
        for row in model["rows"]:
            if row["target"]:
                counts[row["result"] or "n/a"] = counts.get(row["result"] or "n/a", 0) + 1
    results["summary"] = counts
    results["seconds"] = time.perf_counter() - began
    results["load_average"] = {"start": load_start, "end": os.getloadavg()}
    print()
    print_table(results)
    cold = "off" if args.cold_limit is None else f"{args.cold_limit:g} s"
    print(f"\nratio = pgc s / camexport s (PASS/MISS against issues 5 and 19's targets, n/a: pgc not run); "
          f"x fwd = camexport s / one plain\nonnxruntime forward of the same images timed right "
          f"before the method (ScoreCAM: / the "
          f"same count of plain forwards, its floor); six = the six "
          f"gradient methods in one camexport call (pgc column: the sum of its six).\n"
          f"Times: medians of {args.repeats} runs after one warm-up (runs column: pgc/camexport); "
          f"ScoreCAM/AblationCAM on {args.slow_images} image(s),\nup to {args.slow_budget:g} s of "
          f"timed runs, and a warm-up longer than {cold} is the single timed run (runs 1).\n"
          f"max|d| = max |camexport CAM - pgc CAM|, maps in [0, 1] (round-off: ~1e-5). MB = peak RSS "
          f"of that side's process during the method\n(whole process: model, sessions, arenas).")
    devices = {m["raw"]["pgc"].get("device_name") for m in results["models"].values()} - {None}
    if devices:
        print(f"GPU: {', '.join(sorted(devices))}")
    if results["scaling"]:
        print_scaling(results["scaling"])
    busy = results["load_average"]["end"][0] > 0.5 * threads or load_start[0] > 0.5 * threads
    print(f"\ntargets: {', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'none'}; "
          f"total {results['seconds']:.0f} s; 1-min load average {load_start[0]:.1f} at the start, "
          f"{results['load_average']['end'][0]:.1f} at the end, {threads} cores"
          + (": other work was running, timings are noisy" if busy else "")
          + ("\n--quick: small inputs and batches, not issue 5's setting; its PASS/MISS say nothing"
             if args.quick else ""))
    save(results, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
