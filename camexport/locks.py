"""One writer at a time: the exclusive lock that ``build`` (an artifact directory) and ``run``,
``pack``, ``recompute`` (a result or dataset file) take before they touch their output.

The lock is ``flock`` on a lock file beside the output, holding its owner's pid, host, command and
start time as JSON. The kernel releases a flock when its holder dies, so the lock of a killed
process is taken over by the next one (a log line names the old owner); while the holder lives,
a second writer is refused at once (or waits, with ``wait=True``), and the refusal names the
holder. The holder removes the lock file when it ends in any way but a kill; after locking, a
process checks that the file it locked is still the one at the path (else the previous holder
removed it, and it locks the new one), so removing the file never lets two writers in.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

try:
    import fcntl
except ImportError:  # not POSIX: no lock (one writer is then the user's to ensure)
    fcntl = None

log = logging.getLogger(__name__)

#: How long a refused writer waits for the holder to write its record into a just-created lock file.
HOLDER_WAIT = 1.0


def describe_holder(text: str) -> str:
    """A lock file's record as words: "pid 123 on host, camexport run since ..."."""
    try:
        owner = json.loads(text)
        return (f"pid {owner['pid']} on {owner['host']}, {owner.get('command', 'camexport')} "
                f"since {owner['since']}")
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its pid yet"


class FileLock:
    """``with FileLock(lock_file, "run", busy):`` hold the exclusive lock; ``busy(holder)`` makes
    the error raised when another live process holds it (``holder`` describes that process);
    with ``wait`` the lock is waited for instead."""

    def __init__(self, file: Path, command: str, busy: Callable[[str], Exception], wait: bool = False):
        self.file = Path(file)
        self.command = command
        self.busy = busy
        self.wait = wait
        self.fd: int | None = None

    def __enter__(self) -> Self:
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = self._wait_for_holder(fd)
                os.close(fd)
                raise self.busy(holder) from None
            if self._still_at_path(fd):
                break
            os.close(fd)  # the previous holder removed that file as it finished: lock the new one
        self.fd = fd
        previous = os.pread(fd, 4096, 0).decode(errors="replace")
        if previous.strip():
            log.warning("taking over the lock %s, whose holder ended without releasing it (killed?): %s",
                        self.file, describe_holder(previous))
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": f"camexport {self.command}",
                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode() + b"\n", 0)
        return self

    def _still_at_path(self, fd: int) -> bool:
        try:
            here = os.stat(self.file)
        except FileNotFoundError:
            return False
        locked = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (locked.st_dev, locked.st_ino)

    def _wait_for_holder(self, fd: int) -> str:
        """The holder's description, waiting a moment for a holder that has just locked."""
        deadline = time.monotonic() + HOLDER_WAIT
        while True:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            if text.strip() or time.monotonic() > deadline:
                return describe_holder(text)
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            if self._still_at_path(fd):
                os.unlink(self.file)
        finally:
            os.close(fd)
