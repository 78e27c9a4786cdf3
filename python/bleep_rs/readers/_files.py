"""Reading a section's files with every check: a missing, damaged or malformed file is a BleepError that
names the file, the row or key, and the fix (tables, JSON metadata, numbers and 0 / 1 flags in them)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .._core import BleepError

_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a file"))


def as_path(value, what: str) -> Path:
    """``value`` (a str or an ``os.PathLike`` of str) as a Path; None, bytes or anything else is an error
    naming ``what`` (Path(None) and Path(b"...") raise a bare TypeError)."""
    if isinstance(value, Path):
        return value
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        shown = "empty" if value == "" else f"a {type(value).__name__}"
        raise BleepError(f"{what} must be a path (str or pathlib.Path), not {shown}{' (decode it: .decode())' if isinstance(value, bytes) else ''}")
    return Path(value)


def checked_input(path, what: str, *, kind: str = "file") -> Path:
    """``path`` after checking that it is a regular file (``kind="file"``), a folder (``"folder"``) or
    either (``"any"``), before anything opens it: a named pipe, a device or a socket would block the
    reader forever or stream without end. Every path a reader opens goes through here."""
    path = as_path(path, what)
    try:
        mode = os.stat(path).st_mode  # follows symbolic links: what the reader would open
    except FileNotFoundError:
        raise BleepError(f"{path}: missing ({what})") from None
    except OSError as e:
        raise BleepError(f"{path}: cannot be read ({e.strerror or e}) ({what})") from None
    if (stat.S_ISREG(mode) and kind in ("file", "any")) or (stat.S_ISDIR(mode) and kind in ("folder", "any")):
        return path
    found = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    wanted = {"file": "a regular file", "folder": "a folder", "any": "a regular file or a folder"}[kind]
    raise BleepError(f"{path}: {found}, not {wanted} ({what}): give the file itself")


def is_input_file(path: Path) -> bool:
    """``path`` exists as anything (a file, a pipe ...): the reader then checks it with
    :func:`checked_input`, so that a pipe where a file belongs is an error rather than skipped."""
    return os.path.lexists(path)


def read_json(path: Path, what: str, *, required: bool = True) -> dict:
    """The JSON object in ``path`` ({} when it is missing and not ``required``)."""
    if not required and not is_input_file(path):
        return {}
    path = checked_input(path, what)
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise BleepError(f"{path}: not valid JSON ({e}): restore the file ({what})") from e
    except RecursionError:  # json's decoder recurses once per nesting level
        raise BleepError(f"{path}: JSON nested too deeply to be metadata: restore the file ({what})") from None
    if not isinstance(data, dict):
        raise BleepError(f"{path}: a JSON object ({{...}}) was expected, not a {type(data).__name__} ({what})")
    return data


def metadata_number(data: dict, key: str, path) -> Optional[float]:
    """``data[key]`` (from a JSON file or ``uns``) as a finite positive number; None when the key is
    absent or null; anything else is an error naming the key and ``path``."""
    value = data.get(key)
    if value is None:
        return None
    number = isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))
    if not (number and np.isfinite(value) and value > 0):
        shown = repr(value) if isinstance(value, (str, bytes)) else str(value)
        raise BleepError(f"{path}: {key} is {shown}; it must be a positive number: correct or remove it")
    return float(value)


def _first_row(path: Path, kwargs: dict) -> list:
    """The cells of a table's first line as text, read with the csv module: pandas would build one column
    object per cell (a second for a section's 15,000 genes)."""
    import csv

    from pandas.io.common import get_handle

    with get_handle(path, "r", compression=kwargs.get("compression", "infer"), encoding=kwargs.get("encoding")) as h:
        line = h.handle.readline()
    return next(csv.reader([line], delimiter=kwargs.get("sep", ",")), [])


def read_table(path: Path, what: str, *, ids: bool = False, **kwargs):
    """``pandas.read_csv`` of ``path``; a missing, damaged or unparsable file is an error naming it, and
    so is a repeated column name (pandas would rename the repeat silently: IGKC, IGKC.1). ``ids``: the
    first column is the index, kept as text ("001" stays "001", not the number 1)."""
    import csv
    import zlib

    import pandas as pd

    checked_input(path, what)
    try:
        with_header = kwargs.get("header", "infer") in ("infer", 0) and not kwargs.get("names")
        header = _first_row(path, kwargs) if with_header else None
        if ids:
            # The first column read as text: a converter, which pandas applies to that column alone (a
            # dtype mapping costs as much as the rest of a 15,000-gene table); empty cells stay missing.
            df = pd.read_csv(path, **{**kwargs, "converters": {0: lambda v: v if v != "" else np.nan}})
            df = df.set_index(df.columns[0])
            if str(df.index.name).startswith("Unnamed: 0"):
                df.index.name = None
        else:
            df = pd.read_csv(path, **kwargs)
        if header is not None:
            check_unique([c for c in header if c != ""], "column names", path, "each column needs its own name")
    except (OSError, EOFError, UnicodeDecodeError, zlib.error, ValueError, csv.Error, pd.errors.ParserError) as e:
        # gzip raises OSError / EOFError / zlib.error; pandas ParserError / EmptyDataError (ValueErrors).
        raise BleepError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from e
    return df


def numbers(df, columns: Sequence[str], path, *, whole: bool = False) -> np.ndarray:
    """The ``columns`` of a table as float64 (n, len(columns)); a cell that is not a number (or not a
    whole number with ``whole``) is an error naming its row and column."""
    import pandas as pd

    out = np.empty((len(df), len(columns)), np.float64)
    for j, col in enumerate(columns):
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values) | (whole & (values != np.round(values)))
        if bad.any():
            i = int(np.argmax(bad))
            kind = "a whole number" if whole else "a number"
            raise BleepError(f"{path}: {col} of {df.index[i]!r} is {str(df[col].iloc[i])!r}, not {kind} ({int(bad.sum())} such rows): fix the file")
        out[:, j] = values
    return out


def flags(df, column: str, path) -> np.ndarray:
    """A 0 / 1 column of a table (under tissue, selected) as booleans; any other value is an error."""
    values = numbers(df, [column], path, whole=True)[:, 0]
    other = (values != 0) & (values != 1)
    if other.any():
        i = int(np.argmax(other))
        raise BleepError(f"{path}: {column} of {df.index[i]!r} is {values[i]:g}; it must be 0 or 1: fix the file")
    return values == 1


def check_unique(names: Sequence[str], what: str, where, fix: str) -> None:
    """Raises when ``names`` repeat, naming the first repeats."""
    import pandas as pd

    index = pd.Index([str(n) for n in names])
    if not index.is_unique:
        dup = index[index.duplicated()].unique()[:3].tolist()
        raise BleepError(f"{where}: duplicated {what} ({dup} ...): {fix}")
