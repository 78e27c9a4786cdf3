"""A reference split in shards: a folder of reference files plus a ``manifest.json``, searched exactly.

Write one with :meth:`Reference.save(folder, shard_spots=N) <bleep_rs.Reference.save>`, or spot by spot
with :class:`ShardWriter` (memory bounded by one shard); open it with ``Reference.load(folder)`` (in this
process) or ``Reference.load(folder, client=client)`` (each shard held by a worker of a Dask cluster, see
:mod:`bleep_rs.cluster`). A :class:`ShardedReference` has the API of a :class:`~bleep_rs.Reference` and
the same answers as one reference holding every spot:

* neighbours: each shard's exact top-k, merged by (similarity descending, global spot index ascending)
  in :func:`merge_topk`, the one place of that rule: the same lists, ties included, as one reference;
* imputation: the weights are computed once from the merged neighbours by the Rust weighting of
  :meth:`Reference.impute` (``_core.neighbour_weights``); each shard sums its own neighbours' rows with
  those weights, and the partial rows add up (equal to one reference's within float32 rounding);
* neighbour_spread: each shard returns, per query and gene, the count, mean and sum of squared
  deviations of its neighbours' expression, combined exactly (Chan et al.'s pairwise update, in float64).

The folder::

    atlas/
      manifest.json              written last: a folder without it is not a reference
      shard-00000.safetensors    ordinary reference files (spots [start, stop) of the whole)
      shard-00001.safetensors

``manifest.json``::

    {"format": "bleep-rs.sharded-reference", "format_version": 1,
     "n_spots": 2130000, "dim": 256, "expression_dtype": "float16", "genes": [...],
     "has_sections": true, "metadata": {...}, "model_id": "9f2c..." (the model fingerprint, or null),
     "shards": [{"file": "shard-00000.safetensors", "start": 0, "stop": 100000,
                 "bytes": 3967145032, "sample_sha256": "...", "sha256": "..."}, ...]}

Checks: opening a sharded reference compares each shard file's size and its *sample digest* with the
manifest: the sha256 of the header length and of four 64 KiB spans (both ends of the safetensors header:
tensor shapes and offsets, labels; both ends of the tensor data: the first embeddings, the last
expression values). That reads 256 KiB per shard whatever its size: a 2.13M-spot atlas in 22 shards
opens in milliseconds, where hashing the headers in full (their spot ids, ~100 MB) took 0.2-0.3 s and
the files in full (tens of GB) minutes. A missing, truncated, grown or replaced file is a
:class:`BleepError` naming it. An edit inside the spans' gaps that keeps the size is found by
:meth:`ShardedReference.verify`, which compares the full sha256 of each file (recorded while writing)
and so reads every byte.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from ._core import BleepError, ReferenceCore
from .reference import (
    DEFAULT_K,
    DEFAULT_METHOD,
    METHODS,
    PathLike,
    Reference,
    _check_k,
    _names,
    _neighbours_asked,
    as_float32_matrix,
    is_sparse_matrix,
    weights_of,
)

__all__ = ["MANIFEST", "ShardWriter", "ShardedReference", "merge_topk", "read_manifest", "write_shards"]

#: The name of the manifest in a sharded reference's folder.
MANIFEST = "manifest.json"
FORMAT = "bleep-rs.sharded-reference"
FORMAT_VERSION = 1
_SHARD_NAME = re.compile(r"^shard-\d{5,}\.safetensors$")
# Rows of the (query x neighbour x gene) block neighbour_spread gathers at once: about 64 MB of float32.
_GATHER_VALUES = 16 * 1024 * 1024
#: What an opened shard is counted as in Dask's memory accounting, at most (see _Shard).
_HELD_OUTSIDE_MAP = 1 << 20


# ---- the ordering rule ---------------------------------------------------------------------------


def merge_topk(parts: Sequence[Sequence[np.ndarray]], k: int) -> tuple:
    """The global top-k of each query from the shards' exact top-k lists.

    ``parts``: one tuple per shard, ``(indices, similarities, *extra)``, each (Q, k_s) with indices
    already global (shard start added); ``extra`` arrays (e.g. the neighbours' norms) travel with their
    neighbour. Returns the same tuple, each (Q, min(k, sum of k_s)), ordered by similarity descending
    and, among equal similarities, global spot index ascending: the order of one reference holding
    every spot, so the lists are identical to its lists, ties included.
    """
    if not parts:
        raise BleepError("merge_topk needs at least one shard's neighbours")
    cols = [np.concatenate([np.asarray(p[j]) for p in parts], axis=1) for j in range(len(parts[0]))]
    key = _rank_key(cols[1], cols[0])
    if key.shape[1] > k:  # the k smallest keys (distinct: no two entries name the same spot), then sorted
        best = np.argpartition(key, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(best, np.argsort(np.take_along_axis(key, best, axis=1), axis=1), axis=1)
    else:
        order = np.argsort(key, axis=1)
    return tuple(np.take_along_axis(c, order, axis=1) for c in cols)


def _rank_key(sims: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """One int64 per neighbour that sorts ascending as (similarity descending, index ascending): the
    float32 similarity's bits made order-preserving and reversed in the high 32 bits, the spot index
    (< 2**31) in the low ones. One key sorts far faster than lexsort's two on rows."""
    bits = (np.asarray(sims, np.float32) + np.float32(0)).view(np.int32)  # + 0: -0.0 becomes 0.0, equal to it
    descending = ~(bits ^ ((bits >> 31) & 0x7FFFFFFF))  # negative floats' bits count down: flip; ~ reverses
    return (descending.astype(np.int64) << 32) | np.asarray(indices, np.int64)


# ---- files: headers, digests, manifest -----------------------------------------------------------


def _header_bytes(f) -> bytes:
    """The safetensors header of an open file: its 8-byte little-endian length and the JSON."""
    head = f.read(8)
    if len(head) < 8:
        raise BleepError(f"{f.name}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    body = f.read(n)
    if len(body) < n:
        raise BleepError(f"{f.name}: truncated safetensors header")
    return head + body


_SPAN = 64 * 1024


def _sample_digest(path: Path) -> str:
    """sha256 of the safetensors header length and of 64 KiB at both ends of the header and of the data
    (see the module's documentation): a fingerprint read in constant time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise BleepError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        end = 8 + struct.unpack("<Q", head)[0]  # where the header ends and the data begins
        h.update(head)
        for at in (8, end - _SPAN, end, size - _SPAN):
            f.seek(min(max(at, 0), size))
            h.update(f.read(_SPAN))
    return h.hexdigest()


def _digests(path: Path) -> dict:
    """Size, sample digest and full sha256 of a shard file, as the manifest records them."""
    full = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            full.update(chunk)
    return {"bytes": path.stat().st_size, "sample_sha256": _sample_digest(path), "sha256": full.hexdigest()}


def _check_shard_file(path: Path, entry: Mapping[str, Any]) -> None:
    """Raises a BleepError naming ``path`` unless it has the size and sample digest the manifest recorded.
    (A same-size change between the sampled spans is found by ShardedReference.verify.)"""
    if not path.is_file():
        raise BleepError(f"{path}: shard file missing: the sharded reference is incomplete; restore the file or rewrite the reference")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise BleepError(f"{path}: shard file changed since the manifest was written ({size} bytes, the manifest says {entry['bytes']}): "
                         "restore the file or rewrite the reference")
    if _sample_digest(path) != entry["sample_sha256"]:
        raise BleepError(f"{path}: shard file changed since the manifest was written (its sample digest differs): "
                         "restore the file or rewrite the reference")


def read_manifest(directory: PathLike) -> dict:
    """The manifest of the sharded reference in ``directory``, checked for consistency (not the files:
    see :meth:`ShardedReference.verify`). Raises a BleepError saying what is wrong."""
    directory = Path(directory).expanduser()
    path = directory / MANIFEST
    if directory.is_file():
        raise BleepError(f"{directory} is a reference file, not the folder of a sharded reference (client= serves one written by "
                         "Reference.save(folder, shard_spots=N))")
    if not directory.is_dir():
        raise BleepError(f"{directory}: no such folder")
    if not path.is_file():
        raise BleepError(f"{directory} is not a sharded reference (no {MANIFEST}; an interrupted write leaves none): "
                         "write it with Reference.save(folder, shard_spots=N) or ShardWriter")
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BleepError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BleepError(f"{path}: not the manifest of a bleep-rs sharded reference (format is not {FORMAT!r})")
    if not isinstance(m.get("format_version"), int) or m["format_version"] > FORMAT_VERSION:
        raise BleepError(f"{path}: written in sharded format {m.get('format_version')}, newer than this bleep-rs reads ({FORMAT_VERSION}): upgrade bleep-rs")
    try:
        shards, at = m["shards"], 0
        for s in shards:
            if not _SHARD_NAME.match(s["file"]):  # a plain name in the folder, never a path elsewhere
                raise BleepError(f"{path}: bad shard file name {s['file']!r}")
            if s["start"] != at or s["stop"] <= s["start"]:
                raise BleepError(f"{path}: shard {s['file']} covers spots [{s['start']}, {s['stop']}), expected to start at {at}")
            at = s["stop"]
            int(s["bytes"]), str(s["sample_sha256"]), str(s["sha256"])
        if not shards or at != m["n_spots"]:
            raise BleepError(f"{path}: the shards cover {at} spots, the manifest says {m['n_spots']}")
        if at >= 2**31:  # merge_topk packs a spot index in 31 bits
            raise BleepError(f"{path}: {at} spots; a sharded reference holds fewer than 2**31")
        missing = [key for key in ("dim", "genes", "expression_dtype", "has_sections", "metadata") if key not in m]
        if missing:
            raise KeyError(missing[0])
    except (KeyError, TypeError) as e:
        raise BleepError(f"{path}: malformed manifest (missing or bad entry {e})") from e
    return m


# ---- one shard, where it is held -----------------------------------------------------------------


class _Shard:
    """One shard file opened (checked against its manifest entry first): its core and its spot range.

    Pickles by path (opened and checked again where it is unpickled), so that a Dask worker can spill
    it or hand it to another worker without copying the table. Its size, for Dask's memory accounting,
    is what it holds outside the map, at most 1 MiB: the file's pages are page cache, which the kernel
    reclaims, not the worker's memory (counted as the file, a worker's shards summed past its memory
    limit and Dask refused the task with a MemoryError). The pages a worker has read still count in its
    resident memory, which Dask watches: :meth:`release_pages` drops them when it nears its limit. Work is
    sent to the worker holding the shard explicitly (:class:`bleep_rs.cluster.DaskShards`), not drawn
    there by the size.
    """

    def __init__(self, path: str, entry: Mapping[str, Any], threads: Optional[int] = None):
        self.path, self.entry, self.threads = path, dict(entry), threads
        _check_shard_file(Path(path), entry)
        try:
            self.core = ReferenceCore.load(path, threads=threads)
        except BleepError as e:
            raise BleepError(f"{path}: shard file unreadable: {e}") from e
        self.start, self.stop = int(entry["start"]), int(entry["stop"])
        if self.core.n_spots != self.stop - self.start:
            raise BleepError(f"{path}: holds {self.core.n_spots} spots, the manifest says {self.stop - self.start}")

    def pool(self, threads: Optional[int]) -> Optional[int]:
        """The threads of a call: its own ``threads=``, else those the shard was opened with."""
        return self.threads if threads is None else threads

    def release_pages(self) -> None:
        """Drops this process's mapping of the file's pages (:meth:`ReferenceCore.release_pages`)."""
        self.core.release_pages()

    def __reduce__(self):
        return (_Shard, (self.path, self.entry, self.threads))

    def __sizeof__(self) -> int:
        return min(int(self.entry["bytes"]), _HELD_OUTSIDE_MAP)


def _check_manifest_against(manifest_path: Path, first: Path, manifest: Mapping[str, Any]) -> None:
    """The manifest's genes, embedding size and section labels against the first shard's own (its
    header, memory-mapped): every answer is labelled by the manifest, so an edited or foreign manifest
    would name genes wrongly or drop the per-section centring without a word."""
    try:
        core = ReferenceCore.load(str(first))
    except BleepError as e:
        raise BleepError(f"{first}: shard file unreadable: {e}") from e
    found = {"genes": list(core.genes), "dim": int(core.dim), "has_sections": core.sections is not None}
    wrong = [key for key, value in found.items() if manifest[key] != value]
    if wrong:
        key = wrong[0]
        shown = (lambda v: f"{len(v)} genes starting {v[:3]}") if key == "genes" else repr
        raise BleepError(f"{manifest_path}: its {key} ({shown(manifest[key])}) differ from the shards' ({shown(found[key])}): "
                         "the manifest is damaged or from another reference; write the reference again")


def _open_shard(path: str, entry: Mapping[str, Any], threads: Optional[int] = None) -> _Shard:
    return _Shard(path, entry, threads)


# Per-shard work: module functions, so that Dask sends them by name. Each takes the shard first.


def _native(a: np.ndarray, dtype) -> np.ndarray:
    """``a`` as the binding takes it: C-contiguous and aligned (Dask hands arrays over in buffers at
    any byte offset, which the binding refuses)."""
    return np.require(a, dtype, ["C_CONTIGUOUS", "ALIGNED"])


def _search_part(shard: _Shard, queries: np.ndarray, k: int, with_norms: bool, threads: Optional[int]) -> tuple:
    """The shard's top-k, indices made global, and the neighbours' embedding norms (or None)."""
    queries = _native(queries, np.float32)
    idx, sims = shard.core.search(queries, min(k, shard.stop - shard.start), threads=shard.pool(threads))
    norms = shard.core.norms_of(idx) if with_norms else None
    return idx + shard.start, sims, norms


def _search_step(total: Optional[tuple], shard: _Shard, queries: np.ndarray, k: int, with_norms: bool, threads: Optional[int]) -> tuple:
    """The running top-k merged with this shard's."""
    part = _search_part(shard, queries, k, with_norms, threads)
    return part if total is None else merge_two(total, part, k, with_norms)


def _aggregate_step(total: Optional[np.ndarray], shard: _Shard, local: np.ndarray, weights: np.ndarray, threads: Optional[int]) -> np.ndarray:
    """This shard's weighted rows added into the running Q x G sum (one array for all the shards: a
    sparse shard then touches only its stored values)."""
    if total is None:
        total = np.zeros((len(local), len(shard.core.genes)), np.float32)
    shard.core.aggregate_add(_native(local, np.int64), _native(weights, np.float32), total, threads=shard.pool(threads))
    return total


def _rows(core: ReferenceCore, local: np.ndarray, threads: Optional[int]) -> np.ndarray:
    """Expression rows ``local`` (1-D) as float32: the core has no row copy, and a gather with weight 1
    is one, exactly (1 * x, each value widened to float32)."""
    return core.aggregate(local.reshape(-1, 1), np.ones((len(local), 1), np.float32), threads=threads)


def _moments_part(shard: _Shard, local: np.ndarray, valid: np.ndarray, threads: Optional[int]) -> tuple:
    """Per query (rows of ``local``, the shard's neighbours where ``valid``) and gene: the number of
    neighbours, their mean and the sum of their squared deviations from it, as float32 (half what
    crosses the network; the deviations are float32 values already), combined in float64."""
    local = _native(local, np.int64)
    q, ks = local.shape
    g = len(shard.core.genes)
    n = valid.sum(axis=1).astype(np.float64)
    mean, m2 = np.zeros((q, g)), np.zeros((q, g))
    step = max(1, _GATHER_VALUES // max(1, ks * g))
    for a in range(0, q, step):
        b = min(q, a + step)
        x = _rows(shard.core, local[a:b].ravel(), shard.pool(threads)).reshape(b - a, ks, g)
        w = valid[a:b, :, None]
        mean[a:b] = (x * w).sum(axis=1, dtype=np.float64) / np.maximum(n[a:b], 1)[:, None]
        # deviations in float32, as the single reference's kernel computes them (3x faster than float64)
        dev = (x - mean[a:b, None, :].astype(np.float32)) * w
        m2[a:b] = np.einsum("qkg,qkg->qg", dev, dev)
    return n, mean.astype(np.float32), m2.astype(np.float32)


def _combine_moments(parts: Sequence[tuple]) -> tuple:
    """Counts, means and squared-deviation sums of disjoint groups, combined exactly (Chan et al.), in
    float64."""
    n, mean, m2 = (np.asarray(a, np.float64) for a in parts[0])
    for nb, mb, m2b in ((np.asarray(a, np.float64) for a in p) for p in parts[1:]):
        total = n + nb
        frac = np.divide(nb, total, out=np.zeros_like(total), where=total > 0)[:, None]
        delta = mb - mean
        mean = mean + delta * frac
        m2 = m2 + m2b + delta**2 * (n[:, None] * frac)
        n = total
    return n, mean, m2


def _split(indices: np.ndarray, starts: Sequence[int]) -> dict:
    """The neighbours (Q, k) global ``indices`` name in each shard (shard i holds spots [starts[i],
    starts[i + 1]), the last one up to the end): {i: (local, cols, valid)} for the shards holding any,
    with (Q, k_s) local indices, their column in ``indices`` and which entries are real (a row with
    fewer points to spot 0 there). k_s is the most neighbours any query has in shard i."""
    owner = np.searchsorted(np.asarray(starts), indices, side="right") - 1
    order = np.argsort(owner, axis=1, kind="stable")  # each row's neighbours grouped by shard, once
    grouped = np.take_along_axis(owner, order, axis=1)
    k = indices.shape[1]
    out = {}
    for i in np.unique(owner):
        first = (grouped < i).sum(axis=1)
        count = (grouped == i).sum(axis=1)
        ks = int(count.max())
        step = np.arange(ks)
        cols = np.take_along_axis(order, np.minimum(first[:, None] + step, k - 1), axis=1)
        valid = step < count[:, None]
        local = np.where(valid, np.take_along_axis(indices, cols, axis=1) - starts[i], 0)
        out[int(i)] = (np.ascontiguousarray(local, dtype=np.int64), cols, valid)
    return out


# ---- where the shards live -----------------------------------------------------------------------


def add_parts(total: Any, part: Any) -> Any:
    """Two partial sums (arrays) added: in place into ``total`` (a copy of it where it is read-only, as
    arrays that came over the network can be)."""
    if not total.flags.writeable:
        total = total.copy()
    total += part
    return total


def merge_two(a: tuple, b: tuple, k: int, with_norms: bool) -> tuple:
    """The top-k of two partial top-k lists (:func:`merge_topk`), with or without the neighbours' norms:
    a merge of merges is the merge of the whole, so shards are merged where they are, then here."""
    return merge_topk([p if with_norms else p[:2] for p in (a, b)], k)


def fold(step: Callable, items: Iterable[tuple], shared: tuple = ()) -> Any:
    """``total = step(total, shard, *shared, *args)`` over the (shard, args) of ``items``, starting from
    None: the shards' results folded into one running total as each comes, never one per shard in memory
    (86 Q x G partial predictions of HEST-1k's 19,000 genes for 4,096 queries are 27 GB)."""
    total = None
    for shard, args in items:
        total = step(total, shard, *shared, *args)
    return total


class _LocalShards:
    """The shards in this process, each opened (and checked) on first use."""

    where = "in this process"

    def __init__(self, directory: Path, manifest: dict, threads: Optional[int]):
        self.directory, self.manifest, self.threads = directory, manifest, threads
        self.opened: list = [None] * len(manifest["shards"])

    def shard(self, i: int) -> _Shard:
        if self.opened[i] is None:
            entry = self.manifest["shards"][i]
            self.opened[i] = _Shard(str(self.directory / entry["file"]), entry, self.threads)
        return self.opened[i]

    def run(self, fn: Callable, per_shard: Mapping[int, tuple], shared: tuple = ()) -> dict:
        """``fn(shard, *shared, *per_shard[i])`` for each shard i of ``per_shard``."""
        return {i: fn(self.shard(i), *shared, *args) for i, args in per_shard.items()}

    #: Queries per block of a pipelined imputation: one block, as nothing here overlaps.
    query_block = None

    def submit_reduced(self, step: Callable, per_shard: Mapping[int, tuple], shared: tuple = (), priority: int = 0) -> Any:
        """``step`` folded over the shards of ``per_shard`` (:func:`fold`), now (``priority``: for a
        cluster's queue)."""
        return fold(step, ((self.shard(i), args) for i, args in per_shard.items()), shared)

    def result(self, submitted: Any, combine: Callable) -> Any:
        """What :meth:`submit_reduced` returned, combined (``combine`` adds the totals of several processes)."""
        return submitted

    def run_reduced(self, step: Callable, per_shard: Mapping[int, tuple], combine: Callable, shared: tuple = ()) -> Any:
        return self.result(self.submit_reduced(step, per_shard, shared), combine)

    def close(self) -> None:
        self.opened = [None] * len(self.opened)


# ---- the sharded reference -----------------------------------------------------------------------


class ShardedReference(Reference, reads_folders=True):
    """A reference stored as shards (see the module's documentation), with the API of
    :class:`~bleep_rs.Reference` and the same answers as one reference of every spot.

    Open one with ``Reference.load(folder)`` or ``Reference.load(folder, client=dask_client)``. Opening
    reads the manifest and checks each shard file's size and sample digest (fast); the shards themselves are
    read on first use (in this process) or on the workers, once each, at load (with a client).
    ``threads`` (of load) is the default thread count of the shards' work, each call's ``threads=``
    overriding it.
    """

    def __init__(self, directory: PathLike, *, threads: Optional[int] = None, client: Any = None):
        self.directory = Path(directory).expanduser().resolve()
        self.manifest = read_manifest(self.directory)
        for s in self.manifest["shards"]:
            _check_shard_file(self.directory / s["file"], s)
        _check_manifest_against(self.directory / MANIFEST, self.directory / self.manifest["shards"][0]["file"], self.manifest)
        self._starts = [int(s["start"]) for s in self.manifest["shards"]]
        if client is None:
            self._shards: Any = _LocalShards(self.directory, self.manifest, threads)
        else:
            from .cluster import DaskShards

            self._shards = DaskShards(client, self.directory, self.manifest, _open_shard, fold, threads)
        self._labels: dict = {}

    @classmethod
    def build(cls, *args: Any, **kwargs: Any) -> Reference:
        """A :class:`Reference` in memory (save it with ``shard_spots=`` to shard it)."""
        return Reference.build(*args, **kwargs)

    @property
    def _core(self):
        raise BleepError("this operation needs a single-file reference: a sharded reference has no single table")

    @classmethod
    def load(cls, path: PathLike, *, threads: Optional[int] = None, client: Any = None) -> "ShardedReference":
        """The sharded reference in folder ``path`` (see :meth:`Reference.load`)."""
        return cls(path, threads=threads, client=client)

    @staticmethod
    def write(reference: Reference, directory: PathLike, *, shard_spots: int) -> Path:
        """Writes any reference as shards (what ``reference.save(directory, shard_spots=N)`` does)."""
        return write_shards(reference, directory, shard_spots=shard_spots)

    def __reduce__(self):
        if not isinstance(self._shards, _LocalShards):
            raise BleepError("a reference served by a Dask cluster cannot be pickled (it holds the client): "
                             f"send its folder ({self.directory}) and load it there")
        return (ShardedReference, (str(self.directory),))

    def close(self) -> None:
        """Releases the shards (in this process, or on the workers)."""
        self._shards.close()

    def verify(self) -> None:
        """Reads every shard file in full and compares its sha256 with the manifest's (slow: all the
        bytes). Raises a BleepError naming each file that is missing or differs."""
        bad = []
        for s in self.manifest["shards"]:
            path = self.directory / s["file"]
            if not path.is_file():
                bad.append(f"{path}: missing")
            elif _digests(path)["sha256"] != s["sha256"]:
                bad.append(f"{path}: contents differ from the manifest's sha256")
        if bad:
            raise BleepError("sharded reference damaged: " + "; ".join(bad) + ": restore the files or rewrite the reference")

    # ---- what it holds ----

    @property
    def shards(self) -> list[dict]:
        """The manifest's shard entries: file, start, stop (spot range), bytes, digests."""
        return [dict(s) for s in self.manifest["shards"]]

    @property
    def n_spots(self) -> int:
        return int(self.manifest["n_spots"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def genes(self) -> list[str]:
        return list(self.manifest["genes"])

    @property
    def n_genes(self) -> int:
        return len(self.manifest["genes"])

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.manifest["metadata"])

    @property
    def expression_dtype(self) -> str:
        return str(self.manifest["expression_dtype"])

    @property
    def expression_format(self) -> str:
        """"sparse" or "dense" (the shards' storage of the expression; "mixed" when they differ)."""
        formats = {e.get("expression_format", "unknown") for e in self.manifest["shards"]}
        return formats.pop() if len(formats) == 1 else "mixed"

    def _label(self, key: str) -> list[str]:
        """A per-spot label ("spot_ids" or "sections") of every shard, read from the mapped shard files
        (their label tensors, not their tables)."""
        if key not in self._labels:
            files = [self.directory / s["file"] for s in self.manifest["shards"]]
            self._labels[key] = [v for f in files for v in getattr(ReferenceCore.load(f), key) or []]
        return self._labels[key]

    @property
    def spot_ids(self) -> list[str]:
        return list(self._label("spot_ids"))

    @property
    def sections(self) -> Optional[list[str]]:
        return list(self._label("sections")) if self.manifest["has_sections"] else None

    @property
    def embeddings(self) -> np.ndarray:
        """Every spot's embedding (N x d float32), gathered from the shards."""
        parts = self._shards.run(_embeddings_part, dict.fromkeys(range(len(self.manifest["shards"])), ()))
        return np.concatenate([parts[i] for i in sorted(parts)])

    @property
    def expression(self) -> np.ndarray:
        """Every spot's expression (N x G float32), gathered from the shards: the whole table."""
        return self.aggregate(np.arange(self.n_spots).reshape(-1, 1), np.ones((self.n_spots, 1), np.float32))

    # ---- retrieval ----

    def _queries(self, queries: Any) -> np.ndarray:
        q = as_float32_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise BleepError(f"queries have {q.shape[1]} columns but the reference embeddings have {self.dim}: "
                             "embed the queries with the model that built this reference")
        return q

    def _search(self, q: np.ndarray, k: int, with_norms: bool, threads: Optional[int]) -> tuple:
        every = dict.fromkeys(range(len(self.manifest["shards"])), ())
        combine = functools.partial(merge_two, k=k, with_norms=with_norms)
        # Already in merge order (a shard's search orders as merge_topk does); only a lone shard's result
        # still carries its unused norms slot.
        found = self._shards.run_reduced(_search_step, every, combine, shared=(q, k, with_norms, threads))
        return tuple(found[:3 if with_norms else 2])

    def search(self, queries: Any, k: int = DEFAULT_K, *, threads: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`Reference.search`: the merge of the shards' exact top-k (:func:`merge_topk`)."""
        idx, sims = self._search(self._queries(queries), _check_k(k), False, threads)
        return idx, sims

    def impute(self, queries: Any, k: int = DEFAULT_K, method: str = DEFAULT_METHOD, *, temperature: float = 0.1,
               return_neighbours: bool = False, threads: Optional[int] = None, return_neighbors: Optional[bool] = None,
               centre_sections: bool = False):
        """As :meth:`Reference.impute`: neighbours merged from the shards, weighted once here by the
        Rust weighting, each shard's weighted rows summed (only Q x G partial sums leave a shard)."""
        if method not in METHODS:
            raise BleepError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        q = self._queries(queries)
        merged = self._search(q, _check_k(k), method == "weighted", threads)
        idx, sims = merged[0], merged[1]
        w = weights_of(q, sims, merged[2] if method == "weighted" else None, method, temperature)
        pred = self._aggregate(idx, w, threads)
        if centre_sections:
            pred = self.centre(pred, idx, w, threads=threads)
        return (pred, idx, sims) if _neighbours_asked(return_neighbours, return_neighbors) else pred

    def _check_indices(self, indices: Any) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
            raise BleepError(f"indices must be a 2-D integer array, got {idx.dtype} with shape {idx.shape}")
        if idx.shape[1] == 0:
            raise BleepError("indices must have at least one column (k >= 1)")
        bad = (idx < 0) | (idx >= self.n_spots)
        if bad.any():
            row = int(np.argmax(bad.any(axis=1)))
            raise BleepError(f"index {idx[bad][0]} (row {row} of indices) is out of range for a reference of {self.n_spots} spots")
        return idx.astype(np.int64, copy=False)

    def _aggregate_jobs(self, idx: np.ndarray, w: np.ndarray, threads: Optional[int]) -> dict:
        """{shard: (its neighbours' local indices, their weights (0 where not real), threads)}."""
        return {i: (local, np.where(valid, np.take_along_axis(w, cols, axis=1), 0).astype(np.float32), threads)
                for i, (local, cols, valid) in _split(idx, self._starts).items()}

    def _aggregate(self, idx: np.ndarray, w: np.ndarray, threads: Optional[int]) -> np.ndarray:
        """Each shard's weighted rows, summed where the shards are (per worker on a cluster: Q x G crosses
        the network once per worker, not once per shard). In blocks of queries where the shards are
        elsewhere (``query_block``): every block is queued at once (in order: explicit priorities, as Dask
        orders tasks submitted within 100 ms of each other as it likes) and each block's partial sums are
        fetched while the workers sum the next, so moving block x G float32 overlaps the work instead of
        following it."""
        pred = np.zeros((idx.shape[0], self.n_genes), np.float32)
        block = self._shards.query_block or max(1, len(idx))
        spans = [(a, min(a + block, len(idx))) for a in range(0, len(idx), block)]
        submitted = [(a, b, self._shards.submit_reduced(_aggregate_step, jobs, (), priority=-c))
                     for c, (a, b) in enumerate(spans) if (jobs := self._aggregate_jobs(idx[a:b], w[a:b], threads))]
        for a, b, parts in submitted:
            pred[a:b] = self._shards.result(parts, add_parts)
        return pred

    def aggregate(self, indices: Any, weights: Any, *, threads: Optional[int] = None) -> np.ndarray:
        """As :meth:`Reference.aggregate` (global indices): each shard's share, summed."""
        idx = self._check_indices(indices)
        w = as_float32_matrix(weights, "weights")
        if w.shape != idx.shape:
            raise BleepError(f"indices {idx.shape} and weights {w.shape} must have the same shape (queries x k)")
        if not np.isfinite(w).all():
            raise BleepError("weights hold a NaN or infinite value")
        return self._aggregate(idx, w, threads)

    def neighbour_spread(self, indices: Any, *, threads: Optional[int] = None) -> np.ndarray:
        """As :meth:`Reference.neighbour_spread`: each shard's per-gene count, mean and squared
        deviations of its neighbours, combined exactly, then the population standard deviation."""
        idx = self._check_indices(indices)
        if idx.shape[0] == 0:
            return np.zeros(0, np.float32)
        jobs = {i: (local, valid, threads) for i, (local, _, valid) in _split(idx, self._starts).items()}
        parts = self._shards.run(_moments_part, jobs)
        n, _, m2 = _combine_moments([parts[i] for i in sorted(parts)])
        return np.sqrt(m2 / n[:, None]).mean(axis=1).astype(np.float32)

    # ---- files ----

    def save(self, path: PathLike, *, shard_spots: Optional[int] = None) -> None:
        """Writes the reference again: as shards of ``shard_spots`` spots in folder ``path``, or (without
        ``shard_spots``) as one file, which holds every spot in memory."""
        if shard_spots is None:
            Reference.build(self.embeddings, self.expression, self.genes, spot_ids=self.spot_ids, sections=self.sections,
                            metadata=self.metadata, expression_dtype=self.expression_dtype).save(path)
        else:
            write_shards(self, path, shard_spots=shard_spots)

    def __len__(self) -> int:
        return self.n_spots

    def __repr__(self) -> str:
        n = len(self.manifest["shards"])
        return (f"ShardedReference({self.n_spots} spots in {n} shard{'s' * (n != 1)} {self._shards.where}, {self.dim}-d embeddings, "
                f"{self.n_genes} genes, expression {self.expression_dtype})")


def _embeddings_part(shard: _Shard) -> np.ndarray:
    return shard.core.embeddings()


# ---- writing -------------------------------------------------------------------------------------


class ShardWriter:
    """Writes a sharded reference spot by spot, holding at most one shard in memory.

        with ShardWriter("atlas/", genes, shard_spots=100_000, metadata=meta) as w:
            for emb, expr, ids, sections in batches:        # expression dense or scipy.sparse
                w.add(emb, expr, spot_ids=ids, sections=sections)

    Each full shard is built and written as soon as it fills; :meth:`close` (the end of the ``with``
    block) writes the last one and the manifest. Everything goes to a temporary folder beside
    ``directory`` that is renamed into place at the end: an interrupted write leaves no folder that
    looks complete (and the next write removes its leftovers). An existing ``directory`` is refused
    unless ``overwrite`` (and even then only a sharded reference or an empty folder is replaced).
    Memory: one shard's embeddings and expression as float32, plus the core's copy while it is built.
    """

    def __init__(self, directory: PathLike, genes: Sequence[str], *, shard_spots: int, metadata: Optional[Mapping[str, Any]] = None,
                 expression_dtype: str = "float32", expression_format: str = "auto", overwrite: bool = False, threads: Optional[int] = None):
        from ._atomic import atomic_path

        if isinstance(shard_spots, bool) or not isinstance(shard_spots, (int, np.integer)) or shard_spots < 1:
            raise BleepError(f"shard_spots must be a whole number >= 1, got {shard_spots!r}")
        self.directory = Path(directory).expanduser()
        _check_destination(self.directory, overwrite)
        genes_list = _names(genes, "genes")
        assert genes_list is not None
        if not genes_list:
            raise BleepError("the gene list is empty: the reference needs at least one gene")
        if len(set(genes_list)) != len(genes_list):
            raise BleepError("gene names must be unique")
        self.genes, self.shard_spots, self.threads = genes_list, int(shard_spots), threads
        self.metadata = _metadata(metadata)
        self.expression_dtype, self.expression_format = expression_dtype, expression_format
        # The shard being filled: its batches as given (slices, no copy), dense or sparse.
        self._emb: list[np.ndarray] = []
        self._expr: list[Any] = []
        self._ids: list[str] = []
        self._sections: Optional[list[str]] = None
        self._with_sections: Optional[bool] = None
        self._fill = 0  # rows in the shard being filled
        self._written = 0  # spots in finished shards
        self._entries: list[dict] = []
        self._dim = 0
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(self.directory))
        self._tmp.mkdir()
        self._closed = self._aborted = False

    @property
    def n_spots(self) -> int:
        """Spots added so far."""
        return self._written + self._fill

    def add(self, embeddings: Any, expression: Any, *, spot_ids: Optional[Sequence[str]] = None,
            sections: Optional[Sequence[str]] = None) -> None:
        """Adds spots: embeddings (n x d) and expression (n x G, dense or scipy.sparse: sparse stays sparse)
        on the writer's genes, their ids (default: their global index) and sections (given for every batch
        or none)."""
        if self._closed:
            raise BleepError("this ShardWriter is closed" + (" (abandoned after an error)" if self._aborted else ""))
        emb = as_float32_matrix(embeddings, "embeddings")
        n = emb.shape[0]
        expr: Any = expression.tocsr() if is_sparse_matrix(expression) else as_float32_matrix(expression, "expression")
        if expr.shape != (n, len(self.genes)):
            raise BleepError(f"expression has shape {expr.shape}; {n} spots x {len(self.genes)} genes expected (one row per embedding, one column per gene)")
        ids = _names(spot_ids, "spot_ids")
        if ids is None:
            ids = [str(i) for i in range(self.n_spots, self.n_spots + n)]
        secs = _names(sections, "sections")
        for what, labels in (("spot_ids", ids), ("sections", secs)):
            if labels is not None and len(labels) != n:
                raise BleepError(f"{what} has {len(labels)} entries for {n} spots")
        if self._with_sections is None:
            self._with_sections = secs is not None
            self._sections = [] if self._with_sections else None
        elif self._with_sections != (secs is not None):
            raise BleepError("sections must be given for every batch or for none")
        if self._dim and emb.shape[1] != self._dim:
            raise BleepError(f"embeddings have {emb.shape[1]} columns, earlier batches {self._dim}")
        self._dim = int(emb.shape[1])
        at = 0
        while at < n:  # split at shard boundaries, flushing each shard as it fills
            take = min(n - at, self.shard_spots - self._fill)
            self._emb.append(emb[at:at + take])
            self._expr.append(expr[at:at + take])
            self._ids += ids[at:at + take]
            if self._sections is not None and secs is not None:
                self._sections += secs[at:at + take]
            self._fill += take
            at += take
            if self._fill == self.shard_spots:
                self._flush()

    def _flush(self) -> None:
        import scipy.sparse as sp

        n, start = self._fill, self._written
        name = f"shard-{len(self._entries):05d}.safetensors"
        emb = np.concatenate(self._emb)
        if any(is_sparse_matrix(x) for x in self._expr):
            expr: Any = sp.vstack([x if is_sparse_matrix(x) else sp.csr_matrix(x) for x in self._expr], format="csr")
        else:
            expr = np.concatenate(self._expr)
        self._emb, self._expr = [], []
        try:
            shard = Reference.build(emb, expr, self.genes, spot_ids=self._ids, sections=self._sections, metadata=self.metadata,
                                    expression_dtype=self.expression_dtype, expression_format=self.expression_format, threads=self.threads)
        except BleepError as e:
            self.abort()  # a reference without these spots would look complete: nothing is written
            raise BleepError(f"spots {start} to {start + n - 1} (shard {name}): {e}; nothing was written") from e
        del emb, expr
        shard._core.save(self._tmp / name)
        fmt = shard.expression_format
        del shard
        self._entries.append({"file": name, "start": start, "stop": start + n, "expression_format": fmt, **_digests(self._tmp / name)})
        self._written += n
        self._fill, self._ids = 0, []
        self._sections = [] if self._with_sections else None

    def close(self) -> Path:
        """Writes the last shard and the manifest, and moves the folder into place. Returns its path."""
        if self._aborted:
            raise BleepError(f"{self.directory}: the write was abandoned after an error: nothing was written")
        if self._closed:
            return self.directory
        try:
            if self._fill:
                self._flush()
            if not self._entries:
                raise BleepError("no spots were added: a reference needs at least one spot")
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "n_spots": self._written, "dim": self._dim,
                "expression_dtype": self.expression_dtype, "genes": self.genes, "has_sections": bool(self._with_sections),
                "metadata": self.metadata, "model_id": self.metadata.get("model_id"), "shards": self._entries,
            }
            (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._emb = self._expr = None
        self._stack.close()  # fsync, then the rename that makes the folder appear
        return self.directory

    def abort(self) -> None:
        """Drops everything written: the destination is left as it was."""
        if not self._closed:
            self._closed = self._aborted = True
            self._emb = self._expr = None
            self._stack.__exit__(BleepError, BleepError("aborted"), None)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _metadata(metadata: Optional[Mapping[str, Any]]) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise BleepError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        return json.loads(json.dumps(dict(metadata)))
    except TypeError as e:
        raise BleepError(f"metadata must be JSON-serialisable: {e}") from e


def _check_destination(directory: Path, overwrite: bool) -> None:
    """Refuses to replace a file, a folder that is neither a sharded reference nor empty, or (without
    ``overwrite``) anything."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise BleepError(f"{directory} is a file: a sharded reference is written to a folder; choose another path")
    if not overwrite:
        raise BleepError(f"{directory} exists: choose another folder or pass overwrite=True")
    if (directory / MANIFEST).is_file() or not any(directory.iterdir()):
        return
    raise BleepError(f"{directory} is a folder that is not a sharded reference: it is not replaced; choose another path")


def write_shards(reference: Reference, directory: PathLike, *, shard_spots: int, overwrite: bool = True) -> Path:
    """Writes ``reference`` as shards of ``shard_spots`` spots into ``directory`` (with a
    :class:`ShardWriter`); what :meth:`Reference.save(directory, shard_spots=N) <Reference.save>` does."""
    ids, sections = reference.spot_ids, reference.sections
    emb = reference.embeddings
    import scipy.sparse as sp

    fmt = reference.expression_format
    with ShardWriter(directory, reference.genes, shard_spots=shard_spots, metadata=reference.metadata,
                     expression_dtype=reference.expression_dtype, expression_format=fmt if fmt in ("dense", "sparse") else "auto",
                     overwrite=overwrite) as w:
        step = max(1, min(int(shard_spots), _GATHER_VALUES // max(1, reference.n_genes)))
        for a in range(0, reference.n_spots, step):
            b = min(a + step, reference.n_spots)
            rows = reference.aggregate(np.arange(a, b).reshape(-1, 1), np.ones((b - a, 1), np.float32))
            w.add(emb[a:b], sp.csr_matrix(rows) if fmt == "sparse" else rows, spot_ids=ids[a:b],
                  sections=None if sections is None else sections[a:b])
    return Path(directory)

