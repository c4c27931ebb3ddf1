"""``camexport recompute``: CAMs of a finished result file from its saved activations, gradients
and outputs alone, without the model (the file must come from a run with --save-activations and,
for gradient methods, --save-gradients). Reads and edits go through :mod:`camexport.store`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from camexport.methods import METHODS, RECOMPUTABLE, canonical_methods, method
from camexport.methods.inputs import CamInputs
from camexport.methods.pipeline import to_channel_first
from camexport.store import OutputLock, ResultReader, edit_results
from camexport.targets import ClassifierOutputTarget
from camexport.tasks import RunError

__all__ = ["RECOMPUTABLE", "recompute"]


def _check(results: Path, names: list[str]) -> None:
    """RunError unless ``results`` is finished and holds every tensor ``names`` need."""
    with ResultReader(results) as stored:
        if not stored.complete:
            raise RunError(f"{results} is not finished; run the same `camexport run` command again first")
        wants_gradients = any(METHODS[m].gradients for m in names)
        for layer in stored.manifest["layers"]:
            for group, needed in (("activations", True), ("gradients", wants_gradients)):
                if needed and not stored.has(f"{group}/{layer['name']}"):
                    raise RunError(f"{results} has no /{group}/{layer['name']}; run with "
                                   f"--save-activations --save-gradients to recompute later")


def _inputs(stored: ResultReader, rows: np.ndarray, size: tuple[int, ...], layers: list[dict]) -> CamInputs:
    """What a method reads for samples ``rows``, from the stored tensors (no input images)."""
    raw = [stored.activations(layer["name"], rows) for layer in layers]
    grads = [stored.gradients(layer["name"], rows) if stored.has(f"gradients/{layer['name']}") else None
             for layer in layers]
    layouts = [layer["layout"] for layer in layers]
    return CamInputs(
        x=np.broadcast_to(np.zeros((), np.float32), (len(rows), 3, *size)),
        outputs=stored.outputs(rows=rows),
        targets=[ClassifierOutputTarget(int(t)) for t in stored.targets(rows)],
        activations=[to_channel_first(a, lay) for a, lay in zip(raw, layouts)],
        gradients=[None if g is None else to_channel_first(g, lay) for g, lay in zip(grads, layouts)],
        raw_activations=raw, layouts=layouts)


def recompute(results: str | Path, methods, eigen_smooth: bool = False, batch_size: int = 64) -> list[str]:
    """Add (or replace) /cams/<method> in a finished result file from its saved tensors; returns
    the methods' canonical names. RunError for a method that needs the model, an unfinished
    file or missing tensors.

    Works on a copy that replaces the file at the end, so an interruption loses nothing; holds
    the file's lock (:class:`camexport.store.OutputLock`), so a run writing it refuses, and the
    other way round."""
    results = Path(results)
    names = canonical_methods(methods)
    refused = [m for m in names if m not in RECOMPUTABLE]
    if refused:
        raise RunError(f"{', '.join(refused)} need the model; recompute handles {', '.join(RECOMPUTABLE)}; "
                       f"use `camexport run` for the others")
    ResultReader(results).close()  # a missing or foreign file is refused before any lock file
    with OutputLock(results, "recompute"):
        _check(results, names)
        _edit(results, names, eigen_smooth, batch_size)
    return names


def _edit(results: Path, names: list[str], eigen_smooth: bool, batch_size: int) -> None:
    with edit_results(results) as edit:
        stored = edit.reader
        manifest = stored.manifest
        size = tuple(manifest["preprocessing"]["size"])
        count = stored.count
        usable = stored.done & ~stored.invalid
        layers = manifest["layers"]
        for name in names:
            cams = edit.replace_cams(name, (count, *size))
            implementation = method(name)
            for start in range(0, count, batch_size):
                rows = np.flatnonzero(usable[start:start + batch_size]) + start
                if not len(rows):
                    continue
                cams[rows] = implementation(_inputs(stored, rows, size, layers), eigen_smooth)
        done_before = stored.attrs.get("recomputed", [])
        edit.set_attr("recomputed", sorted(set(done_before) | set(names)))
