"""The built-in default job: the pretrained EfficientNet-Lite0 explains the packaged photos.

Builds (or reuses) artifacts/efficientnet-lite0, runs the photos through its augmented graph on
onnxruntime, computes several CAM methods, and writes results/default.h5 and PNG overlays in
results/default/ (one grid per photo: the photo, then each method).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import h5py
import numpy as np

from camexport import __version__
from camexport.build import AUGMENTED_FILE, build
from camexport.data import preprocess, sample_photos
from camexport.explain import Explainer
from camexport.render import grid, overlay

METHODS = ["gradcam", "gradcam++", "hirescam", "layercam", "eigencam", "ablationcam", "fullgrad"]


def imagenet_names() -> list[str]:
    import torchvision

    return torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifact", default="artifacts/efficientnet-lite0")
    parser.add_argument("--out", default="results")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--limit", type=int, help="Only the first N photos.")
    args = parser.parse_args()
    methods = args.methods.split(",")

    artifact = Path(args.artifact)
    if not (artifact / AUGMENTED_FILE).is_file():
        result = build("efficientnet-lite0", ["bn2"], methods=methods, out_dir=artifact)
        print(f"built {artifact} in {sum(result.timings.values()):.1f}s")
    explainer = Explainer(artifact)
    prep = explainer.manifest["preprocessing"]
    photos = sample_photos()[: args.limit]
    x = np.stack([preprocess(p.image, prep["size"], prep["mean"], prep["std"]) for p in photos])

    start = time.perf_counter()
    result = explainer(x, targets=None, methods=methods)
    seconds = time.perf_counter() - start
    names = imagenet_names()
    predicted = result.outputs.argmax(axis=1)

    out = Path(args.out)
    pictures = out / "default"
    pictures.mkdir(parents=True, exist_ok=True)
    with h5py.File(out / "default.h5", "w") as h5:
        h5.attrs.update({"camexport_version": __version__, "model": "efficientnet-lite0",
                         "provider": "cpu", "methods": json.dumps(methods),
                         "manifest": json.dumps(explainer.manifest)})
        h5["names"] = np.array([p.name for p in photos], dtype=h5py.string_dtype())
        h5["labels"] = np.array([-1 if p.label is None else p.label for p in photos])
        h5[f"outputs/{explainer.output_name}"] = result.outputs
        h5["targets"] = predicted
        for method, cams in result.cams.items():
            h5.create_dataset(f"cams/{method}", data=cams, chunks=(1, *cams.shape[1:]),
                              compression="gzip")
    height, width = prep["size"]
    correct = 0
    for i, photo in enumerate(photos):
        rgb = cv2.resize(photo.image, (width, height), interpolation=cv2.INTER_LINEAR) / 255.0
        tiles = [np.uint8(rgb * 255)] + [overlay(rgb.astype(np.float32), result.cams[m][i])
                                         for m in methods]
        labels = [names[predicted[i]]] + methods
        picture = grid(tiles, labels)
        cv2.imwrite(str(pictures / f"{i:02d}_{photo.name}.png"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        known = "" if photo.label is None else f" (label {names[photo.label]})"
        correct += int(photo.label == predicted[i])
        print(f"{photo.name:<18} predicted {names[predicted[i]]}{known}")
    labelled = sum(p.label is not None for p in photos)
    print(f"top-1 {correct}/{labelled} on the labelled photos; {len(methods)} methods for "
          f"{len(photos)} photos in {seconds:.1f}s")
    print(f"wrote {out / 'default.h5'} and {len(photos)} overlays in {pictures}/")


if __name__ == "__main__":
    main()
