"""Fuzzing (reliability issue): random small models and randomly damaged files, drawn by hypothesis.

1. Random models: conv nets (Conv2d with random kernel, stride, padding, groups and dilation,
   BatchNorm, six activations, max/avg pooling, residual adds, concatenation) with MLP heads, and
   a small attention block on patch tokens (Linear q/k/v, softmax, matmul, LayerNorm). Each is
   exported and augmented for a random layer, and must give
   - the plain graph's outputs unchanged (max |diff| <= 1e-5 of max |output|);
   - the layer gradient of a random target class equal to torch float64 autograd on the same
     module: relative L2 <= 1e-5 and max |diff| <= 1e-5 max |g| (tests/test_graph_parity.py).
   A float32 forward can put a value that lies within round-off of a kink (ReLU at 0, HardSwish
   at -3 and 3, a MaxPool window's two largest values) on the other side of it than float64
   does, and the two gradients then belong to two pieces of the function. So the input is the
   first draw of its seeded generator on which, in torch's float64 forward, no value lies within
   KINK_MARGIN (of its tensor's max |value|) of a kink: a stated property of the input.
   A missing gradient rule may end the build as a GradientError naming the op (recorded in
   MISSING_RULES and printed); any other exception fails.
2. Random byte mutations (flip, overwrite, insert, delete, truncate) of a valid .onnx model, a
   .pt state_dict, an artifact's model.cam.onnx and manifest.json, and an input .h5 dataset, fed
   to `camexport build`, `inspect` and `run`: each ends in success or a one-line camexport error
   (exit code 0, 1 or 2, no traceback, no "camexport bug"). Runs on a damaged .h5 go through a
   subprocess (h5py on corrupt files can crash the process): its return code is never negative.

Deterministic: every property runs with ``derandomize=True`` and no example database.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st
from torch import nn

from camexport.artifact import AUGMENTED_FILE, MANIFEST_FILE
from camexport.build import build, export_plain, make_augmented
from camexport.cli import main
from camexport.eager import activations_and_gradients
from camexport.graph import activation_name, gradient_name
from camexport.graph.autodiff import GradientError
from camexport.load import Preprocessing, from_module
from camexport.runtime import session

ROOT = Path(__file__).resolve().parents[2]
OUTPUT_RTOL = 1e-5
GRADIENT_REL_L2 = 1e-5
GRADIENT_MAX_REL = 1e-5
#: A value closer to a kink than this fraction of its tensor's max |value| (float64) could fall on
#: the other side of it in the float32 graph (float32 round-off of these small sums: ~1e-7).
KINK_MARGIN = 1e-5
#: Draws of an example's input generator tried for one away from every kink.
DRAWS = 20

#: op types that ended a build with a GradientError (no rule), across the session
MISSING_RULES: set[str] = set()


def fuzz_settings(examples: int) -> settings:
    """``examples`` drawn deterministically; no shrinking (each example exports a model or runs a
    command: shrinking a failure took minutes), the failing example is printed as drawn."""
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


# -- random models -------------------------------------------------------------------------------
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish,
               "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil: bool = False) -> int:
    """torch's output size; with ``ceil`` (ceil_mode), the last window starts inside the input."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil else span // stride) + 1
    return out - 1 if ceil and (out - 1) * stride >= size + padding else out


class Block(nn.Module):
    """conv -> [bn] -> act -> [pool]; ``kind`` residual adds the input back, concat stacks the
    input and the conv branch along channels (both keep the conv's spatial size)."""

    def __init__(self, kind: str, conv: nn.Conv2d, bn: bool, act: str, pool: nn.Module | None):
        super().__init__()
        self.kind = kind
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels) if bn else nn.Identity()
        self.act = ACTIVATIONS[act]()
        self.pool = pool or nn.Identity()

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        if self.kind == "residual":
            y = x + y
        elif self.kind == "concat":
            y = torch.cat([x, y], dim=1)
        return self.pool(y)


class ConvNet(nn.Module):
    def __init__(self, blocks: list[Block], channels: int, hidden: list[int], act: str, classes: int):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        layers, width = [nn.AdaptiveAvgPool2d(1), nn.Flatten()], channels
        for units in hidden:
            layers += [nn.Linear(width, units), ACTIVATIONS[act]()]
            width = units
        self.head = nn.Sequential(*layers, nn.Linear(width, classes))

    def forward(self, x):
        return self.head(self.blocks(x))


@st.composite
def conv_nets(draw) -> dict:
    """The spec of a random conv net (:func:`_conv_net` builds it)."""
    size = image = draw(st.sampled_from([12, 16]))
    channels, blocks = 3, []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["plain", "residual", "concat"])) if blocks else "plain"
        dilation = draw(st.sampled_from([1, 1, 2]))
        if kind == "plain":
            kernel = draw(st.sampled_from([1, 2, 3, 5]))
            stride = draw(st.sampled_from([1, 2]))
            padding = draw(st.integers(0, dilation * (kernel - 1) // 2))
            groups = draw(st.sampled_from([g for g in (1, 2, 3, channels) if channels % g == 0]))
            out = groups * draw(st.integers(1, max(1, 8 // groups)))
        else:  # the branch keeps the spatial size: odd kernel, stride 1, "same" padding
            kernel = draw(st.sampled_from([1, 3]))
            stride, padding = 1, dilation * (kernel - 1) // 2
            groups = draw(st.sampled_from([g for g in (1, 2, channels) if channels % g == 0]))
            out = channels if kind == "residual" else groups * draw(st.integers(1, max(1, 6 // groups)))
        if _conv_out(size, kernel, stride, padding, dilation) < 2:
            kernel, stride, padding, dilation = 1, 1, 0, 1
        size = _conv_out(size, kernel, stride, padding, dilation)
        channels_after = channels + out if kind == "concat" else out
        pool = draw(st.sampled_from([None, "max", "avg"]))
        pool_kernel, pool_stride = draw(st.sampled_from([(2, 2), (3, 1), (3, 2)]))
        ceil, include_pad = draw(st.booleans()), draw(st.booleans())
        if pool and _conv_out(size, pool_kernel, pool_stride, pool_kernel // 2, 1, ceil) >= 2:
            size = _conv_out(size, pool_kernel, pool_stride, pool_kernel // 2, 1, ceil)
        else:
            pool = None
        blocks.append({"kind": kind, "in": channels, "out": out, "kernel": kernel, "stride": stride,
                       "padding": padding, "dilation": dilation, "groups": groups,
                       "bn": draw(st.booleans()), "act": draw(st.sampled_from(sorted(ACTIVATIONS))),
                       "pool": pool and (pool, pool_kernel, pool_stride, ceil, include_pad)})
        channels = channels_after
    hidden = draw(st.lists(st.sampled_from([4, 8]), max_size=2))
    return {"model": "conv", "size": image, "blocks": blocks, "channels": channels, "hidden": hidden,
            "act": draw(st.sampled_from(sorted(ACTIVATIONS))), "classes": draw(st.integers(2, 6))}


def _pool(kind: str, kernel: int, stride: int, ceil: bool, include_pad: bool) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(kernel, stride, padding=kernel // 2, ceil_mode=ceil)
    return nn.AvgPool2d(kernel, stride, padding=kernel // 2, ceil_mode=ceil, count_include_pad=include_pad)


def _conv_net(spec: dict) -> nn.Module:
    blocks = [Block(b["kind"], nn.Conv2d(b["in"], b["out"], b["kernel"], b["stride"], b["padding"],
                                         b["dilation"], b["groups"]),
                    b["bn"], b["act"], b["pool"] and _pool(*b["pool"])) for b in spec["blocks"]]
    return ConvNet(blocks, spec["channels"], spec["hidden"], spec["act"], spec["classes"])


class Attention(nn.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(d)) v, heads split by reshape."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class TokenNet(nn.Module):
    """Patch embedding -> tokens -> x + attn(ln(x)) [-> x + mlp(ln(x))] -> ln -> mean -> head."""

    def __init__(self, dim: int, heads: int, patch: int, mlp: int, act: str, classes: int):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = self.norm2 = None
        if mlp:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, mlp), ACTIVATIONS[act](), nn.Linear(mlp, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return self.head(self.norm(x).mean(dim=1))


@st.composite
def token_nets(draw) -> dict:
    """The spec of a random attention model on patch tokens."""
    heads = draw(st.sampled_from([1, 2]))
    return {"model": "tokens", "size": draw(st.sampled_from([8, 12])), "patch": 4,
            "dim": heads * draw(st.sampled_from([4, 6, 8])), "heads": heads,
            "mlp": draw(st.sampled_from([0, 8, 16])), "act": draw(st.sampled_from(sorted(ACTIVATIONS))),
            "classes": draw(st.integers(2, 6))}


def _module(spec: dict, seed: int) -> nn.Module:
    """The module of a spec, its weights (and BatchNorm statistics) from ``seed``."""
    torch.manual_seed(seed)
    if spec["model"] == "tokens":
        module = TokenNet(spec["dim"], spec["heads"], spec["patch"], spec["mlp"], spec["act"],
                          spec["classes"])
    else:
        module = _conv_net(spec)
    for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
        for tensor, low, high in ((bn.weight, 0.5, 1.5), (bn.bias, -0.5, 0.5),
                                  (bn.running_mean, -0.5, 0.5), (bn.running_var, 0.5, 2.0)):
            tensor.data.uniform_(low, high)
    return module.eval()


def _near_kink(module: nn.Module, x: np.ndarray) -> bool:
    """Whether, in ``module``'s float64 forward on ``x``, a ReLU or HardSwish input lies within
    KINK_MARGIN of a kink, or a MaxPool window's two largest values (the largest not an exact 0,
    which only a ReLU or HardSwish below it gives, and whose gradient is 0) are that close."""
    near = []

    def check(mod, args, _output):
        v = args[0]
        scale = KINK_MARGIN * float(v.abs().max())
        if isinstance(mod, nn.MaxPool2d):
            k, s, p = mod.kernel_size, mod.stride, mod.padding
            padded = torch.nn.functional.pad(v, [p, p + k * mod.ceil_mode] * 2, value=-math.inf)
            top = padded.unfold(2, k, s).unfold(3, k, s).flatten(-2).topk(2, dim=-1).values
            near.append(bool(((top[..., 0] - top[..., 1] <= scale) & (top[..., 0] != 0)).any()))
        else:
            kinks = [0.0] if isinstance(mod, nn.ReLU) else [-3.0, 3.0]
            near.append(any(bool((((v - k).abs() <= scale) & (v != k)).any()) for k in kinks))

    hooks = [m.register_forward_hook(check) for m in module.modules()
             if isinstance(m, (nn.ReLU, nn.Hardswish, nn.MaxPool2d))]
    try:
        with torch.no_grad():
            module(torch.from_numpy(x))
    finally:
        for hook in hooks:
            hook.remove()
    return any(near)


def _input(module: nn.Module, size: int, rng) -> np.ndarray | None:
    """The first draw of ``rng`` away from every kink (module docstring); None if none is."""
    reference = module.double()
    try:
        for _ in range(DRAWS):
            x = rng.standard_normal((2, 3, size, size))
            if not _near_kink(reference, x):
                return x.astype(np.float32)
    finally:
        module.float()
    return None


def _layers(module: nn.Module) -> list[str]:
    """Every submodule path with a spatial map (feature maps, tokens: not the head's vectors) that
    puts a node in the graph: not nn.Identity, and not a conv that a BatchNorm follows (the
    exporter folds the two into one Conv, named after the BatchNorm)."""
    folded = {f"{name}.conv" for name, m in module.named_modules()
              if isinstance(m, Block) and isinstance(m.bn, nn.BatchNorm2d)}
    return [name for name, m in module.named_modules() if name and not name.startswith("head")
            and not isinstance(m, nn.Identity) and name not in folded]


@fuzz_settings(24)
@given(spec=st.one_of(conv_nets(), token_nets()), data=st.data())
def test_random_model_gradients_match_torch_float64(spec, data):
    seed = data.draw(st.integers(0, 2**16), label="seed")
    module = _module(spec, seed)
    layer = data.draw(st.sampled_from(_layers(module)), label="layer")
    rng = np.random.default_rng(seed)
    x = _input(module, spec["size"], rng)
    if x is None:
        print("NEARKINK", spec, seed, layer)
        reject()
    _check_gradients(spec, module, layer, x, rng)


def _block(kind, channels, out, groups, bn, act, pool) -> dict:
    return {"kind": kind, "in": channels, "out": out, "kernel": 3, "stride": 1, "padding": 1, "dilation": 1,
            "groups": groups, "bn": bn, "act": act, "pool": pool}


#: the drawn examples repeat themselves (derandomized): these pinned nets make sure that ReLU
#: kinks, MaxPool and AveragePool with ceil_mode (and counted padding) are always covered
PINNED = [
    {"model": "conv", "size": 16, "channels": 8, "hidden": [8], "act": "relu", "classes": 4,
     "blocks": [_block("plain", 3, 8, 1, True, "relu", ("max", 3, 2, True, False)),
                _block("residual", 8, 8, 2, False, "relu", ("avg", 3, 2, True, True))]},
    {"model": "conv", "size": 12, "channels": 12, "hidden": [], "act": "hardswish", "classes": 3,
     "blocks": [_block("plain", 3, 6, 3, False, "relu", ("avg", 2, 2, True, False)),
                _block("concat", 6, 6, 1, True, "hardswish", ("max", 2, 2, False, False))]},
]


@pytest.mark.parametrize("spec", PINNED, ids=["relu-maxpool-avgpool-ceil", "concat-avgpool-ceil"])
def test_pinned_models_gradients_match_torch_float64(spec):
    module = _module(spec, 0)
    for seed in range(20):  # the first draw away from every kink
        rng = np.random.default_rng(seed)
        x = _input(module, spec["size"], rng)
        if x is not None:
            break
    assert x is not None
    for layer in ("blocks.0.act", "blocks.0.pool"):  # the gradient back through every later op
        _check_gradients(spec, module, layer, x, rng)


def _check_gradients(spec: dict, module: nn.Module, layer: str, x: np.ndarray, rng) -> None:
    """The augmented graph's outputs equal the plain graph's, and its layer gradient torch's in
    float64 (a GradientError is accepted only as a missing rule, recorded)."""
    loaded = from_module(module, "fuzz", Preprocessing(size=(spec["size"], spec["size"])))
    plain, _ = export_plain(loaded)
    try:
        augmented, manifest = make_augmented(loaded, plain, [layer], ["gradcam"])
    except GradientError as err:
        message = str(err)
        assert "no gradient rule is registered" in message and "camexport/graph/rules/" in message, message
        MISSING_RULES.add(message.split("op '")[1].split("'")[0])
        print(f"missing rule: {message}")
        return
    onnx.checker.check_model(augmented)
    classes = spec["classes"]
    weights = np.zeros((2, classes), np.float32)
    weights[[0, 1], rng.integers(0, classes, 2)] = 1

    run = session(augmented, threads=1)
    names = [o.name for o in run.get_outputs()]
    got = dict(zip(names, run.run(None, {run.get_inputs()[0].name: x, "target_weights": weights})))
    base_run = session(plain, threads=1)
    for output, base in zip(base_run.get_outputs(), base_run.run(None, {base_run.get_inputs()[0].name: x})):
        err = np.abs(got[output.name] - base).max() / max(1.0, np.abs(base).max())
        assert err <= OUTPUT_RTOL, f"output {output.name} changed by {err:.2e}"

    _, _, grads = activations_and_gradients(module, x, [layer], weights, dtype=torch.float64)
    label = manifest["layers"][0]["name"]
    grad, ref = got[gradient_name(label)], grads[layer]
    assert got[activation_name(label)].shape == grad.shape == ref.shape
    scale = np.abs(ref).max()
    if scale == 0:
        assert np.abs(grad).max() == 0
        return
    rel_l2 = np.linalg.norm(grad - ref) / np.linalg.norm(ref)
    max_rel = np.abs(grad - ref).max() / scale
    print(f"{spec['model']} {layer}: rel L2 {rel_l2:.1e}, max {max_rel:.1e}")
    assert rel_l2 <= GRADIENT_REL_L2, f"{layer}: gradient relative L2 {rel_l2:.2e}"
    assert max_rel <= GRADIENT_MAX_REL, f"{layer}: gradient max |diff| {max_rel:.2e} of max |g|"


# -- damaged files -------------------------------------------------------------------------------
SIZE = 16
#: the timm constructor of the state_dict target (a tiny test model: 272k weights)
ARCH = "test_convnext"
RUNNER = "import sys; from camexport.cli import main; main(sys.argv[1:], prog_name='camexport')"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Path]:
    """A valid .onnx model, .pt state_dict (of ARCH), artifact and input dataset (two images)."""
    import cv2
    import timm

    root = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    loaded = from_module(Tiny(), "tiny", Preprocessing(size=(SIZE, SIZE)))
    build(loaded, ["features.5"], methods="gradcam,scorecam", out_dir=root / "artifact")
    onnx.save(export_plain(loaded)[0], str(root / "model.onnx"))
    torch.save(timm.create_model(ARCH, pretrained=False).state_dict(), root / "model.pt")
    photos = root / "photos"
    photos.mkdir()
    for k in range(2):
        cv2.imwrite(str(photos / f"p{k}_1.png"), np.full((SIZE, SIZE, 3), 60 * k + 30, np.uint8))
    code, output = _cli("pack", photos, "--out", root / "data.h5", "--size", SIZE, "--labels", "names")
    assert code == 0, output
    return {"onnx": root / "model.onnx", "pt": root / "model.pt", "artifact": root / "artifact",
            "data": root / "data.h5"}


def _cli(*args) -> tuple[int, str]:
    """Exit code and output of a command that ended as it should: success, or one line
    ``Error: ...`` (exit 1; 2 for click's usage errors), no traceback, no camexport bug."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{args}: {result.exception!r}\n{output}"
    assert result.exit_code in (0, 1, 2), f"{args}: exit code {result.exit_code}\n{output}"
    assert "Traceback" not in output and "camexport bug" not in output, f"{args}:\n{output}"
    return result.exit_code, output


@pytest.mark.parametrize("record", ["['', 'features', 'b=\\xe509', 'relu']", "not python", "[1, 2]",
                                    "{'a': 1}"])
def test_a_damaged_exporter_record_is_read_as_none(valid, tmp_path, record):
    """Found by the mutations below: a node's ``pkg.torch.onnx.name_scopes`` (or class_hierarchy)
    that is not a list of strings made `inspect` fail with a camexport bug; it is now ignored (the
    node has no module path), and the model is listed or built as any other exporter's."""
    model = onnx.load(str(valid["onnx"]))
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key in ("pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy"):
                prop.value = record
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    _cli("inspect", path)
    code, output = _cli("build", path, "--out", tmp_path / "art", "-q")
    assert code == 0, output


@st.composite
def mutations(draw, length: int, regions: list[tuple[int, int]] | None = None) -> list[tuple]:
    """1-3 byte edits (kind, offset, bytes) of a file of ``length`` bytes, offsets in
    ``regions`` ([start, end) ranges; default: the whole file)."""
    regions = regions or [(0, length)]
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        start, end = draw(st.sampled_from(regions))
        kind = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        offset = draw(st.integers(start, max(start, end - 1)))
        edits.append((kind, offset, draw(st.binary(min_size=1, max_size=16))))
    return edits


def _mutate(data: bytes, edits: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, offset, chunk in edits:
        offset = min(offset, len(out))
        if kind == "flip":
            out[offset:offset + 1] = bytes([b ^ (chunk[0] or 1) for b in out[offset:offset + 1]])
        elif kind == "overwrite":
            out[offset:offset + len(chunk)] = chunk
        elif kind == "insert":
            out[offset:offset] = chunk
        elif kind == "delete":
            del out[offset:offset + len(chunk)]
        else:
            del out[offset:]
    return bytes(out)


def _damaged(source: Path, folder: Path, edits: list[tuple]) -> Path:
    target = folder / source.name
    target.write_bytes(_mutate(source.read_bytes(), edits))
    return target


@fuzz_settings(20)
@given(data=st.data())
def test_a_damaged_onnx_model_is_built_or_refused(valid, tmp_path_factory, data):
    source = valid["onnx"]
    edits = data.draw(mutations(source.stat().st_size), label="edits")
    folder = tmp_path_factory.mktemp("onnx")
    model = _damaged(source, folder, edits)
    _cli("inspect", model)
    _cli("build", model, "--out", folder / "out", "-q")


def _zip_structure(path: Path) -> list[tuple[int, int]]:
    """The byte ranges of a torch zip file that are not tensor data: each record's header and the
    pickle, and the central directory (damaged tensor bytes are only other weights)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        infos = sorted(archive.infolist(), key=lambda i: i.header_offset)
        directory = archive.start_dir
    regions = []
    for info in infos:
        data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        keep = info.file_size if info.filename.split("/")[-2:-1] != ["data"] else 0
        regions.append((info.header_offset, data_start + keep + 64))
    return regions + [(directory, path.stat().st_size)]


@fuzz_settings(6)
@given(data=st.data())
def test_a_damaged_state_dict_is_built_or_refused(valid, tmp_path_factory, data):
    source = valid["pt"]
    edits = data.draw(mutations(source.stat().st_size, _zip_structure(source)), label="edits")
    folder = tmp_path_factory.mktemp("pt")
    model = _damaged(source, folder, edits)
    _cli("build", model, "--arch", ARCH, "--input-size", 32, 32, "--layer", "stages.1",
         "--out", folder / "out", "-q")


@fuzz_settings(16)
@given(name=st.sampled_from([AUGMENTED_FILE, MANIFEST_FILE]), data=st.data())
def test_a_damaged_artifact_runs_or_is_refused(valid, tmp_path_factory, name, data):
    folder = tmp_path_factory.mktemp("artifact")
    artifact = folder / "artifact"
    shutil.copytree(valid["artifact"], artifact)
    edits = data.draw(mutations((artifact / name).stat().st_size), label="edits")
    (artifact / name).write_bytes(_mutate((artifact / name).read_bytes(), edits))
    _cli("inspect", artifact)
    _cli("run", artifact, "--data", valid["data"], "--out", folder / "out.h5",
         "--methods", "gradcam,scorecam", "-q")


@fuzz_settings(10)
@given(data=st.data())
def test_a_damaged_dataset_is_run_or_refused_without_a_crash(valid, tmp_path_factory, data):
    source = valid["data"]
    edits = data.draw(mutations(source.stat().st_size), label="edits")
    folder = tmp_path_factory.mktemp("h5")
    dataset = _damaged(source, folder, edits)
    command = ["run", valid["artifact"], "--data", dataset, "--out", folder / "out.h5", "-q"]
    done = subprocess.run([sys.executable, "-c", RUNNER, *map(str, command)], check=False,
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    output = done.stdout + done.stderr
    assert done.returncode in (0, 1, 2), f"{edits}: return code {done.returncode}\n{output}"
    assert "Traceback" not in output and "camexport bug" not in output, f"{edits}:\n{output}"


def test_missing_rules_seen():
    """Prints the ops that ended a random model's build with a GradientError (allowed: a clear
    camexport error), for the log."""
    print(f"ops without a gradient rule met by the random models: {sorted(MISSING_RULES) or 'none'}")
