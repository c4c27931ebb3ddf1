"""What `camexport inspect` reports: candidate layers of a model, or an artifact's contents."""

from __future__ import annotations

from pathlib import Path

import onnx

from camexport.artifact import AUGMENTED_FILE, get_manifest
from camexport.build import export_plain
from camexport.detection import layer_aliases
from camexport.graph.augment import upgrade_opset
from camexport.graph.builder import GraphFacts
from camexport.graph.locate import AUTO_LAYER, module_outputs, resolve
from camexport.graph.rules import NO_GRADIENT, REFUSED, find_rule
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
    plain, _ = export_plain(load(model, arch=arch, trust_pickle=trust_pickle))
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


def tail_coverage(model: str, layer: str | None = None, arch: str | None = None,
                  trust_pickle: bool = False, input_size: tuple[int, int] | None = None) -> dict:
    """Every op type on the tail (from ``layer``, default the auto-picked one, to the first
    output), with its node count and whether a gradient rule covers it (``rule``; ``why`` says
    what is missing otherwise), at the opset camexport differentiates in. The tail is what
    :func:`camexport.graph.autodiff.differentiate` walks: ops without gradient (Shape, ...) are
    not on it."""
    loaded = load(model, arch=arch, trust_pickle=trust_pickle)
    if input_size:
        loaded.preprocessing.size = tuple(input_size)
    plain, detector = export_plain(loaded)
    plain = upgrade_opset(plain)
    facts = GraphFacts(plain)
    label, tensor = resolve(plain, layer or AUTO_LAYER, facts, layer_aliases(detector))
    nodes = list(plain.graph.node)
    output = plain.graph.output[0].name
    # the nodes the reverse-mode driver visits (autodiff.differentiate prunes the same way)
    depends = {tensor}
    for node in nodes:
        if node.op_type not in NO_GRADIENT and any(i in depends for i in node.input):
            depends.update(o for o in node.output if facts.is_float(o))
    reaches = {output}
    for node in reversed(nodes):
        if node.op_type not in NO_GRADIENT and any(o in reaches for o in node.output):
            reaches.update(i for i in node.input if facts.is_float(i))
    counts: dict[tuple[str, str], int] = {}
    for node in nodes:
        if node.op_type not in NO_GRADIENT and any(i in depends for i in node.input) and any(
                o in reaches for o in node.output):
            key = (node.domain, node.op_type)
            counts[key] = counts.get(key, 0) + 1
    ops = []
    for (domain, op_type), count in counts.items():
        missing = find_rule(op_type, facts.opset, domain) is None
        why = REFUSED.get(op_type, "no gradient rule is registered for this op") if missing else ""
        ops.append({"op": f"{domain}.{op_type}" if domain else op_type, "count": count,
                    "rule": not missing, "why": why})
    return {"layer": label, "tensor": tensor, "shape": _shape_text(facts.shape(tensor)),
            "output": output, "opset": facts.opset, "ops": ops}
