"""What `camexport inspect` reports: candidate layers of a model, or an artifact's contents."""

from __future__ import annotations

from pathlib import Path

import onnx

from camexport.build import AUGMENTED_FILE
from camexport.export import to_onnx
from camexport.graph.augment import get_manifest
from camexport.graph.builder import GraphFacts
from camexport.graph.locate import module_outputs
from camexport.load import load


def _shape_text(shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def is_artifact(path: str) -> bool:
    p = Path(path)
    if p.is_dir():
        return (p / AUGMENTED_FILE).is_file()
    if p.suffix == ".onnx" and p.is_file():
        return get_manifest(onnx.load(str(p), load_external_data=False)) is not None
    return False


def candidate_layers(model: str, arch: str | None = None, trust_pickle: bool = False) -> list[tuple]:
    """(module path, tensor, shape text) for every module whose output is one tensor."""
    plain = to_onnx(load(model, arch=arch, trust_pickle=trust_pickle))
    facts = GraphFacts(plain)
    order = {v: k for k, node in enumerate(plain.graph.node) for v in node.output}
    rows = []
    for path, candidate in module_outputs(plain, facts).items():
        if len(candidate.tensors) != 1:
            continue
        tensor = candidate.tensors[0]
        rows.append((order.get(tensor, -1), path, tensor, _shape_text(facts.shape(tensor))))
    return [row[1:] for row in sorted(rows)]


def describe_artifact(path: str) -> dict:
    p = Path(path)
    graph_path = p / AUGMENTED_FILE if p.is_dir() else p
    model = onnx.load(str(graph_path), load_external_data=False)

    def values(infos):
        return [(v.name, _shape_text(
            [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]))
            for v in infos]

    return {"path": str(graph_path), "inputs": values(model.graph.input),
            "outputs": values(model.graph.output), "manifest": get_manifest(model)}
