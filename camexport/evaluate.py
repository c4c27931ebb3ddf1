"""``camexport evaluate``: metrics added to a finished result file, its CAMs not recomputed.

A metric name comes from one of two tables:

- :mod:`camexport.metrics` (drop in confidence, ROAD, deletion/insertion, the ARCC family):
  the model re-runs on perturbed images through the artifact recorded in the result (root
  attribute ``artifact``, or ``--artifact``) over the input data (``data``, or ``--data``), as
  ``camexport run --metrics`` does it (:meth:`camexport.run.Job.stored_metrics`): the run's
  batches (its --batch-size from 0), seeds (--seed + the batch's first sample), targets,
  --metric-score, --eigen-smooth and --aug-smooth. The scores are the run's own for a run whose
  batches started at multiples of --batch-size (every local run, resumed or not), up to the CAMs:
  a run with --cam-dtype float16 scored its float32 maps, evaluate scores the stored float16 ones.
- :mod:`camexport.localisation` (pointing game, IoU, MaxBoxAcc, Gini, ...): the stored CAMs
  against the input's annotations (``/boxes``, and ``/masks`` where there, read by
  :func:`camexport.annotations.read_annotations` at the CAM size through the artifact's resize)
  for the class in ``/targets``; no model.

A name both tables know is the first's: ``complexity`` is pytorch-grad-cam's mean |cam|
(Quantus' entropy complexity is ``entropy``). Scores go to ``/metrics/<metric>/<method>`` for
every method in ``/cams``, NaN where the run explained nothing (and, for localisation, where the
target class has no box). A metric the file holds already is skipped unless ``overwrite``.

Resumable and crash-safe: the scores are written as shards beside the result and merged into it
by one atomic rewrite under the result's lock (:mod:`camexport.store.evaluations`); a rerun of
the same command after any kill skips the finished shards and gives the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camexport.annotations import read_annotations
from camexport.artifact import AUGMENTED_FILE, graph_path
from camexport.load import sha256
from camexport.store import InputData, OutputLock, ResultReader, StoreError, refuse_inputs
from camexport.store.evaluations import MetricShards, shards_of
from camexport.tasks import RunError

__all__ = ["EvaluateSummary", "evaluate_results", "metric_kinds"]

#: the two tables, in the order a name is looked up
MODEL, LOCALISATION = "model", "localisation"


@dataclass
class EvaluateSummary:
    out: Path
    #: the metrics this call wrote (canonical names)
    added: list[str]
    #: the asked metrics the file held already (not recomputed: --overwrite-metrics)
    skipped: list[str]
    #: batches of samples computed by this call (shards finished before a kill are not)
    computed: int
    seconds: float


def metric_kinds(spec: str | list[str]) -> list[tuple[str, str]]:
    """(canonical name, MODEL or LOCALISATION) of each metric of ``spec``; RunError naming both
    tables for an unknown one."""
    from camexport import localisation, metrics

    found: list[tuple[str, str]] = []
    for token in metrics.metric_tokens(spec):
        try:
            entry = (metrics.metric_names([token])[0], MODEL)
        except metrics.MetricError as model_error:
            try:
                entry = (localisation.metric_names([token])[0], LOCALISATION)
            except localisation.LocalisationError as local_error:
                unknown = "unknown metric" in str(model_error) and "unknown metric" in str(local_error)
                if not unknown:  # a known name with a bad parameter: that table's message
                    raise RunError(str(model_error if "unknown metric" not in str(model_error)
                                       else local_error)) from None
                raise RunError(f"unknown metric {token.split(':')[0]!r}; model metrics: "
                               f"{', '.join(metrics.METRICS)}; localisation metrics (annotations): "
                               f"{', '.join(localisation.METRICS)}") from None
        if entry not in found:
            found.append(entry)
    if not found:
        raise RunError("no metric given: pass --metrics, e.g. --metrics drop-in-confidence,pointing-game")
    return found


def evaluate_results(results: str | Path, metrics: str | list[str], data: str | Path | None = None,
                     artifact: str | Path | None = None, overwrite: bool = False, provider: str = "cpu",
                     progress: Callable[[int, int, float], None] | None = None) -> EvaluateSummary:
    """Add ``metrics`` to the finished result file ``results`` (see the module docstring);
    ``data`` / ``artifact``: where the input dataset / the artifact are now, when they moved
    since the run; ``overwrite``: recompute metrics the file holds. ``progress(done, total,
    seconds)`` after each batch of each metric, in samples times metrics."""
    begin = time.perf_counter()
    results = Path(results)
    names = metric_kinds(metrics)
    ResultReader(results).close()  # a missing or foreign file is refused before any lock file
    refuse_inputs([(results, "RESULT"), (shards_of(results), "RESULT (its shards folder)")],
                  [("--data input dataset", data), ("--artifact", artifact)])
    with OutputLock(results, "evaluate"):
        with ResultReader(results) as stored:
            if not stored.complete:
                raise RunError(f"{results} is not finished; run the same `camexport run` command again "
                               f"first, then evaluate it")
            present = stored.metrics
            fingerprint = stored.fingerprint
        skipped = [name for name, _ in names if name in present and not overwrite]
        todo = [(name, kind) for name, kind in names if name not in skipped]
        if not todo:
            if shards_of(results).exists():  # left by a kill after the merge's rename
                MetricShards(results, {"fingerprint": fingerprint, "provider": provider}).remove()
            return EvaluateSummary(results, [], skipped, 0, time.perf_counter() - begin)
        shards = MetricShards(results, {"fingerprint": fingerprint, "provider": provider})
        try:
            computed = _compute(results, todo, shards, data, artifact, provider, progress, begin)
        except BaseException:
            if shards.empty():  # refused before any score: no folder left behind
                shards.remove()
            raise
        with ResultReader(results) as stored:
            count = stored.count
        shards.merge([name for name, _ in todo], count)
    return EvaluateSummary(results, [name for name, _ in todo], skipped, computed,
                           time.perf_counter() - begin)


def _compute(results: Path, todo: list[tuple[str, str]], shards: MetricShards, data, artifact,
             provider: str, progress, begin: float) -> int:
    """Every shard not finished yet; returns how many batches were computed."""
    with ResultReader(results) as stored:
        attrs, parameters = stored.attrs, stored.parameters
        count, methods = stored.count, stored.methods
        size = tuple(stored.manifest["preprocessing"]["size"])
        resize = stored.manifest["preprocessing"].get("resize", "stretch")
        batch = int(parameters.get("batch_size", 16))
        data_path = _data_path(results, attrs, data)
        model = [name for name, kind in todo if kind == MODEL]
        local = [name for name, kind in todo if kind == LOCALISATION]
        explained = stored.done & ~stored.invalid
        starts = range(0, count, batch)
        work = [(start, name) for start in starts for name, _ in todo
                if not shards.done(name, start, min(start + batch, count))]
        if not work:
            return 0
        job = None
        inputs = InputData.open(data_path)
        try:
            _check_data(inputs, attrs["fingerprint"].get("data", {}), results)
            if local:
                _check_annotations(inputs, data_path, size, local)
            if any(name in model for _, name in work):
                job = _job(results, attrs, parameters, model, data_path, artifact, provider, count)
            total, done = sum(min(start + batch, count) - start for start, _ in work), 0
            for start, name in work:
                stop = min(start + batch, count)
                rows = slice(start, stop)
                cams = {method: stored.cams(method, rows) for method in methods}
                classes = stored.targets(rows)
                if name in model:
                    arrays = job.stored_metrics(start, stop, cams, classes, [name])
                    scores = {method: arrays[f"metrics/{name}/{method}"] for method in methods}
                else:
                    annotations = read_annotations(inputs.handle, rows, size, resize=resize, targets=classes)
                    scores = {method: _localise(name, cams[method], annotations, classes, explained[rows])
                              for method in methods}
                shards.write(name, start, scores)
                done += stop - start
                if progress:
                    progress(done, total, time.perf_counter() - begin)
        finally:
            if job is not None:
                job.data.close()
            inputs.close()
        return len(work)


def _localise(name: str, cams: np.ndarray, annotations, classes: np.ndarray,
              explained: np.ndarray) -> np.ndarray:
    from camexport.localisation import evaluate

    scores = np.asarray(evaluate(name, np.asarray(cams, np.float32), annotations, classes), np.float32)
    scores[~explained] = np.nan
    return scores


def _data_path(results: Path, attrs: dict, data) -> Path:
    path = Path(data) if data is not None else Path(attrs.get("data", ""))
    if not path.is_file():
        where = f"--data {path}" if data is not None else f"the input dataset {path} recorded in {results}"
        raise RunError(f"{where} does not exist (moved or deleted?); pass --data IN.h5, the dataset "
                       f"the run read")
    return path


def _check_data(inputs: InputData, recorded: dict, results: Path) -> None:
    """RunError unless ``inputs`` holds the images the result was made from (shape, dtype and
    the first and last image; the path may differ)."""
    now = inputs.identity()
    if any(recorded.get(key) != now[key] for key in ("shape", "dtype", "probe_sha256")):
        raise RunError(f"{inputs.path} is not the input dataset {results} was made from (its images "
                       f"differ); pass --data IN.h5, the dataset the run read")


def _check_annotations(inputs: InputData, path: Path, size: tuple[int, ...], names: list[str]) -> None:
    from camexport.localisation import METRICS

    needing = [n for n in names if METRICS[n.split(":")[0]].needs_annotations]
    if needing and read_annotations(inputs.handle, slice(0, 1), size) is None:
        raise StoreError(f"{path} has no /boxes: pack it with --annotations FILE to evaluate "
                         f"{', '.join(needing)}")


def _job(results: Path, attrs: dict, parameters: dict, metrics: list[str], data: Path, artifact,
         provider: str, count: int):
    """The run's Job, rebuilt from its parameters, over the artifact the result names (or the
    one given) and ``data`` (checked), for its metric plumbing only (it writes nothing)."""
    from camexport.run import Job, RunConfig

    recorded = Path(attrs.get("artifact", ""))
    graph = graph_path(artifact) if artifact is not None else recorded
    if not graph.is_file():
        where = (f"--artifact {artifact} holds no {AUGMENTED_FILE}" if artifact is not None
                 else f"the artifact {recorded.parent} recorded in {results} is gone (moved or deleted)")
        raise RunError(f"{where}: pass --artifact DIR, the artifact directory the run used")
    if sha256(graph) != attrs.get("graph_sha256"):
        raise RunError(f"{graph} is not the graph {results} was made with (its sha256 differs; a "
                       f"rebuilt artifact is another graph): pass --artifact DIR of the run's artifact")
    config = RunConfig(graph.parent, data, results, methods=attrs.get("methods") or ["gradcam"],
                       metrics=metrics, targets=parameters.get("targets", "pred"), provider=provider,
                       batch_size=int(parameters.get("batch_size", 16)), limit=count,
                       eigen_smooth=bool(parameters.get("eigen_smooth")),
                       aug_smooth=bool(parameters.get("aug_smooth")),
                       metric_score=parameters.get("metric_score", "softmax"),
                       seed=int(parameters.get("seed", 0)),
                       detection_threshold=float(parameters.get("detection_threshold", 0.5)))
    return Job(config, worker=True)
