"""Reading a section's files with every check: a missing, damaged or malformed file is a BleepError that
names the file, the row or key, and the fix (tables, JSON metadata, numbers and 0 / 1 flags in them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .._core import BleepError
from ._common import check_unique


def read_json(path: Path, what: str, *, required: bool = True) -> dict:
    """The JSON object in ``path`` ({} when it is missing and not ``required``)."""
    if not path.exists():
        if required:
            raise BleepError(f"{path}: missing ({what})")
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise BleepError(f"{path}: not valid JSON ({e}): restore the file ({what})") from e
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


def read_table(path: Path, what: str, **kwargs):
    """``pandas.read_csv`` of ``path``; a missing, damaged or unparsable file is an error naming it, and
    so is a repeated column name (pandas would rename the repeat silently: IGKC, IGKC.1)."""
    import zlib

    import pandas as pd

    if not path.exists():
        raise BleepError(f"{path}: missing ({what})")
    try:
        df = pd.read_csv(path, **kwargs)
        if kwargs.get("header", "infer") in ("infer", 0) and not kwargs.get("names"):
            header = pd.read_csv(path, **{**kwargs, "header": None, "index_col": None, "nrows": 1, "dtype": str})
            check_unique(header.iloc[0].dropna().tolist(), "column names", path, "each column needs its own name")
    except (OSError, EOFError, UnicodeDecodeError, zlib.error, ValueError, pd.errors.ParserError) as e:
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
