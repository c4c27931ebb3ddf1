"""What protects inputs and finished work from an output: checked before anything is written.

- :func:`refuse_inputs`: an output path that is (or resolves to, through a symlink or a hard
  link) one of the command's inputs is refused.
- :func:`existing_kind`: what an existing output path is (a camexport result, an input dataset
  made by ``camexport pack``, another HDF5 file, a directory ...), so that ``--overwrite``
  replaces only a file of the kind the command writes.
- :class:`OutputLock`: one writer per output. ``OUT.h5.lock`` beside ``OUT.h5`` (and beside its
  ``OUT.h5.parts/`` shards and live view, which only the holder writes) is locked with
  ``flock`` and holds the owner's pid and host. The kernel releases a flock when its holder
  dies, so the lock of a killed run is taken over by the next one (a log line names the old
  pid); a second writer while the holder lives is refused at once, naming it. The lock file is
  removed when the holder ends in any way but a kill; a holder checks after locking that the
  file it locked is still the one at the path (else another holder removed it, and it locks the
  new one), so removing the file never lets two writers in.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import h5py

from camexport.artifact import artifact_file_names
from camexport.locks import FileLock
from camexport.store import INPUT_KIND, KIND_ATTR, StoreError

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

#: What :func:`existing_kind` calls the files camexport writes.
RESULT = "a camexport result"
PACKED = "an input dataset made by camexport pack"


# -- outputs that are inputs ---------------------------------------------------------------------
def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same real path, or the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def refuse_inputs(outputs: list[tuple[str | Path, str]], inputs: list[tuple[str, str | Path | None]]) -> None:
    """StoreError when an output is one of the inputs; ``outputs``: (path, the option that
    names it, e.g. "--out"), ``inputs``: (what it is, e.g. "--data input dataset", path or None)."""
    for output, option in outputs:
        for what, source in inputs:
            if source is not None and _same_file(Path(output), Path(source)):
                raise StoreError(f"{option} {output} is the {what} {source} (the same file"
                                 f"{'' if str(output) == str(source) else ', through a link'}); "
                                 f"writing it would destroy the input: choose another "
                                 f"{option.split()[0]}")


def artifact_files(artifact: str | Path) -> list[Path]:
    """The files of an artifact: its directory's files (for an .onnx file given, the file and
    the artifact files beside it)."""
    path = Path(artifact)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    return [path, *(path.parent / name for name in artifact_file_names(path.parent))]


# -- what an existing output is ------------------------------------------------------------------
def existing_kind(path: str | Path) -> str | None:
    """None for no file, else what it is: "a camexport result", "an input dataset made by
    camexport pack", "an HDF5 file camexport did not write", "a file that is not HDF5", "a
    directory" or "not a regular file"."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if path.is_dir():
        return "a directory"
    if not path.is_file():
        return "not a regular file" if path.exists() else "a broken symbolic link"
    if not h5py.is_hdf5(path):
        return "a file that is not HDF5"
    try:
        with h5py.File(path, "r") as h5:
            attrs = dict(h5.attrs)
    except OSError:
        return "an HDF5 file camexport cannot read"
    if "fingerprint" in attrs:
        return RESULT
    kind = attrs.get(KIND_ATTR)
    if (kind.decode() if isinstance(kind, bytes) else kind) == INPUT_KIND:
        return PACKED
    return "an HDF5 file camexport did not write (or an input dataset packed before pack marked its files)"


def refuse_foreign(path: Path, kind: str | None, own: str, command: str) -> None:
    """StoreError unless ``path`` is absent or of the kind ``command`` writes (``own``)."""
    if kind is not None and kind != own:
        raise StoreError(f"--out {path} exists and is {kind}; camexport {command} only replaces "
                         f"{own} (not even --overwrite replaces anything else): choose another --out, "
                         f"or move it away yourself")


# -- one writer per output -----------------------------------------------------------------------
class OutputLock(FileLock):
    """``with OutputLock(out, "run"):`` the exclusive lock on ``out`` (``OUT.lock``, see
    :mod:`camexport.locks`); the folders made for it are removed again if nothing was written."""

    def __init__(self, path: str | Path, command: str):
        self.path = Path(path)
        super().__init__(self.path.with_name(self.path.name + ".lock"), command, self._busy)
        self.created: list[Path] = []

    def _busy(self, holder: str) -> StoreError:
        return StoreError(f"{self.path} is being written by another camexport process ({holder}; lock "
                          f"{self.file}): wait for it to finish, or choose another --out")

    def __enter__(self) -> Self:
        self.created = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create {self.path.parent} ({err}); choose another --out") from err
        try:
            super().__enter__()
        except OSError as err:
            raise StoreError(f"cannot create the lock file {self.file} ({err}); choose another "
                             f"--out, in a folder you can write") from err
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for folder in self.created:  # folders made for an output that was never written
            try:
                folder.rmdir()
            except OSError:
                break
