"""What the benchmark scripts share: seeded random-weight models built into artifacts, the machine
record, one timing loop, and peak-RSS readings (per phase in this process, per child process).

Imported by the scripts beside it (``python scripts/bench.py`` puts ``scripts/`` on sys.path).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    found = {}
    for package in ("camexport", "torch", "torchvision", "timm", "onnxruntime", "onnxruntime-gpu",
                    "grad-cam", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": cores(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions()}


def save_random(arch: str, folder: str | Path, seed: int = 0):
    """An untrained torchvision/timm ``arch`` (no download), initialised after manual_seed(seed),
    saved as the state_dict ``folder/<arch>.pt``: (module, path)."""
    import torch

    from camexport.load import build_architecture

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    module, _ = build_architecture(arch)
    path = folder / f"{arch}.pt"
    torch.save(module.state_dict(), path)
    return module.eval(), path


def build_random(arch: str, layer: str, folder: str | Path, size: int, methods, seed: int = 0):
    """:func:`save_random` built for ``layer`` at size x size into ``folder/<arch>-<size>``:
    (module, BuildResult)."""
    from camexport.build import build

    module, path = save_random(arch, folder, seed)
    built = build(str(path), [layer], arch=arch, methods=methods,
                  out_dir=Path(folder) / f"{arch}-{size}", input_size=(size, size), overwrite=True)
    return module, built


def measure(call, repeats: int, cold_limit_s: float | None = None, budget_s: float | None = None):
    """Wall time of ``call()``: one warm-up run, then ``repeats`` timed runs, median.

    A warm-up longer than ``cold_limit_s`` is itself the only measurement (``runs`` 1,
    ``cold`` True): that is how minutes-long calls are timed. ``budget_s`` stops the timed runs
    early once they have taken that long (at least one run). Returns (record, last result)."""
    start = time.perf_counter()
    result = call()
    first = time.perf_counter() - start
    if cold_limit_s is not None and first > cold_limit_s:
        return {"median_s": first, "runs": 1, "cold": True, "times_s": [first]}, result
    times: list[float] = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
        if budget_s is not None and sum(times) > budget_s:
            break
    return {"median_s": statistics.median(times), "runs": len(times), "cold": False,
            "warmup_s": first, "times_s": times}, result


# -- memory ----------------------------------------------------------------------------------
def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """This process's resident set size now (Linux /proc), MB."""
    return _status_mb("VmRSS")


_earlier_peak = 0.0  # the highest VmHWM seen before a reset


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0,
    /proc/self/clear_refs = 5), so that :func:`peak_rss_mb` measures one phase;
    :func:`process_peak_rss_mb` still gives the peak over the whole process."""
    global _earlier_peak
    _earlier_peak = max(_earlier_peak, peak_rss_mb() or 0.0)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """This process's peak RSS (VmHWM) since start or the last :func:`reset_peak_rss`, MB."""
    return _status_mb("VmHWM")


def process_peak_rss_mb() -> float | None:
    """This process's peak RSS over its whole life (resets included), MB.

    Read inside the process on purpose: a child's ru_maxrss from wait4 is not its own peak,
    since exec folds the high-water mark of the parent's memory image (copied or shared by
    fork/vfork) into it, so a child of a parent holding 1.5 GB reports at least 1.5 GB."""
    now = peak_rss_mb()
    return None if now is None else max(_earlier_peak, now)


def run_child(command: list[str], env: dict | None = None) -> float:
    """Run ``command`` (stdout and stderr pass through) and return its wall seconds; a failure
    is fatal."""
    begin = time.perf_counter()
    code = subprocess.run(command, check=False, env=env).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {code})")
    return time.perf_counter() - begin
