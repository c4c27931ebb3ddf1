"""Faults never lose finished work or leave a broken file: a full disk (a real tmpfs, and
injected ENOSPC/EIO at each kind of write) and SIGKILL at seeded points of `run` and `build`
(camexport.faults), each followed by the same command.

After every fault: the command failed with one `Error:` line (no traceback, no segfault) or was
killed, OUT.h5 opens with h5py when it exists, `show` counts what the shards hold and every
finished sample equals an uninterrupted run's. After the same command: the whole result equals
the uninterrupted run's (/cams, /targets, /outputs) and nothing is left beside it."""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_helper import cli, tiny_workspace

from camexport.artifact import MANIFEST_FILE, verify_artifact
from camexport.faults import FAULT_VARIABLE
from camexport.store import ResultReader

SAMPLES = 12
SIZE = 32
METHODS = "gradcam,eigencam"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SEED = 20



@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny CNN's artifact (and its plain ONNX graph, to build from quickly), SAMPLES random
    images packed, and the result of an uninterrupted run."""
    root = tiny_workspace(tmp_path_factory.mktemp("faults"), SIZE, SAMPLES, METHODS)
    shutil.copy(root / "art" / "model.plain.onnx", root / "tiny.onnx")
    cli(*_run_args(root, root / "reference.h5"))
    return root


def _run_args(root: Path, out: Path) -> list:
    return ["run", root / "art", "--data", root / "data.h5", "--out", out, "--methods", METHODS,
            "--batch-size", "2", "-q"]


def _command(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "camexport.cli", *map(str, _run_args(root, out))]


def _arrays(results: ResultReader, rows) -> dict[str, np.ndarray]:
    found = {f"cams/{m}": results.cams(m, rows) for m in METHODS.split(",")}
    found["targets"] = results.targets(rows)
    found.update({f"outputs/{name}": results.outputs(name, rows) for name in results.output_names})
    return found


def _check_kept(out: Path, reference: Path) -> int:
    """After a fault: OUT.h5 opens (when there is one), and what the shards hold (read through
    ResultReader, as `show` and `render` do) equals the uninterrupted run; the samples done."""
    if out.exists():
        with h5py.File(out, "r") as h5:
            for name in ("done", "targets", "cams/gradcam"):
                if name in h5:
                    h5[name][()]
    if not out.exists() and not out.with_name(out.name + ".parts").joinpath("run.json").exists():
        return 0
    with ResultReader(out) as results, ResultReader(reference) as expected:
        rows = np.flatnonzero(results.done)
        if len(rows):
            kept, wanted = _arrays(results, rows), _arrays(expected, rows)
            assert kept.keys() == wanted.keys()
            for name in kept:
                np.testing.assert_array_equal(kept[name], wanted[name], err_msg=name)
        return len(rows)


def _check_finished(out: Path, reference: Path) -> None:
    """The whole result equals the uninterrupted run's; no parts folder, temporary file or lock."""
    with h5py.File(out, "r") as h5:
        assert h5.attrs["complete"]
    with ResultReader(out) as results, ResultReader(reference) as expected:
        assert results.complete and results.done.all()
        found, wanted = _arrays(results, slice(None)), _arrays(expected, slice(None))
        for name in wanted:
            np.testing.assert_array_equal(found[name], wanted[name], err_msg=name)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def _one_error(result, pattern: str) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _show(out: Path) -> str:
    return cli("show", out).output.splitlines()[0]


# -- a full disk: a real one (tmpfs) ----------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted at tmp_path/disk (size set by the test through the returned function)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(size: int, remount: bool = False) -> Path:
        options = f"{'remount,' if remount else ''}size={size}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"tmpfs not mountable here ({done.stderr.strip()}): skipped")
            pytest.skip(f"cannot mount a tmpfs ({done.stderr.strip()})")
        mounted.append(disk)
        return disk

    yield mount
    if mounted:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("where", ["shards", "final copy"])
def test_full_tmpfs_keeps_shards_and_resumes(workspace, small_disk, where):
    reference = workspace / "reference.h5"
    whole = reference.stat().st_size
    # room for about half the shards; or for all of them but not the final copy beside them
    size = int(whole * 0.6) if where == "shards" else int(whole * 2.5)
    disk = small_disk(size)
    out = disk / "out.h5"
    failed = subprocess.run(_command(workspace, out), env=ENV, capture_output=True, text=True, check=False)
    print(f"\n[tmpfs {size} B, {where}] exit {failed.returncode}: {failed.stderr.strip()}")
    assert failed.returncode == 1, (failed.returncode, failed.stderr)  # not 139 (segfault)
    assert "Traceback" not in failed.stderr and failed.stderr.count("Error: ") == 1, failed.stderr
    message = failed.stderr.strip()
    assert re.search(r"the disk holding \S+ is full \(No space left on device\) while writing "
                     + ("samples" if where == "shards" else "the final copy")
                     + r".*The rest needs about [\d.]+ [kM]B free there.*run the same command again", message)
    parts = out.with_name("out.h5.parts")
    assert not list(parts.glob(".*")) and not list(disk.glob(".*.partial"))  # no partial file
    kept = _check_kept(out, reference)
    assert 0 < kept <= SAMPLES and (kept == SAMPLES) == (where == "final copy")
    shown = _show(out)
    assert f"{kept}/{SAMPLES} samples done (unfinished: rerun the same command to finish)" in shown
    rendered = cli("render", out, "--out", disk.parent / "pictures").output
    assert f"wrote {kept} images" in rendered
    print(f"  show: {shown}\n  render: {rendered.strip()}")
    small_disk(whole * 4, remount=True)
    again = subprocess.run(_command(workspace, out), env=ENV, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    _check_finished(out, reference)
    print(f"  rerun after more space: exit 0, {SAMPLES - kept} samples computed, equal to the reference")


# -- a full disk or an I/O error, injected at each kind of write --------------------------------
INJECTED = [
    # id, file written when the error comes (a name pattern), shards there first, errno, message
    ("shard-enospc", r"\.shard-", 2, errno.ENOSPC,
     r"is full \(No space left on device\) while writing samples 4"),
    ("shard-eio", r"\.shard-", 3, errno.EIO,
     r"cannot write samples 6\.\.7 .*Input/output error.*fix the disk"),
    ("view-enospc", r"\.out\.h5\.partial", 0, errno.ENOSPC, r"while writing the live view"),
    ("final-enospc", r"\.out\.h5\.partial", SAMPLES // 2, errno.ENOSPC,
     r"while writing the final copy .*about [\d.]+ [kM]B free there for the final copy"),
]


@pytest.mark.parametrize("pattern, shards, code, message",
                         [pytest.param(*row[1:], id=row[0]) for row in INJECTED])
def test_injected_write_error_keeps_shards_and_resumes(workspace, tmp_path, monkeypatch, pattern, shards,
                                                       code, message):
    from camexport import store

    out = tmp_path / "out.h5"
    parts = out.with_name("out.h5.parts")
    real_pwrite = os.pwrite

    def failing(fd, data, offset):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if re.search(pattern, name) and len(list(parts.glob("shard-*.h5"))) >= shards:
            raise OSError(code, os.strerror(code))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(store.os, "pwrite", failing)
    line = _one_error(cli(*_run_args(workspace, out), ok=False), message)
    monkeypatch.undo()
    assert not list(parts.glob(".*")) and not list(tmp_path.glob(".*.partial"))
    kept = _check_kept(out, workspace / "reference.h5")
    assert kept == min(shards * 2, SAMPLES)
    shown = _show(out)
    assert f"{kept}/{SAMPLES} samples done (unfinished" in shown
    print(f"\n[injected {errno.errorcode[code]} after {shards} shards] {line}\n  show: {shown}")
    cli(*_run_args(workspace, out))
    _check_finished(out, workspace / "reference.h5")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_pack_on_a_failing_disk_keeps_the_existing_dataset(workspace, tmp_path, monkeypatch, code):
    """``pack`` writes through the same guarded writer: one error line, no file left, and the
    dataset it was replacing (--overwrite) unchanged."""
    from camexport import store

    out = tmp_path / "packed.h5"
    shutil.copy(workspace / "data.h5", out)
    before = out.read_bytes()
    real_pwrite = os.pwrite
    calls = []

    def failing(fd, data, offset):
        calls.append(fd)
        if len(calls) > 3:
            raise OSError(code, os.strerror(code))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(store.os, "pwrite", failing)
    line = _one_error(cli("pack", workspace / "images", "--out", out, "--size", SIZE, "--overwrite", "-q",
                          ok=False), r"cannot write \S+packed\.h5 after \d+ images .*run the same pack again")
    monkeypatch.undo()
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["packed.h5"]
    print(f"\n[pack, {errno.errorcode[code]}] {line}")


# -- SIGKILL at seeded points of `run` ------------------------------------------------------------
#: point -> the occurrences it has in a fresh run of this workspace (measured: 6 shards of 2)
RUN_POINTS = {"shard-write": 190, "shard-rename": 6, "view-write": 8, "view-rename": 1,
              "final-write": 60, "final-rename": 1, "parts-remove": 1}


def _kill_points(seed: int, count: int = 20) -> list[tuple[str, int]]:
    """``count`` distinct (point, occurrence) pairs from random.Random(seed): every point once,
    then any pair (so mostly mid-shard and mid-final-copy writes, the most numerous)."""
    rng = random.Random(seed)
    chosen = [(point, rng.randint(1, last)) for point, last in RUN_POINTS.items()]
    pool = [(point, k) for point, last in RUN_POINTS.items() for k in range(1, last + 1)
            if (point, k) not in chosen]
    return chosen + rng.sample(pool, count - len(chosen))


def _killed(command: list[str], fault: str) -> None:
    process = subprocess.run(command, env={**ENV, FAULT_VARIABLE: fault}, capture_output=True, text=True,
                             check=False)
    assert process.returncode == -signal.SIGKILL, (fault, process.returncode, process.stderr)


@pytest.mark.parametrize("point, occurrence", _kill_points(SEED), ids=lambda v: str(v))
def test_sigkill_then_same_command(workspace, tmp_path, point, occurrence):
    out = tmp_path / "out.h5"
    command = _command(workspace, out)
    if point.startswith("view"):  # a view over shards: let a first run leave some
        _killed(command, "shard-rename:4")
    _killed(command, f"{point}:{occurrence}")
    left = sorted(p.name for p in tmp_path.iterdir())
    kept = _check_kept(out, workspace / "reference.h5")
    shown = _show(out) if out.exists() or kept else "(no OUT.h5 yet)"
    again = subprocess.run(command, env=ENV, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    _check_finished(out, workspace / "reference.h5")
    print(f"\n[kill {point}:{occurrence}] left {left}, {kept}/{SAMPLES} kept and equal; show: {shown}; "
          f"rerun exit 0, result equal, no leftovers")


# -- SIGKILL at points of `build` -----------------------------------------------------------------
#: (point, occurrence, --overwrite over an older artifact); a new target is renamed, not swapped
BUILD_KILLS = [("artifact-write", 2, False), ("artifact-swap", 1, False), ("artifact-write", 1, True),
               ("artifact-write", 3, True), ("artifact-swap", 1, True), ("artifact-swapped", 1, True)]


def _build_command(workspace: Path, target: Path, methods: str, overwrite: bool) -> list[str]:
    return [sys.executable, "-m", "camexport.cli", "build", str(workspace / "tiny.onnx"), "--layer", "relu_1",
            "--methods", methods, "--out", str(target), "-q", *(["--overwrite"] if overwrite else [])]


@pytest.mark.parametrize("point, occurrence, overwrite", BUILD_KILLS, ids=lambda v: str(v))
def test_build_sigkill_then_same_command(workspace, tmp_path, point, occurrence, overwrite):
    target = tmp_path / "art"
    if overwrite:  # an older artifact, of other methods, to be replaced
        cli("build", workspace / "tiny.onnx", "--layer", "relu_1", "--methods", "gradcam", "--out", target,
            "-q")
    command = _build_command(workspace, target, METHODS, overwrite)
    _killed(command, f"{point}:{occurrence}")
    if target.exists():  # the old artifact or the new one, whole: never a mix
        methods = verify_artifact(target)[1]["methods"]
        assert methods in (["gradcam"], METHODS.split(",")), methods
        state = f"artifact verifies ({','.join(methods)})"
    else:
        assert not overwrite
        state = "no artifact yet"
    again = subprocess.run(command, env=ENV, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    assert verify_artifact(target)[1]["methods"] == METHODS.split(",")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no scratch, old copy or lock
    assert (target / MANIFEST_FILE).is_file()
    print(f"\n[build {'--overwrite ' if overwrite else ''}kill {point}:{occurrence}] {state}; rerun exit 0, "
          f"new artifact verifies, no leftovers")
