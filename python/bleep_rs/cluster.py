"""A sharded reference served by a Dask cluster (``pip install bleep-rs[dask]``).

    from distributed import Client
    client = Client("scheduler:8786")                   # or distributed.LocalCluster(...)
    atlas = bleep_rs.Reference.load("atlas/", client=client)
    predicted = atlas.impute(embeddings, k=50)           # same answers as in one process

Every worker must see the reference's folder at the same path (a shared file system). Loading submits
one task per shard that opens the shard file (checked against the manifest);
its result, the opened shard, stays there as a Dask future for as long as the reference is used. An
imputation then runs one task per worker and step:

1. each worker searches the shards it holds and merges their top-k (a merge of merges is the merge of
   the whole); the client merges the workers' lists (:func:`bleep_rs.shards.merge_topk`) and computes
   the weights once, with the Rust weighting (``_core.neighbour_weights``);
2. each worker gets its shards' neighbours and weights back and sums its shards' weighted rows into one
   partial prediction; the client adds the workers' partials. Expression never leaves its worker. This
   step runs in blocks of queries (``DaskShards.query_block``), all queued at once: each block's
   partials (block x G float32 from each worker) are fetched while the workers sum the next, so their
   transfer overlaps the work instead of following it. (Searching in blocks too would read every shard's
   embeddings once per block.)

A lost worker: its shards were results of tasks with no inputs but the file path, so the scheduler
recomputes them on another worker (reading the files again) and the queries in flight wait for that.
Spilled to disk or moved, a shard pickles as its path (no copy of the table). If a file went missing or
changed meanwhile, reopening it fails with a BleepError naming it.

Threads: each worker runs the Rust kernels on as many threads as Dask gave it (its ``nthreads``) unless
``threads=`` of ``Reference.load`` says otherwise. ``verify()`` reads the files from
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
    """A BleepError raised on a worker, carried back without the worker's traceback (:func:`_on_worker`,
    the one wrapper of every bleep-rs task, the shards' here and the cohort's): the client raises it again
    as a BleepError, or records it as a slide's error, in the worker's one line."""


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


def _open(open_shard: Callable, path: str, entry: Mapping, threads: Optional[int]) -> Any:
    """On a worker: a shard opened to run on the worker's own thread count unless told otherwise (several
    workers on one machine, each on every core, would oversubscribe it: 20 % slower on 2 cores)."""
    if threads is None:
        from distributed import get_worker

        threads = get_worker().state.nthreads
    return open_shard(path, entry, threads)


def _pinned(addr: Optional[str], *, loose: bool) -> dict:
    """The submit options that run a task on worker ``addr`` (anywhere where None); ``loose``: elsewhere
    when that worker is gone or busy."""
    return {} if addr is None else {"workers": [addr], "allow_other_workers": loose}


#: A worker above this fraction of its Dask memory limit releases the mapped file pages its shards read.
RELEASE_AT = 0.5
#: Shards whose pages this worker released (what the tests observe).
RELEASED = {"shards": 0}


def _fold_then_release(fold: Callable, step: Callable, items: list, shared: tuple) -> Any:
    """On a worker: ``fold(step, items, shared)``, then, where the worker is above :data:`RELEASE_AT` of
    its memory limit, each shard's ``release_pages()``. Dask counts a process's resident memory, mapped
    file pages included: a worker that has read much of its shards' files passes its spill threshold (70 %)
    with no data of its own, spills the shards (each then reopened at every use: 2.13M spots, a third
    slower) and at 80 % pauses. Released pages stay in the page cache; reading them again is a minor fault."""
    try:
        return fold(step, items, shared)
    finally:
        if _near_memory_limit():
            for shard, _ in items:
                try:  # best effort: the step's answer (or its own error) stands whatever madvise says
                    shard.release_pages()
                    RELEASED["shards"] += 1
                except BleepError:
                    pass


def _near_memory_limit() -> bool:
    import psutil
    from distributed import get_worker

    limit = get_worker().memory_manager.memory_limit
    return bool(limit) and psutil.Process().memory_info().rss > RELEASE_AT * limit


def _client_type():
    try:
        from distributed import Client
    except ImportError as e:
        raise BleepError("a client= needs dask.distributed: pip install 'bleep-rs[dask]'") from e
    return Client


class DaskShards:
    """The shards of a sharded reference, each opened once on a worker of ``client``'s cluster and kept
    there as a future (what :class:`~bleep_rs.shards.ShardedReference` uses with a client).
    ``open_shard(path, manifest_entry, threads)`` opens one (on a worker) and checks it (a shard has a
    ``release_pages()``: see :func:`_fold_then_release`); ``fold(step,
    items, shared)`` folds the shards a worker holds into one total (:func:`bleep_rs.shards.fold`,
    passed in: this module does not import that one)."""

    where = "on a Dask cluster"

    def __init__(self, client: Any, directory: Path, manifest: dict, open_shard: Callable, fold: Callable, threads: Optional[int] = None):
        if not isinstance(client, _client_type()):
            raise BleepError(f"client must be a dask.distributed Client, got {type(client).__name__}")
        self.client, self.fold = client, fold
        self.directory, self.tag = directory, uuid.uuid4().hex[:12]
        self._open_args, self.entries = (open_shard, threads), manifest["shards"]
        self.sizes = [int(s["stop"]) - int(s["start"]) for s in self.entries]  # spots per shard
        # Placed by Dask, unrestricted: pinned to a worker (even loosely), a shard whose workers were all lost
        # with its file gone left the next query waiting instead of failing (test_cluster).
        self.futures = [self._submit_open(i) for i in range(len(self.entries))]
        self._opened(self.futures)  # open every shard now: a missing or changed file is an error of load
        self._balance()

    def _submit_open(self, i: int, where: Optional[str] = None, generation: int = 0) -> Any:
        """The task opening shard ``i`` (loosely on worker ``where``, if given)."""
        open_shard, threads = self._open_args
        entry = self.entries[i]
        key = f"bleep-shard-{self.tag}-{i:05d}" + (f"-{generation}" if generation else "")
        return self.client.submit(_on_worker, _open, open_shard, str(self.directory / entry["file"]), entry, threads, key=key, pure=False,
                                  **_pinned(where, loose=True))

    def _opened(self, futures: list) -> None:
        """Waits for shard openings; the first that failed is the error of load (every shard released)."""
        from distributed import wait

        wait(futures)
        for f in futures:
            if f.status == "error":
                error = f.exception()
                self.client.cancel(futures)  # those of a move are not yet self.futures
                self.close()
                if isinstance(error, RemoteBleepError):
                    raise BleepError(f"{error} (opened on a worker: every worker must see {self.directory} at that path)") from None
                raise error

    def _balance(self) -> None:
        """Gives every worker an even share of the spots to search. Dask places the opening tasks as its
        workers free up, which can leave one worker 49 shards and the other 37 (it then searches a third
        longer while the other waits). A shard of a worker above its share is opened again on the worker
        furthest below (loosely placed there: a lost worker's shards still reopen anywhere) and its first
        opening released. A move, not a copy: Dask's memory manager drops extra replicas within seconds."""
        load = dict.fromkeys(self.client.scheduler_info(n_workers=-1)["workers"], 0)
        mine: dict = {}
        for i, addrs in self.who_has().items():
            if len(addrs) == 1 and addrs[0] in load:
                load[addrs[0]] += self.sizes[i]
                mine.setdefault(addrs[0], []).append(i)
        moves: dict = {}
        while len(load) > 1:
            full, empty = max(load, key=load.get), min(load, key=load.get)
            movable = mine.get(full) or []
            if not movable or load[full] - load[empty] <= self.sizes[movable[-1]]:
                break  # as even as whole shards make it
            i = movable.pop()
            load[full] -= self.sizes[i]
            load[empty] += self.sizes[i]
            moves[i] = empty
        if not moves:
            return
        moved = {i: self._submit_open(i, addr, generation=1) for i, addr in moves.items()}
        self._opened(list(moved.values()))
        # Unpinned once open, as the first openings are. Dask (2026.1) takes a task out of no-worker, when a
        # worker joins, only if that worker meets the task's restriction, loose or not: a moved shard whose
        # workers were all lost at once waited forever for the address it was placed on (test_cluster).
        self.client.sync(self.client.scheduler.set_restrictions, worker={f.key: None for f in moved.values()})
        old = [self.futures[i] for i in moved]
        for i, future in moved.items():
            self.futures[i] = future
        self.client.cancel(old)

    def run(self, fn: Callable, per_shard: Mapping[int, tuple], shared: tuple = ()) -> dict:
        """``fn(shard, *shared, *per_shard[i])`` on the worker holding shard i, for each i of
        ``per_shard``. The arguments travel inside each task, not scattered: a task that holds its inputs
        can be run again elsewhere when its worker dies, scattered data would be lost with it (and the
        queries, Q x d, are small beside the Q x G partial predictions that come back)."""
        if not self.futures:
            raise BleepError("this reference was closed: load it again")
        where = self._holders(per_shard)
        tasks = {i: self.client.submit(_on_worker, fn, self.futures[i], *shared, *args, pure=False, **_pinned(where[i], loose=True))
                 for i, args in per_shard.items()}
        with _bleep_errors():
            return dict(zip(tasks, self.client.gather(list(tasks.values()))))

    #: Queries per block of the aggregation (ShardedReference.impute): while the workers sum one block, the
    #: previous block's partial predictions (block x genes float32 from each worker) travel.
    query_block = 512

    def run_reduced(self, step: Callable, per_shard: Mapping[int, tuple], combine: Callable, shared: tuple = ()) -> Any:
        """``total = step(total, shard, *shared, *per_shard[i])`` folded over the shards each worker holds
        (``fold``, one task per worker: the shared arguments travel once per worker,
        and one result comes back per worker: a Q x G partial prediction, or a merged top-k), then the
        workers' totals combined here as they arrive (``combine(total, next)``)."""
        return self.result(self.submit_reduced(step, per_shard, shared), combine)

    def result(self, submitted: Any, combine: Callable) -> Any:
        """The workers' totals of :meth:`submit_reduced`, combined here as each arrives."""
        with _bleep_errors():
            total = None
            for _, part in submitted:
                total = part if total is None else combine(total, part)
            return total

    def submit_reduced(self, step: Callable, per_shard: Mapping[int, tuple], shared: tuple = (), priority: int = 0) -> Any:
        """Queues :meth:`run_reduced`'s tasks (one per worker; ``priority``: higher runs first) and returns
        them as ``distributed.as_completed(..., with_results=True)``, which fetches each result in the
        background as soon as it is done (:meth:`result` combines them)."""
        from distributed import as_completed

        if not self.futures:
            raise BleepError("this reference was closed: load it again")
        groups: dict = {}
        for i, addr in self._holders(per_shard).items():
            groups.setdefault(addr, []).append((self.futures[i], per_shard[i]))
        # Each group on the worker holding its shards (Dask counts a shard as small: it would not keep the work
        # there by itself); loose, so that a worker lost meanwhile does not leave its group waiting for it. A
        # shard whose worker died has no holder until Dask reopens it: that group goes anywhere.
        return as_completed([self.client.submit(_on_worker, _fold_then_release, self.fold, step, items, shared, pure=False, priority=priority,
                                                **_pinned(addr, loose=True))
                             for addr, items in groups.items()], with_results=True)

    def _holders(self, shards) -> dict:
        """One worker per shard among those holding it, the least loaded (in spots) first: a shard held by
        two workers (Dask copies small data where a task needs it) must not pile every task on the first."""
        held, load = self.who_has(), {}
        for addrs in held.values():
            for a in addrs:
                load.setdefault(a, 0)
        chosen = {}
        for i in sorted(shards, key=lambda i: len(held.get(i) or ())):  # the shards with one holder first
            addrs = held.get(i) or []
            chosen[i] = min(addrs, key=lambda a: load[a]) if addrs else None
            if chosen[i] is not None:
                load[chosen[i]] += self.sizes[i]
        return chosen

    def who_has(self) -> dict:
        """Which worker(s) hold each shard: {shard number: [worker addresses]}."""
        held = self.client.who_has(self.futures)
        return {i: list(held.get(f.key, ())) for i, f in enumerate(self.futures)}

    def close(self) -> None:
        """Releases the shards on the workers."""
        if self.futures:
            self.client.cancel(self.futures)
        self.futures = []
