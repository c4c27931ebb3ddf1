"""Ctrl-C and SIGTERM held back while HDF5 calls into Python.

h5py writes camexport's files through a Python file object (``camexport.store._GuardedFile``):
HDF5's C code calls its ``write``/``seek``. A KeyboardInterrupt raised inside such a call leaves
HDF5 half-way through an operation, and the process has segfaulted on it. Inside
:func:`held_back` the two signals are only recorded; they take effect when the block ends (the
file then closed and renamed, or removed), or earlier where the block's own Python code calls
:meth:`Held.raise_pending` (between two images of a long pack).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Held:
    """The signals that arrived inside a :func:`held_back` block, in order."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.previous: dict[int, object] = {}

    def record(self, signum, frame) -> None:
        self.pending.append(signum)

    def raise_pending(self) -> None:
        """Deliver what arrived, now, to the handlers in place before the block (Ctrl-C raises
        KeyboardInterrupt; camexport's CLI turns SIGTERM into one too). Call it only where no
        HDF5 call is under way."""
        if not self.pending:
            return
        self._restore()
        try:
            for signum in dict.fromkeys(self.pending):
                signal.raise_signal(signum)
        finally:
            self.pending.clear()
            self._install()

    def _install(self) -> None:
        for signum in _SIGNALS:
            self.previous[signum] = signal.signal(signum, self.record)

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()


@contextmanager
def held_back() -> Iterator[Held]:
    """``with held_back() as held:`` SIGINT and SIGTERM recorded, not acted on, until the block
    ends; then delivered. Outside the main thread (where Python runs no signal handler) a no-op."""
    held = Held()
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    held._install()
    try:
        yield held
    finally:
        held._restore()
        for signum in dict.fromkeys(held.pending):
            signal.raise_signal(signum)
