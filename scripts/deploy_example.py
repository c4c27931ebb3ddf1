"""Explain every image of a folder with a fused camexport artifact, using only onnxruntime (or
OpenVINO's runtime), numpy and OpenCV (for reading, resizing and writing images): no torch, no
camexport.

    camexport build resnet50.pt --arch resnet50 --layer layer4 --fuse gradcam,eigencam \\
        --fuse-uint8 --out artifacts/resnet50-fused
    python scripts/deploy_example.py artifacts/resnet50-fused photos/ --out overlays/
    python scripts/deploy_example.py artifacts/resnet50-fused photos/ --runtime openvino

One ``session.run`` per batch gives the model's outputs and every fused heatmap
(``cam/<method>/<layer>``, (B, H, W) at the model's input size); each heatmap is resized back to
its image's own size (a 640x480 webcam frame stays 640x480) and blended over it as a JET
colour map, as pytorch-grad-cam's show_cam_on_image does. Each image explains its top class
(an all-zero ``target_weights`` row). At the end the script prints the third-party modules it
loaded and exits with status 1 if torch or camexport was among them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
#: weight of the photo in the overlay (pytorch-grad-cam's show_cam_on_image default)
IMAGE_WEIGHT = 0.5


class OpenVINOGraph:
    """The augmented graph compiled by OpenVINO's own runtime for the CPU, answering the two
    session calls this script makes: ``get_inputs()`` (name, shape) and ``run(names, feed)``."""

    def __init__(self, path: Path):
        import openvino

        core = openvino.Core()
        model = core.read_model(str(path))
        # OpenVINO 2026.4.1's CPU plugin computes a matrix product or convolution wrongly when
        # its weight constant also feeds one reading it in the other layout, as the backward pass
        # does (Conv beside ConvTranspose); camexport.openvino_session.untie_shared_weights
        for op in model.get_ordered_ops():
            if op.get_type_name() == "Constant" and op.get_output_partial_shape(0).rank.get_length() >= 2:
                for reader in list(op.output(0).get_target_inputs())[1:]:
                    copy = openvino.op.Constant(openvino.Tensor(op.get_data().copy()))
                    reader.replace_source_output(copy.output(0))
        # the graph's own input names (a compiled input may also carry an inner tensor's name)
        self.inputs = [SimpleNamespace(name=port.get_any_name(),
                                       shape=[d.get_length() if d.is_static else None
                                              for d in port.get_partial_shape()])
                       for port in model.inputs]
        # float32: the CPU plugin computes in bfloat16 by default on CPUs with AVX512-BF16 or AMX
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self.request = self.compiled.create_infer_request()

    def get_inputs(self):
        return self.inputs

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feed)
        ports = {name: port for port in self.compiled.outputs for name in port.get_names()}
        return [results[ports[name]] for name in names]


def load_artifact(directory: Path, provider: str, runtime: str = "onnxruntime"):
    """The augmented graph's session and the artifact's manifest."""
    manifest = json.loads((directory / "manifest.json").read_text())
    if not manifest.get("fused"):
        sys.exit(f"{directory} has no fused heads: build it with camexport build ... --fuse gradcam")
    if runtime == "openvino":
        return OpenVINOGraph(directory / "model.cam.onnx"), manifest
    import onnxruntime as ort

    providers = {"cpu": ["CPUExecutionProvider"],
                 "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}[provider]
    session = ort.InferenceSession(str(directory / "model.cam.onnx"), providers=providers)
    return session, manifest


def preprocess(images: list[np.ndarray], prep: dict) -> np.ndarray:
    """BGR uint8 images of any size to the model's (B, 3, H, W) float32 input (manifest's size,
    channel order, 1/255 scale, mean and std)."""
    height, width = prep["size"]
    batch = []
    for image in images:
        resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        if prep.get("channel_order", "RGB") == "RGB":
            resized = resized[:, :, ::-1]
        scaled = resized.astype(np.float32) / np.float32(255)
        batch.append((scaled - np.float32(prep["mean"])) / np.float32(prep["std"]))
    return np.ascontiguousarray(np.stack(batch).transpose(0, 3, 1, 2))


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The heatmap (h, w) in [0, 1] or 0-255, resized to the image and blended as JET colours."""
    if heatmap.dtype != np.uint8:
        heatmap = np.clip(np.round(heatmap * 255), 0, 255).astype(np.uint8)
    heatmap = cv2.resize(heatmap, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    colours = cv2.applyColorMap(heatmap, cv2.COLORMAP_JET)
    return cv2.addWeighted(image, IMAGE_WEIGHT, colours, 1 - IMAGE_WEIGHT, 0)


def third_party_modules() -> list[str]:
    """Top-level modules loaded so far that are not part of Python's standard library."""
    tops = {name.split(".")[0] for name in sys.modules}
    return sorted(t for t in tops if t not in sys.stdlib_module_names and not t.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path, help="artifact directory built with --fuse")
    parser.add_argument("images", type=Path, help="folder of images")
    parser.add_argument("--out", type=Path, default=Path("overlays"), help="folder for the overlays")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                        help="onnxruntime's execution provider (--runtime onnxruntime)")
    parser.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime",
                        help="openvino: OpenVINO's own runtime on the CPU (pip install openvino)")
    args = parser.parse_args(argv)
    if args.runtime == "openvino" and args.provider != "cpu":
        parser.error("--runtime openvino runs on the CPU: leave --provider at cpu")

    session, manifest = load_artifact(args.artifact, args.provider, args.runtime)
    heads = manifest["fused"]["outputs"]
    model_output = manifest["score"]["output"]
    inputs = {value.name: value for value in session.get_inputs()}
    classes = inputs.pop("target_weights").shape[1]
    (image_input,) = inputs
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    args.out.mkdir(parents=True, exist_ok=True)

    clock, written = time.perf_counter(), 0
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start:start + args.batch_size]
        images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in chunk]
        x = preprocess(images, manifest["preprocessing"])
        weights = np.zeros((len(x), classes), np.float32)  # all-zero row: the top class
        outputs = session.run([model_output, *heads], {image_input: x, "target_weights": weights})
        logits, maps = outputs[0], dict(zip(heads, outputs[1:]))
        for b, (path, image) in enumerate(zip(chunk, images)):
            print(f"{path.name}: class {int(logits[b].argmax())} ({image.shape[1]}x{image.shape[0]})")
            for head in heads:
                target = args.out / f"{path.stem}_{head.replace('/', '_')}.png"
                cv2.imwrite(str(target), overlay(image, maps[head][b]))
                written += 1
    elapsed = time.perf_counter() - clock
    print(f"{len(paths)} images, {written} overlays in {elapsed:.2f} s -> {args.out}")
    modules = third_party_modules()
    print(f"third-party modules loaded ({len(modules)}): {', '.join(modules)}")
    forbidden = [name for name in ("torch", "camexport") if name in sys.modules]
    print(f"torch loaded: {'torch' in sys.modules}; camexport loaded: {'camexport' in sys.modules}")
    return 1 if forbidden else 0


if __name__ == "__main__":
    sys.exit(main())
