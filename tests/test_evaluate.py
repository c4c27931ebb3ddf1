"""``camexport evaluate``: metrics added to a finished result equal `camexport run --metrics`'s,
resumable after SIGKILL at any of its writes with the original datasets intact, and its refusals.

A tiny CNN (tests/cli_helper.py) at 32 × 32 on 7 random images, batches of 3 (a short last one).
Model metrics are compared bit for bit: evaluate re-runs the run's own code (Job.stored_metrics)
with the run's batches and seeds on the same float32 CAMs. Annotations are written into the input
dataset with h5py (/boxes, /box_count, /box_labels, the layout `camexport pack --annotations`
writes), so these tests do not depend on the packing side.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_helper import cli, tiny_workspace

from camexport.localisation import Annotations
from camexport.localisation import evaluate as localise
from camexport.store import ResultReader

pytestmark = pytest.mark.xdist_group("evaluate")

METHODS = "gradcam,eigencam"
MODEL_METRICS = "drop-in-confidence,coherency,coherency:gradcam,arcc::30,60"
SIZE, SAMPLES, BATCH = 32, 7, 3


def _run(root: Path, out: Path, data: Path, metrics: str = "") -> Path:
    extra = ["--metrics", metrics] if metrics else []
    cli("run", root / "art", "--data", data, "--out", out, "--methods", METHODS, "--batch-size", BATCH,
        "--seed", 3, *extra, "-q")
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The tiny artifact, its data (a copy without annotations: plain.h5), a run with the model
    metrics (reference.h5) and one without (base.h5), then boxes added to data.h5: for each
    sample a box of its explained class, but for samples 1 and 4 (NaN expected there)."""
    root = tiny_workspace(tmp_path_factory.mktemp("evaluate"), SIZE, SAMPLES, METHODS)
    shutil.copy(root / "data.h5", root / "plain.h5")
    _run(root, root / "reference.h5", root / "data.h5", MODEL_METRICS)
    _run(root, root / "base.h5", root / "data.h5")
    with ResultReader(root / "base.h5") as results:
        targets = results.targets()
    boxes = np.full((SAMPLES, 2, 4), np.nan, np.float32)
    labels = np.full((SAMPLES, 2), -1, np.int64)
    counts = np.zeros(SAMPLES, np.int32)
    for i, target in enumerate(targets):
        boxes[i, 0] = [2 + i, 3, 20 + i, 25]
        labels[i, 0] = target if i not in (1, 4) else (target + 1) % 10
        counts[i] = 1
        if i == 2:  # a second box of another class
            boxes[i, 1], labels[i, 1], counts[i] = [0, 0, 8, 8], (target + 3) % 10, 2
    with h5py.File(root / "data.h5", "a") as h5:
        h5["boxes"], h5["box_labels"], h5["box_count"] = boxes, labels, counts
    return root


def _copy(workspace: Path, tmp_path: Path) -> Path:
    out = tmp_path / "result.h5"
    shutil.copy(workspace / "base.h5", out)
    return out


def _snapshot(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a result file, by name."""
    found = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, item: found.__setitem__(name, item[()])
                      if isinstance(item, h5py.Dataset) else None)
    return found


def _same(a: dict, b: dict, names) -> None:
    for name in names:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _expected_localisation(workspace: Path, name: str, method: str) -> np.ndarray:
    with ResultReader(workspace / "base.h5") as results, h5py.File(workspace / "data.h5") as h5:
        annotations = Annotations(np.nan_to_num(h5["boxes"][()]), h5["box_labels"][()], h5["box_count"][()])
        return localise(name, results.cams(method), annotations, results.targets()).astype(np.float32)


def test_evaluate_equals_run_metrics_and_localisation(workspace, tmp_path):
    out = _copy(workspace, tmp_path)
    before = _snapshot(out)
    shown = cli("evaluate", out, "--metrics", f"{MODEL_METRICS},pointing-game,relevance-mass-accuracy,gini",
                "-q").output
    assert "added drop-in-confidence, coherency, coherency:gradcam, arcc::30,60, pointing-game" in shown
    after = _snapshot(out)
    _same(before, after, before)  # /cams, /outputs, /targets ... untouched
    reference = _snapshot(workspace / "reference.h5")
    model = [n for n in reference if n.startswith("metrics/")]
    assert len(model) == 8
    _same(reference, after, model)  # bit-identical to the run's own scores
    for name in ("pointing-game", "relevance-mass-accuracy", "gini"):
        for method in METHODS.split(","):
            got = after[f"metrics/{name}/{method}"]
            np.testing.assert_array_equal(got, _expected_localisation(workspace, name, method))
            assert np.isnan(got[[1, 4]]).all() != (name == "gini")  # no box of the target class
    with ResultReader(out) as results:
        assert results.complete
        assert results.attrs["evaluated"] == [*MODEL_METRICS.split(",")[:3], "arcc::30,60", "pointing-game",
                                              "relevance-mass-accuracy", "gini"]
        assert results.attrs["metrics"] == results.attrs["evaluated"]
    assert not out.with_name(out.name + ".evaluate").exists()


def _evaluate_command(out: Path, metrics: str) -> list[str]:
    return [sys.executable, "-m", "camexport.cli", "evaluate", str(out), "--metrics", metrics, "-q"]


def _killed_at(point: str, command: list[str]) -> None:
    process = subprocess.run(command, env={**os.environ, "CAMEXPORT_FAULT": point}, capture_output=True,
                             text=True, check=False, timeout=120)
    assert process.returncode == -signal.SIGKILL, process.stderr


def test_sigkill_then_rerun_completes_with_the_same_numbers(workspace, tmp_path):
    """Killed with its 3rd shard written but not renamed, then again in the final merge (the copy written, not
    renamed): each time OUT.h5 is the original, the finished shards are kept and not redone;
    the third command finishes with the numbers of an uninterrupted evaluate."""
    out = _copy(workspace, tmp_path)
    original = _snapshot(out)
    shards = out.with_name(out.name + ".evaluate")
    command = _evaluate_command(out, "drop-in-confidence,coherency:gradcam,pointing-game")
    _killed_at("evaluate-shard-rename:3", command)  # the 3rd written, not renamed
    assert _snapshot(out).keys() == original.keys()
    _same(original, _snapshot(out), original)
    finished = sorted(shards.glob("*/rows-*.h5"))
    assert len(finished) == 2
    stamps = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in finished}
    _killed_at("evaluate-merge:1", command)
    _same(original, _snapshot(out), original)
    assert _snapshot(out).keys() == original.keys()  # nothing merged
    assert len(list(shards.glob("*/rows-*.h5"))) == 3 * 3  # 3 metrics x 3 batches
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == stamp for p, stamp in stamps.items())  # not redone
    assert subprocess.run(command, check=False, timeout=120).returncode == 0
    after = _snapshot(out)
    _same(original, after, original)
    reference = _snapshot(workspace / "reference.h5")
    _same(reference, after, [n for n in reference if n.startswith(("metrics/drop", "metrics/coherency:"))])
    for method in METHODS.split(","):
        np.testing.assert_array_equal(after[f"metrics/pointing-game/{method}"],
                                      _expected_localisation(workspace, "pointing-game", method))
    assert not shards.exists()
    again = subprocess.run(command[:-1], capture_output=True, text=True, check=False, timeout=120)
    assert again.returncode == 0 and "pointing-game is in" in again.stderr and "skipped" in again.stderr


def test_present_metrics_are_skipped_unless_overwritten(workspace, tmp_path):
    out = _copy(workspace, tmp_path)
    cli("evaluate", out, "--metrics", "drop-in-confidence", "-q")
    first = _snapshot(out)
    result = cli("evaluate", out, "--metrics", "drop-in-confidence,complexity", "-q")
    assert "drop-in-confidence is in" in result.output and "added complexity" in result.output
    cli("evaluate", out, "--metrics", "drop-in-confidence", "--overwrite-metrics", "-q")
    _same(first, _snapshot(out), [n for n in first if n.startswith("metrics/")])
    with ResultReader(out) as results:
        assert results.attrs["metrics"] == ["drop-in-confidence", "complexity"]


def test_refusals(workspace, tmp_path):
    out = _copy(workspace, tmp_path)
    original = _snapshot(out)

    def refused(*args) -> str:
        result = cli("evaluate", out, *args, ok=False)
        assert result.exit_code == 1, result.output
        return result.output

    assert "unknown metric 'nope'" in refused("--metrics", "nope")
    assert "localisation metrics" in refused("--metrics", "nope")
    assert "coherency[:METHOD]" in refused("--metrics", "coherency:gradcam:20")
    assert "has no /boxes: pack it with --annotations FILE" in refused(
        "--metrics", "pointing-game", "--data", workspace / "plain.h5")
    assert "holds no model.cam.onnx" in refused("--metrics", "drop-in-confidence", "--artifact", tmp_path)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5["images"] = np.zeros((SAMPLES, SIZE, SIZE, 3), np.uint8)
    assert "not the input dataset" in refused("--metrics", "drop-in-confidence", "--data", other)
    with h5py.File(out, "a") as h5:  # the artifact moved since the run
        h5.attrs["artifact"] = str(tmp_path / "gone" / "model.cam.onnx")
    assert "is gone (moved or deleted): pass --artifact DIR" in refused("--metrics", "drop-in-confidence")
    cli("evaluate", out, "--metrics", "drop-in-confidence", "--artifact", workspace / "art", "-q")
    with h5py.File(out, "a") as h5:
        h5.attrs["data"] = str(tmp_path / "moved.h5")
    assert "pass --data IN.h5" in refused("--metrics", "road-morf")
    assert not out.with_name(out.name + ".evaluate").exists()  # refusals leave no shards folder
    _same(original, _snapshot(out), original)


def test_unfinished_result_is_refused(workspace, tmp_path):
    out = tmp_path / "unfinished.h5"
    command = [sys.executable, "-m", "camexport.cli", "run", str(workspace / "art"), "--data",
               str(workspace / "data.h5"), "--out", str(out), "--methods", "gradcam", "--batch-size", "2",
               "-q"]
    _killed_at("shard-rename:2", command)
    result = cli("evaluate", out, "--metrics", "gini", ok=False)
    assert result.exit_code == 1 and "is not finished; run the same `camexport run` command" in result.output
    assert json.loads((out.with_name(out.name + ".parts") / "run.json").read_text())["count"] == SAMPLES
