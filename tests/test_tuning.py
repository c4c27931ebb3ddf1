"""camexport.tuning.BatchTuner: the inner batch of plain forwards picked by measurement."""

from __future__ import annotations

import numpy as np

from camexport.tuning import CANDIDATES, TIMED, BatchTuner


def _fake_call(per_image_ms: dict[int, float], clock: list[float]):
    """A forward whose cost per image depends on the chunk size (a fake clock, no sleeping)."""

    def call(chunk: np.ndarray) -> np.ndarray:
        clock[0] += per_image_ms.get(len(chunk), 100.0) * len(chunk) / 1000
        return chunk * 2

    return call


def test_tuner_settles_on_the_fastest_size(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("camexport.tuning.time.perf_counter", lambda: clock[0])
    tuner = BatchTuner(64)
    call = _fake_call({8: 40.0, 16: 30.0, 32: 35.0, 64: 50.0}, clock)
    x = np.arange(1000, dtype=np.float32)[:, None]
    out = tuner.run(x, call)
    np.testing.assert_array_equal(out, x * 2)  # every row once, in order
    assert tuner.settled and tuner.size == 16
    # the measuring phase: each candidate (TIMED + 1) times, then the fastest only
    assert sum(c * (TIMED + 1) for c in CANDIDATES) < len(x)


def test_first_run_of_a_size_is_not_counted(monkeypatch):
    """A slow first run (a runtime allocating for a new shape) must not decide the size."""
    clock = [0.0]
    monkeypatch.setattr("camexport.tuning.time.perf_counter", lambda: clock[0])
    tuner = BatchTuner(16, candidates=(8, 16))
    costs = iter([10.0, 1.0, 1.0, 9.0, 1.5, 1.5])  # s per chunk: 8 (cold), 8, 8, 16 (cold), 16, 16

    def call(chunk):
        clock[0] += next(costs)
        return chunk

    tuner.run(np.zeros((8 * 3 + 16 * 3, 1), np.float32), call)
    assert tuner.size == 16  # 1.5 s / 16 images beats 1 s / 8 images; the cold runs are ignored


def test_limit_and_partial_chunks():
    tuner = BatchTuner(20)
    assert tuner.candidates == [8, 16]
    tuner.record(16, 5, 0.001)  # a partial chunk is no measurement
    assert not tuner.settled and tuner.size == 8
    assert BatchTuner(4).candidates == [4]
