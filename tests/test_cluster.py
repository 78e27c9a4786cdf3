"""A sharded reference served by a real Dask cluster (a LocalCluster of two worker processes): the same
answers as one reference in this process, shards held on the workers, lost workers recovered from,
missing or changed files named."""

import os
import pickle
import shutil
import signal
import threading
import time

import numpy as np
import pytest

import bleep_rs
from bleep_rs import BleepError, Reference

pytest.importorskip("distributed")

from conftest import local_cluster

#: Worker processes of a real LocalCluster (a developer need not run them on every change; `make test` does).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    with local_cluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as (_, c):
        yield c


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One reference with duplicated embeddings across the shard boundaries (ties), saved as one file
    and as 4 shards of 60 spots."""
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((230, 12)).astype(np.float32) * rng.uniform(0.5, 2, (230, 1)).astype(np.float32)
    emb[58:64] = emb[0:6]  # the same rows in shards 0 and 1
    emb[178:182] = emb[58:62]
    expr = rng.gamma(2.0, 1.0, (230, 9)).astype(np.float32)
    folder = tmp_path_factory.mktemp("atlas")
    ref = Reference.build(emb, expr, [f"g{i}" for i in range(9)], sections=[f"s{i // 50}" for i in range(230)], metadata={"model_id": "m1"})
    ref.save(folder / "one.safetensors")
    ref.save(folder / "atlas", shard_spots=60)
    return Reference.load(folder / "one.safetensors"), folder


@pytest.fixture(scope="module")
def served(client, single):
    ref = Reference.load(single[1] / "atlas", client=client)
    yield ref
    ref.close()


def queries(single, n=25):
    ref = single[0]
    rng = np.random.default_rng(3)
    return np.concatenate([rng.standard_normal((n, ref.dim)), ref.embeddings[[0, 1, 59, 60, 179]]]).astype(np.float32)


def test_answers_equal_one_reference(single, served):
    ref, q = single[0], queries(single)
    for k in (1, 7, 64, 500):
        idx, sims = ref.search(q, k)
        idx2, sims2 = served.search(q, k)
        np.testing.assert_array_equal(idx2, idx)
        np.testing.assert_array_equal(sims2, sims)
        for method in bleep_rs.METHODS:
            got, i3, _ = served.impute(q, k, method, return_neighbours=True)
            np.testing.assert_array_equal(i3, idx)
            np.testing.assert_allclose(got, ref.impute(q, k, method), rtol=2e-5, atol=2e-5, err_msg=method)
            np.testing.assert_allclose(served.impute(q, k, method, centre_sections=True), ref.impute(q, k, method, centre_sections=True),
                                       rtol=1e-4, atol=1e-4, err_msg=method)  # the section means computed on the workers
        np.testing.assert_allclose(served.neighbour_spread(idx), ref.neighbour_spread(idx), rtol=1e-4, atol=1e-5)


def test_imputation_in_blocks_of_queries_equals_one_reference(single, served, monkeypatch):
    """The pipelined imputation (searches queued at once, each block's aggregation as its neighbours
    come) over blocks of 7 queries, the last one short: the same answers as one reference."""
    ref, q = single[0], queries(single)
    monkeypatch.setattr(served._shards, "query_block", 7)
    for method in bleep_rs.METHODS:
        got, idx, sims = served.impute(q, 20, method, return_neighbours=True)
        want, idx1, sims1 = ref.impute(q, 20, method, return_neighbours=True)
        np.testing.assert_array_equal(idx, idx1)
        np.testing.assert_array_equal(sims, sims1)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=method)


def test_shards_live_on_the_workers(client, served, single):
    held = served._shards.who_has()
    assert sorted(held) == [0, 1, 2, 3] and all(held.values())
    assert {a for addrs in held.values() for a in addrs} <= set(client.scheduler_info()["workers"])
    assert "on a Dask cluster" in repr(served)
    # the scheduler counts a shard as what it holds outside its map (at most 1 MiB), not as its file: a
    # worker's shards summed as files passed its memory limit and Dask refused the work (MemoryError)
    keys = [f.key for f in served._shards.futures]
    nbytes = client.run_on_scheduler(lambda dask_scheduler: [dask_scheduler.tasks[k].nbytes for k in keys])
    assert all(n <= min(s["bytes"], 2**20) + 1024 for n, s in zip(nbytes, served.shards))
    ref = single[0]
    assert served.spot_ids == ref.spot_ids and served.sections == ref.sections and served.metadata == ref.metadata
    assert (served.n_spots, served.dim, served.genes, served.expression_dtype) == (ref.n_spots, ref.dim, ref.genes, ref.expression_dtype)
    np.testing.assert_array_equal(served.expression, ref.expression)
    with pytest.raises(BleepError, match="cannot be pickled"):
        pickle.dumps(served)


def test_errors_on_the_workers_come_back_as_bleep_errors(served):
    with pytest.raises(BleepError, match="NaN"):
        served.search(np.full((1, 12), np.nan, np.float32), k=3)


def test_a_reference_file_travels_by_path(client, single):
    ref, q = single[0], queries(single)
    got = client.submit(lambda r, x: r.search(x, 5)[0], ref, q).result()
    np.testing.assert_array_equal(got, ref.search(q, 5)[0])


def test_client_needs_a_sharded_folder(client, single):
    with pytest.raises(BleepError, match="is a reference file, not the folder"):
        Reference.load(single[1] / "one.safetensors", client=client)
    with pytest.raises(BleepError, match="must be a dask.distributed Client"):
        Reference.load(single[1] / "atlas", client="tcp://127.0.0.1:8786")


def test_missing_or_changed_shard_is_named_at_load(client, single, tmp_path):
    copy = tmp_path / "atlas"
    shutil.copytree(single[1] / "atlas", copy)
    (copy / "shard-00002.safetensors").unlink()
    with pytest.raises(BleepError, match=r"shard-00002\.safetensors: shard file missing"):
        Reference.load(copy, client=client)
    shutil.copy(copy / "shard-00001.safetensors", copy / "shard-00002.safetensors")
    with pytest.raises(BleepError, match=r"shard-00002\.safetensors: shard file changed"):
        Reference.load(copy, client=client)


def kill_workers_holding(client, ref, shard):
    """SIGKILL the worker processes that hold ``shard`` (a small shard may have been copied to both;
    their nannies start fresh ones)."""
    addrs = ref._shards.who_has()[shard]
    assert addrs
    kill_workers(client, addrs)


def kill_workers(client, addrs):
    """SIGKILL the worker processes at ``addrs`` and wait until the scheduler has let them go."""
    for pid in client.run(os.getpid, workers=addrs).values():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while set(addrs) & set(client.scheduler_info()["workers"]) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_lost_worker_is_recovered_from(client, single, tmp_path):
    copy = tmp_path / "atlas"
    shutil.copytree(single[1] / "atlas", copy)
    served = Reference.load(copy, client=client)
    ref, q = single[0], queries(single)
    kill_workers_holding(client, served, 0)
    np.testing.assert_array_equal(served.search(q, 20)[0], ref.search(q, 20)[0])  # shard 0 opened again elsewhere
    np.testing.assert_allclose(served.impute(q, 20, "weighted"), ref.impute(q, 20, "weighted"), rtol=2e-5, atol=2e-5)
    # a file gone while its worker is lost: reopening it fails, naming it
    (copy / "shard-00003.safetensors").unlink()
    kill_workers_holding(client, served, 3)
    with pytest.raises(BleepError, match=r"shard-00003\.safetensors: shard file missing"):
        served.search(q, 20)
    served.close()
    client.wait_for_workers(2, timeout=60)


def test_work_is_spread_evenly_however_dask_placed_the_shards(single):
    """Every shard opened on a lone worker, then a second worker joins: balancing moves shards to the idle
    worker (each opened there, the first opening released), and the answers stay those of one file."""
    ref, folder = single
    with local_cluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as (cluster, c):
        served = Reference.load(folder / "atlas", client=c)
        cluster.scale(2)
        c.wait_for_workers(2)
        shards = served._shards
        assert len({a for addrs in shards.who_has().values() for a in addrs}) == 1  # all on the first worker
        shards._balance()
        c.amm.run_once()  # Dask's memory manager drops extra replicas: the shards were moved, not copied
        assert all(len(addrs) == 1 for addrs in shards.who_has().values())
        # Moved, then unpinned: a worker lost with every other would leave a pinned shard waiting for its address.
        restricted = c.run_on_scheduler(lambda dask_scheduler, keys: {k: dask_scheduler.tasks[k].worker_restrictions for k in keys},
                                        keys=[f.key for f in shards.futures])
        assert any(k.endswith("-1") for k in restricted) and not any(restricted.values()), restricted
        load: dict = {}
        for i, addr in shards._holders(range(len(shards.sizes))).items():
            load[addr] = load.get(addr, 0) + shards.sizes[i]
        assert len(load) == 2 and max(load.values()) - min(load.values()) <= max(shards.sizes), load
        q = queries(single)
        np.testing.assert_array_equal(served.search(q, 20)[0], ref.search(q, 20)[0])
        np.testing.assert_allclose(served.impute(q, 20, "mean"), ref.impute(q, 20, "mean"), rtol=2e-5, atol=2e-5)
        # Every worker lost at once, and a search sent while none runs: the nannies' new workers reopen every
        # shard, the moved ones too (pinned, those waited forever for the address they had been placed on).
        kill_workers(c, list(c.scheduler_info()["workers"]))
        box: dict = {}
        searching = threading.Thread(target=lambda: box.setdefault("found", served.search(q, 20)), daemon=True)
        searching.start()
        searching.join(120)
        assert "found" in box, "the search after losing every worker still waits"
        np.testing.assert_array_equal(box["found"][0], ref.search(q, 20)[0])
        served.close()


def test_a_worker_near_its_memory_limit_releases_the_mapped_pages(single):
    """Dask counts mapped file pages as a worker's memory: above half its limit a worker drops them after
    each step (else it spills the shards, which then reopen at every use). Answers are unchanged."""
    import dask

    ref, folder = single
    # A limit below what any worker holds, without Dask's own reactions to it (spill, pause, restart).
    never = {f"distributed.worker.memory.{s}": False for s in ("target", "spill", "pause", "terminate")}
    with dask.config.set(never), local_cluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                                               memory_limit="64MiB") as (_, c):
        served = Reference.load(folder / "atlas", client=c)
        q = queries(single)
        np.testing.assert_allclose(served.impute(q, 20, "softmax"), ref.impute(q, 20, "softmax"), rtol=2e-5, atol=2e-5)
        assert sum(c.run(lambda: bleep_rs.cluster.RELEASED["shards"]).values()) >= 2 * len(served.shards)  # search and aggregate
        np.testing.assert_array_equal(served.search(q, 20)[0], ref.search(q, 20)[0])
        served.close()
