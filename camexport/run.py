"""Batch jobs: an input dataset through an artifact, CAMs and metrics into a result file.

One onnxruntime session (the Explainer's) serves the CAM methods and the metrics. Samples are
taken in contiguous batches of the ones not done yet, so a killed run resumes where it stopped
(see :mod:`camexport.store` for why nothing finished is ever lost).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from camexport import __version__
from camexport.build import AUGMENTED_FILE
from camexport.data import preprocess
from camexport.explain import Explainer
from camexport.load import sha256
from camexport.methods import METHODS, canonical_methods
from camexport.store import InputData, ResultWriter, StoreError
from camexport.targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

#: The live OUT.h5 view is rewritten at most every this many seconds, and at most 10 % of the time.
PUBLISH_EVERY = 1.0
METRIC_SCORES = ("softmax", "logit")


class RunError(ValueError):
    """A run that cannot start as asked, with what to change."""


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
                "concept_sha256": _concept_sha256(str(self.targets)),
                "detection_threshold": self.detection_threshold}


@dataclass
class RunSummary:
    out: Path
    samples: int
    computed: int
    invalid: int
    seconds: float
    provider: str


def _check_methods(config: RunConfig, manifest: dict) -> list[str]:
    methods = canonical_methods(config.methods)
    built = canonical_methods(manifest.get("methods") or ["gradcam"])
    available = set().union(*(METHODS[m].needs for m in built))
    for name in methods:
        missing = METHODS[name].needs - available - {"forwards", "tail"}
        if missing:
            raise RunError(f"the artifact was built for {', '.join(built)}; {name} also needs "
                           f"{', '.join(sorted(missing))}: rebuild with `camexport build ... "
                           f"--methods {','.join(sorted(set(built) | {name}))}`")
    return methods


def _targets_for(config: RunConfig, data: InputData, count: int, classes: int):
    """A function (start, stop) -> list of targets (None = the top class)."""
    mode = str(config.targets)
    if mode == "pred":
        return lambda start, stop: None
    if mode.startswith("concept:"):
        return _concept_targets(mode.split(":", 1)[1], count, classes)
    if mode == "label":
        labels = data.labels
        if labels is None:
            raise RunError(f"--targets label, but {data.path} has no /labels; use --targets pred "
                           f"or a class index, or pack with --labels")
        labels = labels[:count]
        bad = np.flatnonzero((labels < 0) | (labels >= classes))
        if len(bad):
            raise RunError(f"--targets label: {len(bad)} samples (first: {bad[0]}) have no valid "
                           f"label in 0..{classes - 1}; use --targets pred")
        return lambda start, stop: [int(v) for v in labels[start:stop]]
    try:
        category = int(mode)
    except ValueError:
        raise RunError(f"--targets must be pred, label, a class index or concept:FILE.npy, "
                       f"not {mode!r}") from None
    if not 0 <= category < classes:
        raise RunError(f"--targets {category} is out of range for a model with {classes} classes")
    return lambda start, stop: [category] * (stop - start)


def _concept_sha256(targets: str) -> str | None:
    """The concept file's hash: a run with another concept in the same file is another run."""
    path = Path(targets.split(":", 1)[1]) if targets.startswith("concept:") else None
    return sha256(path) if path and path.is_file() else None


def _concept_targets(path: str, count: int, size: int):
    """Targets from a concept embedding file: (D,) for every sample or (N, D), one per sample."""
    from camexport.targets import SimilarityToConceptTarget, TargetError

    try:
        concepts = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise RunError(f"--targets concept:{path}: not a readable .npy file ({err})") from err
    if concepts.ndim == 1:
        concepts = np.broadcast_to(concepts, (count, len(concepts)))
    if concepts.ndim != 2 or concepts.shape[1] != size or len(concepts) < count:
        raise RunError(f"--targets concept:{path} holds an array of shape {concepts.shape}; expected "
                       f"({size},) for every sample or ({count}, {size}), one concept per sample, "
                       f"for a model output of {size} values")
    try:
        targets = [SimilarityToConceptTarget(c) for c in concepts[:count]]
    except TargetError as err:
        raise RunError(f"--targets concept:{path}: {err}") from err
    return lambda start, stop: targets[start:stop]


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
    """A configured run: opened data, explainer and result writer, ready to ``run()``."""

    def __init__(self, config: RunConfig):
        if config.batch_size < 1:
            raise RunError("--batch-size must be at least 1")
        if config.cam_dtype not in ("float32", "float16"):
            raise RunError("--cam-dtype must be float32 or float16")
        if config.metric_score not in METRIC_SCORES:
            raise RunError(f"--metric-score must be one of {METRIC_SCORES}")
        self.config = config
        artifact = Path(config.artifact)
        graph = artifact / AUGMENTED_FILE if artifact.is_dir() else artifact
        if not graph.is_file():
            raise RunError(f"{artifact} is not an artifact (no {AUGMENTED_FILE}); make one with camexport build")
        self.explainer = Explainer(artifact, provider=config.provider, batch_size=max(config.batch_size, 16))
        manifest = self.explainer.manifest
        config.methods = _check_methods(config, manifest)
        if config.metrics:
            from camexport.metrics import metric_names

            config.metrics = metric_names(config.metrics)
        self.data = InputData.open(config.data)
        self.prep = manifest["preprocessing"]
        size = tuple(self.prep["size"])
        text = "x".join(map(str, size))
        if self.data.preprocessed and self.data.image_shape[1:] != size:
            raise StoreError(f"{config.data}:/images is preprocessed at {self.data.image_shape[1:]}, "
                             f"but the artifact takes {text}; store uint8 images to be "
                             f"resized at run time, or preprocess at {text}")
        if len(size) != 2 and not self.data.preprocessed:
            raise StoreError(f"the artifact takes {len(size)}-D inputs ({text}): store them in "
                             f"{config.data}:/images as (N, 3, {', '.join(map(str, size))}) float32, "
                             f"preprocessed")
        self.detector = self.explainer.detection
        if self.detector is None and len(self.explainer.output_shape) > 1 and (
                str(config.targets) == "pred" or config.metrics):
            raise RunError(f"the model output is {self.explainer.output_shape} per sample (segmentation): "
                           f"give --targets CLASS or label (the pixels the model assigns to that class "
                           f"are explained), and no --metrics")
        if len(size) != 2 and config.metrics:
            raise RunError(f"metrics ({', '.join(config.metrics)}) work on 2-D images; the artifact "
                           f"takes {len(size)}-D inputs ({text}): run without --metrics")
        self.count = len(self.data) if config.limit is None else min(config.limit, len(self.data))
        if self.count == 0:
            raise RunError(f"{config.data} holds no images")
        self.classes = self.explainer.classes
        self.targets = _targets_for(config, self.data, self.count, self.classes)
        self.provider = self.explainer.provider_name
        fingerprint = {"graph_sha256": sha256(graph), "data": self.data.identity(),
                       "count": self.count, "parameters": config.parameters()}
        attrs = {"camexport_version": __version__, "provider": self.provider,
                 "manifest": manifest, "methods": config.methods, "metrics": config.metrics,
                 "layers": [layer["name"] for layer in manifest["layers"]],
                 "artifact": str(graph.resolve()), "data": str(Path(config.data).resolve()),
                 "model_sha256": manifest["source"]["sha256"], "graph_sha256": fingerprint["graph_sha256"]}
        self.writer = ResultWriter(config.out, self.count, fingerprint, attrs,
                                   compression=config.compression, overwrite=config.overwrite)

    def _inputs(self, raw: np.ndarray) -> np.ndarray:
        if self.data.preprocessed:
            return np.ascontiguousarray(raw, np.float32)
        return np.stack([preprocess(image, self.prep["size"], self.prep["mean"], self.prep["std"])
                         for image in raw])

    def _segmentation_targets(self, x: np.ndarray, classes: list) -> list:
        """Class c of a segmentation model: the pixels it assigns to c, as pgc's tutorial
        (SemanticSegmentationTarget(c, argmax(output) == c)); one plain forward."""
        from camexport.targets import SemanticSegmentationTarget

        predicted = self.explainer.forward(x).argmax(axis=1)
        return [SemanticSegmentationTarget(int(c), np.float32(p == c)) for c, p in zip(classes, predicted)]

    def _detection_targets(self, x: np.ndarray, classes: list | None):
        """Each image's detections and, as pgc's detection tutorial, its target: the detections
        scoring at least --detection-threshold (of the --targets class, if one), by box and
        label (camexport.detection.detection_targets); one plain forward."""
        from camexport.detection import detection_targets

        found = self.explainer.detect(x)
        classes = classes or [None] * len(x)
        return found, [detection_targets(f, self.config.detection_threshold, c, spec=self.detector)
                       for f, c in zip(found, classes)]

    def _detection_arrays(self, found: list, rows: np.ndarray, n: int) -> dict[str, np.ndarray]:
        """Per image, the detections padded to the manifest's detections_per_img (NaN boxes and
        scores, label -1 past ``count``)."""
        most = self.detector.detections_per_img
        arrays = {"detections/boxes": np.full((n, most, 4), np.nan, np.float32),
                  "detections/scores": np.full((n, most), np.nan, np.float32),
                  "detections/labels": np.full((n, most), -1, np.int32),
                  "detections/count": np.zeros(n, np.int32)}
        for row, f in zip(rows, found):
            arrays["detections/boxes"][row, :len(f)] = f.boxes
            arrays["detections/scores"][row, :len(f)] = f.scores
            arrays["detections/labels"][row, :len(f)] = f.labels
            arrays["detections/count"][row] = len(f)
        return arrays

    def _metric_targets(self, classes: np.ndarray, chosen: list | None) -> list:
        if self.detector is not None or str(self.config.targets).startswith("concept:"):
            return chosen  # the similarity itself, whatever --metric-score says
        kind = ClassifierOutputSoftmaxTarget if self.config.metric_score == "softmax" else ClassifierOutputTarget
        return [kind(int(c)) for c in classes]

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Every array of samples start..stop, invalid ones (NaN/Inf pixels) filled, not explained."""
        config = self.config
        x = self._inputs(self.data.images(start, stop))
        valid = np.isfinite(x).reshape(len(x), -1).all(axis=1)
        n = stop - start
        arrays: dict[str, np.ndarray] = {"invalid": ~valid}
        targets = self.targets(start, stop)
        rows = np.flatnonzero(valid)
        chosen = None if targets is None else [targets[i] for i in rows]
        if self.detector is not None:
            found, chosen = self._detection_targets(x[rows], chosen) if len(rows) else ([], chosen)
            arrays.update(self._detection_arrays(found, rows, n))
        elif chosen is not None and len(self.explainer.output_shape) > 1 and len(rows):
            chosen = self._segmentation_targets(x[rows], chosen)
        result = None
        if len(rows):
            result = self.explainer(x[rows], targets=chosen, methods=config.methods,
                                    eigen_smooth=config.eigen_smooth, aug_smooth=config.aug_smooth)
        outputs = np.full((n, *self.explainer.output_shape), np.nan, np.float32)
        classes = np.full(n, -1, np.int64)
        if result is not None:
            outputs[rows] = result.outputs
            # -1: a concept, or a detector's own detections (--targets pred)
            classes[rows] = ([-1 if targets is None else targets[i] for i in rows]
                             if self.detector is not None
                             else [getattr(t, "category", -1) for t in result.targets])
        if self.detector is None:  # a detector's rows per anchor are summarised as detections/
            arrays[f"outputs/{self.explainer.output_name}"] = outputs
        arrays["targets"] = classes
        for name in config.methods:
            cams = np.zeros((n, *self.prep["size"]), config.cam_dtype)
            if result is not None:
                cams[rows] = result.cams[name]
            arrays[f"cams/{name}"] = cams
            for metric in config.metrics:
                from camexport.metrics import evaluate

                scores = np.full(n, np.nan, np.float32)
                if result is not None:
                    scores[rows] = evaluate(metric, x[rows], result.cams[name],
                                            self._metric_targets(classes[rows], chosen),
                                            self.explainer.forward, seed=config.seed + start)
                arrays[f"metrics/{metric}/{name}"] = scores
        if config.save_activations or config.save_gradients:
            arrays.update(self._raw_tensors(x, rows, result, n))
        return arrays

    def _raw_tensors(self, x, rows, result, n) -> dict[str, np.ndarray]:
        """Layer activations and gradients in the graph's layout, for `camexport recompute`
        (one more graph run, with the targets the CAMs were made for)."""
        from camexport.graph.augment import activation_name, gradient_name
        from camexport.targets import target_weights

        ran = {}
        if result is not None:
            weights = target_weights(result.targets, result.outputs, self.explainer.output_shape)
            ran = self.explainer.run_graph(x[rows], weights)
        found = {}
        for layer in self.explainer.layers:
            for group, wanted, name in [("activations", self.config.save_activations, activation_name),
                                        ("gradients", self.config.save_gradients, gradient_name)]:
                if wanted:
                    whole = np.zeros((n, *layer["shape"][1:]), np.float32)
                    if ran:
                        whole[rows] = ran[name(layer["name"])]
                    found[f"{group}/{layer['name']}"] = whole
        return found

    def run(self, progress: Callable[[int, int, float], None] | None = None) -> RunSummary:
        """Every sample not done yet; returns what was computed. Re-entrant after a crash."""
        begin = time.perf_counter()
        done = self.writer.done()[: self.count]
        if done.all() and self.writer.complete:
            return RunSummary(Path(self.config.out), self.count, 0, 0, 0.0, self.provider)
        todo = int((~done).sum())
        computed = invalid = 0
        published, cost = time.perf_counter(), self._publish()
        for start, stop in _batches(done, self.config.batch_size):
            arrays = self.batch(start, stop)
            self.writer.write(start, arrays)
            computed += stop - start
            invalid += int(arrays["invalid"].sum())
            if time.perf_counter() - published > max(PUBLISH_EVERY, 10 * cost):
                published, cost = time.perf_counter(), self._publish()
            if progress:
                progress(computed, todo, time.perf_counter() - begin)
        self.writer.finish(self._whole_datasets())
        self.data.close()
        return RunSummary(Path(self.config.out), self.count, computed, invalid,
                          time.perf_counter() - begin, self.provider)

    def _publish(self) -> float:
        begin = time.perf_counter()
        self.writer.publish()
        return time.perf_counter() - begin

    def _whole_datasets(self) -> dict[str, np.ndarray]:
        import h5py

        extra = {}
        labels = self.data.labels
        if labels is not None:
            extra["labels"] = labels[: self.count]
        names = self.data.names
        if names is not None:
            extra["names"] = np.array(names[: self.count], dtype=h5py.string_dtype())
        return extra


def run(config: RunConfig, progress=None) -> RunSummary:
    return Job(config).run(progress)


# `camexport recompute` lives in camexport.recompute; kept importable from here.
from camexport.recompute import RECOMPUTABLE, recompute  # noqa: F401
