import os
import sys
from pathlib import Path

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
