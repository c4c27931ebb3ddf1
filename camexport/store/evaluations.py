"""``camexport evaluate``'s crash-safe writing: metric shards beside a finished result, merged into
it by one atomic rewrite (the result layout is drawn in :mod:`camexport.store`)::

    OUT.h5.evaluate/
        record.json                        what the shards were computed for: the result's
                                           fingerprint and the execution provider
        <metric, URL-quoted>/rows-<start>-<stop>.h5
                                           /<method> (stop - start, ...) float32: the scores of
                                           samples start..stop-1 of every CAM method

Each shard is written to a temporary name and renamed (atomic), so a SIGKILL leaves only whole
shards; a rerun skips the rows whose shard is there. When every shard of every asked metric is
there, they are copied into a copy of ``OUT.h5`` (``/metrics/<metric>/<method>``, root attributes
``metrics`` and ``evaluated`` updated) that is renamed over it (:func:`edit_results`), then the
folder goes. A kill before that rename leaves ``OUT.h5`` as it was; after it, the next run finds
the metrics present and only removes the folder. A shards folder made for another record (the
result was re-run since, or another provider) is dropped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import quote

import h5py
import numpy as np

from camexport.artifact import replace_atomic, temporary_path
from camexport.faults import fault_point
from camexport.store import _written
from camexport.store.reader import edit_results

#: The record of what the shards were computed for.
RECORD = "record.json"


def shards_of(path: Path) -> Path:
    """The folder of ``camexport evaluate``'s shards of a result (``OUT.h5.evaluate``)."""
    return path.with_name(path.name + ".evaluate")


class MetricShards:
    """The finished per-metric, per-row-range scores of one ``camexport evaluate`` of ``path``."""

    def __init__(self, path: str | Path, made_for: dict):
        """``made_for``: what determines the scores (JSON); other shards there are dropped."""
        self.path = Path(path)
        self.folder = shards_of(self.path)
        record = self.folder / RECORD
        if record.is_file() and json.loads(record.read_text()) != made_for:
            shutil.rmtree(self.folder)  # computed for an earlier run of the result: stale
        self.folder.mkdir(exist_ok=True)
        if not record.is_file():
            temporary = temporary_path(record)
            temporary.write_text(json.dumps(made_for))
            replace_atomic(temporary, record)
        for stale in self.folder.glob("*/.*.partial"):  # a shard cut short
            stale.unlink()

    def _shard(self, metric: str, start: int, stop: int) -> Path:
        return self.folder / quote(metric, safe="") / f"rows-{start:09d}-{stop:09d}.h5"

    def done(self, metric: str, start: int, stop: int) -> bool:
        return self._shard(metric, start, stop).is_file()

    def write(self, metric: str, start: int, scores: dict[str, np.ndarray]) -> None:
        """The scores {method: (n, ...)} of samples start..start+n-1 (atomic)."""
        stop = start + len(next(iter(scores.values())))
        shard = self._shard(metric, start, stop)
        shard.parent.mkdir(exist_ok=True)
        with _written(shard, "evaluate-shard") as (h5, _):
            for method, values in scores.items():
                h5[method] = np.asarray(values, np.float32)

    def read(self, metric: str, count: int) -> dict[str, np.ndarray]:
        """{method: (count, ...) float32} from the metric's shards (NaN where none is)."""
        found: dict[str, np.ndarray] = {}
        for shard in sorted(self._shard(metric, 0, 0).parent.glob("rows-*.h5")):
            _, start, stop = shard.stem.split("-")
            with h5py.File(shard, "r") as h5:
                for method in h5:
                    values = h5[method][()]
                    if method not in found:
                        found[method] = np.full((count, *values.shape[1:]), np.nan, np.float32)
                    found[method][int(start):int(stop)] = values
        return found

    def merge(self, names: list[str], count: int) -> None:
        """Every asked metric's shards into ``/metrics`` of the result (one atomic rewrite), then
        the folder removed. ``metrics`` and ``evaluated`` root attributes list them."""
        with edit_results(self.path) as edit:
            compression = edit.reader.storage("targets").compression or "gzip"
            for metric in names:
                for method, values in self.read(metric, count).items():
                    edit.replace_dataset(f"metrics/{metric}/{method}", values, compression)
            listed = edit.reader.attrs.get("metrics") or []
            edit.set_attr("metrics", listed + [m for m in names if m not in listed])
            before = edit.reader.attrs.get("evaluated") or []
            edit.set_attr("evaluated", before + [m for m in names if m not in before])
            fault_point("evaluate-merge")  # the copy written, not yet renamed over the result
        self.remove()

    def empty(self) -> bool:
        """Whether no shard is finished."""
        return not any(self.folder.glob("*/rows-*.h5"))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
