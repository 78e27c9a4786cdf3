"""An atlas the size of HEST-1k, side by side: bleep-rs's sparse, sharded, memory-mapped reference against
faiss IndexFlatIP + a scipy sparse aggregation of the same neighbours, in one run.

    .venv/bin/python benches/bench_atlas.py                      # the issue's sizes (2.13M spots, 19,000 genes)
    .venv/bin/python benches/bench_atlas.py --spots 200000       # a quick run

What it does (every step prints what it measured; the scratch folder is deleted at the end unless --keep):
  generate   a synthetic atlas: --spots spots, --genes genes, Visium-like counts with about --zeros zeros
             (log1p-normalised values stored as --dtype), --dim-d embeddings in clusters, written by
             bleep-rs's ShardWriter in shards of --shard-spots (build time and peak RSS of that process), and
             the peer's copy (unit float32 embeddings; per-shard CSR in scipy's own types)
  size       bytes per spot: dense (genes x dtype) against the sparse shards on disk
  load       Reference.load(folder) in a fresh process: seconds and resident memory after load
  search     k = 50 neighbours + mean imputation of --queries queries, one process, 2 threads: bleep-rs
             impute against faiss IndexFlatIP search + scipy CSR row gather and weighted sum (per shard, on
             its own int32/float32 CSR); neighbour lists compared (ties aside)
  cluster    the same through Reference.load(folder, client=...) on a LocalCluster of 2 worker processes
             (1 thread each), between two one-process runs: ratio to the faster of those, neighbours identical
  big        (--big-spots, default 0 = skipped) a larger atlas over --big-workers workers, each with a memory
             limit below the whole atlas: shows no worker needs all of it (--only-big: this step alone)

Every heavy step runs in its own process (its RSS is its own). Prints the CPU model, the kernel and the peers'
versions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
K, THREADS = 50, 2


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def rss_mb() -> float:
    """Resident memory of this process now (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB): VmHWM, its own (ru_maxrss also counts a vforking parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------ the data


def chunk_of_spots(rng, n: int, genes: int, zeros: float, dim: int, centres: np.ndarray, dtype: str):
    """n synthetic spots: (embeddings n x dim float32, CSR parts of their expression).

    Non-zero genes are drawn with geometric gaps (so each row's gene indices come out sorted and unique
    without a dense n x genes mask); values are log1p of a per-spot-normalised Poisson-like count, rounded
    to the storage type so that the peer sees exactly the values bleep-rs stores.
    """
    p = 1.0 - zeros
    width = int(genes * p * 1.3) + 64  # enough gaps to cross the last gene in all but ~never
    gaps = rng.geometric(p, size=(n, width)).astype(np.int32)
    cols = np.cumsum(gaps, axis=1, dtype=np.int64) - 1
    keep = cols < genes
    counts = keep.sum(axis=1)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = cols[keep].astype(np.int32)
    raw = rng.geometric(0.35, size=indices.size).astype(np.float32)
    values = np.log1p(raw * (1e4 / 2000.0)).astype(np.float32)
    values = round_to(values, dtype)
    labels = rng.integers(0, len(centres), size=n)
    emb = centres[labels] + 0.35 * rng.standard_normal((n, dim), dtype=np.float32)
    return emb.astype(np.float32), (indptr, indices, values)


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to the storage type (and back), as the reference stores them."""
    if dtype == "float32":
        return values
    if dtype == "float16":
        return values.astype(np.float16).astype(np.float32)
    bits = values.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)  # round to nearest even
    return rounded.view(np.float32)


def generate(args, scratch: Path) -> dict:
    """Writes the atlas (bleep-rs shards and the peer's copy); returns what it measured."""
    import scipy.sparse as sp

    from bleep_rs.shards import ShardWriter

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((512, args.dim), dtype=np.float32)
    genes = [f"G{i:05d}" for i in range(args.genes)]
    peer = scratch / "peer"
    peer.mkdir()
    t0 = time.perf_counter()
    written, writing = 0, 0.0
    writer = ShardWriter(scratch / "atlas", genes, shard_spots=args.shard_spots, expression_dtype=args.dtype,
                         metadata={"model": "synthetic atlas"})
    with writer:
        for start in range(0, args.spots, args.chunk):
            n = min(args.chunk, args.spots - start)
            emb, (indptr, indices, values) = chunk_of_spots(rng, n, args.genes, args.zeros, args.dim, centres, args.dtype)
            expr = sp.csr_matrix((values, indices, indptr), shape=(n, args.genes))
            t = time.perf_counter()
            writer.add(emb, expr, spot_ids=[str(i) for i in range(start, start + n)])
            writing += time.perf_counter() - t
            written += n
            print(f"  generated {written:,} / {args.spots:,} spots", end="\r", flush=True, file=sys.stderr)
            if not args.peer:
                continue
            # The peer's copy: unit embeddings for faiss, CSR chunks in scipy's own types.
            np.save(peer / f"emb-{start:09d}.npy", emb / np.linalg.norm(emb, axis=1, keepdims=True))
            for name, part in (("data", values), ("indices", indices.astype(np.int32)), ("indptr", indptr.astype(np.int32)),
                               ("shape", np.array([n, args.genes]))):
                np.save(peer / f"csr-{start:09d}-{name}.npy", part)
        t = time.perf_counter()  # leaving the block writes the last shard and the manifest
    writing += time.perf_counter() - t
    return {"seconds": time.perf_counter() - t0, "writer_seconds": writing, "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------------------------------ the workers


def worker_load(folder: str) -> dict:
    import bleep_rs

    before = rss_mb()
    t = time.perf_counter()
    ref = bleep_rs.Reference.load(folder)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "rss_before_mb": before, "rss_after_mb": rss_mb(), "n_spots": ref.n_spots, "n_genes": ref.n_genes,
            "shards": len(ref.shards) if hasattr(ref, "shards") else 1}


def queries_for(scratch: Path, n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    centres = np.random.default_rng(seed).standard_normal((512, dim), dtype=np.float32)
    q = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, dim), dtype=np.float32)
    return q.astype(np.float32)


def worker_bleep(folder: str, queries: str, out: str, workers: str, memory_limit: str = "auto") -> dict:
    """bleep-rs: search + mean imputation, in this process or through a LocalCluster of `workers` processes
    (each with `memory_limit`)."""
    import bleep_rs

    q = np.load(queries)
    client = cluster = None
    workers = int(workers)
    if workers:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=max(1, THREADS // workers), processes=True,
                               dashboard_address=None, memory_limit=memory_limit)
        client = Client(cluster)
    t = time.perf_counter()
    ref = bleep_rs.Reference.load(folder, client=client) if client else bleep_rs.Reference.load(folder)
    load = time.perf_counter() - t
    ref.impute(q[:64], k=K)  # first use: checks and packs each shard's embeddings for the search
    best, result = float("inf"), None
    for _ in range(2):
        t = time.perf_counter()
        pred, idx, sims = ref.impute(q, k=K, return_neighbours=True)
        best = min(best, time.perf_counter() - t)
        result = (pred, idx, sims)
    pred, idx, sims = result
    np.save(out + "-idx.npy", idx)
    np.save(out + "-sims.npy", sims)
    np.save(out + "-pred.npy", pred)
    result = {"seconds": best, "load_seconds": load, "peak_rss_mb": peak_rss_mb(), "kernel": bleep_rs.kernel_info()}
    if client:
        result["worker_peak_rss_mb"] = sorted(client.run(peak_rss_mb).values())
        client.close()
        cluster.close()
    return result


def worker_peer(scratch: str, queries: str, out: str) -> dict:
    """faiss IndexFlatIP + scipy: the exact search over every spot's unit embedding, then each chunk's CSR
    (memory-mapped, int32/float32: scipy's own types) gathers its neighbours' rows for one sparse product."""
    import faiss
    import scipy.sparse as sp

    faiss.omp_set_num_threads(THREADS)
    peer = Path(scratch) / "peer"
    starts = sorted(int(p.stem.split("-")[1]) for p in peer.glob("emb-*.npy"))
    t = time.perf_counter()
    index = faiss.IndexFlatIP(np.load(peer / f"emb-{starts[0]:09d}.npy", mmap_mode="r").shape[1])
    for s in starts:
        index.add(np.load(peer / f"emb-{s:09d}.npy"))
    chunks = [_mapped_csr(peer, s) for s in starts]
    load = time.perf_counter() - t
    q = np.load(queries)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    bounds = np.array(starts + [index.ntotal])

    def run():
        sims, idx = index.search(qn, K)
        n_q, genes = len(q), chunks[0].shape[1]
        pred = np.zeros((n_q, genes), np.float32)
        which = np.searchsorted(bounds, idx, side="right") - 1
        rows_q = np.repeat(np.arange(n_q), K)
        for c, chunk in enumerate(chunks):
            hit = (which == c).ravel()
            if not hit.any():
                continue
            local = idx.ravel()[hit] - bounds[c]
            rows = chunk[local]  # the neighbours' rows, read from the mapped file
            w = sp.csr_matrix((np.full(hit.sum(), 1.0 / K, np.float32), (rows_q[hit], np.arange(hit.sum()))), shape=(n_q, hit.sum()))
            pred += (w @ rows).toarray()
        return pred, idx, sims

    best, result = float("inf"), None
    for _ in range(2):
        t = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - t)
    pred, idx, sims = result
    np.save(out + "-idx.npy", idx)
    np.save(out + "-sims.npy", sims)
    np.save(out + "-pred.npy", pred)
    return {"seconds": best, "load_seconds": load, "peak_rss_mb": peak_rss_mb(), "faiss": faiss.__version__}


def _mapped_csr(peer: Path, start: int):
    import scipy.sparse as sp

    parts = [np.load(peer / f"csr-{start:09d}-{name}.npy", mmap_mode="r") for name in ("data", "indices", "indptr")]
    shape = tuple(np.load(peer / f"csr-{start:09d}-shape.npy"))
    return sp.csr_matrix(tuple(parts), shape=shape, copy=False)


WORKERS = {"load": worker_load, "bleep": worker_bleep, "peer": worker_peer}


def in_child(task: str, *args) -> dict:
    """Runs a worker in a fresh process (its memory is its own) and returns what it printed as JSON."""
    cmd = [sys.executable, str(HERE), "--worker", task, *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        # The cause first (Dask's shutdown noise after it can fill the tail), then the tail.
        causes = [line for line in out.stderr.splitlines() if "Error" in line and "CancelledError" not in line][:10]
        raise SystemExit(f"{task} failed:\n" + "\n".join(causes) + f"\n...\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker_generate(settings: str, scratch: str) -> dict:
    return generate(argparse.Namespace(**json.loads(settings)), Path(scratch))


WORKERS["generate"] = worker_generate


def expression_bytes(folder: Path) -> int:
    """Bytes of the expression tensors (dense or sparse) in a sharded reference's files, from their headers."""
    total = 0
    for f in sorted(folder.glob("shard-*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k.startswith("expression"))
    return total


def compare(a: str, b: str) -> dict:
    """Neighbour lists and predictions of two runs: differing lists must be near-ties."""
    ia, ib = np.load(a + "-idx.npy"), np.load(b + "-idx.npy")
    sa, sb = np.load(a + "-sims.npy"), np.load(b + "-sims.npy")
    differ = np.flatnonzero((np.sort(ia, 1) != np.sort(ib, 1)).any(1))
    # A differing set is a tie at the boundary when both k-th similarities agree to float32 rounding.
    not_ties = int(sum(abs(float(sa[i, -1]) - float(sb[i, -1])) > 1e-6 for i in differ))
    pa, pb = np.load(a + "-pred.npy"), np.load(b + "-pred.npy")
    same = np.setdiff1d(np.arange(len(ia)), differ)
    err = float(np.abs(pa[same] - pb[same]).max() / max(1e-12, float(np.abs(pb[same]).max()))) if len(same) else 0.0
    return {"sets_differ": int(len(differ)), "not_near_ties": not_ties, "identical_lists": bool((ia == ib).all()), "max_rel_err": err}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(WORKERS[sys.argv[2]](*sys.argv[3:])))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spots", type=int, default=2_130_306, help="spots in the atlas (HEST-1k: 2,130,306)")
    p.add_argument("--genes", type=int, default=19_000)
    p.add_argument("--zeros", type=float, default=0.9, help="fraction of zeros in the expression")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--shard-spots", type=int, default=25_000, help="spots per shard (the writer holds about one shard)")
    p.add_argument("--chunk", type=int, default=5_000, help="spots generated (and handed to the writer) at a time")
    p.add_argument("--queries", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--big-spots", type=int, default=0, help="also a larger atlas over --big-workers workers (0: skip)")
    p.add_argument("--big-genes", type=int, default=None, help="genes of the larger atlas (default: --genes)")
    p.add_argument("--big-workers", type=int, default=4)
    p.add_argument("--big-memory-limit", default="12GiB",
                   help="each big-run worker's Dask memory limit (Dask counts resident memory, mapped shard pages included)")
    p.add_argument("--only-big", action="store_true", help="run only the larger atlas (the disk need not hold both)")
    p.add_argument("--scratch", type=Path, default=None, help="folder for the atlas (default: a temporary folder)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", type=Path, default=Path(".bench/atlas.json"))
    args = p.parse_args()

    import bleep_rs

    info = bleep_rs.kernel_info()
    from importlib.metadata import version

    peers = {name: version(name) for name in ("faiss-cpu", "scipy", "dask", "distributed", "numpy")}
    print(f"bleep-rs {bleep_rs.__version__} atlas benchmark; CPU: {cpu_model()} ({os.cpu_count()} cpus); search kernel "
          f"{info['kernel']} ({info['reason']}); peers: " + ", ".join(f"{k} {v}" for k, v in peers.items()))
    print(f"atlas: {args.spots:,} spots x {args.genes:,} genes, {args.zeros:.0%} zeros, {args.dtype}, d = {args.dim}, "
          f"shards of {args.shard_spots:,}; {args.queries:,} queries, k = {K}, {THREADS} threads")
    results: dict = {"cpu": cpu_model(), "kernel": info, "peers": peers, "settings": vars(args) | {"scratch": str(args.scratch), "out": str(args.out)}}
    scratch = Path(tempfile.mkdtemp(prefix="bleep-atlas-", dir=args.scratch))
    try:
        settings = {k: getattr(args, k) for k in ("spots", "genes", "zeros", "dim", "dtype", "shard_spots", "chunk", "seed")} | {"peer": True}
        queries = scratch / "queries.npy"
        np.save(queries, queries_for(scratch, args.queries, args.dim, args.seed))
        q = args.queries
        if not args.only_big:
            r = results["build"] = in_child("generate", json.dumps(settings), scratch)
            print(f"build: bleep-rs's ShardWriter {r['writer_seconds']:.0f} s of {r['seconds']:.0f} s (generating the data and the "
                  f"peer's copy take the rest); peak RSS of the process {r['peak_rss_mb']:,.0f} MB")
            atlas = scratch / "atlas"
            dense = args.spots * args.genes * np.dtype(np.float32 if args.dtype == "float32" else np.float16).itemsize
            sparse = expression_bytes(atlas)
            results["size"] = {"dense_bytes_per_spot": dense / args.spots, "sparse_bytes_per_spot": sparse / args.spots, "ratio": sparse / dense}
            print(f"size: expression {sparse / args.spots:,.0f} bytes per spot sparse vs {dense / args.spots:,.0f} dense "
                  f"({sparse / dense:.1%} of dense)")
            r = results["load"] = in_child("load", atlas)
            print(f"load: {r['seconds'] * 1000:.1f} ms for {r['shards']} shards; RSS {r['rss_before_mb']:,.0f} MB before, "
                  f"{r['rss_after_mb']:,.0f} MB after")
            # bleep-rs in one process, on the cluster, and in one process again, on the same page cache (the
            # atlas and the peer's copy do not both fit in 24 GB: after the peer, the atlas is read again).
            # The first run after generating reads pages the peer's copy pushed out: the faster of the two
            # one-process runs is the baseline of both ratios.
            first = in_child("bleep", atlas, queries, scratch / "one", 0)
            two = results["cluster_2"] = in_child("bleep", atlas, queries, scratch / "two", 2)
            again = in_child("bleep", atlas, queries, scratch / "one", 0)
            one = results["one_process"] = min(first, again, key=lambda r: r["seconds"]) | {"runs_seconds": [first["seconds"], again["seconds"]]}
            print(f"one process: {first['seconds']:.2f} s before the cluster, {again['seconds']:.2f} s after")
            peer = results["peer"] = in_child("peer", scratch, queries, scratch / "peer-run")
            cmp = results["one_vs_peer"] = compare(str(scratch / "one"), str(scratch / "peer-run"))
            print(f"search + impute, one process: bleep-rs {q / one['seconds']:,.0f} q/s (peak RSS {one['peak_rss_mb']:,.0f} MB), "
                  f"faiss + scipy {q / peer['seconds']:,.0f} q/s (peak RSS {peer['peak_rss_mb']:,.0f} MB): "
                  f"{peer['seconds'] / one['seconds']:.2f}x; {cmp['sets_differ']} neighbour sets differ ({cmp['not_near_ties']} not near-ties), "
                  f"max rel. err of the predictions {cmp['max_rel_err']:.1e}")
            cmp2 = results["cluster_vs_one"] = compare(str(scratch / "two"), str(scratch / "one"))
            print(f"LocalCluster, 2 worker processes: {q / two['seconds']:,.0f} q/s = {one['seconds'] / two['seconds']:.2f}x one process "
                  f"(load {two['load_seconds']:.1f} s; workers' peak RSS {two['worker_peak_rss_mb']} MB); "
                  f"neighbour lists identical: {cmp2['identical_lists']}, max rel. err {cmp2['max_rel_err']:.1e}")
        if args.big_spots:
            big = scratch / "big"
            big.mkdir()
            settings = settings | {"spots": args.big_spots, "genes": args.big_genes or args.genes, "peer": False}
            r = results["big_build"] = in_child("generate", json.dumps(settings), big)
            total = sum(f.stat().st_size for f in (big / "atlas").glob("shard-*"))
            r = results["big"] = in_child("bleep", big / "atlas", queries, big / "run", args.big_workers, args.big_memory_limit)
            print(f"big: {args.big_spots:,} spots x {settings['genes']:,} genes ({total / 2**30:.1f} GiB of shards) over {args.big_workers} workers limited to "
                  f"{args.big_memory_limit} each: {q / r['seconds']:,.0f} q/s; workers' peak RSS {r['worker_peak_rss_mb']} MB")
    finally:
        if args.keep:
            print(f"kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
