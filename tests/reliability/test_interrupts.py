"""Ctrl-C / SIGTERM that arrive while HDF5 is inside a call into camexport's file object are held
back until the write is whole (or, in long writes, until the next row): raised there, they left
HDF5 half-way and the process segfaulted (seen once in CI: a run terminated during a shard write,
exit -11 instead of 1). Each test delivers the signal from inside that call, deterministically."""

from __future__ import annotations

import signal

import h5py
import numpy as np
import pytest

from camexport.store import _GuardedFile, _written
from camexport.store.inputs import write_input


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, even where the test process was started
    with SIGINT ignored (a shell's background job, nohup): Python then installs no handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def signal_inside_hdf5(monkeypatch):
    """The first write HDF5 makes through the guard raises the signal given to the fixture."""

    def arm(signum: int) -> list[int]:
        delivered: list[int] = []
        write = _GuardedFile.write

        def write_with_signal(self, buffer):
            if not delivered:
                delivered.append(signum)
                signal.raise_signal(signum)  # a handler that raised would raise right here
            return write(self, buffer)

        monkeypatch.setattr(_GuardedFile, "write", write_with_signal)
        return delivered

    return arm


@pytest.fixture
def sigterm_as_interrupt():
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_an_hdf5_write_waits_for_the_whole_file(tmp_path, signal_inside_hdf5,
                                                                 sigterm_as_interrupt, signum):
    path = tmp_path / "shard.h5"
    delivered = signal_inside_hdf5(signum)
    data = np.arange(4096, dtype=np.float32).reshape(64, 64)
    with pytest.raises(KeyboardInterrupt), _written(path, "shard") as (h5, _guard):
        h5.create_dataset("cams", data=data)
        h5.flush()  # HDF5 writes through the guard here: the signal arrives inside it
        assert delivered == [signum]
    with h5py.File(path, "r") as written:  # the interrupt came after the file was complete
        np.testing.assert_array_equal(written["cams"][()], data)
    assert [p.name for p in tmp_path.iterdir()] == ["shard.h5"]  # no temporary file left
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_ctrl_c_in_a_long_pack_stops_between_images_and_keeps_the_old_file(tmp_path, signal_inside_hdf5):
    path = tmp_path / "data.h5"
    old = write_input(path, iter([("old", np.zeros((8, 8, 3), np.uint8), 0)]), (8, 8))
    before = path.read_bytes()
    delivered = signal_inside_hdf5(signal.SIGINT)
    taken = []

    noise = np.random.default_rng(0)

    def images():  # incompressible 256 x 256 images: HDF5 writes a few before the pack ends
        for i in range(50):
            taken.append(i)
            yield f"image{i}", noise.integers(0, 256, (256, 256, 3), np.uint8), i

    with pytest.raises(KeyboardInterrupt):
        write_input(path, images(), (256, 256))
    assert delivered == [signal.SIGINT]
    assert old == 1 and len(taken) < 50  # stopped at the next image, not after all of them
    assert path.read_bytes() == before  # the existing dataset unchanged
    assert [p.name for p in tmp_path.iterdir()] == ["data.h5"]
