"""Deterministic kill points for the fault-injection tests: one hook, a no-op unless asked for.

``CAMEXPORT_FAULT="shard-write:3"`` makes the process kill itself (SIGKILL: no cleanup, as a
power cut or the OOM killer) the 3rd time it reaches the point named ``shard-write``. The points:

    shard-write, view-write, final-write   each write into the temporary file of a shard, of
                                           the live view OUT.h5, of the final self-contained
                                           OUT.h5 (camexport.store): mid-file
    shard-rename, view-rename, final-rename   that file written, not yet synced and renamed
    parts-remove                           the final file in place, the parts folder not removed
    artifact-write                         each file written into a build's temporary directory
    artifact-swap                          the temporary directory complete, not yet swapped in
    artifact-swapped                       swapped in, the replaced artifact not yet removed

``tests/reliability/test_faults.py`` kills at these points and checks that the same command
then finishes with the results of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal

#: The environment variable naming the point and occurrence to kill at ("name:k").
FAULT_VARIABLE = "CAMEXPORT_FAULT"
_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process at the k-th time it reaches ``name`` when CAMEXPORT_FAULT="name:k"."""
    wanted = os.environ.get(FAULT_VARIABLE)
    if not wanted:
        return
    point, _, occurrence = wanted.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(occurrence or 1):
        os.kill(os.getpid(), signal.SIGKILL)
