"""A sharded reference served by a Dask cluster (``pip install bleep-rs[dask]``).

    from distributed import Client
    client = Client("scheduler:8786")                   # or distributed.LocalCluster(...)
    atlas = bleep_rs.Reference.load("atlas/", client=client)
    predicted = atlas.impute(embeddings, k=50)           # same answers as in one process

Every worker must see the reference's folder at the same path (a shared file system). Loading submits
one task per shard that opens the shard file (checked against the manifest) on a worker; its result, the
opened shard, stays there as a Dask future for as long as the reference is used. Each query then:

1. scatters the queries once; each shard's task, run on the worker holding it, returns its exact top-k
   (indices made global, similarities, and for "weighted" the neighbours' norms);
2. merges them on the client (:func:`bleep_rs.shards.merge_topk`) and computes the weights once there
   with the Rust weighting (``_core.neighbour_weights``);
3. sends each shard only its own neighbours and weights; each returns a Q x G partial prediction, and the
   client sums them. Expression never leaves its worker.

A lost worker: its shards were results of tasks with no inputs but the file path, so the scheduler
recomputes them on another worker (reading the files again) and the queries in flight wait for that.
Spilled to disk or moved, a shard pickles as its path (no copy of the table). If a file went missing or
changed meanwhile, reopening it fails with a BleepError naming it.

Threads: each worker process runs the Rust kernels on a pool of all the machine's cores by default;
with several workers per machine pass ``threads=`` to ``Reference.load`` (or set BLEEP_RS_NUM_THREADS
in the workers' environment) so that they do not oversubscribe it. ``verify()`` reads the files from
the client's machine.

This module imports ``distributed``; ``import bleep_rs`` does not import it (nor dask).
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ._core import BleepError

__all__ = ["DaskShards", "RemoteBleepError"]


class RemoteBleepError(Exception):
    """A BleepError raised on a worker, carried back without the worker's traceback; the client raises it
    again as a BleepError whose message is the worker's, one line."""


def _on_worker(fn: Callable, *args):
    try:
        return fn(*args)
    except BleepError as e:
        raise RemoteBleepError(str(e)) from None


@contextlib.contextmanager
def _bleep_errors():
    try:
        yield
    except RemoteBleepError as e:
        raise BleepError(str(e)) from None


def _client_type():
    try:
        from distributed import Client
    except ImportError as e:
        raise BleepError("a client= needs dask.distributed: pip install 'bleep-rs[dask]'") from e
    return Client


def reduced(fn: Callable, items: list, shared: tuple, combine: Callable) -> Any:
    """On a worker: ``fn(shard, *shared, *args)`` over the shards it holds, combined as each comes."""
    total = None
    for shard, args in items:
        part = fn(shard, *shared, *args)
        total = part if total is None else combine(total, part)
    return total


class DaskShards:
    """The shards of a sharded reference, each opened once on a worker of ``client``'s cluster and kept
    there as a future (what :class:`~bleep_rs.shards.ShardedReference` uses with a client).
    ``open_shard(path, manifest_entry, threads)`` opens one (on a worker) and checks it."""

    where = "on a Dask cluster"

    def __init__(self, client: Any, directory: Path, manifest: dict, open_shard: Callable, threads: Optional[int] = None):
        from distributed import wait

        if not isinstance(client, _client_type()):
            raise BleepError(f"client must be a dask.distributed Client, got {type(client).__name__}")
        self.client = client
        tag = uuid.uuid4().hex[:12]
        self.futures = [
            client.submit(_on_worker, open_shard, str(directory / s["file"]), s, threads, key=f"bleep-shard-{tag}-{i:05d}", pure=False)
            for i, s in enumerate(manifest["shards"])
        ]
        wait(self.futures)  # open every shard now: a missing or changed file is an error of load
        for f in self.futures:
            if f.status == "error":
                error = f.exception()
                self.close()
                if isinstance(error, RemoteBleepError):
                    raise BleepError(f"{error} (opened on a worker: every worker must see {directory} at that path)") from None
                raise error

    def run(self, fn: Callable, per_shard: Mapping[int, tuple], shared: tuple = ()) -> dict:
        """``fn(shard, *shared, *per_shard[i])`` on the worker holding shard i, for each i of
        ``per_shard``. The arguments travel inside each task, not scattered: a task that holds its inputs
        can be run again elsewhere when its worker dies, scattered data would be lost with it (and the
        queries, Q x d, are small beside the Q x G partial predictions that come back)."""
        if not self.futures:
            raise BleepError("this reference was closed: load it again")
        tasks = {i: self.client.submit(_on_worker, fn, self.futures[i], *shared, *args, pure=False) for i, args in per_shard.items()}
        with _bleep_errors():
            return dict(zip(tasks, self.client.gather(list(tasks.values()))))

    def run_reduced(self, fn: Callable, per_shard: Mapping[int, tuple], combine: Callable, shared: tuple = ()) -> Any:
        """``fn(shard, *shared, *per_shard[i])`` over the shards of ``per_shard``, combined pairwise as each
        comes (``combine(total, next)``): one task per worker combines the shards it holds (the shared
        arguments travel once per worker, and one result comes back per worker: a Q x G partial
        prediction, or a merged top-k), then the workers' results are combined here as they arrive."""
        if not self.futures:
            raise BleepError("this reference was closed: load it again")
        held, groups = self.who_has(), {}
        for i, args in per_shard.items():
            groups.setdefault((held.get(i) or [None])[0], []).append((self.futures[i], args))
        # A shard whose worker died has no holder until Dask reopens it: that group goes anywhere.
        where = lambda addr: {} if addr is None else {"workers": [addr], "allow_other_workers": True}  # noqa: E731
        tasks = [self.client.submit(_on_worker, reduced, fn, items, shared, combine, pure=False, **where(addr))
                 for addr, items in groups.items()]
        from distributed import as_completed

        with _bleep_errors():
            total = None
            for _, part in as_completed(tasks, with_results=True):
                total = part if total is None else combine(total, part)
            return total

    def who_has(self) -> dict:
        """Which worker(s) hold each shard: {shard number: [worker addresses]}."""
        held = self.client.who_has(self.futures)
        return {i: list(held.get(f.key, ())) for i, f in enumerate(self.futures)}

    def close(self) -> None:
        """Releases the shards on the workers."""
        if self.futures:
            self.client.cancel(self.futures)
        self.futures = []
