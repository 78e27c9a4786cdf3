"""Writing outputs so that nothing is lost or half-written: one temporary-then-rename step and one check
of an output path, used by every writer (predictions, reports, models, checkpoints, figures).

A temporary is named ``.NAME.PID.tmp[SUFFIX]`` beside ``NAME`` (the pattern the Rust core's reference
writer uses too), and a replaced folder is parked as ``.NAME.PID.old`` until the new one is in place. A
process killed mid-write leaves such a file behind; the next write of ``NAME`` removes those whose
process is gone (:func:`remove_stale`), so a rerun cleans up after a kill.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ._core import BleepError

__all__ = ["atomic_path", "check_output", "remove_stale", "same_path"]


def _leftover(name: str) -> "re.Pattern[str]":
    return re.compile(rf"^\.{re.escape(name)}\.(\d+)\.(tmp|old)(\..*)?$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale(path: "os.PathLike[str] | str") -> list:
    """Removes the temporaries of ``path`` that processes now gone left behind; returns them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern, gone = _leftover(path.name), []
    for entry in path.parent.iterdir():
        m = pattern.match(entry.name)
        if m and not _alive(int(m.group(1))):
            _remove(entry)
            gone.append(entry)
    return gone


def _sync(path: Path) -> None:
    """Flushes a file, or every file of a folder, to disk: a renamed output must hold its data even
    after a power cut."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: "os.PathLike[str] | str", *, suffix: Optional[str] = None) -> Iterator[Path]:
    """A temporary path beside ``path`` to write a file or a folder to; when the block ends without an
    exception it replaces ``path`` (a file, or a folder: the old one is removed once the new one is in
    place), otherwise it is removed. ``suffix``: the temporary's (default ``path``'s own, for writers
    that choose the format by it). The folder of ``path`` is created.

        with atomic_path(out) as tmp:
            adata.write_h5ad(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    pid = os.getpid()
    tmp = path.with_name(f".{path.name}.{pid}.tmp{path.suffix if suffix is None else suffix}")
    old = path.with_name(f".{path.name}.{pid}.old")
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise BleepError(f"{path}: nothing was written")
        _sync(tmp)
        if path.exists() and path.is_dir() != tmp.is_dir():
            kinds = ("a file", "a folder")
            raise BleepError(f"{path} is {kinds[path.is_dir()]}, and {kinds[tmp.is_dir()]} is to be written there: move it or choose another path")
        if path.is_dir() and not path.is_symlink():
            os.replace(path, old)  # a folder cannot be renamed over a folder that is not empty
        os.replace(tmp, path)
    finally:
        _remove(tmp)
        _remove(old)


def same_path(a: "os.PathLike[str] | str", b: "os.PathLike[str] | str") -> bool:
    """Whether two paths name the same file or folder (following links; either may not exist)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output(
    path: "os.PathLike[str] | str",
    *,
    suffixes: Sequence[str] = (),
    inputs: Sequence["os.PathLike[str] | str"] = (),
    overwrite: bool = False,
    option: str = "--out",
) -> Path:
    """Checks an output path before any work: its suffix is one of ``suffixes`` (when given), it is none
    of ``inputs``, it does not exist unless ``overwrite``, and its folder is (or can be created as) a
    writable folder. Raises :class:`BleepError` naming ``option`` and the fix."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise BleepError(f"{option} {path}: the name must end in {' or '.join(suffixes)}")
    for source in inputs:
        if source is not None and same_path(path, source):
            raise BleepError(f"{option} {path} is an input of this command ({source}): choose another output path")
    if path.exists() and not overwrite:
        raise BleepError(f"{path} exists: choose another {option} or pass --overwrite")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise BleepError(f"{option} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BleepError(f"{option} {path}: the folder {folder} is not writable: choose another output path")
    return path
