"""One generic checker for every VJP rule: the dot-product identity <J^T u, v> = <u, J v>.

J v is measured by central finite differences in float64 on onnx's reference evaluator; J^T u
is the graph our driver emits. The same backward graph also runs under onnxruntime in float32,
which must agree with the float64 reference to float32 round-off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _RefConvTranspose
from onnx.reference.ops.op_erf import Erf as _RefErf
from scipy.special import erf

from camexport.graph.autodiff import differentiate
from camexport.graph.builder import Builder, GraphFacts


class Erf(_RefErf):
    """The reference Erf rounds through float32; the float64 check needs float64."""

    def _run(self, x):
        return (erf(x).astype(x.dtype),)


class Gelu(OpRun):
    """The reference expands Gelu through a float32 Erf; evaluate it in float64."""

    def _run(self, x, approximate="none"):
        if approximate == "tanh":
            inner = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
            return ((0.5 * x * (1 + np.tanh(inner))).astype(x.dtype),)
        return ((0.5 * x * (1 + erf(x / np.sqrt(2)))).astype(x.dtype),)


class ConvTranspose(_RefConvTranspose):
    """The reference ConvTranspose mishandles group > 1: run it once per group."""

    def _run(self, x, w, b=None, group=None, **kwargs):
        group = group or self.group or 1
        if group == 1:
            return super()._run(x, w, b, group=1, **kwargs)
        xs, ws = np.split(x, group, axis=1), np.split(w, group, axis=0)
        parts = [super(ConvTranspose, self)._run(xi, wi, None, group=1, **kwargs)[0]
                 for xi, wi in zip(xs, ws)]
        out = np.concatenate(parts, axis=1)
        return (out if b is None else out + b.reshape(1, -1, *[1] * (out.ndim - 2)),)


def _reference(model: onnx.ModelProto) -> ReferenceEvaluator:
    return ReferenceEvaluator(model, new_ops=[Erf, Gelu, ConvTranspose])


@dataclass
class Case:
    """One op under test. ``inputs``: a shape (differentiated, random in ``low..high``),
    or a numpy array (a constant initializer), or None (an empty optional input)."""

    op: str
    inputs: list
    attrs: dict = field(default_factory=dict)
    opset: int = 20
    outputs: int = 1
    low: float = -1.0
    high: float = 1.0
    rtol: float = 1e-6   # float64 dot-product identity
    ort_rtol: float = 1e-5  # onnxruntime float32 against the float64 reference
    name: str = ""
    overrides: dict | None = None  # a rule table replacing the standard one (camexport.graph.rules)

    @property
    def id(self) -> str:
        return self.name or self.op


def _model(case: Case, dtype) -> tuple[onnx.ModelProto, list[str], list[np.ndarray]]:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(0)
    graph_inputs, inits, names, values = [], [], [], []
    for k, spec in enumerate(case.inputs):
        name = f"in{k}"
        if spec is None:
            names.append("")
        elif isinstance(spec, np.ndarray):
            array = spec.astype(dtype) if spec.dtype.kind == "f" else spec
            inits.append(numpy_helper.from_array(array, name))
            names.append(name)
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, elem, list(spec)))
            values.append(rng.uniform(case.low, case.high, size=spec).astype(np.float64))
            names.append(name)
    outs = [f"out{k}" for k in range(case.outputs)]
    node = helper.make_node(case.op, names, outs, name="op", **case.attrs)
    graph = helper.make_graph([node], "case", graph_inputs,
                              [onnx.ValueInfoProto(name=o) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model, [i.name for i in graph_inputs], values


def backward_model(case: Case, dtype) -> tuple[onnx.ModelProto, list[str], list[np.ndarray]]:
    """The op's model, extended with seeds ``seed<k>`` per output and outputs ``grad<k>``."""
    model, wrt, values = _model(case, dtype)
    facts = GraphFacts(model)
    builder = Builder(facts, {v for n in model.graph.node for v in (*n.input, *n.output)})
    seeds = {o.name: f"seed_{o.name}" for o in model.graph.output}
    grads = differentiate(model, facts, builder, seeds, wrt, overrides=case.overrides)
    graph = model.graph
    graph.node.extend(builder.nodes)
    graph.initializer.extend(builder.initializers)
    for out in list(graph.output):
        shape = facts.shape(out.name)
        graph.input.append(helper.make_tensor_value_info(seeds[out.name], out.type.tensor_type.elem_type,
                                                         list(shape)))
    for k, w in enumerate(wrt):
        graph.node.append(helper.make_node("Identity", [grads[w]], [f"grad{k}"]))
        graph.output.append(helper.make_tensor_value_info(
            f"grad{k}", facts.dtype(w), list(facts.shape(w))))
    onnx.checker.check_model(model, full_check=True)
    return model, wrt, values


def check(case: Case) -> None:
    model64, wrt, xs = backward_model(case, np.float64)
    rng = np.random.default_rng(1)
    ref = _reference(model64)
    feeds = dict(zip(wrt, xs))
    forward = _reference(_model(case, np.float64)[0])
    ys = forward.run(None, feeds)
    us = [rng.standard_normal(np.shape(y)) for y in ys]
    vs = [rng.standard_normal(x.shape) for x in xs]
    seeds = {f"seed_out{k}": u for k, u in enumerate(us)}
    grads = ref.run([f"grad{k}" for k in range(len(wrt))], {**feeds, **seeds})
    eps = 1e-6
    plus = forward.run(None, {w: x + eps * v for w, x, v in zip(wrt, xs, vs)})
    minus = forward.run(None, {w: x - eps * v for w, x, v in zip(wrt, xs, vs)})
    jvp = sum(float(np.sum(u * (p - m) / (2 * eps))) for u, p, m in zip(us, plus, minus))
    vjp = sum(float(np.sum(g * v)) for g, v in zip(grads, vs))
    scale = max(abs(jvp), abs(vjp), 1e-12)
    assert abs(jvp - vjp) <= case.rtol * scale, f"{case.id}: <J^T u, v>={vjp} vs <u, J v>={jvp}"

    model32, _, _ = backward_model(case, np.float32)
    session = ort.InferenceSession(model32.SerializeToString(), providers=["CPUExecutionProvider"])
    types = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
             for i in model32.graph.input}
    feeds32 = {k: v.astype(types[k]) for k, v in {**feeds, **seeds}.items()}
    got = session.run([f"grad{k}" for k in range(len(wrt))], feeds32)
    for k, (g32, g64) in enumerate(zip(got, grads)):
        err = np.linalg.norm(g32 - g64) / max(np.linalg.norm(g64), 1e-12)
        assert err <= case.ort_rtol, f"{case.id}: onnxruntime float32 grad{k} off by {err:.2e} (rel L2)"


def check_jvp(case: Case) -> None:
    """A forward-mode rule: its tangent J v against central finite differences in float64."""
    from camexport.graph.forward import linearize

    model, wrt, xs = _model(case, np.float64)
    facts = GraphFacts(model)
    builder = Builder(facts, {v for n in model.graph.node for v in (*n.input, *n.output)})
    seeds = {w: f"tangent_{w}" for w in wrt}
    output = model.graph.output[0].name
    tangent = linearize(model, facts, builder, seeds, output)
    graph = model.graph
    graph.node.extend(builder.nodes)
    graph.initializer.extend(builder.initializers)
    for w in wrt:
        graph.input.append(helper.make_tensor_value_info(seeds[w], facts.dtype(w), list(facts.shape(w))))
    graph.node.append(helper.make_node("Identity", [tangent], ["jvp"]))
    graph.output.append(helper.make_tensor_value_info("jvp", facts.dtype(output), None))
    rng = np.random.default_rng(2)
    vs = [rng.standard_normal(x.shape) for x in xs]
    feeds = dict(zip(wrt, xs))
    got = _reference(model).run(["jvp"], {**feeds, **{seeds[w]: v for w, v in zip(wrt, vs)}})[0]
    forward = _reference(_model(case, np.float64)[0])
    eps = 1e-6
    plus = forward.run(None, {w: x + eps * v for w, x, v in zip(wrt, xs, vs)})[0]
    minus = forward.run(None, {w: x - eps * v for w, x, v in zip(wrt, xs, vs)})[0]
    expected = (plus - minus) / (2 * eps)
    err = np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12)
    assert err <= case.rtol * 10, f"{case.id}: forward-mode tangent off by {err:.2e}"
