"""Writing outputs so that nothing is lost or half-written: one temporary-then-rename step and one check
of an output path, used by every writer (predictions, reports, models, checkpoints, figures).

A temporary is named ``.NAME.PID-TID-RAND.tmp[SUFFIX]`` beside ``NAME`` (unique per writer: process,
thread and a random part; the Rust core's reference writer's ``.NAME.PID.tmp`` is recognised too), and a
replaced folder is parked as ``.NAME.PID-TID-RAND.old`` until the new one is in place. A process killed
mid-write leaves such a file behind; the next write of ``NAME`` removes those whose process is gone
(:func:`remove_stale`), so a rerun cleans up after a kill. Outputs get the permissions the umask gives a
new file (0666 & ~umask, folders 0777 & ~umask), whatever the writer used.

A command holds :func:`output_lock` on each output for its whole run (a ``.NAME.lock`` file beside it,
locked with ``flock``): a second command writing the same output stops at once, naming the first's pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import threading
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

from ._core import BleepError

__all__ = ["atomic_path", "check_output", "output_lock", "remove_stale", "same_path", "temporary_name"]


def _leftover(name: str) -> "re.Pattern[str]":
    return re.compile(rf"^\.{re.escape(name)}\.(\d+)(?:-[0-9a-z]+-[0-9a-z]+)?\.(tmp|old)(\..*)?$")


def temporary_name(name: str, kind: str = "tmp") -> str:
    """``.NAME.PID-TID-RAND.KIND``: the name of a writer's temporary (``kind`` "tmp") or parked old
    folder ("old") beside ``NAME``; two writers (processes or threads) never share one."""
    return f".{name}.{os.getpid()}-{threading.get_ident():x}-{secrets.token_hex(4)}.{kind}"


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (os.umask sets it: racy with
    threads), else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path) -> None:
    """Gives a written file (or folder and all it holds) the mode a new file gets: mkstemp and some
    writers make 0600, and an output others of the group share must be readable as any other file."""
    mask = _umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


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
    tmp = path.with_name(temporary_name(path.name) + (path.suffix if suffix is None else suffix))
    old = path.with_name(temporary_name(path.name, "old"))
    try:
        yield tmp
        if not tmp.exists():
            raise BleepError(f"{path}: nothing was written")
        _follow_umask(tmp)
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


def _overlap(output: Path, source: Path) -> Optional[str]:
    """How writing ``output`` would touch ``source`` (links followed): it is it, holds it, or lies in it."""
    if same_path(output, source):
        return "is"
    out, src = output.resolve(), source.resolve()
    if out in src.parents:
        return "contains"
    if src in out.parents:
        return "lies inside"
    return None


def _writable(folder: Path) -> Optional[str]:
    """Why nothing can be created in an existing folder, or None: a real probe (os.access says yes to
    root, and knows nothing of read-only file systems)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e.strerror or str(e)


#: How the library's writers (write_h5ad, write_zarr ...) name their output in :func:`check_output`'s errors:
#: by their arguments (the command line says its flags instead: bleep_rs.cli.as_flags).
LIBRARY_OUTPUT = {"option": "path", "overwrite_option": "overwrite=True"}


def check_output(
    path: "os.PathLike[str] | str",
    *,
    suffixes: Sequence[str] = (),
    inputs: Sequence[Optional["os.PathLike[str] | str"]] = (),
    overwrite: bool = False,
    option: str = "out",
    overwrite_option: str = "overwrite=True",
) -> Path:
    """Checks an output path before any work: its suffix is one of ``suffixes`` (when given), it neither
    is, holds nor lies inside any of ``inputs`` (resolved, links followed; ``None`` entries are skipped:
    with or without ``overwrite``, no output ever replaces what the command reads), it does not exist
    unless ``overwrite``, and its folder is (or can be created in) a writable folder. The one check of an
    output path. Raises :class:`BleepError` naming ``option`` and the fix (``overwrite_option``: how the
    caller says overwrite; the library's writers name their arguments, the command line its flags)."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise BleepError(f"{option}={path}: the name must end in {' or '.join(suffixes)}")
    for source in inputs:
        if source is None or str(source) == "":
            continue
        how = _overlap(path, Path(source))
        if how == "is":
            raise BleepError(f"{option}={path} is an input of this command ({source}): choose another output path")
        if how:
            raise BleepError(f"{option}={path} {how} {source}, an input of this command: writing it would replace what is read; "
                             "choose an output path outside the inputs")
    if path.exists() and not overwrite:
        raise BleepError(f"{path} exists: choose another {option}= or pass {overwrite_option}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise BleepError(f"{option}={path}: {folder} is a file, not a folder")
    why = _writable(folder)
    if why:
        raise BleepError(f"{option}={path}: the folder {folder} is not writable ({why}): choose another output path")
    return path


# -- one writer per output ---------------------------------------------------------------------------

_HELD: Dict[Path, Tuple[int, int]] = {}  # lock file -> (fd, depth): a process re-entering its own lock
_HELD_LOCK = threading.Lock()


def _lock_path(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    return path.with_name(f".{path.name}.lock")


def _holder(lock: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f"pid {int(lock.read_text().split()[0])}"
    return "pid unknown"


def _acquire(lock: Path) -> int:
    """An fd holding an exclusive flock on ``lock`` (the file at that name now: a lock file that its
    holder removed on release is not the one a new writer must lock)."""
    import fcntl

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            target = str(lock.with_name(lock.name[1:-5]))
            raise BleepError(f"{target} is being written by another process ({_holder(lock)}): wait for it to end, "
                             "or choose another output path") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # removed by its holder between our open and our lock: lock the new one


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def output_lock(path: "os.PathLike[str] | str") -> Iterator[Path]:
    """Holds the output ``path`` for this process for the block: a ``.NAME.lock`` file beside it, locked
    with ``flock`` (released by the system when the process dies, however it dies) and removed at the
    end. A second process locking the same output gets a :class:`BleepError` naming the first's pid; the
    same process may enter it again (a command that locks its output, then calls a library writer that
    locks it too)."""
    lock = _lock_path(Path(path))
    made = [p for p in [lock.parent, *lock.parent.parents] if not p.exists()]
    with _HELD_LOCK:
        fd, depth = _HELD.get(lock, (-1, 0))
        if depth == 0:
            lock.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = _acquire(lock)
            except BaseException:
                _remove_empty(made)
                raise
        _HELD[lock] = (fd, depth + 1)
    try:
        yield Path(path)
    finally:
        with _HELD_LOCK:
            fd, depth = _HELD[lock]
            if depth == 1:
                del _HELD[lock]
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # before unlocking: a new writer locks a new file, see _acquire
                os.close(fd)
                _remove_empty(made)  # the folders made for the lock, when nothing was written in them
            else:
                _HELD[lock] = (fd, depth - 1)
