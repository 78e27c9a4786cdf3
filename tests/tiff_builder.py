"""A little-endian classic TIFF written tag by tag, for files no writer would make: SubIFDs that loop
or repeat, directories that point at each other, resolution tags with zero denominators or signed
values, sizes the data cannot hold.

    ifds = [rgb_strip(4, 3, extra={330: (4, [Ref(0)] * 1000)})]
    path.write_bytes(build(ifds))

Values are (TIFF type, list); a value ``Ref(i)`` is the offset of directory i, ``Blob(k)`` the offset of
data blob k. A directory's "next" (the key "next") is the index of the directory that follows it in
the chain, None to end it; by default directory i is followed by i + 1.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

#: Bytes per value of each TIFF type (a RATIONAL / SRATIONAL is written as two LONG / SLONG values).
WIDTH = {1: 1, 2: 1, 3: 2, 4: 4, 5: 4, 9: 4, 10: 4, 11: 4, 12: 8, 13: 4}
PACK = {1: "B", 2: "B", 3: "H", 4: "I", 5: "I", 9: "i", 10: "i", 11: "f", 12: "d", 13: "I"}


@dataclass(frozen=True)
class Ref:
    """The offset of directory ``index``."""

    index: int


@dataclass(frozen=True)
class Blob:
    """The offset of data blob ``index``."""

    index: int


@dataclass(frozen=True)
class Alias:
    """An entry of ``count`` values that are not written again: it points at the out-of-line values of
    ``tag`` in the earlier directory ``ifd`` (as a damaged file may do, many times over)."""

    count: int
    ifd: int
    tag: int


Tags = Dict[object, object]


def rgb_strip(width: int, height: int, *, blob: int = 0, nbytes: Optional[int] = None, extra: Optional[Tags] = None) -> Tags:
    """An uncompressed RGB image in one strip, its pixels in data blob ``blob`` (``nbytes`` long)."""
    tags: Tags = {
        256: (4, [width]), 257: (4, [height]), 258: (3, [8, 8, 8]), 259: (3, [1]), 262: (3, [2]),
        273: (4, [Blob(blob)]), 277: (3, [3]), 278: (4, [height]),
        279: (4, [width * height * 3 if nbytes is None else nbytes]),
    }
    tags.update(extra or {})
    return tags


def _count(kind: int, values: Sequence[object]) -> int:
    return len(values) // 2 if kind in (5, 10) else len(values)


def _size(tags: Tags) -> int:
    entries = [v for k, v in tags.items() if isinstance(k, int)]
    outside = sum(len(v) * WIDTH[t] for t, v in entries if not isinstance(v, Alias) and len(v) * WIDTH[t] > 4)
    return 2 + 12 * len(entries) + 4 + outside


def build(ifds: List[Tags], blobs: Sequence[bytes] = ()) -> bytes:
    """The file: header, the directories (each followed by its out-of-line values), then the blobs."""
    at = [8]
    for tags in ifds:
        at.append(at[-1] + _size(tags))
    blob_at = [at[-1]]
    for b in blobs:
        blob_at.append(blob_at[-1] + len(b))

    def resolve(v: object) -> object:
        return at[v.index] if isinstance(v, Ref) else blob_at[v.index] if isinstance(v, Blob) else v

    out = bytearray(b"II*\x00" + struct.pack("<I", 8 if ifds else 0))
    placed: Dict[Tuple[int, int], int] = {}  # (directory, tag): where its out-of-line values are
    for i, tags in enumerate(ifds):
        entries = sorted((k, v) for k, v in tags.items() if isinstance(k, int))
        extra_at = at[i] + 2 + 12 * len(entries) + 4
        extra = bytearray()
        out += struct.pack("<H", len(entries))
        for tag, (kind, values) in entries:
            if isinstance(values, Alias):
                out += struct.pack("<HHII", tag, kind, values.count, placed[(values.ifd, values.tag)])
                continue
            raw = b"".join(struct.pack("<" + PACK[kind], resolve(v)) for v in values)
            out += struct.pack("<HHI", tag, kind, _count(kind, values))
            if len(raw) <= 4:
                out += raw.ljust(4, b"\0")
            else:
                out += struct.pack("<I", extra_at)
                placed[(i, tag)] = extra_at
                extra_at += len(raw)
                extra += raw
        nxt = tags.get("next", i + 1 if i + 1 < len(ifds) else None)
        out += struct.pack("<I", 0 if nxt is None else at[nxt])
        out += extra
    for b in blobs:
        out += b
    return bytes(out)
