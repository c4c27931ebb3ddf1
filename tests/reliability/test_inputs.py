"""Every input is checked before work starts: a malformed dataset, a size the model cannot take, a
layer without a spatial map, labels that are no class indices, a wrong --arch, out-of-range options
and directories given for files are each refused with one line naming the problem and the fix
(exit 1, or 2 for click's usage errors), never a traceback, and no file written before is changed.

One row per case: the command, the message expected (problem and fix), the exit code. A tiny CNN
at 32 x 32 (its artifact built once for the module), datasets made by hand with h5py for the
malformed ones. torchvision's weight downloads are blocked: every --arch is built offline."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from camexport.cli import main

SIZE = 32
nn = torch.nn


class Twice(nn.Module):
    """A module called twice: its path names two tensors (an ambiguous --layer)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.block(torch.relu(self.block(torch.relu(self.stem(x)))))
        return self.head(x.mean(dim=(2, 3)))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def _strided() -> nn.Module:
    """Needs at least 13 x 13: a stride-2 3 x 3 convolution, a 2 x 2 max-pool, a 3 x 3 convolution."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def _dataset(path: Path, **arrays) -> None:
    """An HDF5 file with these datasets ("group": an empty group)."""
    with h5py.File(path, "w") as h5:
        for name, value in arrays.items():
            if isinstance(value, str):
                h5.create_group(name)
            else:
                h5[name] = value


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, one_torch_thread) -> Path:
    """Model files, the tiny CNN's artifact, 4 images, their packed dataset, malformed datasets,
    label files and a concept file."""
    root = tmp_path_factory.mktemp("inputs")
    torch.save(_tiny(), root / "tiny.pt")
    torch.save(_tiny().state_dict(), root / "tiny_state.pt")
    torch.save(_strided(), root / "strided.pt")
    torch.save(Twice().eval(), root / "twice.pt")
    result = CliRunner().invoke(main, ["build", str(root / "tiny.pt"), "--layer", "3", "--trust-pickle",
                                       "--input-size", str(SIZE), str(SIZE), "--out", str(root / "art"),
                                       "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, SIZE, SIZE, 3), np.uint8)
    for i, image in enumerate(pixels):
        cv2.imwrite(str(images / f"img{i}.png"), image)
    result = CliRunner().invoke(main, ["pack", str(images), "--out", str(root / "data.h5"), "--size",
                                       str(SIZE), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    _dataset(root / "float64.h5", images=pixels.astype(np.float64))
    _dataset(root / "int32.h5", images=pixels.astype(np.int32))
    _dataset(root / "scalar.h5", images=np.float32(1))
    _dataset(root / "group.h5", images="group")
    _dataset(root / "no-images.h5", pixels=pixels)
    _dataset(root / "empty.h5", images=pixels[:0])
    _dataset(root / "float-labels.h5", images=pixels, labels=np.array([875.7, 1, 2, 3]))
    _dataset(root / "string-labels.h5", images=pixels, labels=np.array([b"cat", b"dog", b"cat", b"dog"]))
    _dataset(root / "short-labels.h5", images=pixels, labels=np.array([1, 2]))
    _dataset(root / "big-labels.h5", images=pixels, labels=np.array([875, 1, 2, 3]))
    (root / "folder").mkdir()
    (root / "notes.txt").write_text("not HDF5\n")
    (root / "other-names.csv").write_text("other.png,3\nanother.png,4\n")
    (root / "word-labels.csv").write_text("file,label\nimg0.png,3\nimg1.png,cat\n")
    np.save(root / "concept.npy", np.ones(10, np.float32))
    return root


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """torchvision's weight downloads fail the test (the machine may have a network)."""
    import torchvision.models._api as api

    def refuse(url, *args, **kwargs):
        raise AssertionError(f"camexport tried to download {url}")

    monkeypatch.setattr(api, "load_state_dict_from_url", refuse)


RUN = ["run", "{w}/art", "--data", "{w}/data.h5", "--out", "{out}.h5", "-q"]


def _run(data: str, *extra: str) -> list[str]:
    return ["run", "{w}/art", "--data", data, "--out", "{out}.h5", "-q", *extra]


def _build(model: str, *extra: str) -> list[str]:
    return ["build", model, "--out", "{out}", "-q", *extra]


TINY = ["--trust-pickle", "--input-size", str(SIZE), str(SIZE)]
PACK = ["pack", "{w}/images", "--out", "{out}.h5", "--size", str(SIZE), "-q"]
FIX_DATA = r"`camexport pack IMAGES_DIR --out \S+` makes one"
EXPECTED_IMAGES = r"expected \(N, H, W, 3\) uint8 RGB or \(N, 3, H, W\) float32 already preprocessed"
OFFLINE_ARCH = (r"the weights in \S+tiny_state\.pt do not fit --arch {arch}: \d+ keys of {arch} missing "
                r"from the file .*Pass the --arch the state_dict was saved from")

#: (case, command ({w}: the workspace, {out}: an output path in the case's folder), the message
#: expected (the problem and the fix), the exit code)
CASES = [
    # -- the input dataset: /images and /labels -----------------------------------------------
    ("images-float64", _run("{w}/float64.h5"),
     (rf"float64\.h5:/images is float64 of shape \(4, 32, 32, 3\); {EXPECTED_IMAGES}.*: convert it "
     rf"\(for 0-255 pixels: images\.astype\(numpy\.uint8\)\), or {FIX_DATA}"), 1),
    ("images-int32", _run("{w}/int32.h5"),
     rf"int32\.h5:/images is int32 of shape \(4, 32, 32, 3\); {EXPECTED_IMAGES}.*astype\(numpy\.uint8\)", 1),
    ("images-scalar", _run("{w}/scalar.h5"),
     rf"scalar\.h5:/images is float32 of shape \(\); {EXPECTED_IMAGES}.*: convert it, or {FIX_DATA}", 1),
    ("images-group", _run("{w}/group.h5"),
     rf"group\.h5:/images is an HDF5 group, not a dataset; store the images as one array .*{FIX_DATA}",
     1),
    ("images-missing", _run("{w}/no-images.h5"),
     (rf"no-images\.h5 has no /images dataset \(it holds \['pixels'\]\); an input dataset holds /images .*"
     rf"{FIX_DATA}"), 1),
    ("images-empty", _run("{w}/empty.h5"),
     rf"empty\.h5:/images holds no images \(shape \(0, 32, 32, 3\)\); {FIX_DATA} from a folder of images", 1),
    ("labels-float", _run("{w}/float-labels.h5"),
     (r"float-labels\.h5:/labels holds 1 values that are not whole numbers \(first: sample 0, 875\.7\), "
     r"and a label is a class index: store one integer class index per image in /labels"), 1),
    ("labels-strings", _run("{w}/string-labels.h5"),
     r"string-labels\.h5:/labels holds \|S3 values, not class indices: store one integer class index", 1),
    ("labels-too-few", _run("{w}/short-labels.h5"),
     (r"short-labels\.h5:/labels has shape \(2,\), but /images holds 4 images: store one integer class "
     r"index per image in /labels \(-1: unknown\), or remove /labels"), 1),
    ("labels-out-of-range", _run("{w}/big-labels.h5", "--targets", "label"),
     (r"--targets label: 1 samples \(first: sample 0, label 875\) have no label in 0\.\.9, the model's "
     r"classes: use --targets pred, or a dataset whose /labels are this model's classes"), 1),
    ("labels-absent", _run("{w}/data.h5", "--targets", "label"),
     (r"--targets label, but \S+data\.h5 has no /labels; use --targets pred or a class index, or pack "
     r"with --labels"), 1),
    ("data-missing", _run("{w}/missing.h5"),
     r"input dataset \S+missing\.h5 does not exist; make one with `camexport pack IMAGES_DIR --out", 1),
    ("data-directory", _run("{w}/folder"),
     (r"input dataset \S+folder is a directory, not an HDF5 file: pass the \.h5 file itself; `camexport "
     r"pack \S+folder --out data\.h5` makes one"), 1),
    ("data-not-hdf5", _run("{w}/notes.txt"),
     (r"notes\.txt is not a readable HDF5 file \(.*\); pass an input dataset \(\.h5 with /images\): "
      r"`camexport pack"), 1),
    # -- run options ----------------------------------------------------------------------------
    ("artifact-missing", ["run", "{w}/nothing", "--data", "{w}/data.h5", "--out", "{out}.h5"],
     r"artifact \S+nothing does not exist; make one with `camexport build MODEL --out \S+nothing`", 1),
    ("artifact-is-a-model-file", ["run", "{w}/tiny.pt", "--data", "{w}/data.h5", "--out", "{out}.h5"],
     r"tiny\.pt is a file, not a camexport artifact: .*make one with `camexport build MODEL --out DIR`", 1),
    ("artifact-is-a-folder", ["run", "{w}/folder", "--data", "{w}/data.h5", "--out", "{out}.h5"],
     r"folder is not an artifact \(no model\.cam\.onnx\); make one with camexport build MODEL --out DIR", 1),
    ("targets-out-of-range", [*RUN, "--targets", "10"],
     r"--targets 10 is out of range for a model with 10 classes: pass a class index in 0\.\.9, or pred", 1),
    ("targets-negative", [*RUN, "--targets", "-1"],
     r"--targets -1 is out of range for a model with 10 classes: pass a class index in 0\.\.9", 1),
    ("targets-word", [*RUN, "--targets", "cat"],
     r"--targets must be pred, label, a class index or concept:FILE\.npy, not 'cat'", 1),
    ("targets-float", [*RUN, "--targets", "3.5"],
     r"--targets must be pred, label, a class index or concept:FILE\.npy, not '3\.5'", 1),
    ("concept-missing", [*RUN, "--targets", "concept:{w}/nothing.npy"],
     (r"--targets concept:\S+nothing\.npy: not a readable \.npy file \(.*No such file.*\); pass a file saved "
     r"with numpy\.save"), 1),
    ("concept-directory", [*RUN, "--targets", "concept:{w}/folder"],
     r"--targets concept:\S+folder: not a readable \.npy file \(.*Is a directory.*\); pass a file saved", 1),
    ("batch-size-zero", [*RUN, "--batch-size", "0"],
     r"--batch-size must be at least 1, not 0: pass the number of images per graph run", 1),
    ("batch-size-negative", [*RUN, "--batch-size", "-3"], r"--batch-size must be at least 1, not -3: ", 1),
    ("batch-size-word", [*RUN, "--batch-size", "many"], (r"Invalid value for '--batch-size': 'many' is not a "
     r"valid integer"), 2),
    ("limit-negative", [*RUN, "--limit", "-1"],
     r"--limit must be at least 1, not -1: pass how many samples to explain, or leave --limit out", 1),
    ("limit-zero", [*RUN, "--limit", "0"], r"--limit must be at least 1, not 0: pass how many samples", 1),
    ("run-method-unknown", [*RUN, "--methods", "gradcan"],
     r"unknown method 'gradcan'; choose from gradcam, hirescam", 1),
    ("run-method-not-built", [*RUN, "--methods", "fullgrad"],
     (r"the artifact was built for gradcam; fullgrad also needs .*: rebuild with `camexport build \.\.\. "
     r"--methods fullgrad,gradcam`"), 1),
    ("metric-unknown", [*RUN, "--metrics", "road-foo"],
     r"unknown metric 'road-foo'; choose from .*road-morf", 1),
    ("metric-bad-parameter", [*RUN, "--metrics", "road-morf:abc"],
     r"road-morf takes percentiles in \[0, 100\] or 'auto', not 'abc'", 1),
    ("provider-unknown", [*RUN, "--provider", "tpu"], r"Invalid value for '--provider': 'tpu' is not", 2),
    # -- build: sizes, layers, methods ----------------------------------------------------------
    ("input-size-negative", _build("{w}/tiny.pt", "--trust-pickle", "--input-size", "-64", "-64"),
     (r"--input-size H W must be positive, not -64 -64: pass the size the model takes, e\.g\. --input-size "
     r"224 224, or leave it out"), 1),
    ("input-size-zero", _build("{w}/tiny.pt", "--trust-pickle", "--input-size", "0", "0"),
     r"--input-size H W must be positive, not 0 0: pass the size the model takes", 1),
    ("depth-zero", _build("{w}/tiny.pt", "--trust-pickle", "--input-size", "8", "8", "--depth", "0"),
     r"--depth D and --input-size H W must be positive, not 0 8 8", 1),
    ("depth-without-input-size", _build("{w}/tiny.pt", "--trust-pickle", "--depth", "4"),
     r"--depth D goes with --input-size H W", 1),
    ("depth-on-a-2d-model", _build("{w}/tiny.pt", *TINY, "--depth", "4"),
     (r"--depth 4: the model does not run on a \(1, 3, 4, 32, 32\) input \(RuntimeError: .*\), and it runs "
     r"on 2-D images \(1, 3, 32, 32\): leave --depth out"), 1),
    ("input-size-below-strides", _build("{w}/strided.pt", "--trust-pickle", "--input-size", "4", "4"),
     (r"--input-size 4 4 is too small for this model: the model does not run on a \(1, 3, 4, 4\) input "
     r"\(RuntimeError: .*Output size is too small\)\. It runs at 13x13 .*: pass --input-size 13 13 or "
     r"larger"),
     1),
    ("input-size-one-side-too-small", _build("{w}/strided.pt", "--trust-pickle", "--input-size", "4", "64"),
     r"--input-size 4 64 is too small for this model: .* pass --input-size 13 13 or larger", 1),
    ("layer-without-map", _build("{w}/tiny.pt", *TINY, "--layer", "6"),
     (r"--layer 6 \(linear, shape \(N, 10\)\) has no spatial map to explain .*: pass one of the layers with "
     r"a "
     r"spatial map, nearest the output last: 0, 1, 2, 3 \(`camexport inspect MODEL` lists every layer"), 1),
    ("layer-pooled-1x1", _build("{w}/tiny.pt", *TINY, "--layer", "4"),
     r"--layer 4 \(.*, shape \(N, 16, 1, 1\)\) has no spatial map .*: pass one of the layers .*: 0, 1, 2, 3 ",
     1),
    ("layer-unknown", _build("{w}/tiny.pt", *TINY, "--layer", "layer4"),
     r"no layer named 'layer4' in this model\..*Run `camexport inspect MODEL` to list every layer", 1),
    ("layer-index-out-of-range", _build("{w}/twice.pt", *TINY, "--layer", "stem[0]"),
     r"'stem' has no children to index in 'stem\[0\]': run `camexport inspect MODEL` to list every layer", 1),
    ("layer-ambiguous", _build("{w}/twice.pt", *TINY, "--layer", "block"),
     (r"module 'block' hands 2 tensors to the rest of the graph \(called more than once.*\): .*Pass one "
     r"tensor name as --layer"), 1),
    ("build-method-unknown", _build("{w}/tiny.pt", *TINY, "--methods", "gradcan"),
     r"unknown method 'gradcan'; choose from gradcam", 1),
    ("fuse-unknown", _build("{w}/tiny.pt", *TINY, "--fuse", "scorecam"),
     r"cannot fuse \['scorecam'\]; fusable methods: gradcam", 1),
    # -- build: model files and --arch ----------------------------------------------------------
    ("model-missing", _build("{w}/nothing.pt"),
     r"model file '\S+nothing\.pt' does not exist \(or is not a file\); pass a \.pt, \.pt2, \.onnx path", 1),
    ("model-directory", _build("{w}/folder"),
     r"folder is a directory, not a model file: pass a \.pt, \.pt2 or \.onnx file", 1),
    ("pickle-not-trusted", _build("{w}/tiny.pt"),
     r"tiny\.pt holds a pickled module, and unpickling runs arbitrary code.*pass --trust-pickle", 1),
    ("arch-missing", _build("{w}/tiny_state.pt"),
     r"tiny_state\.pt is a state_dict: pass --arch with the torchvision or timm constructor", 1),
    ("arch-unknown", _build("{w}/tiny_state.pt", "--arch", "resnet999"),
     (r"unknown --arch 'resnet999': not a torchvision or timm model name \(closest: resnet50.*\); pass the "
     r"constructor the state_dict was saved from"), 1),
    ("arch-weights-do-not-fit", _build("{w}/tiny_state.pt", "--arch", "resnet18"),
     OFFLINE_ARCH.format(arch="resnet18"), 1),
    # built offline (no backbone weights downloaded), then the tiny weights are refused
    ("arch-offline-lraspp", _build("{w}/tiny_state.pt", "--arch", "lraspp_mobilenet_v3_large"),
     OFFLINE_ARCH.format(arch="lraspp_mobilenet_v3_large"), 1),
    ("arch-offline-deeplabv3", _build("{w}/tiny_state.pt", "--arch", "deeplabv3_resnet50"),
     OFFLINE_ARCH.format(arch="deeplabv3_resnet50"), 1),
    ("arch-offline-fcn", _build("{w}/tiny_state.pt", "--arch", "fcn_resnet50"),
     OFFLINE_ARCH.format(arch="fcn_resnet50"), 1),
    # -- pack -------------------------------------------------------------------------------------
    ("pack-images-missing", ["pack", "{w}/nothing", "--out", "{out}.h5"],
     r"no images \(\.jpg, .*\) in \S+nothing; give a folder or a glob such as 'photos/\*\.jpg'", 1),
    ("pack-size-zero", ["pack", "{w}/images", "--out", "{out}.h5", "--size", "0"],
     r"--size must be a positive number of pixels, not 0: pass the side the images are cut to", 1),
    ("pack-size-negative", ["pack", "{w}/images", "--out", "{out}.h5", "--size", "-5"],
     r"--size must be a positive number of pixels, not -5", 1),
    ("pack-labels-missing", [*PACK, "--labels", "{w}/nothing.csv"],
     r"--labels \S+nothing\.csv does not exist; pass a CSV of 'file name,label' lines .*, or --labels names",
     1),
    ("pack-labels-directory", [*PACK, "--labels", "{w}/folder"],
     r"--labels \S+folder is a directory; pass a CSV of 'file name,label' lines .*, or --labels names", 1),
    ("pack-labels-name-no-image", [*PACK, "--labels", "{w}/other-names.csv"],
     (r"other-names\.csv names none of the 4 images \(it names 'other\.png', \.\.\.; the images are "
     r"'img0\.png', \.\.\.\): the first column must be each image's file name \(img0\.png\) or stem"), 1),
    ("pack-labels-not-integers", [*PACK, "--labels", "{w}/word-labels.csv"],
     r"word-labels\.csv, line 3: label 'cat' is not a class index; labels are whole numbers", 1),
]


@pytest.mark.parametrize("command, pattern, code", [pytest.param(*row[1:], id=row[0]) for row in CASES])
def test_refused_before_work(workspace, tmp_path, command, pattern, code):
    out = tmp_path / "out"
    args = [a.format(w=workspace, out=out) for a in command]
    before = _digests(workspace)
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    output = result.output
    print(f"{' '.join(command[:1])}: {output.strip()}")
    assert result.exit_code == code, output
    assert "Traceback" not in output and "camexport bug" not in output, output
    line = " ".join(output.split())
    assert re.search(pattern, line), line
    assert _digests(workspace) == before
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["lraspp_mobilenet_v3_large", "deeplabv3_resnet50", "fcn_resnet50"])
def test_segmentation_arch_is_built_offline(arch):
    """README: nothing is downloaded; torchvision's segmentation builders fetch ImageNet backbone
    weights unless told not to (no_downloads fails the test on any download)."""
    from camexport.load import build_architecture

    module, preprocessing = build_architecture(arch)
    assert not module.training and preprocessing.size == (224, 224)


def test_integral_float_labels_are_accepted(workspace, tmp_path):
    """Float labels that are whole numbers (as pandas writes them) are class indices."""
    data = tmp_path / "labels.h5"
    with h5py.File(workspace / "data.h5") as source:
        _dataset(data, images=source["images"][()], labels=np.array([3.0, 1.0, -1.0, 9.0]))
    result = CliRunner().invoke(main, ["run", str(workspace / "art"), "--data", str(data), "--out",
                                       str(tmp_path / "out.h5"), "--targets", "label", "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 1 and "sample 2, label -1" in result.output, result.output
    result = CliRunner().invoke(main, ["run", str(workspace / "art"), "--data", str(data), "--out",
                                       str(tmp_path / "out.h5"), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "out.h5") as h5:
        np.testing.assert_array_equal(h5["labels"][()], [3, 1, -1, 9])
