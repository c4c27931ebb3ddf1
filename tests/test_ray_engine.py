"""`camexport run --engine ray`: a pool of Ray actors gives the local engine's result, bit for bit,
also when one of its workers is killed mid-run or the driver is killed and run again.

One local Ray (2 CPUs) for the module, started by a fixture and shut down after it; the
drivers run as subprocesses that join it with --address (in-process runs would share this
process's Ray). A tiny CNN at 32 x 32 over random images: GradCAM, EigenCAM, ScoreCAM and a
metric."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_helper import cli, tiny_workspace

ray = pytest.importorskip("ray", reason="Ray is a test extra (camexport[ray]); it is not installed")

pytestmark = pytest.mark.xdist_group("ray")  # one local Ray per test session, on one worker

SAMPLES = 48
SIZE = 32
METHODS = "gradcam,eigencam,scorecam"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
#: the datasets a Ray result must share with the local one, bit for bit
COMPARED = ("cams/gradcam", "cams/eigencam", "cams/scorecam", "outputs", "targets", "invalid",
            "metrics/drop-in-confidence/gradcam", "metrics/drop-in-confidence/scorecam")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray for the module's drivers to join; nothing of it left after the module."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    address = ray.get_runtime_context().gcs_address
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path()).name
    assert _processes(session.encode()), "the Ray daemons are not found by their session"
    yield address
    ray.shutdown()
    _wait(lambda: not _processes(session.encode()) and not _worker_pids(), "Ray's processes to end", 30)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny CNN's artifact, random images packed, and the local engine's result."""
    root = tiny_workspace(tmp_path_factory.mktemp("ray"), SIZE, SAMPLES, METHODS, width_extra=0)
    cli(*_run_args(root, root / "local.h5"))
    return root


def _run_args(root: Path, out: Path, *extra) -> list:
    return ["run", root / "art", "--data", root / "data.h5", "--out", out, "--methods", METHODS,
            "--metrics", "drop-in-confidence", "--batch-size", "2", *extra]


def _ray_command(root: Path, out: Path, address: str, *extra, workers: str = "2") -> list[str]:
    args = _run_args(root, out, "--engine", "ray", "--address", address, "--workers", workers, *extra)
    return [sys.executable, "-m", "camexport.cli", *map(str, args)]


def _same_as_local(out: Path, root: Path) -> None:
    with h5py.File(out, "r") as result, h5py.File(root / "local.h5", "r") as local:
        assert result.attrs["complete"] and result["done"][()].all()
        for name in COMPARED:
            if name == "outputs":
                name = f"outputs/{next(iter(local['outputs']))}"
            assert result[name].dtype == local[name].dtype
            np.testing.assert_array_equal(result[name][()], local[name][()], err_msg=name)  # bit for bit
        assert sorted(result) == sorted(local)
        assert '"engine": "ray"' in result.attrs["run_engine"]
    assert not out.with_name(out.name + ".parts").exists()


def test_two_workers_give_the_local_result(cluster, workspace):
    out = workspace / "ray.h5"
    done = subprocess.run(_ray_command(workspace, out, cluster), env=ENV, capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: {SAMPLES} samples" in done.stdout
    _same_as_local(out, workspace)


def _shards(out: Path) -> int:
    return len(list(out.with_name(out.name + ".parts").glob("shard-*.h5")))


def _processes(mark: bytes, files=("cmdline", "environ")) -> list[int]:
    """Processes (other than this one) whose command line or environment holds ``mark``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(mark in (entry / name).read_bytes() for name in files):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def _worker_pids() -> list[int]:
    """The pool's actor processes (Ray titles them after the actor's class)."""
    return _processes(b"ShardWorker", files=("cmdline",))


def _wait(condition, what: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_killed_worker_is_replaced_and_nothing_is_done_twice(cluster, workspace):
    out = workspace / "worker-killed.h5"
    process = subprocess.Popen(_ray_command(workspace, out, cluster, "--batch-size", "1"), env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: _shards(out) >= 4, "the first shards")
    pids = _worker_pids()
    assert pids, "no ShardWorker actor alive"
    os.kill(pids[0], signal.SIGKILL)
    seen = set(pids)
    while process.poll() is None:  # the pool restarts the killed actor in a new process
        seen.update(_worker_pids())
        time.sleep(0.05)
    assert seen - set(pids), "no actor process replaced the killed one"
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert f"wrote {out}: {SAMPLES} samples" in stdout  # each range reported once
    _same_as_local(out, workspace)


def test_a_killed_driver_resumes_from_the_shards(cluster, workspace):
    out = workspace / "driver-killed.h5"
    command = _ray_command(workspace, out, cluster, "--batch-size", "1", workers="1:2")  # a pool that grows
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: _shards(out) >= 6, "the first shards")
    process.send_signal(signal.SIGKILL)
    process.wait()
    _wait(lambda: not _worker_pids(), "the killed driver's actors to go", timeout=60)
    kept = _shards(out)
    assert 6 <= kept < SAMPLES
    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, check=False, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over the lock" in rerun.stderr
    assert f"wrote {out}: {SAMPLES - kept} samples" in rerun.stdout  # resumed, not restarted
    _same_as_local(out, workspace)


def test_without_ray_the_error_names_the_extra(workspace, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = cli(*_run_args(workspace, workspace / "no-ray.h5", "--engine", "ray"), ok=False)
    assert result.exit_code == 1
    assert "pip install camexport[ray]" in result.output and "--engine local" in result.output
    assert not (workspace / "no-ray.h5").exists()


def test_ray_options_without_the_ray_engine_are_refused(workspace):
    result = cli(*_run_args(workspace, workspace / "local-workers.h5", "--workers", "4"), ok=False)
    assert result.exit_code == 2 and "--workers only apply to --engine ray" in result.output


@pytest.mark.parametrize("workers", ["0", "3:2", "two", "-1"])
def test_a_malformed_worker_count_is_refused_before_ray_starts(workspace, workers):
    result = cli(*_run_args(workspace, workspace / "bad-workers.h5", "--engine", "ray", "--workers", workers),
                 ok=False)
    assert result.exit_code == 1
    assert "--workers must be a count of actors (2) or a range MIN:MAX" in result.output
    assert not (workspace / "bad-workers.h5").exists()
