import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

#: Set CAMEXPORT_TEST_MEMLOG=FILE to append each test's peak and final resident memory (MB) to
#: FILE: the suite runs two workers on a 24 GB machine, so a test's peak is a budget to keep.
MEMLOG = os.environ.get("CAMEXPORT_TEST_MEMLOG")


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) // 1024
    return 0


if MEMLOG:
    def pytest_runtest_setup(item):
        with open("/proc/self/clear_refs", "w") as refs:  # resets VmHWM, the peak
            refs.write("5")

    def pytest_runtest_teardown(item, nextitem):
        with open(MEMLOG, "a") as log:
            log.write(f"{_status('VmHWM'):6d} {_status('VmRSS'):6d} {item.nodeid}\n")


@pytest.fixture(scope="module")
def compat_cache(tmp_path_factory):
    """One camexport.compat cache per test module (each model is exported once in the module)."""
    from camexport.compat import engine

    root = tmp_path_factory.mktemp("compat-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv(engine.CACHE_ENV, str(root))
    yield root
    patch.undo()
    # the module's explainers (their sessions hold the weights and memory arenas) go with it:
    # a test worker runs many modules
    for explainer in engine._LIVE.values():
        explainer.release()
    engine._LIVE.clear()
    give_back_memory()


def give_back_memory() -> None:
    """Collect garbage and hand the freed heap back to the system (glibc keeps it otherwise): a
    test worker runs module after module, and Faster R-CNN's explainers leave GBs freed."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small torch calls on two threads crawl when another process shares the two cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
