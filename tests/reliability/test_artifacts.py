"""Artifacts are consistent or refused: `build` replaces an artifact whole (only with --overwrite),
one build at a time; every reader (run, inspect, Explainer) checks the files against each other;
corrupt or foreign files are a one-line error naming the file and the fix, never a traceback.

Every case checks that the files written before it are unchanged (sha256 before and after)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from camexport.artifact import AUGMENTED_FILE, MANIFEST_FILE, PLAIN_FILE, ArtifactBusyError, artifact_lock
from camexport.build import build
from camexport.cli import main
from camexport.errors import CamexportError
from camexport.explain import Explainer
from camexport.export import to_onnx
from camexport.load import Preprocessing, from_module

SIZE = 16
REBUILD = r"rebuild it with `camexport build MODEL \.\.\. --out .* --overwrite`"
ROOT = Path(__file__).resolve().parents[2]


def _tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, 3)).eval()


def _loaded(seed: int):
    return from_module(_tiny(seed), f"tiny{seed}", Preprocessing(size=(SIZE, SIZE)))


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(*args) -> tuple[int, str]:
    """Exit code and output; an exception out of the command (a traceback) fails the test."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def _error(code: int, output: str) -> str:
    """The one ``Error: ...`` line of a command that failed as a user error (exit 1)."""
    lines = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """Two artifacts of two tiny CNNs (different weights), a model file of the first, a packed
    dataset of two images, and the layer's tensor name."""
    root = tmp_path_factory.mktemp("made")
    first = build(_loaded(1), ["1"], methods="gradcam,scorecam", out_dir=root / "one")
    build(_loaded(2), ["1"], methods="gradcam,scorecam", out_dir=root / "two")
    models = root / "models"
    models.mkdir()
    onnx.save(to_onnx(_loaded(1)), str(models / "tiny.onnx"))
    photos = root / "photos"
    photos.mkdir()
    for k in range(2):
        cv2.imwrite(str(photos / f"p{k}_1.png"), np.full((SIZE, SIZE, 3), 60 * k + 30, np.uint8))
    code, output = _cli("pack", photos, "--out", root / "data.h5", "--size", SIZE, "--labels", "names")
    assert code == 0, output
    return {"root": root, "one": root / "one", "two": root / "two", "model": models / "tiny.onnx",
            "data": root / "data.h5", "tensor": first.manifest["layers"][0]["tensor"]}


# -- corrupt and foreign inputs: one row per case ----------------------------------------------
def _external(path: Path, location: str) -> None:
    """Make the largest initializer of the ONNX file ``path`` keep its data at ``location``."""
    model = onnx.load(str(path))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data) or len(t.float_data))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())
    (path.parent.parent / "secret.bin").write_bytes(bytes(16))


def _rerecord(artifact: Path) -> None:
    """Record the graph's new digest in manifest.json (a tampered artifact that is consistent)."""
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    manifest["graph_sha256"] = hashlib.sha256((artifact / AUGMENTED_FILE).read_bytes()).hexdigest()
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))


def _swap_plain(made, art):
    shutil.copy(made["two"] / PLAIN_FILE, art / PLAIN_FILE)


def _truncate_graph(made, art):
    data = (art / AUGMENTED_FILE).read_bytes()
    (art / AUGMENTED_FILE).write_bytes(data[:len(data) // 2])


def _random_graph(made, art):
    (art / AUGMENTED_FILE).write_bytes(np.random.default_rng(0).bytes(4096))


def _empty_graph(made, art):
    (art / AUGMENTED_FILE).write_bytes(b"")


def _drop_plain(made, art):
    (art / PLAIN_FILE).unlink()


def _old_version(made, art):
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    manifest["camexport_version"] = "0.0.9"
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))


def _no_digest(made, art):  # an artifact of camexport before this check
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    del manifest["graph_sha256"]
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))


def _other_manifest(made, art):  # manifest.json of another build, digests edited to match
    manifest = json.loads((made["two"] / MANIFEST_FILE).read_text())
    manifest["plain_sha256"] = hashlib.sha256((art / PLAIN_FILE).read_bytes()).hexdigest()
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))
    _rerecord(art)


def _escaping_graph(made, art):
    _external(art / AUGMENTED_FILE, "../secret.bin")
    _rerecord(art)


#: (case, how the copy of artifact "one" is damaged, the message expected from every reader)
BROKEN = [
    ("plain-from-another-artifact", _swap_plain,
     rf"{PLAIN_FILE} does not match {MANIFEST_FILE} .*copied from another build.*{REBUILD}"),
    ("truncated-graph", _truncate_graph, rf"{AUGMENTED_FILE} does not match .*truncated.*{REBUILD}"),
    ("random-graph", _random_graph, rf"{AUGMENTED_FILE} does not match .*{REBUILD}"),
    ("empty-graph", _empty_graph, rf"{AUGMENTED_FILE} does not match .*{REBUILD}"),
    ("plain-missing", _drop_plain, rf"incomplete artifact \({PLAIN_FILE} missing.*{REBUILD}"),
    ("older-camexport", _old_version, rf"built by camexport 0\.0\.9, this is camexport .*{REBUILD}"),
    ("no-digests", _no_digest, rf"records no digests of the graphs.*{REBUILD}"),
    ("manifest-of-another-build", _other_manifest,
     rf"{MANIFEST_FILE} and the manifest inside .*{AUGMENTED_FILE} differ.*{REBUILD}"),
    ("external-data-escaping", _escaping_graph,
     r"keeps its data at '\.\./secret\.bin', outside the model's folder"),
]
READERS = ["run", "inspect", "explainer"]


def _read(reader: str, art: Path, made: dict, tmp_path: Path) -> str:
    """The one-line error of ``reader`` on the artifact ``art``."""
    if reader == "explainer":
        with pytest.raises(CamexportError) as caught:
            Explainer(art)
        return str(caught.value)
    args = (["run", art, "--data", made["data"], "--out", tmp_path / "o.h5", "-q"] if reader == "run"
            else ["inspect", art])
    return _error(*_cli(*args))


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case,damage,pattern", BROKEN, ids=[c[0] for c in BROKEN])
def test_an_inconsistent_artifact_is_refused_with_the_fix(made, tmp_path, case, damage, pattern, reader):
    art = tmp_path / "art" / "artifact"
    shutil.copytree(made["one"], art)
    damage(made, art)
    before = _digests(tmp_path)
    message = _read(reader, art, made, tmp_path)
    print(f"{case} / {reader}: {message.strip()}")
    assert re.search(pattern, message, re.DOTALL), message
    assert _digests(tmp_path) == before
    assert not (tmp_path / "o.h5").exists()


def _random_file(made, tmp):
    path = tmp / "random.onnx"
    path.write_bytes(np.random.default_rng(1).bytes(3000))
    return path


def _empty_file(made, tmp):
    path = tmp / "empty.onnx"
    path.write_bytes(b"")
    return path


def _truncated_model(made, tmp):
    path = tmp / "truncated.onnx"
    data = made["model"].read_bytes()
    path.write_bytes(data[:len(data) // 3])
    return path


def _random_pt(made, tmp):
    path = tmp / "random.pt"
    path.write_bytes(np.random.default_rng(2).bytes(3000))
    return path


def _a_directory(made, tmp):
    path = tmp / "folder"
    path.mkdir()
    (path / "notes.txt").write_text("not a model")
    return path


def _escaping_model(made, tmp):
    path = tmp / "models" / "escaping.onnx"
    path.parent.mkdir()
    shutil.copy(made["model"], path)
    _external(path, "../secret.bin")
    return path


#: (case, the file made, the command (MODEL/ARTIFACT is {path}), the message expected)
FOREIGN = [
    ("random-onnx-as-model", _random_file, ["build", "{path}", "--out", "{out}"],
     r"random\.onnx is not an ONNX model \(it does not parse as one.*truncated"),
    ("random-onnx-as-artifact", _random_file, ["inspect", "{path}"],
     r"random\.onnx is not an ONNX model \(it does not parse as one"),
    ("random-file-as-artifact-to-run", _random_pt, ["run", "{path}", "--data", "{data}", "--out", "{out}.h5"],
     r"random\.pt is a file, not a camexport artifact: expected an artifact directory holding"),
    ("random-pt-as-model", _random_pt, ["build", "{path}", "--out", "{out}"],
     r"random\.pt is not a readable torch file .*truncated or corrupt"),
    ("empty-onnx-as-model", _empty_file, ["build", "{path}", "--out", "{out}"],
     r"empty\.onnx is empty \(0 bytes\), not an ONNX model"),
    ("empty-onnx-as-artifact", _empty_file, ["inspect", "{path}"], r"empty\.onnx is empty \(0 bytes\)"),
    ("truncated-onnx-as-model", _truncated_model, ["build", "{path}", "--out", "{out}"],
     r"truncated\.onnx is not an ONNX model .*truncated"),
    ("directory-as-model", _a_directory, ["build", "{path}", "--out", "{out}"],
     r"folder is a directory, not a model file: pass a \.pt, \.pt2 or \.onnx file"),
    ("directory-as-artifact-to-inspect", _a_directory, ["inspect", "{path}"],
     r"folder is a directory, not a model file.*an artifact directory is read by"),
    ("directory-as-artifact-to-run", _a_directory, ["run", "{path}", "--data", "{data}", "--out", "{out}.h5"],
     r"folder is not an artifact \(no model\.cam\.onnx\); make one with camexport build"),
    ("external-data-escaping-model-build", _escaping_model, ["build", "{path}", "--out", "{out}"],
     r"tensor '.*' keeps its data at '\.\./secret\.bin', outside the model's folder"),
    ("external-data-escaping-model-inspect", _escaping_model, ["inspect", "{path}"],
     r"keeps its data at '\.\./secret\.bin', outside the model's folder"),
]


@pytest.mark.parametrize("case,make,command,pattern", FOREIGN, ids=[c[0] for c in FOREIGN])
def test_a_foreign_or_corrupt_file_is_a_clear_error(made, tmp_path, case, make, command, pattern):
    path = make(made, tmp_path)
    before = _digests(tmp_path)
    out = tmp_path / "out"
    args = [a.format(path=path, out=out, data=made["data"]) for a in command]
    output = _error(*_cli(*args))
    print(f"{case}: {output}")
    assert re.search(pattern, output, re.DOTALL), output
    assert _digests(tmp_path) == before
    assert not out.exists()


# -- build: refused, replaced whole, killed, concurrent ----------------------------------------
def _existing(made, tmp):
    shutil.copytree(made["one"], tmp / "target")
    return tmp / "target"


def _foreign_directory(made, tmp):
    (tmp / "target").mkdir()
    (tmp / "target" / "thesis.tex").write_text("mine")
    return tmp / "target"


#: (case, the --out made, extra flags, the message expected)
REFUSED_BUILDS = [
    ("existing-artifact", _existing, [],
     r"--out .*target already holds an artifact; pass --overwrite \(overwrite=True\) to replace it"),
    ("non-artifact-directory", _foreign_directory, [],
     r"--out .*target is a directory holding other files \(thesis\.tex\), not an artifact; choose another"),
    ("non-artifact-directory-overwrite", _foreign_directory, ["--overwrite"],
     r"holding other files \(thesis\.tex\).*camexport replaces only artifacts"),
]


@pytest.mark.parametrize("case,make,flags,pattern", REFUSED_BUILDS, ids=[c[0] for c in REFUSED_BUILDS])
def test_build_refuses_an_existing_directory_before_any_work(made, tmp_path, case, make, flags, pattern):
    target = make(made, tmp_path)
    before = _digests(tmp_path)
    # a model that does not exist: the refusal comes first, before loading or exporting
    output = _error(*_cli("build", tmp_path / "no-such-model.onnx", "--out", target, *flags, "-q"))
    print(f"{case}: {output}")
    assert re.search(pattern, output), output
    assert _digests(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_build_overwrite_replaces_the_artifact_whole(made, tmp_path):
    target = _existing(made, tmp_path)
    old = _digests(target)
    opened = Explainer(target)  # before the rebuild: it must not mix the old and the new graphs
    code, output = _cli("build", made["model"], "--layer", made["tensor"], "--methods", "gradcam",
                        "--out", target, "--overwrite", "-q")
    assert code == 0, output
    new = _digests(target)
    assert sorted(new) == sorted([AUGMENTED_FILE, PLAIN_FILE, MANIFEST_FILE])
    assert new[AUGMENTED_FILE] != old[AUGMENTED_FILE] and new[MANIFEST_FILE] != old[MANIFEST_FILE]
    assert json.loads((target / MANIFEST_FILE).read_text())["methods"] == ["gradcam"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # no temporary, lock or old
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    assert Explainer(target)(x, None, methods=["gradcam"]).cams["gradcam"].shape == (1, SIZE, SIZE)
    with pytest.raises(CamexportError, match=r"was replaced while in use .*open it again"):
        opened.forward(x)  # ScoreCAM's and the metrics' plain graph


HOLDER = textwrap.dedent("""
    # a `camexport build --overwrite` that stops after writing the plain graph into its temporary
    # directory (the first fsync) and before the augmented graph, until the file argv[1] appears
    import os, sys, time
    from pathlib import Path
    real, calls = os.fsync, []
    def fsync(fd):
        real(fd)
        calls.append(fd)
        if len(calls) == 1:
            print("PAUSED", flush=True)
            while not Path(sys.argv[1]).exists():
                time.sleep(0.02)
    os.fsync = fsync
    from camexport.cli import main
    main(sys.argv[2:])
""")


def _holder(made, tmp_path: Path, target: Path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "go"), "build", str(made["model"]), "--layer",
         made["tensor"], "--methods", "gradcam", "--out", str(target), "--overwrite", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    assert line.strip() == "PAUSED", process.communicate()
    return process


def test_a_killed_build_leaves_the_old_artifact_and_the_next_one_cleans_up(made, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    target = _existing(made, work)
    before = _digests(target)
    process = _holder(made, tmp_path, target)
    process.send_signal(signal.SIGKILL)  # between the plain graph and the augmented one
    process.wait()
    assert _digests(target) == before
    left = sorted(p.name for p in work.iterdir())
    assert any(n.startswith(".target.partial-") for n in left), left  # what the killed one wrote
    Explainer(target)  # the old artifact still verifies
    build(_loaded(3), ["1"], out_dir=target, overwrite=True)  # the lock died with its holder
    assert sorted(p.name for p in work.iterdir()) == ["target"]
    assert _digests(target) != before
    Explainer(target)


def test_two_builds_at_once_one_proceeds_the_other_refuses_naming_it(made, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    target = _existing(made, work)
    before = _digests(target)
    process = _holder(made, tmp_path, target)
    start = time.perf_counter()
    code, output = _cli("build", made["model"], "--layer", made["tensor"], "--out", target,
                        "--overwrite", "-q")
    refused_in = time.perf_counter() - start
    output = _error(code, output)
    print(f"second build: {output} ({refused_in:.2f} s)")
    assert re.search(
        rf"target is being built by pid {process.pid} on .*, camexport build since .* "
        rf"\(it holds .*\.target\.lock\); wait for that build to finish", output), output
    assert refused_in < 2
    assert _digests(target) == before
    (tmp_path / "go").touch()
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    assert sorted(p.name for p in work.iterdir()) == ["target"]
    assert json.loads((target / MANIFEST_FILE).read_text())["methods"] == ["gradcam"]
    Explainer(target)


def test_the_lock_refuses_in_process_and_is_released(tmp_path):
    target = tmp_path / "target"
    with artifact_lock(target), pytest.raises(ArtifactBusyError, match=rf"pid {os.getpid()}"):
        build(_loaded(1), ["1"], out_dir=target)
    assert not target.exists() and not list(tmp_path.iterdir())
    build(_loaded(1), ["1"], out_dir=target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
