"""No output destroys an input or finished work, and one writer per result: outputs that are
inputs (also through links), `pack` and `--overwrite` over files camexport did not write, two or
three runs on one --out, a run killed (SIGKILL) or terminated (SIGTERM) and resumed.

A tiny CNN at 32 x 32 (built once for the module) over random images: the runs take a few
seconds, long enough that concurrent runs overlap."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_helper import cli, tiny_workspace

from camexport.cli import INTERRUPTED
from camexport.store import ResultReader

#: Enough samples (one per batch) that a run lasts a few seconds: concurrent runs overlap.
SAMPLES = 240
SIZE = 32
METHODS = "gradcam,eigencam"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}



@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny CNN's artifact, SAMPLES random images, their packed dataset and a finished result."""
    root = tiny_workspace(tmp_path_factory.mktemp("reliability"), SIZE, SAMPLES, METHODS)
    cli(*_run_args(root, root / "data.h5", root / "reference.h5"))
    return root


def _run_args(root: Path, data: Path, out: Path) -> list:
    return ["run", root / "art", "--data", data, "--out", out, "--methods", METHODS,
            "--batch-size", "1", "-q"]


def _command(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "camexport.cli", *map(str, _run_args(root, root / "data.h5", out)), *extra]


def _snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders (directories and links listed as such)."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_symlink():
                found[str(path)] = "link to " + os.readlink(path)
            elif path.is_dir():
                found[str(path)] = "directory"
            else:
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _same_cams(out: Path, reference: Path) -> None:
    with ResultReader(out) as results, ResultReader(reference) as expected:
        assert results.complete and results.done.all()
        for method in METHODS.split(","):
            np.testing.assert_array_equal(results.cams(method), expected.cams(method))
        np.testing.assert_array_equal(results.targets(), expected.targets())


# -- outputs that are inputs, or files camexport does not replace --------------------------------
def _make_out(kind: str, root: Path, case: Path) -> Path:
    """The --out of a case, made as ``kind`` says (in the case's folder, or the workspace's)."""
    data, out = case / "data.h5", case / "out.h5"
    if kind == "data":
        return data
    if kind == "symlink":
        out.symlink_to(data)
    elif kind == "hardlink":
        os.link(data, out)
    elif kind == "result":
        shutil.copy(root / "reference.h5", out)
    elif kind == "packed":
        shutil.copy(data, out)
    elif kind == "foreign-hdf5":
        with h5py.File(out, "w") as h5:
            h5["images"] = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    elif kind == "text":
        out.write_text("precious notes\n")
    elif kind == "directory":
        out.mkdir()
        (out / "inside.txt").write_text("kept\n")
    elif kind == "artifact":
        return root / "art" / "model.cam.onnx"
    elif kind == "image":
        return root / "images" / "img000.png"
    elif kind == "index-link":
        out = case / "pictures"
        out.mkdir()
        os.link(case / "result.h5", out / "index.html")
    return out


RUN = ["run", "{art}", "--data", "{data}", "--out", "{out}", "--methods", METHODS, "-q"]
PACK = ["pack", "{images}", "--out", "{out}", "--size", str(SIZE), "-q"]
CASES = [
    # id, command, what --out is, the message: the problem and the fix
    ("run-out-is-data", RUN, "data",
     (r"--out \S+data\.h5 is the --data input dataset \S+data\.h5 \(the same file\); writing it would "
      r"destroy the input: choose another --out")),
    ("run-out-symlink-to-data", RUN, "symlink",
     (r"--out \S+out\.h5 is the --data input dataset \S+data\.h5 \(the same file, through a link\).*"
      r"choose another --out")),
    ("run-out-hardlink-to-data", RUN, "hardlink",
     (r"--out \S+out\.h5 is the --data input dataset \S+data\.h5 \(the same file, through a link\).*"
      r"choose another --out")),
    ("run-out-is-artifact-file", RUN, "artifact",
     r"--out \S+model\.cam\.onnx is the artifact file .*choose another --out"),
    ("run-over-packed-dataset", RUN, "packed",
     (r"--out \S+out\.h5 exists and is an input dataset made by camexport pack; camexport run only "
      r"replaces a camexport result .*choose another --out")),
    ("run-overwrite-over-packed-dataset", [*RUN, "--overwrite"], "packed",
     (r"is an input dataset made by camexport pack; camexport run only replaces a camexport result "
      r"\(not even --overwrite.*choose another --out")),
    ("run-overwrite-over-foreign-hdf5", [*RUN, "--overwrite"], "foreign-hdf5",
     (r"exists and is an HDF5 file camexport did not write .*; camexport run only replaces a camexport "
      r"result .*choose another --out")),
    ("run-overwrite-over-text", [*RUN, "--overwrite"], "text",
     r"exists and is a file that is not HDF5; .*choose another --out"),
    ("run-overwrite-over-directory", [*RUN, "--overwrite"], "directory",
     r"exists and is a directory; .*choose another --out"),
    ("pack-over-result", PACK, "result",
     (r"--out \S+out\.h5 exists and is a camexport result; camexport pack only replaces an input "
      r"dataset made by camexport pack .*choose another --out")),
    ("pack-overwrite-over-result", [*PACK, "--overwrite"], "result",
     r"exists and is a camexport result; camexport pack only replaces .*choose another --out"),
    ("pack-over-dataset", PACK, "packed",
     (r"--out \S+out\.h5 exists \(an input dataset made by camexport pack\); pass --overwrite to "
      r"replace it, or choose another --out")),
    ("pack-overwrite-over-foreign-hdf5", [*PACK, "--overwrite"], "foreign-hdf5",
     (r"exists and is an HDF5 file camexport did not write .*; camexport pack only replaces an input "
      r"dataset made by camexport pack .*choose another --out")),
    ("pack-overwrite-over-text", [*PACK, "--overwrite"], "text",
     r"exists and is a file that is not HDF5; .*choose another --out"),
    ("pack-overwrite-over-directory", [*PACK, "--overwrite"], "directory",
     r"exists and is a directory; .*choose another --out"),
    ("pack-out-is-an-image", [*PACK, "--overwrite"], "image",
     r"--out \S+img000\.png is the input image \S+img000\.png .*choose another --out"),
    ("render-index-is-the-result", ["render", "{result}", "--out", "{out}"], "index-link",
     (r"--out \S+index\.html is the result file \S+result\.h5 \(the same file, through a link\).*"
      r"choose another --out")),
]


@pytest.mark.parametrize("command, kind, message", [pytest.param(*row[1:], id=row[0]) for row in CASES])
def test_refused_and_nothing_changed(workspace, tmp_path, command, kind, message):
    shutil.copy(workspace / "data.h5", tmp_path / "data.h5")
    shutil.copy(workspace / "reference.h5", tmp_path / "result.h5")
    out = _make_out(kind, workspace, tmp_path)
    names = {"art": workspace / "art", "data": tmp_path / "data.h5", "out": out,
             "images": workspace / "images", "result": tmp_path / "result.h5"}
    before = _snapshot(workspace, tmp_path)
    result = cli(*[arg.format(**names) for arg in command], ok=False)
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())  # click wraps nothing, but paths may be long
    assert re.search(message, line), line
    assert _snapshot(workspace, tmp_path) == before


def test_pack_overwrite_replaces_its_own_dataset(workspace, tmp_path):
    """--overwrite does replace a dataset made by pack (the marker attribute says so)."""
    out = tmp_path / "again.h5"
    cli("pack", workspace / "images", "--out", out, "--size", 16, "-q")
    cli("pack", workspace / "images", "--out", out, "--size", SIZE, "--overwrite", "-q")
    with h5py.File(out) as h5, h5py.File(workspace / "data.h5") as reference:
        np.testing.assert_array_equal(h5["images"][()], reference["images"][()])
        assert h5.attrs["camexport_kind"] == "input dataset"
    assert not (tmp_path / "again.h5.lock").exists()


# -- one writer per result -----------------------------------------------------------------------
def _holder_pattern(pid: int) -> str:
    return (rf"is being written by another camexport process \(pid {pid} on {re.escape(socket.gethostname())}"
            rf".*\): wait for it to finish, or choose another --out")


@pytest.mark.parametrize("count", [2, 3])
def test_concurrent_runs_one_proceeds(workspace, tmp_path, count):
    out = tmp_path / "shared.h5"
    command = _command(workspace, out)
    processes = [subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(count)]
    finished = [(p.pid, p.wait(timeout=120), *p.communicate()) for p in processes]
    winners = [f for f in finished if f[1] == 0]
    assert len(winners) == 1, finished
    winner = winners[0][0]
    for pid, code, _, err in finished:
        if pid != winner:
            assert code == 1 and re.search(_holder_pattern(winner), err), err
    _same_cams(out, workspace / "reference.h5")
    assert not out.with_name("shared.h5.lock").exists()
    assert not out.with_name("shared.h5.parts").exists()


def _shards(out: Path) -> int:
    return len(list(out.with_name(out.name + ".parts").glob("shard-*.h5")))


def _started(command: list[str], out: Path, shards: int = 2) -> subprocess.Popen:
    """A run, once it has written ``shards`` shards."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while _shards(out) < shards and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, process.communicate()
    return process


def test_overwrite_during_a_run_is_refused(workspace, tmp_path):
    out = tmp_path / "busy.h5"
    first = _started(_command(workspace, out), out)
    refused = cli("run", workspace / "art", "--data", workspace / "data.h5", "--out", out,
                  "--methods", "gradcam", "--overwrite", "-q", ok=False)
    assert refused.exit_code == 1 and re.search(_holder_pattern(first.pid), refused.output), refused.output
    assert first.wait(timeout=120) == 0, first.communicate()
    _same_cams(out, workspace / "reference.h5")


def test_sigkill_then_rerun_takes_the_lock_over(workspace, tmp_path):
    out = tmp_path / "killed.h5"
    command = [c for c in _command(workspace, out) if c != "-q"]
    process = _started(command, out)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    lock = out.with_name("killed.h5.lock")
    assert json.loads(lock.read_text())["pid"] == process.pid  # left behind by the kill
    kept = _shards(out)
    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert re.search(rf"taking over the lock .*killed\.h5\.lock.* pid {process.pid} on ", rerun.stderr)
    assert f"wrote {out}: {SAMPLES - kept} samples" in rerun.stdout  # resumed, not restarted
    _same_cams(out, workspace / "reference.h5")
    assert not lock.exists()


def test_sigterm_says_so_and_resumes(workspace, tmp_path):
    out = tmp_path / "terminated.h5"
    command = [c for c in _command(workspace, out) if c != "-q"]
    process = _started(command, out)
    process.send_signal(signal.SIGTERM)
    _stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    assert f"Error: {INTERRUPTED}" in stderr
    assert not out.with_name("terminated.h5.lock").exists()  # released on the way out
    kept = _shards(out)
    assert kept >= 2
    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over" not in rerun.stderr
    assert f"wrote {out}: {SAMPLES - kept} samples" in rerun.stdout  # resumed where it stopped
    _same_cams(out, workspace / "reference.h5")
