"""The command line: thin commands over library functions; errors become ClickException."""

from __future__ import annotations

import json
import logging
import sys
import time

import click

from camexport import __version__
from camexport.graph.augment import SCORE_FUNCTIONS


#: Errors that carry a message meant for the user (raised by the library).
def _user_errors():
    from camexport.export import ExportError
    from camexport.graph.autodiff import GradientError
    from camexport.graph.locate import LayerError
    from camexport.load import LoadError
    from camexport.methods import MethodError
    from camexport.runtime import ProviderError

    return (LoadError, ExportError, LayerError, GradientError, MethodError, ProviderError,
            ValueError)


class _Reporter:
    """Progress lines with elapsed time, on stderr."""

    def __init__(self, quiet: bool = False):
        self.start = time.perf_counter()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"[{time.perf_counter() - self.start:6.1f}s] {message}", err=True)


@click.group()
@click.version_option(__version__, prog_name="camexport")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """CAM-augmented ONNX graphs: explanations for vision models where they are deployed."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("model")
@click.option("--layer", "layers", multiple=True, required=True,
              help="Module path (layer4.2, features[-1], blocks[-1].norm1) or ONNX tensor name. Repeatable.")
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
@click.option("--trust-pickle", is_flag=True,
              help="Allow a whole pickled module (unpickling runs code from the file).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def build(model, layers, methods, arch, score, output_name, out_dir, input_size, trust_pickle, quiet):
    """Build the CAM-augmented ONNX graph of MODEL (a .pt/.pt2/.onnx file, or efficientnet-lite0)."""
    from camexport.build import build as build_artifact

    report = _Reporter(quiet)
    try:
        result = build_artifact(model, list(layers), methods=methods, arch=arch, score=score,
                                out_dir=out_dir, trust_pickle=trust_pickle, output=output_name,
                                input_size=input_size or None, progress=report)
    except _user_errors() as err:
        raise click.ClickException(str(err)) from err
    total = sum(result.timings.values())
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    click.echo(f"built {result.graph_path} in {total:.1f}s ({steps})")
    for layer in result.manifest["layers"]:
        click.echo(f"  layer {layer['name']}: tensor {layer['tensor']} {layer['layout']['kind']}")


@main.command()
@click.argument("model")
@click.option("--arch", help="torchvision or timm constructor name, for a state_dict file.")
@click.option("--trust-pickle", is_flag=True, help="Allow a whole pickled module.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(model, arch, trust_pickle, as_json):
    """List candidate layers of MODEL, or the inputs, outputs and manifest of an ARTIFACT."""
    from camexport.inspect import candidate_layers, describe_artifact, is_artifact

    try:
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
    except _user_errors() as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(json.dumps([{"layer": p, "tensor": t, "shape": s} for p, t, s in rows], indent=2))
        return
    width = max((len(p) for p, _, _ in rows), default=10)
    for path, tensor, shape in rows:
        click.echo(f"{path:<{width}}  {shape:<22} {tensor}")


if __name__ == "__main__":
    sys.exit(main())
