"""Batch jobs: an input dataset through an artifact, CAMs and metrics into a result file.

One onnxruntime session (the Explainer's) serves the CAM methods and the metrics. Samples are
taken in contiguous batches of the ones not done yet, so a killed run resumes where it stopped
(see :mod:`camexport.store` for why nothing finished is ever lost).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from camexport import __version__
from camexport.artifact import graph_path, temporary_path
from camexport.data import preprocess, preprocess_args
from camexport.explain import Explainer
from camexport.load import sha256
from camexport.methods import METHODS, canonical_methods
from camexport.store import (
    COMPRESSIONS,
    InputData,
    OutputLock,
    ResultWriter,
    StoreError,
    artifact_files,
    refuse_inputs,
)
from camexport.tasks import RunError, concept_sha256, task_for

#: The live OUT.h5 view is rewritten at most every this many seconds, and at most 10 % of the time.
PUBLISH_EVERY = 1.0
METRIC_SCORES = ("softmax", "logit")
CAM_DTYPES = ("float32", "float16")

__all__ = ["CAM_DTYPES", "METRIC_SCORES", "Job", "RunConfig", "RunError", "RunSummary", "run"]


@dataclass
class RunConfig:
    artifact: str | Path
    data: str | Path
    out: str | Path
    methods: list[str] = field(default_factory=lambda: ["gradcam"])
    metrics: list[str] = field(default_factory=list)
    targets: str = "pred"  # "pred", "label" or a class index
    provider: str = "cpu"
    batch_size: int = 16
    limit: int | None = None
    eigen_smooth: bool = False
    aug_smooth: bool = False
    cam_dtype: str = "float32"
    compression: str = "gzip"
    metric_score: str = "softmax"
    save_activations: bool = False
    save_gradients: bool = False
    overwrite: bool = False
    seed: int = 0
    detection_threshold: float = 0.5

    def parameters(self) -> dict:
        """What, beside the graph and the data, determines the stored numbers."""
        return {"methods": self.methods, "metrics": self.metrics, "targets": self.targets,
                "batch_size": self.batch_size, "eigen_smooth": self.eigen_smooth,
                "aug_smooth": self.aug_smooth, "cam_dtype": self.cam_dtype,
                "metric_score": self.metric_score, "save_activations": self.save_activations,
                "save_gradients": self.save_gradients, "seed": self.seed,
                "concept_sha256": concept_sha256(str(self.targets)),
                "detection_threshold": self.detection_threshold}


@dataclass
class RunSummary:
    out: Path
    samples: int
    computed: int
    invalid: int
    seconds: float
    provider: str
    #: this call finished the file (False: it was complete already and nothing was done)
    finished: bool = True
    #: where the batches ran, in words ("" for this process)
    engine: str = ""


def _check_methods(methods, manifest: dict) -> list[str]:
    methods = canonical_methods(methods)
    built = canonical_methods(manifest.get("methods") or ["gradcam"])
    available = set().union(*(METHODS[m].graph_needs for m in built))
    for name in methods:
        missing = METHODS[name].graph_needs - available
        if missing:
            raise RunError(f"the artifact was built for {', '.join(built)}; {name} also needs "
                           f"{', '.join(sorted(missing))}: rebuild with `camexport build ... "
                           f"--methods {','.join(sorted(set(built) | {name}))}`")
    return methods


def _checked(config: RunConfig) -> RunConfig:
    """A copy of ``config`` with its names made canonical, or a RunError naming the fix."""
    if config.batch_size < 1:
        raise RunError(f"--batch-size must be at least 1, not {config.batch_size}: pass the number of "
                       f"images per graph run (16 by default)")
    if config.limit is not None and config.limit < 1:
        raise RunError(f"--limit must be at least 1, not {config.limit}: pass how many samples to "
                       f"explain, or leave --limit out for every sample")
    for option, value, choices in (("--cam-dtype", config.cam_dtype, CAM_DTYPES),
                                   ("--metric-score", config.metric_score, METRIC_SCORES),
                                   ("--compression", config.compression, COMPRESSIONS)):
        if value not in choices:
            raise RunError(f"{option} must be one of {choices}")
    metrics = config.metrics
    if metrics:
        from camexport.metrics import metric_names

        metrics = metric_names(metrics)
    return replace(config, metrics=metrics)


def _batches(done: np.ndarray, size: int):
    """Contiguous (start, stop) runs of samples not done, at most ``size`` long."""
    start = 0
    n = len(done)
    while start < n:
        if done[start]:
            start += 1
            continue
        stop = start
        while stop < n and not done[stop] and stop - start < size:
            stop += 1
        yield start, stop
        start = stop


class Job:
    """A configured run: opened data, explainer and result writer, ready to ``run()``. The kind
    of model (camexport.tasks) decides targets, checks and its own arrays; the job does not."""

    def __init__(self, config: RunConfig, provenance: dict | None = None, worker: bool = False):
        """``provenance``: root attributes saying how the run was made (the engine); ``worker``:
        one of a distributed run's workers, which computes batches and writes their shards only
        (the driver's Job holds the ResultWriter)."""
        config = _checked(config)
        artifact = Path(config.artifact)
        graph = graph_path(artifact)
        if not artifact.exists():
            raise RunError(f"artifact {artifact} does not exist; make one with `camexport build MODEL "
                           f"--out {artifact}`")
        if not graph.is_file():
            raise RunError(f"{artifact} is not an artifact (no {graph.name}); make one with camexport "
                           f"build MODEL --out DIR, and pass DIR")
        # the data is checked first: a malformed dataset is refused before the graph is loaded
        self.data = InputData.open(config.data)
        try:
            self._start(config, artifact, graph, provenance or {"engine": "local"}, worker)
        except BaseException:
            self.data.close()
            raise

    def _start(self, config: RunConfig, artifact: Path, graph: Path, provenance: dict, worker: bool) -> None:
        """The explainer, the task and the result writer of a job whose data is open."""
        self.explainer = Explainer(artifact, provider=config.provider, batch_size=max(config.batch_size, 16))
        manifest = self.explainer.manifest
        self.config = config = replace(config, methods=_check_methods(config.methods, manifest))
        if config.metrics:  # the methods coherency, arcc and adcc re-run must be in the graph too
            from camexport.metrics import metric_methods

            _check_methods(metric_methods(config.metrics), manifest)
        self.prep = manifest["preprocessing"]
        size = tuple(self.prep["size"])
        text = "x".join(map(str, size))
        if self.data.preprocessed and self.data.image_shape[1:] != size:
            raise StoreError(f"{config.data}:/images is preprocessed at {self.data.image_shape[1:]}, "
                             f"but the artifact takes {text}; store uint8 images to be "
                             f"resized at run time, or preprocess at {text}")
        self.task = task_for(manifest, self.explainer.output_shape, config.targets)
        self.task.check(self)
        self.count = len(self.data) if config.limit is None else min(config.limit, len(self.data))
        self.targets = self.task.run_targets(self)
        self.provider = self.explainer.provider_name
        if worker:
            self.writer = ResultWriter.for_worker(config.out, self.count, config.compression)
            return
        fingerprint = {"graph_sha256": sha256(graph), "data": self.data.identity(),
                       "count": self.count, "parameters": config.parameters()}
        attrs = {"camexport_version": __version__, "provider": self.provider,
                 "manifest": manifest, "methods": config.methods, "metrics": config.metrics,
                 "layers": [layer["name"] for layer in manifest["layers"]],
                 "artifact": str(graph.resolve()), "data": str(Path(config.data).resolve()),
                 "model_sha256": manifest["source"]["sha256"], "graph_sha256": fingerprint["graph_sha256"],
                 "run_engine": provenance}
        self.writer = ResultWriter(config.out, self.count, fingerprint, attrs,
                                   compression=config.compression, overwrite=config.overwrite)

    def _inputs(self, raw: np.ndarray) -> np.ndarray:
        if self.data.preprocessed:
            return np.ascontiguousarray(raw, np.float32)
        arguments = preprocess_args(self.prep)  # a stretch, or Ultralytics' letterbox
        return np.stack([preprocess(image, **arguments) for image in raw])

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Every array of samples start..stop, invalid ones (NaN/Inf pixels) filled, not explained."""
        config = self.config
        x = self._inputs(self.data.images(start, stop))
        valid = np.isfinite(x).reshape(len(x), -1).all(axis=1)
        n = stop - start
        rows = np.flatnonzero(valid)
        targets = self.targets(start, stop)
        asked = None if targets is None else [targets[i] for i in rows]
        chosen, arrays = self.task.prepare(self, x[rows], asked, rows, n)
        arrays["invalid"] = ~valid
        result = None
        if len(rows):
            result = self.explainer(x[rows], targets=chosen, methods=config.methods,
                                    eigen_smooth=config.eigen_smooth, aug_smooth=config.aug_smooth)
        outputs = np.full((n, *self.explainer.output_shape), np.nan, np.float32)
        classes = np.full(n, -1, np.int64)
        if result is not None:
            outputs[rows] = result.outputs
            classes[rows] = self.task.stored_classes(asked, result.targets)
        arrays.update(self.task.output_arrays(self.explainer.output_name, outputs))
        arrays["targets"] = classes
        for name in config.methods:
            cams = np.zeros((n, *self.prep["size"]), config.cam_dtype)
            if result is not None:
                cams[rows] = result.cams[name]
            arrays[f"cams/{name}"] = cams
            if result is not None:
                arrays.update(self._metrics(config.metrics, name, x[rows], rows, n, result.cams[name],
                                            result.targets, classes, chosen, start))
            else:
                arrays.update({f"metrics/{m}/{name}": np.full(n, np.nan, np.float32) for m in config.metrics})
        if config.save_activations or config.save_gradients:
            arrays.update(self._raw_tensors(x, rows, result, n))
        return arrays

    def _metrics(self, metrics, name, x, rows, n, cams, cam_targets, classes, chosen,
                 start) -> dict[str, np.ndarray]:
        """``/metrics/<metric>/<name>`` of a batch of ``n`` samples from the CAMs ``cams`` of its
        explained ones ``rows`` (images ``x``), made for ``cam_targets``; NaN for the others."""
        from camexport.metrics import evaluate

        arrays = {}
        scored = self.task.metric_targets(self.config, classes[rows], chosen) if len(rows) else []
        for metric in metrics:
            scores = np.full(n, np.nan, np.float32)
            if len(rows):
                scores[rows] = evaluate(metric, x, cams, scored, self.explainer.forward,
                                        seed=self.config.seed + start, cam_fn=self.cam_fn,
                                        cam_targets=cam_targets, cam_method=name)
            arrays[f"metrics/{metric}/{name}"] = scores
        return arrays

    def stored_metrics(self, start: int, stop: int, cams: dict[str, np.ndarray], classes: np.ndarray,
                       metrics: list[str]) -> dict[str, np.ndarray]:
        """``/metrics/<metric>/<method>`` of samples start..stop-1 from CAMs made before
        (``camexport evaluate``): ``cams`` {method: (n, H, W)} and ``classes`` (/targets) as
        stored; images, targets, seed and the explained rows as :meth:`batch` has them, so the
        scores are the run's own when the run's batches started at ``start``."""
        x = self._inputs(self.data.images(start, stop))
        n = stop - start
        rows = np.flatnonzero(np.isfinite(x).reshape(n, -1).all(axis=1))
        targets = self.targets(start, stop)
        asked = None if targets is None else [targets[i] for i in rows]
        chosen, _ = self.task.prepare(self, x[rows], asked, rows, n)
        cam_targets = chosen if chosen is not None else [int(c) for c in classes[rows]]
        arrays = {}
        for name, maps in cams.items():
            arrays.update(self._metrics(metrics, name, x[rows], rows, n, np.asarray(maps, np.float32)[rows],
                                        cam_targets, classes, chosen, start))
        return arrays

    def cam_fn(self, method: str, x: np.ndarray, targets: list) -> np.ndarray:
        """``method``'s CAMs of ``x`` for ``targets`` as the run makes them (the metrics that
        re-run a method: coherency, arcc, adcc)."""
        return self.explainer(x, targets=targets, methods=[method], eigen_smooth=self.config.eigen_smooth,
                              aug_smooth=self.config.aug_smooth).cams[method]

    def _raw_tensors(self, x, rows, result, n) -> dict[str, np.ndarray]:
        """Layer activations and gradients in the graph's layout, for `camexport recompute`:
        those the explanation computed (one more graph run only where its methods read no
        gradient and --save-gradients asks for them)."""
        activations = gradients = None
        if result is not None:
            activations, gradients = result.inputs.raw_activations, result.inputs.raw_gradients
            if self.config.save_gradients and any(g is None for g in gradients):
                from camexport.graph.outputs import activation_name, gradient_name
                from camexport.targets import target_weights

                weights = target_weights(result.targets, result.outputs, self.explainer.output_shape)
                ran = self.explainer.run_graph(x[rows], weights)
                activations = [ran[activation_name(layer["name"])] for layer in self.explainer.layers]
                gradients = [ran[gradient_name(layer["name"])] for layer in self.explainer.layers]
        found = {}
        for k, layer in enumerate(self.explainer.layers):
            for group, wanted, values in [("activations", self.config.save_activations, activations),
                                          ("gradients", self.config.save_gradients, gradients)]:
                if wanted:
                    whole = np.zeros((n, *layer["shape"][1:]), np.float32)
                    if values is not None:
                        whole[rows] = values[k]
                    found[f"{group}/{layer['name']}"] = whole
        return found

    def run(self, progress: Callable[[int, int, float], None] | None = None) -> RunSummary:
        """Every sample not done yet; returns what was computed. Re-entrant after a crash."""
        begin = time.perf_counter()
        done = self.writer.done()[: self.count]
        if done.all() and self.writer.complete:
            return RunSummary(Path(self.config.out), self.count, 0, 0, 0.0, self.provider, finished=False)
        todo = int((~done).sum())
        computed = invalid = 0
        view = LiveView(self.writer)
        for start, stop in _batches(done, self.config.batch_size):
            arrays = self.batch(start, stop)
            self.writer.write(start, arrays)
            computed += stop - start
            invalid += int(arrays["invalid"].sum())
            view.update()
            if progress:
                progress(computed, todo, time.perf_counter() - begin)
        self.writer.finish(self._whole_datasets())
        self.data.close()
        return RunSummary(Path(self.config.out), self.count, computed, invalid,
                          time.perf_counter() - begin, self.provider)

    def _whole_datasets(self) -> dict:
        extra = {}
        labels = self.data.labels
        if labels is not None:
            extra["labels"] = labels[: self.count]
        names = self.data.names
        if names is not None:
            extra["names"] = list(names[: self.count])
        return extra


class LiveView:
    """The OUT.h5 view of a running job, published at once and then rewritten at most every
    PUBLISH_EVERY seconds and at most 10 % of the time (its cost grows with the shards)."""

    def __init__(self, writer: ResultWriter):
        self.writer = writer
        self._publish()

    def _publish(self) -> None:
        begin = time.perf_counter()
        self.writer.publish()
        self.published = time.perf_counter()
        self.cost = self.published - begin

    def update(self) -> None:
        if time.perf_counter() - self.published > max(PUBLISH_EVERY, 10 * self.cost):
            self._publish()


def _refuse_inputs(config: RunConfig) -> None:
    """StoreError when --out (or its lock, parts folder or temporary file) is an input."""
    out = Path(config.out)
    outputs = [(out, "--out"), (out.with_name(out.name + ".lock"), "--out (its lock file)"),
               (out.with_name(out.name + ".parts"), "--out (its parts folder)"),
               (temporary_path(out), "--out (its temporary file)")]
    inputs = [("--data input dataset", config.data)]
    inputs += [("artifact file", path) for path in artifact_files(config.artifact)]
    if str(config.targets).startswith("concept:"):
        inputs.append(("--targets concept file", str(config.targets).split(":", 1)[1]))
    refuse_inputs(outputs, inputs)


def run(config: RunConfig, progress=None) -> RunSummary:
    """The whole job: --out checked against the inputs, then locked (one writer per result) for
    as long as the job runs."""
    _refuse_inputs(config)
    with OutputLock(config.out, "run"):
        return Job(config).run(progress)


# `camexport recompute` lives in camexport.recompute; kept importable from here.
from camexport.recompute import RECOMPUTABLE, recompute  # noqa: F401
