"""The inner batch of repeated plain forwards, chosen by measurement on the model at hand.

ScoreCAM runs B·C masked images and the perturbation metrics run the imputed or masked images
through the plain model: nothing but forwards, so their speed is the forward's throughput at the
inner batch. That batch is a property of the model and the runtime, not a constant: measured
here (onnxruntime CPU, 2 cores, ms per image at 8/16/32/64) resnet50 41/35/36/44 and vit_small
45/49/50/69, and a GPU wants larger batches still. :class:`BatchTuner` measures while the work
is done: the first full chunks of each candidate size are timed (the first one of a size warms
the runtime for that shape and is not counted), then every later chunk uses the size with the
lowest time per image. Nothing is run only to measure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

#: inner batch sizes tried, in this order
CANDIDATES = (8, 16, 32, 64)
#: timed chunks per candidate after its warm-up chunk (the fastest counts)
TIMED = 2


class BatchTuner:
    """Chunks of at most ``limit`` images; the size among :data:`CANDIDATES` (those up to the
    limit) with the lowest measured seconds per image once each has been timed."""

    def __init__(self, limit: int, candidates: Sequence[int] = CANDIDATES):
        self.candidates = [c for c in candidates if c <= limit] or [limit]
        self._runs: dict[int, int] = {}
        self._per_image: dict[int, float] = {}

    @property
    def settled(self) -> bool:
        return len(self._per_image) == len(self.candidates) and all(
            self._runs.get(c, 0) > TIMED for c in self.candidates)

    @property
    def size(self) -> int:
        """The chunk size to run next: a candidate still being measured, else the fastest."""
        for candidate in self.candidates:
            if self._runs.get(candidate, 0) <= TIMED:
                return candidate
        return min(self._per_image, key=self._per_image.get)

    def record(self, size: int, count: int, seconds: float) -> None:
        """A chunk of ``count`` images run at chunk size ``size`` took ``seconds``; only full
        chunks after the size's first run count."""
        if count != size or size not in self.candidates:
            return
        runs = self._runs[size] = self._runs.get(size, 0) + 1
        if runs > 1:
            per_image = seconds / count
            self._per_image[size] = min(self._per_image.get(size, per_image), per_image)

    def run(self, x: np.ndarray, call: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``call`` over ``x`` in chunks, concatenated along the first axis."""
        parts, start = [], 0
        while start < len(x):
            size = self.size
            chunk = x[start:start + size]
            began = time.perf_counter()
            parts.append(call(chunk))
            self.record(size, len(chunk), time.perf_counter() - began)
            start += len(chunk)
        return np.concatenate(parts)
