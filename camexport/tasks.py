"""One Task per kind of model: what differs between a classifier, a segmentation model, an
embedding explained against concepts, a detector and a 3-D model, in one place.

The kind is picked once (:func:`task_for`, from the artifact's manifest and output, and the run's
``--targets``); :class:`camexport.explain.Explainer` and :class:`camexport.run.Job` then call the
same hooks on every kind and never ask which kind they run:

- ``classes``, ``has_top_class``, ``bind(targets)``, ``detection``: what the Explainer needs;
- ``check(job)``: refuse a run this kind cannot do, naming the fix;
- ``run_targets(job)``: a function (start, stop) -> the targets asked for on those samples;
- ``prepare(job, x, chosen)``: the targets to explain on a batch and the kind's own arrays
  (a detector's detections);
- ``stored_classes``, ``output_arrays``, ``metric_targets``: what goes into the result file.

A new kind of model (a two-stage detector, keypoints) is a new Task class here and a line
in :func:`task_for`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from camexport.errors import CamexportError
from camexport.store import StoreError
from camexport.targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget


class RunError(CamexportError, ValueError):
    """A run that cannot start as asked, with what to change."""


class Task:
    """A classifier: (K,) logits per image; targets are classes, the default its top class."""

    #: whether each sample has a top class to explain by default (a (K,) output)
    has_top_class = True
    #: a detector's post-processing (camexport.detection.DetectorSpec), None for other kinds
    detection = None
    #: whether the Explainer may run the graph's image-only head once and its target-dependent
    #: tail per target (camexport.graph.cut.split_by_targets)
    splits = True
    #: whether the model can run from a layer's tensors on (Explainer.tail: DFF's concept scores,
    #: AblationCAM)
    cuts = True

    def __init__(self, manifest: dict, output_shape: tuple[int, ...]):
        self.manifest = manifest
        self.output_shape = output_shape

    @property
    def classes(self) -> int:
        """K: classes (or values) per image of the explained output."""
        return self.output_shape[0]

    def bind(self, targets):
        """The caller's targets, completed with what this kind knows (a detector's spec)."""
        return targets

    def session(self, made, explainer):
        """A session of the artifact's graph (or a part of it) as the Explainer runs it: the
        image (and target weights) in. Two-stage detectors compute their proposals there."""
        return made

    def release(self) -> None:
        """Drop the sessions this kind holds of its own (Explainer.release)."""

    def check_cut(self, explainer, what: str) -> None:
        """Refuse running the model from a layer on (``what``: the method's need), where the
        graph cannot be cut there."""

    def ablate(self, explainer, layer: int, channels: np.ndarray, values: np.ndarray,
               image: np.ndarray) -> np.ndarray | None:
        """The model outputs of ``image`` (1, ...) with layer ``layer``'s channel ``channels[i]``
        ablated in row i, where this kind ablates in its own way (a two-stage detector's FPN
        levels); None: the Explainer's tail with ``values`` filled in."""
        return None

    def head_outputs(self, graph_outputs) -> tuple[str, ...]:
        """Graph outputs that a split's head computes besides the methods' (an Ultralytics
        segment model's mask prototypes), handed to :meth:`keep_head` when it runs."""
        return ()

    def keep_head(self, x: np.ndarray, head: dict) -> None:
        """Keep what this kind needs of a split head's run on images ``x`` (:meth:`head_outputs`);
        ``x`` is the Explainer's own copy, which this kind may keep as it is."""

    def with_extras(self, explainer, x: np.ndarray, outputs: np.ndarray, found: list) -> list:
        """The detections ``found`` of images ``x`` (model ``outputs``), with their masks or
        keypoints where this kind has them (a Mask R-CNN, an Ultralytics segment or pose model)."""
        return found

    def detections(self, outputs: np.ndarray, source) -> list:
        """Per image, the detections in the model's ``outputs`` (detectors only)."""
        from camexport.detection import DetectionError

        raise DetectionError(f"{source} is not a detector artifact (built from a torchvision "
                             f"RetinaNet or FCOS)")

    # -- camexport run ---------------------------------------------------------------------
    def check(self, job) -> None:
        """Refuse a run this kind cannot do, naming the fix."""

    def run_targets(self, job) -> Callable[[int, int], list | None]:
        """A function (start, stop) -> targets of those samples (None: each one's top class)."""
        return class_targets(job.config, job.data, job.count, self.classes)

    def prepare(self, job, x: np.ndarray, chosen: list | None, rows: np.ndarray,
                n: int) -> tuple[list | None, dict]:
        """The targets to explain on the valid images ``x`` (rows ``rows`` of a batch of ``n``),
        given the targets asked for them, and this kind's own arrays for the result file
        (``n`` rows each)."""
        return chosen, {}

    def stored_classes(self, asked: list | None, resolved: list) -> list[int]:
        """What ``/targets`` holds for each explained sample."""
        return [getattr(t, "category", -1) for t in resolved]

    def output_arrays(self, name: str, outputs: np.ndarray) -> dict[str, np.ndarray]:
        """The model outputs as they are stored."""
        return {f"outputs/{name}": outputs}

    def metric_targets(self, config, classes: np.ndarray, chosen: list | None) -> list:
        """The targets the metrics score: the explained class, softmax or logit."""
        kind = ClassifierOutputSoftmaxTarget if config.metric_score == "softmax" else ClassifierOutputTarget
        return [kind(int(c)) for c in classes]


class VolumeTask(Task):
    """A classifier of 3-D inputs (clips, volumes): CAMs are volumes; no metrics."""

    def check(self, job) -> None:
        size = tuple(job.prep["size"])
        text = "x".join(map(str, size))
        if not job.data.preprocessed:
            raise StoreError(
                f"the artifact takes {len(size)}-D inputs ({text}): store them in "
                f"{job.config.data}:/images as (N, 3, {', '.join(map(str, size))}) float32, "
                f"preprocessed")
        if job.config.metrics:
            raise RunError(f"metrics ({', '.join(job.config.metrics)}) work on 2-D images; the artifact "
                           f"takes {len(size)}-D inputs ({text}): run without --metrics")


class ConceptTask(Task):
    """An embedding model explained against concept embeddings (``--targets concept:FILE``):
    the cosine similarity to the concept is the target and what the metrics score."""

    def run_targets(self, job):
        return concept_targets(str(job.config.targets).split(":", 1)[1], job.count, self.classes)

    def metric_targets(self, config, classes, chosen):
        return chosen  # the similarity itself, whatever --metric-score says


class SegmentationTask(Task):
    """A (K, H, W) output: a class is explained through the pixels the model assigns to it,
    as pgc's SemanticSegmentationTarget tutorial; there is no top class."""

    has_top_class = False

    def check(self, job) -> None:
        if str(job.config.targets) == "pred" or job.config.metrics:
            raise RunError(f"the model output is {self.output_shape} per sample (segmentation): "
                           f"give --targets CLASS or label (the pixels the model assigns to that class "
                           f"are explained), and no --metrics")

    def prepare(self, job, x, chosen, rows, n):
        """Class c: the pixels assigned to c (SemanticSegmentationTarget(c, argmax == c));
        one plain forward."""
        from camexport.targets import SemanticSegmentationTarget

        if chosen is None or not len(rows):
            return chosen, {}
        predicted = job.explainer.forward(x).argmax(axis=1)
        return [SemanticSegmentationTarget(int(c), np.float32(p == c)) for c, p in zip(chosen, predicted)], {}


class DetectorTask(Task):
    """A torchvision RetinaNet/FCOS split at its head outputs (camexport.detection): rows per
    anchor; each image explains its detections scoring at least --detection-threshold."""

    has_top_class = False

    def __init__(self, manifest, output_shape):
        from camexport.detection import DetectorSpec

        super().__init__(manifest, output_shape)
        self.detection = DetectorSpec.from_dict(manifest["detection"])

    @property
    def classes(self) -> int:
        return self.detection.classes

    def bind(self, targets):
        from camexport.detection import bind

        return bind(targets, self.detection)

    def detections(self, outputs, source):
        """torchvision's post-processing of each image's rows (camexport.detection.postprocess)."""
        from camexport.detection import postprocess

        return [postprocess(rows, self.detection) for rows in outputs]

    def prepare(self, job, x, chosen, rows, n):
        """Each image's detections and, as pgc's tutorial, its target: the detections scoring
        at least --detection-threshold (of the --targets class, if one); one plain forward."""
        from camexport.detection import detection_targets

        if not len(rows):
            return chosen, self._detection_arrays([], [], rows, n)
        found = job.explainer.detect(x, methods=job.config.methods)  # the explanation reuses its run
        classes = chosen or [None] * len(x)
        targets = [detection_targets(f, job.config.detection_threshold, c, spec=self.detection)
                   for f, c in zip(found, classes)]
        return targets, self._detection_arrays(found, targets, rows, n)

    def _detection_arrays(self, found: list, targets: list, rows: np.ndarray,
                          n: int) -> dict[str, np.ndarray]:
        """Per image, the detections padded to detections_per_img (NaN, label -1 past count;
        a Mask R-CNN's box masks as probabilities x 255 in uint8, 0 past count; a segment model's
        masks, 0 past count; a pose model's keypoints, NaN past count), and how many of
        them the CAMs explain (``detections/explained``; 0: none scores at least
        --detection-threshold, so target-dependent CAMs are all zero)."""
        most = self.detection.detections_per_img
        arrays = {"detections/boxes": np.full((n, most, 4), np.nan, np.float32),
                  "detections/scores": np.full((n, most), np.nan, np.float32),
                  "detections/labels": np.full((n, most), -1, np.int32),
                  "detections/count": np.zeros(n, np.int32),
                  "detections/explained": np.zeros(n, np.int32)}
        settings = self.detection.settings or {}
        extras = {}  # name: (empty array, detection field, conversion)
        if "mask" in settings:  # a Mask R-CNN
            side = settings["mask"]["resolution"]
            extras["box_masks"] = (np.zeros((n, most, side, side), np.uint8),
                                   lambda v: np.rint(np.clip(v, 0, 1) * 255))
        if settings.get("task") == "segment":
            extras["masks"] = (np.zeros((n, most, *settings["proto_size"]), np.uint8), None)
        if settings.get("task") == "pose":
            extras["keypoints"] = (np.full((n, most, *settings["keypoint_shape"]), np.nan, np.float32), None)
        for row, f, target in zip(rows, found, targets):
            for name, (values, convert) in extras.items():
                if len(f):
                    given = getattr(f, name)
                    values[row, :len(f)] = given if convert is None else convert(given)
            arrays["detections/boxes"][row, :len(f)] = f.boxes
            arrays["detections/scores"][row, :len(f)] = f.scores
            arrays["detections/labels"][row, :len(f)] = f.labels
            arrays["detections/count"][row] = len(f)
            arrays["detections/explained"][row] = len(target.labels)
        arrays.update({f"detections/{name}": values for name, (values, _) in extras.items()})
        return arrays

    def stored_classes(self, asked, resolved):
        # -1: the detector's own detections (--targets pred)
        return [-1] * len(resolved) if asked is None else list(asked)

    def output_arrays(self, name, outputs):
        return {}  # rows per anchor are summarised as /detections

    def metric_targets(self, config, classes, chosen):
        return chosen


class YoloTask(DetectorTask):
    """An Ultralytics YOLO detect, segment or pose model (camexport.yolo): rows per anchor as
    for torchvision's detectors, post-processed as Ultralytics' non_max_suppression (the
    manifest's settings); images are letterboxed (the manifest's preprocessing ``resize``).
    A segment model's plain forward also keeps its batch's mask prototypes for the masks of
    its detections; a pose model's keypoints are columns of its rows."""

    def __init__(self, manifest, output_shape):
        super().__init__(manifest, output_shape)
        self.yolo_task = (self.detection.settings or {}).get("task", "detect")
        #: the last plain forward's (images, mask prototypes) of a segment model (or the split
        #: head's that detect(methods=...) ran)
        self.protos: tuple | None = None

    def session(self, made, explainer):
        from camexport.detection import PROTOS

        if self.yolo_task == "segment" and PROTOS in {o.name for o in made.get_outputs()}:
            return _ProtoKeeper(made, self)
        return made

    def release(self):
        self.protos = None

    def head_outputs(self, graph_outputs):
        from camexport.detection import PROTOS

        return (PROTOS,) if self.yolo_task == "segment" and PROTOS in graph_outputs else ()

    def keep_head(self, x, head):
        from camexport.detection import PROTOS

        if PROTOS in head:
            self.protos = (x, head[PROTOS])

    def with_extras(self, explainer, x, outputs, found):
        """Pose: each detection's keypoints from its row. Segment: its mask
        (camexport.yolo.instance_masks) from its row's coefficients and the prototypes that the
        forward which gave ``outputs`` kept (or of a forward of each image, where that forward
        ran ``x`` in several chunks)."""
        from camexport.detection import BOX, same_batch
        from camexport.yolo import instance_masks

        if self.yolo_task not in ("segment", "pose"):
            return found
        start = BOX + self.detection.classes
        if self.yolo_task == "pose":
            shape = self.detection.settings["keypoint_shape"]
            for rows, f in zip(outputs, found):
                f.keypoints = rows[f.anchors, start:].reshape(len(f), *shape)
            return found
        x = np.ascontiguousarray(x, np.float32)
        if self.protos is None or not same_batch(self.protos[0], x):
            protos = []
            for k in range(len(x)):
                explainer.forward(x[k:k + 1])
                protos.append(self.protos[1][0])
        else:
            protos = self.protos[1]
        size = self.detection.image_size
        for rows, f, image_protos in zip(outputs, found, protos):
            f.masks = instance_masks(rows[f.anchors, start:], image_protos, f.boxes, size)
        return found


class _ProtoKeeper:
    """A segment model's plain session: a run for the detections also fetches the mask
    prototypes and keeps them with the batch's key (YoloTask.protos)."""

    def __init__(self, inner, task: YoloTask):
        self.inner, self.task = inner, task
        self.image_name = inner.get_inputs()[0].name

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, names, feed, *args):
        from camexport.detection import DETECTIONS, PROTOS

        if list(names) != [DETECTIONS]:
            return self.inner.run(names, feed, *args)
        rows, protos = self.inner.run([DETECTIONS, PROTOS], feed, *args)
        self.task.protos = (np.array(feed[self.image_name], np.float32), protos)
        return [rows]


class TwoStageTask(DetectorTask):
    """A torchvision Faster R-CNN (camexport.two_stage): the artifact's box graph takes the
    image and its proposals, which every run computes from the image with the artifact's RPN
    graph and torchvision's rules in numpy, as the model does on every forward (ScoreCAM's
    masked images get their own proposals, as in pgc). Rows per proposal and class."""

    splits = False  # the tail after the split would need the proposals too
    cuts = False

    def __init__(self, manifest, output_shape):
        super().__init__(manifest, output_shape)
        self.output_shape = self.detection.row_shape  # (P, C, 5): P is free in the graph
        self._source = None
        self._ablation = None
        self._levels: tuple | None = None
        self._masks = None

    def _proposals(self, explainer):
        """The ProposalSource of the artifact's RPN graph, made on first use."""
        from camexport import two_stage

        if self._source is None:
            from camexport.artifact import read_extra, read_plain
            from camexport.runtime import session

            rpn = read_extra(explainer.path, two_stage.RPN_GRAPH, explainer.manifest)
            boxes = two_stage.PooledBoxes(read_plain(explainer.path, explainer.manifest), self.detection,
                                          _part_sessions(explainer))
            self._source = two_stage.ProposalSource(session(rpn, explainer.provider), self.detection,
                                                    explainer.forward, boxes)
        return self._source

    def session(self, made, explainer):
        from camexport import two_stage

        return two_stage.ProposalSession(made, self._proposals(explainer), explainer.input_name)

    def release(self):
        self._source = self._ablation = self._levels = self._masks = None

    def with_extras(self, explainer, x, outputs, found):
        """A Mask R-CNN's detections with their masks (camexport.two_stage.Masks) on the FPN
        levels of the forward that detected them (kept by the ProposalSource), or, where the
        forward ran ``x`` in several chunks, of an RPN graph run per image."""
        from camexport import two_stage

        if "mask" not in self.detection.settings or not any(len(f) for f in found):
            return found
        source = self._proposals(explainer)
        if self._masks is None:
            from camexport.artifact import read_extra
            from camexport.runtime import session

            plain = read_extra(explainer.path, two_stage.MASK_GRAPH, explainer.manifest)
            self._masks = two_stage.Masks(session(plain, explainer.provider, spin=False), self.detection)
        x = np.ascontiguousarray(x, np.float32)
        key = source.key(x)
        if source.kept_levels is not None and source.kept_levels[0] == key:
            for f, masks in zip(found, self._masks(source.levels(x, key), found)):
                f.box_masks = masks
            return found
        for k, f in enumerate(found):
            image = x[k:k + 1]
            f.box_masks = self._masks(source.levels(image, source.key(image)), [f])[0]
        return found

    def check_cut(self, explainer, what):
        from camexport.detection import DetectionError

        raise DetectionError(
            f"{what} runs the model from the layer on, and a two-stage detector's box head also "
            f"reads proposals chosen from the image: on Faster R-CNN only the FPN levels can be "
            f"ablated (build with --layer backbone, pgc's AblationLayerFasterRCNN). Use the "
            f"gradient methods, EigenCAM or ScoreCAM on other layers")

    def ablate(self, explainer, layer, channels, values, image):
        """pgc's AblationLayerFasterRCNN on the layer ``backbone`` (camexport.two_stage.LevelAblation;
        ``values`` are not used: ablated channels are set to -1000); other layers are refused."""
        from camexport import two_stage
        from camexport.detection import STACK

        if explainer.layers[layer]["tensor"] != STACK:
            self.check_cut(explainer, "AblationCAM")
        source = self._proposals(explainer)
        if self._ablation is None:
            from camexport.artifact import read_extra

            rpn = read_extra(explainer.path, two_stage.RPN_GRAPH, explainer.manifest)
            self._ablation = two_stage.LevelAblation(
                rpn, source.boxes, self.detection, _part_sessions(explainer))
        key = source.key(image)
        if self._levels is None or self._levels[0] != key:  # AblationCAM asks per chunk of channels
            self._levels = (key, self._ablation.for_image(source.run(image, key, levels=True)))
        return self._levels[1](channels)


def _part_sessions(explainer):
    """How sessions of a two-stage detector's per-level cuts are made: their threads do not spin
    (the cuts run in turn) and they keep no memory arena (nine sessions per artifact, each
    would keep its peak: a CI worker holding four Faster R-CNN explainers ran out of memory)."""
    from camexport.runtime import session

    return lambda model: session(model, explainer.provider, spin=False, arena=False)


def task_for(manifest: dict, output_shape: tuple[int, ...], targets: str | None = None) -> Task:
    """The Task of an artifact (its manifest and per-sample output shape) and, for a run, its
    ``--targets``."""
    if "detection" in manifest:
        kind = manifest["detection"].get("kind")
        kinds = {"yolo": YoloTask, "fasterrcnn": TwoStageTask}
        return kinds.get(kind, DetectorTask)(manifest, output_shape)
    if len(output_shape) > 1:
        return SegmentationTask(manifest, output_shape)
    if len(manifest["preprocessing"]["size"]) != 2:
        return VolumeTask(manifest, output_shape)
    if str(targets).startswith("concept:"):
        return ConceptTask(manifest, output_shape)
    return Task(manifest, output_shape)


# -- targets of a run -------------------------------------------------------------------------
def class_targets(config, data, count: int, classes: int):
    """--targets pred, label or a class index: a function (start, stop) -> targets."""
    mode = str(config.targets)
    if mode == "pred":
        return lambda start, stop: None
    if mode == "label":
        labels = data.labels
        if labels is None:
            raise RunError(f"--targets label, but {data.path} has no /labels; use --targets pred "
                           f"or a class index, or pack with --labels")
        labels = labels[:count]
        bad = np.flatnonzero((labels < 0) | (labels >= classes))
        if len(bad):
            raise RunError(f"--targets label: {len(bad)} samples (first: sample {bad[0]}, label "
                           f"{labels[bad[0]]}) have no label in 0..{classes - 1}, the model's classes: "
                           f"use --targets pred, or a dataset whose /labels are this model's classes")
        return lambda start, stop: [int(v) for v in labels[start:stop]]
    try:
        category = int(mode)
    except ValueError:
        raise RunError(f"--targets must be pred, label, a class index or concept:FILE.npy, "
                       f"not {mode!r}") from None
    if not 0 <= category < classes:
        raise RunError(f"--targets {category} is out of range for a model with {classes} classes: "
                       f"pass a class index in 0..{classes - 1}, or pred")
    return lambda start, stop: [category] * (stop - start)


def concept_targets(path: str, count: int, size: int):
    """Targets from a concept embedding file: (D,) for every sample or (N, D), one per sample."""
    from camexport.targets import SimilarityToConceptTarget, TargetError

    try:
        concepts = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise RunError(f"--targets concept:{path}: not a readable .npy file ({err}); pass a file "
                       f"saved with numpy.save, holding a (D,) or (N, D) array") from err
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


def concept_sha256(targets: str) -> str | None:
    """The concept file's hash: a run with another concept in the same file is another run."""
    from camexport.load import sha256

    path = Path(targets.split(":", 1)[1]) if targets.startswith("concept:") else None
    return sha256(path) if path and path.is_file() else None
