"""End to end on real photos and the pretrained EfficientNet-Lite0: pack -> build -> run -> show ->
render -> recompute through the CLI, resuming after SIGKILL, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from cli_helper import cli

from camexport.data import foolbox_files, preprocess, skimage_photos
from camexport.explain import Explainer
from camexport.store import ResultReader

pytestmark = pytest.mark.xdist_group("lite0-run")

METHODS = "gradcam,gradcam++,eigencam,ablationcam,fullgrad"
CAM_TOLERANCE = 1e-6  # the CLI and the Python API run the same graph on the same float32 inputs



@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """A folder of real photos (scikit-image's as PNG, foolbox's JPEGs), an artifact built by the
    CLI and the packed dataset."""
    root = tmp_path_factory.mktemp("run")
    photos = root / "photos"
    photos.mkdir()
    for photo in skimage_photos()[:2]:
        label = photo.label
        cv2.imwrite(str(photos / f"{photo.name}_{label}.png"), cv2.cvtColor(photo.image, cv2.COLOR_RGB2BGR))
    for path in foolbox_files()[:4]:
        shutil.copy(path, photos)
    cli("build", "efficientnet-lite0", "--layer", "bn2", "--methods", METHODS, "--out", root / "lite0", "-q")
    cli("pack", photos, "--out", root / "photos.h5", "--labels", "names")
    return root


@pytest.fixture(scope="session")
def finished(workspace) -> Path:
    out = workspace / "out.h5"
    cli("run", workspace / "lite0", "--data", workspace / "photos.h5", "--out", out,
        "--methods", METHODS, "--batch-size", "4", "--save-activations", "--save-gradients", "-q")
    return out


def test_pack_layout(workspace):
    with h5py.File(workspace / "photos.h5") as h5:
        assert h5["images"].shape == (6, 224, 224, 3) and h5["images"].dtype == np.uint8
        names = [n.decode() for n in h5["names"][()]]
        assert names[:2] == ["chelsea_281.png", "coffee_967.png"]
        assert list(h5["labels"][:2]) == [281, 967]
        assert h5["images"].chunks == (1, 224, 224, 3)


def test_run_layout_and_api_parity(workspace, finished):
    with ResultReader(finished) as results:
        assert results.attrs["complete"]
        assert results.done.all() and not results.invalid.any()
        assert set(results.methods) == set(METHODS.split(","))
        outputs = results.outputs("linear")
        assert outputs.shape == (6, 1000)
        targets = results.targets()
        np.testing.assert_array_equal(targets, outputs.argmax(axis=1))
        assert 281 <= targets[0] <= 285  # Chelsea is a cat
        assert targets[1] == 967  # espresso
        cams = results.storage("cams/gradcam")
        assert cams.chunks == (1, 224, 224) and cams.compression == "gzip"
        assert not cams.virtual
        fingerprint = results.attrs["fingerprint"]
        assert fingerprint["parameters"]["methods"] == METHODS.split(",")
        assert results.attrs["provider"] == "CPUExecutionProvider"
        assert results.storage("activations/bn2").shape == (6, 1280, 7, 7)
        stored = {m: results.cams(m) for m in results.methods}
        images = results.labels
    assert list(images[:2]) == [281, 967]
    explainer = Explainer(workspace / "lite0")
    prep = explainer.manifest["preprocessing"]
    with h5py.File(workspace / "photos.h5") as h5:
        x = np.stack([preprocess(i, prep["size"], prep["mean"], prep["std"]) for i in h5["images"][()]])
    api = explainer(x, methods=METHODS.split(","))
    for name, cams in api.cams.items():
        assert np.abs(cams - stored[name]).max() <= CAM_TOLERANCE, name
    assert not (workspace / "out.h5.parts").exists()


def test_show_render_recompute(workspace, finished, tmp_path):
    shown = cli("show", finished)
    assert "6/6 samples done (complete)" in shown.output and "gradcam++" in shown.output
    info = json.loads(cli("show", finished, "--json").output)
    assert info["done"] == 6 and info["methods"] == sorted(METHODS.split(","))
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(1000)))
    cli("render", finished, "--out", tmp_path / "pics", "--class-names", names)
    pngs = sorted((tmp_path / "pics").glob("*.png"))
    assert len(pngs) == 6
    picture = cv2.imread(str(pngs[0]))
    assert picture.shape[1] == 224 * 6  # the photo and five methods
    page = (tmp_path / "pics" / "index.html").read_text()
    assert page.count("<img") == 6 and "class 967" in page
    copy = tmp_path / "copy.h5"
    shutil.copy(finished, copy)
    cli("recompute", copy, "--methods", "gradcam,layercam")
    with ResultReader(copy) as results, ResultReader(finished) as original:
        np.testing.assert_array_equal(results.cams("gradcam"), original.cams("gradcam"))
        assert results.storage("cams/layercam").shape == (6, 224, 224)
        assert results.cams("layercam").max() > 0.99
    refused = cli("recompute", copy, "--methods", "scorecam", ok=False)
    assert refused.exit_code != 0 and "need the model" in refused.output


def _run_command(workspace: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "camexport.cli", "run", str(workspace / "lite0"), "--data",
            str(workspace / "photos.h5"), "--out", str(out), "--methods", "gradcam,eigencam,ablationcam",
            "--batch-size", "1", "-q"]


def _shards(out: Path) -> int:
    return len(list(out.with_name(out.name + ".parts").glob("shard-*.h5")))


def test_resume_after_sigkill(workspace, finished, tmp_path):
    """Killed between batches, just after a shard appears, and a moment into a batch: each time the
    file stays readable and the next run finishes with the same numbers as an unbroken run."""
    out = tmp_path / "killed.h5"
    command = _run_command(workspace, out)
    kills = [(1, 0.0), (2, 0.15), (3, 0.4), (4, 0.05)]
    for shards, delay in kills:
        process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 300
        while _shards(out) < shards and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL  # killed while working, not after
        with ResultReader(out) as results:
            if results.attrs["complete"]:
                # the run got through its final copy before the kill landed (a loaded machine
                # let it get ahead of this loop): nothing is left to interrupt
                break
        assert _shards(out) >= shards
        finished_rows = np.zeros(6, bool)
        for shard in out.with_name(out.name + ".parts").glob("shard-*.h5"):
            _, start, stop = shard.stem.split("-")
            finished_rows[int(start):int(stop)] = True
        # readable after every kill; the live view (rewritten at most every second, so it may lag
        # behind the shards, e.g. when a run is killed before its first rewrite) shows only
        # finished samples, with their final values
        with ResultReader(out) as results, ResultReader(finished) as reference:
            assert not results.attrs["complete"]
            done = results.done if results.has("done") else np.zeros(6, bool)
            assert not (done & ~finished_rows).any()
            rows = np.flatnonzero(done)
            if len(rows):
                np.testing.assert_array_equal(results.cams("gradcam", rows), reference.cams("gradcam", rows))
    assert subprocess.run(command, check=False).returncode == 0
    with ResultReader(out) as results, ResultReader(finished) as reference:
        assert results.attrs["complete"] and results.done.all()
        np.testing.assert_array_equal(results.outputs("linear"), reference.outputs("linear"))
        for name in ("gradcam", "eigencam", "ablationcam"):
            np.testing.assert_array_equal(results.cams(name), reference.cams(name))
    again = subprocess.run(command[:-1], capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_other_parameters_refused_unless_overwrite(workspace, finished, tmp_path):
    out = tmp_path / "other.h5"
    shutil.copy(finished, out)
    args = ["run", workspace / "lite0", "--data", workspace / "photos.h5", "--out", out,
            "--methods", "gradcam", "--limit", "2", "-q"]
    refused = cli(*args, ok=False)
    assert refused.exit_code != 0 and "--overwrite" in refused.output
    with ResultReader(out) as results:  # untouched
        assert set(results.methods) == set(METHODS.split(","))
    cli(*args, "--overwrite", "--cam-dtype", "float16", "--compression", "lzf")
    with ResultReader(out) as results, ResultReader(finished) as reference:
        assert set(results.methods) == {"gradcam"} and len(results.done) == 2
        cams = results.storage("cams/gradcam")
        assert cams.dtype == np.float16 and cams.compression == "lzf"
        # float16 keeps 11 significant bits: at most half a unit in the last place of values <= 1
        stored = results.cams("gradcam").astype(np.float32)
        assert np.abs(stored - reference.cams("gradcam", slice(None, 2))).max() <= 2 ** -12


def test_nan_pixels_flagged_and_run_goes_on(workspace, tmp_path):
    explainer = Explainer(workspace / "lite0")
    prep = explainer.manifest["preprocessing"]
    with h5py.File(workspace / "photos.h5") as h5:
        x = np.stack([preprocess(i, prep["size"], prep["mean"], prep["std"]) for i in h5["images"][:3]])
    x[1, 0, 5, 5] = np.nan
    x[2, 2, 0, 0] = np.inf
    data = tmp_path / "float.h5"
    with h5py.File(data, "w") as h5:
        h5["images"] = x
    out = tmp_path / "nan.h5"
    result = cli("run", workspace / "lite0", "--data", data, "--out", out, "--methods", "gradcam")
    assert "2 with NaN/Inf pixels" in result.output
    with ResultReader(out) as results:
        np.testing.assert_array_equal(results.invalid, [False, True, True])
        assert results.done.all()
        assert np.isnan(results.outputs("linear", 1)).all()
        assert np.isfinite(results.outputs("linear", 0)).all()
        assert results.targets(1) == -1
        expected = explainer(x[:1], methods=["gradcam"]).cams["gradcam"][0]
        assert np.abs(results.cams("gradcam", 0) - expected).max() <= CAM_TOLERANCE


@pytest.mark.parametrize("images, message", [
    (None, "no /images"),
    (np.zeros((2, 224, 224, 3), np.float32), "expected (N, H, W, 3) uint8"),
    (np.zeros((2, 3, 100, 100), np.float32), "preprocessed at (100, 100)"),
])
def test_bad_input_datasets(workspace, tmp_path, images, message):
    data = tmp_path / "bad.h5"
    with h5py.File(data, "w") as h5:
        if images is None:
            h5["pictures"] = np.zeros(3)
        else:
            h5["images"] = images
    result = cli("run", workspace / "lite0", "--data", data, "--out", tmp_path / "o.h5", ok=False)
    assert result.exit_code != 0 and message in result.output


def test_bad_targets_and_provider(workspace, tmp_path):
    base = ["run", workspace / "lite0", "--data", workspace / "photos.h5", "--out", tmp_path / "o.h5"]
    assert "out of range" in cli(*base, "--targets", "1000", ok=False).output
    assert "pred, label, a class index or concept:FILE.npy" in cli(*base, "--targets", "cat", ok=False).output
    assert "not available" in cli(*base, "--provider", "cuda", ok=False).output
    assert "rebuild with" in cli(*base, "--methods", "guidedbackprop", ok=False).output


def test_pack_unreadable_image_keeps_existing_output(workspace, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(next((workspace / "photos").glob("*.jpg")), folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "packed.h5"
    cli("pack", workspace / "photos", "--out", out, "--size", "32")  # an earlier dataset
    precious = out.read_bytes()
    result = cli("pack", folder, "--out", out, "--overwrite", ok=False)
    assert result.exit_code != 0 and "b.jpg" in result.output and "--skip-unreadable" in result.output
    assert out.read_bytes() == precious
    assert not list(tmp_path.glob(".*partial"))
    cli("pack", folder, "--out", out, "--skip-unreadable", "--overwrite")
    with h5py.File(out) as h5:
        assert h5["images"].shape[0] == 1


def test_unwritable_output_location(workspace):
    result = cli("run", workspace / "lite0", "--data", workspace / "photos.h5",
                 "--out", "/proc/camexport-test/o.h5", "--limit", "1", ok=False)
    assert result.exit_code != 0 and "choose another --out" in result.output


def test_disk_full_keeps_finished_samples(workspace, finished, tmp_path, monkeypatch):
    """ENOSPC on the third batch: a clear error, the first two batches kept, the rerun finishes."""
    from camexport import store

    real = store.replace_atomic
    calls = []

    def full(temporary, path):
        if path.name.startswith("shard-"):
            calls.append(path)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
        real(temporary, path)

    monkeypatch.setattr(store, "replace_atomic", full)
    out = tmp_path / "full.h5"
    args = ["run", workspace / "lite0", "--data", workspace / "photos.h5", "--out", out,
            "--methods", "gradcam,eigencam", "--batch-size", "2", "-q"]
    result = cli(*args, ok=False)
    assert result.exit_code != 0 and "free space" in result.output
    assert _shards(out) == 2
    monkeypatch.setattr(store, "replace_atomic", real)
    cli(*args)
    with ResultReader(out) as results, ResultReader(finished) as reference:
        np.testing.assert_array_equal(results.cams("gradcam"), reference.cams("gradcam"))


def test_metrics_match_the_library_on_the_same_session(workspace, tmp_path):
    """Stored metric scores = camexport.metrics.evaluate on the API's CAMs with the run's seed."""
    from camexport.metrics import evaluate
    from camexport.targets import ClassifierOutputSoftmaxTarget

    out = tmp_path / "metrics.h5"
    cli("run", workspace / "lite0", "--data", workspace / "photos.h5", "--out", out, "--methods",
        "gradcam,eigencam", "--metrics", "road-morf,drop-in-confidence,road-combined:30,70",
        "--limit", "2", "--seed", "5", "-q")
    explainer = Explainer(workspace / "lite0")
    prep = explainer.manifest["preprocessing"]
    with h5py.File(workspace / "photos.h5") as h5:
        x = np.stack([preprocess(i, prep["size"], prep["mean"], prep["std"]) for i in h5["images"][:2]])
    api = explainer(x, methods=["gradcam", "eigencam"])
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in api.outputs.argmax(axis=1)]
    with ResultReader(out) as results:
        assert set(results.metrics) == {"road-morf", "drop-in-confidence", "road-combined:30,70"}
        for metric in results.metrics:
            for method in ("gradcam", "eigencam"):
                expected = evaluate(metric, x, api.cams[method], targets, explainer.forward, seed=5)
                stored = results.metric(metric, method)
                assert np.abs(stored - expected).max() <= 1e-5, (metric, method)
    shown = cli("show", out).output
    assert "road-combined:30,70" in shown and "drop-in-confidence" in shown
