"""The artifact on disk: its file names, its manifest, verifying it, and writing it whole.

An artifact directory (``camexport build`` writes it)::

    model.cam.onnx     the CAM-augmented graph; the manifest (JSON) in its metadata_props
    model.plain.onnx   the exported graph as it is (forward-only passes: ScoreCAM, metrics, tails)
    manifest.json      the same manifest plus ``graph_sha256``, for people, tools and the checks

Digests: the manifest records ``plain_sha256`` (the bytes of model.plain.onnx) and
``camexport_version``; manifest.json alone adds ``graph_sha256`` (the bytes of model.cam.onnx: a
graph cannot carry the digest of itself). Every reader goes through :func:`verify_artifact`
(:func:`read_artifact`, :func:`read_plain`): the three files present, both digests matching, the
same camexport major.minor, and manifest.json equal to the graph's embedded manifest; anything
else is an :class:`ArtifactError` that says to rebuild. Files are hashed once per process (the
result is kept while their size, mtime and inode stay the same).

Writing (:func:`artifact_writer`): the files go into a temporary directory beside the target,
which is then renamed into place; an existing target is swapped with it atomically
(``renameat2(RENAME_EXCHANGE)`` on Linux) and removed, so the target is at every instant the
complete old or the complete new artifact. A lock (``.<name>.lock`` beside the target, ``flock``,
released when its holder exits or dies) lets one build at a time write a target.

Both the build half (:mod:`camexport.build`) and the run-time half (:mod:`camexport.explain`,
:mod:`camexport.run`) use this module; neither imports the other.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import onnx

from camexport import __version__
from camexport.errors import CamexportError
from camexport.faults import fault_point
from camexport.load import read_onnx, sha256
from camexport.locks import FileLock

log = logging.getLogger(__name__)

AUGMENTED_FILE = "model.cam.onnx"
PLAIN_FILE = "model.plain.onnx"
MANIFEST_FILE = "manifest.json"
FILES = (AUGMENTED_FILE, PLAIN_FILE, MANIFEST_FILE)

#: The metadata_props key that holds the manifest in the augmented graph.
MANIFEST_KEY = "camexport.manifest"
#: manifest.json's key for the sha256 of model.cam.onnx (not in the embedded manifest)
GRAPH_DIGEST_KEY = "graph_sha256"

#: the fix every refusal of an artifact names
REBUILD = "rebuild it with `camexport build MODEL ... --out {dir} --overwrite`"


class ArtifactError(CamexportError, ValueError):
    """A path that is not a usable camexport artifact, with how to make one."""


class ArtifactBusyError(ArtifactError):
    """Another process is building the same artifact directory."""


def set_manifest(model: onnx.ModelProto, manifest: Mapping) -> None:
    """Store the manifest (JSON) in the model's ``metadata_props``, replacing any earlier one."""
    kept = [p for p in model.metadata_props if p.key != MANIFEST_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = MANIFEST_KEY, json.dumps(manifest, sort_keys=True)


def get_manifest(model: onnx.ModelProto) -> dict | None:
    """The manifest stored in ``model``, or None for a graph camexport did not build."""
    for prop in model.metadata_props:
        if prop.key == MANIFEST_KEY:
            return json.loads(prop.value)
    return None


def directory_of(path: str | Path) -> Path:
    """The artifact directory of ``path`` (the directory itself, or the folder of its .onnx)."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def graph_path(path: str | Path) -> Path:
    """The augmented graph's file of an artifact directory (or ``path`` itself, an .onnx file)."""
    path = Path(path)
    return path / AUGMENTED_FILE if path.is_dir() else path


def plain_path(path: str | Path) -> Path:
    """The plain graph's file of an artifact."""
    return directory_of(path) / PLAIN_FILE


def is_artifact(path: str | Path) -> bool:
    """Whether ``path`` is an artifact directory (it holds the augmented graph)."""
    return (Path(path) / AUGMENTED_FILE).is_file()


def _version_key(version: str) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:2])


#: verified artifacts of this process: directory -> (the files' (inode, size, mtime), manifest)
_VERIFIED: dict[Path, tuple[tuple, dict]] = {}


def artifact_file_names(directory: Path) -> list[str]:
    """The names of an artifact directory's files: :data:`FILES`, then its extra graphs
    (``model.<key>.onnx``, :func:`extra_file`) found there."""
    extras = sorted(p.name for p in Path(directory).glob("model.*.onnx") if p.name not in FILES)
    return [*FILES, *extras]


def _stats(directory: Path) -> tuple:
    """The files' identities, extra graphs (``model.<key>.onnx``) included."""
    stats = [(directory / name).stat() for name in artifact_file_names(directory)]
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def artifact_directory(path: str | Path) -> Path:
    """The directory of the artifact ``path`` names (the directory or its model.cam.onnx), or an
    ArtifactError saying what ``path`` is instead and what was expected."""
    path = Path(path)
    expected = (f"expected an artifact directory holding {', '.join(FILES)} (or its "
                f"{AUGMENTED_FILE}); make one with `camexport build MODEL --out DIR`")
    if not path.exists():
        raise ArtifactError(f"{path} does not exist: {expected}")
    if path.is_file():
        if path.name != AUGMENTED_FILE:
            raise ArtifactError(f"{path} is a file, not a camexport artifact: {expected}")
        path = path.parent
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a directory or a file: {expected}")
    present = [name for name in FILES if (path / name).is_file()]
    if not present:
        raise ArtifactError(f"{path} is not an artifact (no {AUGMENTED_FILE}): {expected}")
    missing = [name for name in FILES if name not in present]
    if missing:
        raise ArtifactError(f"{path} is an incomplete artifact ({', '.join(missing)} missing: an "
                            f"interrupted build of an older camexport?); {REBUILD.format(dir=path)}")
    return path


def verify_artifact(path: str | Path) -> tuple[Path, dict]:
    """(directory, manifest) of the artifact ``path``, once its files are checked against each
    other (module docstring); the result is kept while the files do not change."""
    directory = artifact_directory(path)
    key = directory.resolve()
    stats = _stats(directory)
    known = _VERIFIED.get(key)
    if known and known[0] == stats:
        return directory, known[1]
    fix = REBUILD.format(dir=directory)
    try:
        recorded = json.loads((directory / MANIFEST_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{directory / MANIFEST_FILE} is not valid JSON ({err}); {fix}") from err
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{directory / MANIFEST_FILE} holds no manifest (a JSON object); {fix}")
    version = recorded.get("camexport_version", "unknown")
    if _version_key(version) != _version_key(__version__):
        raise ArtifactError(f"{directory} was built by camexport {version}, this is camexport "
                            f"{__version__} (artifacts are read by the same major.minor); {fix}")
    if GRAPH_DIGEST_KEY not in recorded or "plain_sha256" not in recorded:
        raise ArtifactError(f"{directory / MANIFEST_FILE} records no digests of the graphs (built "
                            f"before camexport checked them), so its files cannot be checked "
                            f"against each other; {fix}")
    graphs = recorded.get("graphs") or {}
    for name, digest in ((PLAIN_FILE, recorded["plain_sha256"]), (AUGMENTED_FILE, recorded[GRAPH_DIGEST_KEY]),
                         *((extra_file(key), value) for key, value in graphs.items())):
        if not (directory / name).is_file():
            raise ArtifactError(f"{directory} is an incomplete artifact ({name}, listed in "
                                f"{MANIFEST_FILE}, is missing); {fix}")
        found = sha256(directory / name)
        if found != digest:
            raise ArtifactError(
                f"{directory / name} does not match {MANIFEST_FILE} (sha256 {found[:12]}..., "
                f"recorded {str(digest)[:12]}...): it was modified, truncated or copied from "
                f"another build, and would give results that disagree with the rest; {fix}")
    embedded = get_manifest(read_onnx(directory / AUGMENTED_FILE, external_data=False,
                                      error=ArtifactError, fix=fix))
    expected = {k: v for k, v in recorded.items() if k != GRAPH_DIGEST_KEY}
    if json.dumps(embedded, sort_keys=True) != json.dumps(expected, sort_keys=True):  # NaN drifts
        raise ArtifactError(f"{directory / MANIFEST_FILE} and the manifest inside "
                            f"{directory / AUGMENTED_FILE} differ (different builds); {fix}")
    if _stats(directory) != stats:
        raise ArtifactError(f"{directory} changed while it was being checked (a build writing it?); "
                            f"wait for it, or {fix}")
    _VERIFIED[key] = (stats, embedded)
    return directory, embedded


def read_artifact(path: str | Path, expected: Mapping | None = None) -> tuple[onnx.ModelProto, dict]:
    """The augmented graph and manifest of an artifact directory (or its .onnx file), verified
    (:func:`verify_artifact`); ``expected``: the manifest the caller read before (the artifact
    must not have been replaced since)."""
    return _load_verified(path, AUGMENTED_FILE, expected)


def read_plain(path: str | Path, expected: Mapping | None = None) -> onnx.ModelProto:
    """The plain (forward-only) graph of an artifact, verified as :func:`read_artifact`."""
    return _load_verified(path, PLAIN_FILE, expected)[0]


def extra_file(key: str) -> str:
    """The file of an artifact's extra graph ``key`` (a two-stage detector's ``rpn``)."""
    return f"model.{key}.onnx"


def read_extra(path: str | Path, key: str, expected: Mapping | None = None) -> onnx.ModelProto:
    """An artifact's extra graph ``key`` (manifest ``graphs``), its digest checked against the
    manifest's."""
    directory, manifest = verify_artifact(path)  # the extra graphs' digests included
    if key not in (manifest.get("graphs") or {}):
        raise ArtifactError(f"{directory} has no {key!r} graph (its manifest lists "
                            f"{sorted(manifest.get('graphs') or {}) or 'none'})")
    return _load_verified(path, extra_file(key), expected)[0]


def _load_verified(path: str | Path, name: str, expected: Mapping | None) -> tuple[onnx.ModelProto, dict]:
    directory, manifest = verify_artifact(path)
    fix = REBUILD.format(dir=directory)
    model = read_onnx(directory / name, error=ArtifactError, fix=fix)
    after = verify_artifact(directory)[1]  # the files' stats, kept: costs no hashing
    if after is not manifest or (expected is not None and dict(expected) != manifest):
        raise ArtifactError(f"{directory} was replaced while in use (camexport build --overwrite?); "
                            f"open it again (a new Explainer) to use the new artifact")
    return model, manifest


# -- writing ---------------------------------------------------------------------------------
def temporary_path(path: Path) -> Path:
    """Where a file is written before it is renamed over ``path``."""
    return path.with_name(f".{path.name}.partial")


def replace_atomic(temporary: Path, path: Path) -> None:
    """Flush ``temporary`` to disk and rename it over ``path`` (atomic on one filesystem)."""
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new, never half."""
    temporary = temporary_path(path)
    with open(temporary, "wb") as handle:
        handle.write(data)
    replace_atomic(temporary, path)


def _scratch_prefixes(target: Path) -> tuple[str, str]:
    """Name prefixes of a build's temporary directory and of a replaced artifact, beside ``target``."""
    return f".{target.name}.partial-", f".{target.name}.old-"


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse ``target`` unless it is absent, an empty directory, or (``overwrite``) a directory
    holding only artifact files (:func:`artifact_file_names`)."""
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise ArtifactError(f"--out {target} exists and is not a directory; choose another --out")
    names = sorted(p.name for p in target.iterdir())
    if not names:
        return
    own = set(artifact_file_names(target))  # an R-CNN's extra graphs (model.rpn.onnx, ...) too
    foreign = [n for n in names if n not in own and not n.startswith(".") and not n.endswith(".partial")]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ArtifactError(f"--out {target} is a directory holding other files ({shown}), not an "
                            f"artifact; choose another --out (camexport replaces only artifacts)")
    if not overwrite:
        raise ArtifactError(f"--out {target} already holds an artifact; pass --overwrite "
                            f"(overwrite=True) to replace it, or choose another --out")


@contextmanager
def artifact_lock(target: Path, wait: bool = False) -> Iterator[None]:
    """Hold the build lock of ``target`` (``.<name>.lock`` beside it, :mod:`camexport.locks`);
    without ``wait``, an :class:`ArtifactBusyError` naming the holder when another process holds it."""
    def busy(holder: str) -> ArtifactBusyError:
        return ArtifactBusyError(f"{target} is being built by {holder} (it holds {lock.file}); wait for "
                                 f"that build to finish, or build into another --out")

    lock = FileLock(target.with_name(f".{target.name}.lock"), "build", busy, wait=wait)
    with lock:
        yield


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _remove_scratch(target: Path) -> None:
    """Temporary and replaced directories of earlier (killed) builds of ``target``."""
    prefixes = _scratch_prefixes(target)
    for path in target.parent.iterdir():
        if path.name.startswith(prefixes) and path.is_dir():
            log.info("removing %s, left by an interrupted build", path)
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def artifact_writer(target: Path, overwrite: bool = False) -> Iterator[None]:
    """Hold ``target``'s build lock and check it may be written (:func:`check_target`) for the
    whole build; :func:`write_artifact` within it writes the artifact in one step."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with artifact_lock(target):
        check_target(target, overwrite)
        _remove_scratch(target)
        yield


def write_artifact(directory: Path, plain: onnx.ModelProto, augmented: onnx.ModelProto,
                   manifest: Mapping, extra: Mapping[str, bytes] | None = None) -> None:
    """Write the three files of an artifact into a temporary directory beside ``directory``,
    then rename it into place (module docstring). Call it within :func:`artifact_writer`.
    ``extra``: serialised extra graphs by key (:func:`extra_file`), whose digests the manifest
    records under ``graphs``."""
    partial, old = _scratch_prefixes(directory)
    scratch = Path(tempfile.mkdtemp(prefix=partial, dir=directory.parent))
    try:
        graph, plain_bytes = augmented.SerializeToString(), plain.SerializeToString()
        if hashlib.sha256(plain_bytes).hexdigest() != manifest["plain_sha256"]:
            raise RuntimeError("camexport bug: the plain graph changed after its digest was taken")
        recorded = {**manifest, GRAPH_DIGEST_KEY: hashlib.sha256(graph).hexdigest()}
        extra = dict(extra or {})
        if {k: hashlib.sha256(v).hexdigest() for k, v in extra.items()} != dict(manifest.get("graphs") or {}):
            raise RuntimeError("camexport bug: the extra graphs do not match the manifest's digests")
        for name, data in ((PLAIN_FILE, plain_bytes), (AUGMENTED_FILE, graph),
                           *((extra_file(k), v) for k, v in extra.items()),
                           (MANIFEST_FILE, json.dumps(recorded, indent=2).encode())):
            with open(scratch / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            fault_point("artifact-write")
        scratch.chmod(0o777 & ~_umask())
        _fsync_directory(scratch)
        fault_point("artifact-swap")
        if directory.is_dir() and _exchange(scratch, directory):
            fault_point("artifact-swapped")
            shutil.rmtree(scratch)  # it holds the old artifact now
        else:
            if directory.is_dir() and any(directory.iterdir()):
                # no atomic exchange here: the target is absent between these two renames
                aside = Path(tempfile.mkdtemp(prefix=old, dir=directory.parent))
                os.replace(directory, aside / "artifact")
                os.replace(scratch, directory)
                shutil.rmtree(aside)
            else:
                os.replace(scratch, directory)
        _fsync_directory(directory.parent)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
