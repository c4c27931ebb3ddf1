"""What `camexport inspect` reports: candidate layers of a model, or an artifact's contents."""

from __future__ import annotations

from pathlib import Path

from camexport.artifact import AUGMENTED_FILE, FILES, get_manifest, read_artifact, verify_artifact
from camexport.build import export_plain
from camexport.detection import layer_aliases
from camexport.graph.augment import upgrade_opset
from camexport.graph.builder import GraphFacts
from camexport.graph.locate import AUTO_LAYER, module_outputs, resolve
from camexport.graph.rules import NO_GRADIENT, REFUSED, find_rule
from camexport.load import load, read_onnx


def _shape_text(shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def is_artifact(path: str) -> bool:
    """Whether ``path`` is meant as an artifact: a directory holding any artifact file, or an
    .onnx graph carrying a camexport manifest (a corrupt .onnx: a LoadError naming it)."""
    p = Path(path)
    if p.is_dir():
        return any((p / name).exists() for name in FILES)
    if p.suffix == ".onnx" and p.is_file():
        return p.name == AUGMENTED_FILE or get_manifest(read_onnx(p, external_data=False)) is not None
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
    """The inputs, outputs and manifest of the artifact ``path``, once verified
    (:func:`camexport.artifact.verify_artifact`)."""
    directory, _ = verify_artifact(path)
    graph_path = directory / AUGMENTED_FILE
    model, manifest = read_artifact(directory)

    def values(infos):
        return [(v.name, _shape_text(
            [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]))
            for v in infos]

    return {"path": str(graph_path), "inputs": values(model.graph.input),
            "outputs": values(model.graph.output), "manifest": manifest}


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
