"""The command line: thin commands over library functions.

Errors are mapped in one place, :class:`_Main`: a :class:`~camexport.errors.CamexportError` (or
an OSError: a missing file, a permission, a full disk) becomes a one-line ``Error: ...`` with exit
code 1; any other exception is a camexport bug, reported as such in one line, with its traceback
under ``camexport -v``.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import signal
import sys
import time
import traceback
from contextlib import contextmanager

import click

from camexport import __version__
from camexport.errors import CamexportError
from camexport.graph.augment import SCORE_FUNCTIONS

INTERRUPTED = "interrupted; finished samples are kept: run the same command to resume"


class _LibraryChoice(click.Choice):
    """A click.Choice of a library module's tuple (a dict: its keys), imported when first read,
    so that importing the command line does not import the module (camexport.run: 0.2 s)."""

    def __init__(self, module: str, name: str):
        self.source = (module, name)
        super().__init__(())

    @property
    def choices(self) -> tuple:
        module, name = self.source
        return tuple(getattr(importlib.import_module(module), name))

    @choices.setter
    def choices(self, value) -> None:
        """click.Choice.__init__ assigns the choices; the library tuple is the one kept."""


class _FuseOption(click.Option):
    """--fuse, whose help lists the registry's fusable methods (read when help is shown)."""

    def get_help_record(self, ctx: click.Context):
        from camexport.methods import FUSABLE

        saved, self.help = self.help, self.help.format(fusable=", ".join(FUSABLE))
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = saved


class _Main(click.Group):
    """The camexport group: the one place where errors become what the user sees."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            if ctx.invoked_subcommand == "run":
                raise click.ClickException(INTERRUPTED) from None
            raise
        except CamexportError as err:
            raise click.ClickException(str(err)) from err
        except OSError as err:
            if err.errno == errno.EPIPE:  # click's main exits quietly on a closed pipe
                raise
            raise click.ClickException(str(err)) from err
        except Exception as err:
            raise click.ClickException(_bug_report(ctx, err)) from err


def _bug_report(ctx: click.Context, err: Exception) -> str:
    """The line for an unexpected exception; the traceback goes to stderr first under -v."""
    command = ctx.invoked_subcommand or ""
    verbose = ctx.params.get("verbose", False)
    if verbose:
        click.echo("".join(traceback.format_exception(err)).rstrip(), err=True)
    where = "the traceback above" if verbose else f"the traceback that 'camexport -v {command} ...' prints"
    return (f"camexport {command} failed with an unexpected {type(err).__name__}: {err}. This is a "
            f"camexport bug: please report it, with the command and {where}")


#: set by SIGTERM: a KeyboardInterrupt raised inside a finaliser or weakref callback is printed
#: and dropped by Python ("Exception ignored in ..."), so each progress report raises it again
_TERMINATED: list[int] = []


def _raise_if_terminated() -> None:
    if _TERMINATED:
        raise KeyboardInterrupt


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM (``kill``, a scheduler stopping a job) handled as Ctrl-C: the same message, the
    same exit path (a run's finished samples kept, temporary files removed)."""

    def interrupt(signum, frame):
        _TERMINATED.append(signum)
        raise KeyboardInterrupt

    _TERMINATED.clear()
    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (an embedding application): SIGTERM left as it is
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Reporter:
    """Progress lines with elapsed time, on stderr."""

    def __init__(self, quiet: bool = False):
        self.start = time.perf_counter()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"[{time.perf_counter() - self.start:6.1f}s] {message}", err=True)


@click.group(cls=_Main)
@click.version_option(__version__, prog_name="camexport")
@click.option("-v", "--verbose", is_flag=True,
              help="Log debug messages; print the traceback of an unexpected error.")
def main(verbose: bool) -> None:
    """CAM-augmented ONNX graphs: explanations for vision models where they are deployed."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("model")
@click.option("--layer", "layers", multiple=True,
              help="Module path (layer4.2, features[-1], blocks[-1].norm1) or ONNX tensor name. "
                   "Repeatable. Default: the last spatial map before pooling.")
@click.option("--methods", default="gradcam", show_default=True,
              help="Comma-separated CAM methods the artifact is built for.")
@click.option("--arch", help="torchvision or timm constructor name, for a state_dict file.")
@click.option("--score", type=click.Choice(SCORE_FUNCTIONS), default="logit", show_default=True,
              help="Function f of the model output in score = sum(target_weights * f(output)).")
@click.option("--output", "output_name", help="Which model output the score uses (default: the first).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Artifact directory (default: artifacts/<model name>).")
@click.option("--input-size", nargs=2, type=int, metavar="H W",
              help="Input height and width to export at (default: the model's own).")
@click.option("--depth", type=int, metavar="D",
              help="3-D models (5-D input, e.g. r3d_18 clips): frames or slices, with --input-size H W.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow a whole pickled module (unpickling runs code from the file).")
@click.option("--no-maxpool-indices", is_flag=True,
              help="MaxPool gradients by comparison with the maximum instead of MaxPool's Indices "
                   "output (TensorRT has none); ties go to the first maximum, as torch.")
@click.option("--fullgrad-biases", type=_LibraryChoice("camexport.graph.outputs", "FULLGRAD_BIASES"),
              default="pgc", show_default=True,
              help="FullGrad's bias layers: pgc = modules of exactly Conv2d/BatchNorm2d type, as "
                   "pytorch-grad-cam (timm's BatchNormAct2d is not one); all = every bias, taken "
                   "before the activation.")
@click.option("--fuse", "fuse_methods", metavar="METHODS", cls=_FuseOption,
              help="Comma-separated methods whose heatmaps become graph outputs cam/<method>/<layer> "
                   "({fusable}).")
@click.option("--fuse-uint8", is_flag=True, help="Fused heatmaps as uint8 0-255 instead of float32 0-1.")
@click.option("--precision", type=_LibraryChoice("camexport.precision", "PRECISIONS"), default="fp32",
              show_default=True,
              help="fp16: float16 graph with float32 inputs, outputs and fused heads; prints its drift.")
@click.option("--overwrite", is_flag=True,
              help="Replace the artifact already in --out (at once: it stays whole until the new "
                   "one is complete).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def build(model, layers, methods, arch, score, output_name, out_dir, input_size, depth, trust_pickle,
          no_maxpool_indices, fullgrad_biases, fuse_methods, fuse_uint8, precision, overwrite, quiet):
    """Build the CAM-augmented ONNX graph of MODEL (a .pt/.pt2/.onnx file, or efficientnet-lite0)."""
    from camexport.build import build as build_artifact
    from camexport.graph.locate import AUTO_LAYER

    report = _Reporter(quiet)
    if depth is not None and not input_size:
        raise click.ClickException("--depth D goes with --input-size H W (a 5-D input: N, 3, D, H, W)")
    size = (depth, *input_size) if depth is not None else input_size or None
    result = build_artifact(model, list(layers), methods=methods, arch=arch, score=score,
                            out_dir=out_dir, trust_pickle=trust_pickle, output=output_name,
                            input_size=size, progress=report, fuse=fuse_methods,
                            fuse_uint8=fuse_uint8, precision=precision,
                            maxpool_indices=not no_maxpool_indices, fullgrad_biases=fullgrad_biases,
                            overwrite=overwrite)
    total = sum(result.timings.values())
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    for layer in result.manifest["layers"]:
        if layer["requested"] == AUTO_LAYER:
            shape = ", ".join("N" if d is None else str(d) for d in layer["shape"])
            click.echo(f"no --layer given: using {layer['tensor']} ({shape}), the last spatial "
                       f"map before pooling")
    click.echo(f"built {result.graph_path} in {total:.1f}s ({steps})")
    for layer in result.manifest["layers"]:
        click.echo(f"  layer {layer['name']}: tensor {layer['tensor']} {layer['layout']['kind']}")
    for name in result.manifest.get("fused", {}).get("outputs", []):
        click.echo(f"  fused head {name} ({result.manifest['fused']['dtype']})")
    for name, entry in result.manifest.get("fp16_drift", {}).items():
        if name.startswith("cam/") or name in result.manifest["outputs"]:
            correlation = entry.get("correlation_min")
            click.echo(f"  fp16 drift {name}: max |delta| {entry['max_abs']:.2e}"
                       + (f", min correlation {correlation:.6f}" if correlation is not None else ""))


@main.command()
@click.argument("model")
@click.option("--arch", help="torchvision or timm constructor name, for a state_dict file.")
@click.option("--trust-pickle", is_flag=True, help="Allow a whole pickled module.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--check", is_flag=True,
              help="List the ops between the layer and the output and whether each has a "
                   "gradient rule; exit 1 when one lacks it.")
@click.option("--layer", help="With --check: the layer (default: the one build would pick).")
@click.option("--input-size", nargs=2, type=int, metavar="H W",
              help="With --check: input height and width (default: the model's own).")
def inspect(model, arch, trust_pickle, as_json, check, layer, input_size):
    """List candidate layers of MODEL, or the inputs, outputs and manifest of an ARTIFACT."""
    from camexport.inspect import candidate_layers, describe_artifact, is_artifact, tail_coverage

    if check:
        report = tail_coverage(model, layer, arch=arch, trust_pickle=trust_pickle,
                               input_size=input_size or None)
        if as_json:
            click.echo(json.dumps(report, indent=2))
        else:
            click.echo(f"tail from {report['tensor']} {report['shape']} to {report['output']} "
                       f"(opset {report['opset']}):")
            for op in report["ops"]:
                status = "rule" if op["rule"] else f"MISSING: {op['why']}"
                click.echo(f"  {op['op']:<24} {op['count']:>4}  {status}")
        missing = [op["op"] for op in report["ops"] if not op["rule"]]
        if missing:
            raise click.ClickException(
                f"no gradient rule for {', '.join(missing)} on the tail of {report['tensor']}: "
                f"pick a later --layer, or add a rule in camexport/graph/rules/")
        return
    if is_artifact(model):
        info = describe_artifact(model)
        if as_json:
            click.echo(json.dumps(info, indent=2))
            return
        click.echo(f"artifact {info['path']}")
        for kind in ("inputs", "outputs"):
            click.echo(f"{kind}:")
            for name, shape in info[kind]:
                click.echo(f"  {name} {shape}")
        click.echo("manifest:")
        click.echo(json.dumps(info["manifest"], indent=2))
        return
    _Reporter()("exporting to list layers")
    rows = candidate_layers(model, arch=arch, trust_pickle=trust_pickle)
    if as_json:
        click.echo(json.dumps([{"layer": p, "tensor": t, "shape": s} for p, t, s in rows], indent=2))
        return
    width = max((len(p) for p, _, _ in rows), default=10)
    for path, tensor, shape in rows:
        click.echo(f"{path:<{width}}  {shape:<22} {tensor}")


class _Progress:
    """One self-rewriting line on stderr: done/total, images/s and ETA."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.last = 0.0

    def __call__(self, done: int, total: int, seconds: float) -> None:
        _raise_if_terminated()  # after each batch
        if self.quiet or (seconds - self.last < 0.5 and done < total):
            return
        self.last = seconds
        rate = done / seconds if seconds > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        end = "\n" if done >= total else ""
        click.echo(f"\r[{done}/{total}] {rate:.1f} img/s, ETA {int(eta) // 60}:{int(eta) % 60:02d}  ",
                   err=True, nl=False)
        if end:
            click.echo("", err=True)


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
def samples(folder):
    """Write the photos shipped in scikit-image and foolbox into FOLDER (labels in the names),
    and the ImageNet class names beside it."""
    from camexport.data import write_samples

    written = write_samples(folder)
    click.echo(f"wrote {len(written)} photos into {folder}")


@main.command()
@click.argument("images")
@click.option("--out", required=True, help="Input dataset to write (.h5).")
@click.option("--size", default=224, show_default=True,
              help="Shorter side resized to SIZE, then a centre crop.")
@click.option("--labels",
              help="CSV of 'file name,label' lines, or 'names' for labels ending file names (x_281.jpg).")
@click.option("--skip-unreadable", is_flag=True, help="Skip files that are not images instead of stopping.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --out made by camexport pack (nothing else is replaced).")
@click.option("--annotations", type=click.Path(),
              help="Boxes and masks to store with the images (resized and cropped alike): a COCO "
                   "instances .json, Pascal VOC .xml (a file or a folder) or a folder of label .png.")
@click.option("--annotation-classes", type=click.Path(),
              help='JSON mapping category name (or id) to the model\'s class index, e.g. {"cat": 281}.')
@click.option("-q", "--quiet", is_flag=True)
def pack(images, out, size, labels, skip_unreadable, overwrite, annotations, annotation_classes, quiet):
    """Pack IMAGES (a folder or a glob) into an HDF5 input dataset (/images uint8 RGB; with
    --annotations /boxes, /box_labels and /masks too)."""
    from camexport.data import pack as pack_images

    with _terminate_as_interrupt():
        count, skipped = pack_images(images, out, size=size, labels=labels, skip_unreadable=skip_unreadable,
                                     overwrite=overwrite, annotations=annotations,
                                     annotation_classes=annotation_classes)
    for path in skipped:
        click.echo(f"skipped unreadable {path}", err=True)
    if not quiet:
        click.echo(f"packed {count} images at {size}x{size} into {out}")


@main.command()
@click.argument("artifact")
@click.option("--data", required=True, help="Input dataset (.h5 with /images).")
@click.option("--out", required=True, help="Result file (.h5).")
@click.option("--methods", default="gradcam", show_default=True, help="Comma-separated CAM methods.")
@click.option("--metrics", default="",
              help="Comma-separated metrics, parameters after a colon: road-combined:20,40,60,80, "
              "road-morf:70, drop-in-confidence, deletion-auc, complexity, coherency[:METHOD], "
              "arcc[:METHOD][:20,40,60,80], adcc[:METHOD] (METHOD re-run on x*cam; default: the "
              "CAM's own), ... (camexport.metrics.METRICS; `camexport evaluate` adds them, and "
              "localisation metrics, to a finished --out).")
@click.option("--targets", default="pred", show_default=True,
              help="pred (top class), label, a class index, or concept:FILE.npy (embedding models: "
                   "cosine similarity to a (D,) concept, or (N, D), one per sample).")
@click.option("--detection-threshold", default=0.5, show_default=True,
              help="Detector artifacts: explain each image's detections scoring at least this "
                   "(of the --targets class if one is given), as pgc's detection tutorial.")
@click.option("--provider", type=_LibraryChoice("camexport.runtime", "PROVIDERS"), default="cpu",
              show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--limit", type=int, help="Only the first N samples.")
@click.option("--eigen-smooth", is_flag=True)
@click.option("--aug-smooth", is_flag=True)
@click.option("--cam-dtype", type=_LibraryChoice("camexport.run", "CAM_DTYPES"), default="float32",
              show_default=True)
@click.option("--compression", type=_LibraryChoice("camexport.store", "COMPRESSIONS"), default="gzip",
              show_default=True)
@click.option("--metric-score", type=_LibraryChoice("camexport.run", "METRIC_SCORES"), default="softmax",
              show_default=True, help="What the metrics measure for the target class.")
@click.option("--save-activations", is_flag=True, help="Keep layer activations (for camexport recompute).")
@click.option("--save-gradients", is_flag=True, help="Keep layer gradients (for camexport recompute).")
@click.option("--seed", default=0, show_default=True, help="Seed of the metrics' noise.")
@click.option("--overwrite", is_flag=True,
              help="Replace a result made by a different run (nothing but a camexport result is replaced).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: a pool of Ray actors (pip install camexport[ray]), "
                   "same results (docs/scale-out.md).")
@click.option("--address", help="--engine ray: the cluster to join (auto, ray://HOST:PORT); "
                                 "default: a local Ray on this machine.")
@click.option("--workers", help="--engine ray: actors in the pool, N or MIN:MAX (a pool that grows "
                                 "with the load)  [default: 2]")
@click.option("--cpus-per-worker", type=float, help="--engine ray: CPUs of each actor (its "
                                                    "onnxruntime threads)  [default: 1]")
@click.option("--gpus-per-worker", type=float, help="--engine ray: GPUs of each actor (e.g. 0.5, "
                                                    "with --provider cuda)  [default: 0]")
@click.option("-q", "--quiet", is_flag=True, help="No progress line.")
def run(artifact, data, out, methods, metrics, targets, detection_threshold, provider, batch_size, limit,
        eigen_smooth, aug_smooth, cam_dtype, compression, metric_score, save_activations, save_gradients,
        seed, overwrite, engine, address, workers, cpus_per_worker, gpus_per_worker, quiet):
    """Explain every image of a dataset with ARTIFACT; CAMs, outputs and metrics into --out.

    Killed, interrupted or terminated, the same command resumes where it stopped. One run at a
    time writes an --out (OUT.lock beside it); a second one is refused."""
    from camexport.run import RunConfig
    from camexport.run import run as run_job

    config = RunConfig(artifact, data, out, methods=methods.split(","),
                       metrics=[m for m in metrics.split(",") if m], targets=targets,
                       provider=provider, batch_size=batch_size, limit=limit,
                       eigen_smooth=eigen_smooth, aug_smooth=aug_smooth, cam_dtype=cam_dtype,
                       compression=compression, metric_score=metric_score,
                       save_activations=save_activations, save_gradients=save_gradients,
                       overwrite=overwrite, seed=seed, detection_threshold=detection_threshold)
    ray_options = {"address": address, "workers": workers, "cpus_per_worker": cpus_per_worker,
                   "gpus_per_worker": gpus_per_worker}
    given = [f"--{name.replace('_', '-')}" for name, value in ray_options.items() if value is not None]
    if engine == "local" and given:
        raise click.UsageError(f"{', '.join(given)} only apply to --engine ray: add --engine ray, or "
                               f"leave {'them' if len(given) > 1 else 'it'} out")
    with _terminate_as_interrupt():
        if engine == "ray":
            from camexport.ray_engine import RayOptions, run_ray

            options = RayOptions(**{name: value for name, value in ray_options.items() if value is not None})
            summary = run_ray(config, options, progress=_Progress(quiet))
        else:
            summary = run_job(config, progress=_Progress(quiet))
    if not summary.finished and not quiet:
        click.echo(f"{summary.out} is already complete ({summary.samples} samples); nothing to do")
    elif summary.computed == 0 and not quiet:  # every sample was done: this call wrote the final file
        click.echo(f"wrote {summary.out}: its {summary.samples} samples were done before; finished the file")
    elif not quiet:
        rate = summary.computed / summary.seconds if summary.seconds else 0
        click.echo(f"wrote {summary.out}: {summary.computed} samples in {summary.seconds:.1f}s "
                   f"({rate:.1f} img/s) on {summary.provider}"
                   + (f" ({summary.engine})" if summary.engine else "")
                   + (f"; {summary.invalid} with NaN/Inf pixels flagged in /invalid"
                      if summary.invalid else ""))


@main.command()
@click.argument("results")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(results, as_json):
    """Summarise a result file: counts, methods, metric means per method and the methods' ranking
    (as `camexport report`'s), provenance."""
    from camexport.report import rank_methods, ranking_lines
    from camexport.store import summary
    from camexport.store.reader import describe_state

    info = summary(results)
    ranking = rank_methods(info["metrics"], info["methods"])
    if as_json:
        click.echo(json.dumps({**info, "ranking": ranking.as_dict()}, indent=2))
        return
    state = describe_state(info)
    click.echo(f"{info['path']}: {info['done']}/{info['samples']} samples done ({state}), "
               f"{info['invalid']} invalid; provider {info['provider']}; "
               f"camexport {info['camexport_version']}")
    click.echo(f"methods: {', '.join(info['methods'])}")
    for metric, per_method in info["metrics"].items():
        click.echo(f"{metric}:")
        for name, value in per_method.items():
            click.echo(f"  {name:<20} {value: .4f}")
    for line in ranking_lines(ranking):
        click.echo(line)


@main.command()
@click.argument("results")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for index.html and its PNGs.")
@click.option("--data", help="Input dataset for the galleries' photos, if it moved since the run.")
@click.option("--top-classes", default=5, show_default=True, help="Classes in the per-class breakdown.")
@click.option("--gallery", default=4, show_default=True, help="Images in each best / worst gallery.")
@click.option("--gallery-metric", help="Metric choosing the galleries' images [default: road-combined if "
                                       "stored, else the first ranked metric].")
@click.option("--class-names", type=click.Path(exists=True, dir_okay=False),
              help="Text file, one class name per line.")
def report(results, out_dir, data, top_classes, gallery, gallery_metric, class_names):
    """An HTML report with plots: ranking, means with 95 % intervals, per-class breakdown, curves,
    best / worst galleries."""
    from camexport.render import read_class_names
    from camexport.report import report as write_report

    names = read_class_names(class_names) if class_names else None
    written = write_report(results, out_dir, data=data, top_classes=top_classes, gallery=gallery,
                           gallery_metric=gallery_metric, class_names=names,
                           inputs=[class_names] if class_names else [])
    click.echo(f"wrote {out_dir}/index.html and {len(written) - 1} PNGs")


@main.command()
@click.argument("results")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for PNGs and index.html.")
@click.option("--index", "indices", help="Comma-separated sample indices (default: all done).")
@click.option("--data", help="Input dataset, if it moved since the run.")
@click.option("--class-names", type=click.Path(exists=True, dir_okay=False),
              help="Text file, one class name per line.")
@click.option("--image-weight", default=0.5, show_default=True, help="Weight of the photo in the overlay.")
def render(results, out_dir, indices, data, class_names, image_weight):
    """Overlays (like show_cam_on_image), a grid per image across methods, and index.html."""
    from camexport.render import read_class_names, render_results

    chosen = _indices(indices) if indices else None
    names = read_class_names(class_names) if class_names else None
    written = render_results(results, out_dir, chosen, data=data, class_names=names,
                             image_weight=image_weight, inputs=[class_names] if class_names else [])
    click.echo(f"wrote {len(written)} images and {out_dir}/index.html")


def _indices(text: str) -> list[int]:
    """--index: comma-separated sample indices."""
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise click.ClickException(f"--index takes comma-separated sample indices (0,3,7), "
                                   f"not {text!r}") from None


@main.command()
@click.argument("results")
@click.option("--methods", required=True, help="Comma-separated methods to compute from saved tensors.")
@click.option("--eigen-smooth", is_flag=True)
def recompute(results, methods, eigen_smooth):
    """Add CAMs to a result file from its saved activations/gradients, without the model."""
    from camexport.run import recompute as recompute_cams

    with _terminate_as_interrupt():
        names = recompute_cams(results, methods.split(","), eigen_smooth=eigen_smooth)
    click.echo(f"added {', '.join(names)} to {results}")


@main.command()
@click.argument("results")
@click.option("--metrics", required=True,
              help="Comma-separated metrics to add: those of `run --metrics` (the model re-runs "
                   "on perturbed images) and localisation metrics against the input's /boxes "
                   "(pointing-game, iou, maxboxacc, gini, ...).")
@click.option("--data", help="Input dataset, if it moved since the run.")
@click.option("--artifact", help="Artifact directory, if it moved since the run.")
@click.option("--overwrite-metrics", is_flag=True, help="Recompute metrics the file holds already.")
@click.option("--provider", type=_LibraryChoice("camexport.runtime", "PROVIDERS"), default="cpu",
              show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress line.")
def evaluate(results, metrics, data, artifact, overwrite_metrics, provider, quiet):
    """Add metrics to a finished result file without recomputing its CAMs.

    Killed, interrupted or terminated, the same command resumes where it stopped; the file is
    replaced only once every score is computed (its CAMs, outputs and metrics are never lost)."""
    from camexport.evaluate import evaluate_results

    with _terminate_as_interrupt():
        summary = evaluate_results(results, metrics, data=data, artifact=artifact,
                                   overwrite=overwrite_metrics, provider=provider, progress=_Progress(quiet))
    for name in summary.skipped:
        click.echo(f"{name} is in {results} already: skipped (--overwrite-metrics recomputes it)", err=True)
    if summary.added:
        click.echo(f"added {', '.join(summary.added)} to {results} ({summary.seconds:.1f}s)")


if __name__ == "__main__":
    sys.exit(main())
