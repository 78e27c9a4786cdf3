"""Sparse vs dense reference files, and what loading a mapped one costs (issue 16).

Builds a synthetic reference (N spots x G genes, a fraction of zeros, d-dim embeddings) straight from
compressed sparse rows (never dense in Python), saves it sparse and dense, then in a fresh process per
file measures: the load time and resident memory (VmRSS) after load, the first imputation (which checks
and packs the embeddings for the search), later imputations, and the aggregation step alone.

    python benches/bench_sparse_reference.py --n 500000 --genes 2000 --zeros 0.9 --dir /tmp/bench

The files are deleted afterwards unless --keep. Disk: about N x (4 d + 4 G (dense) + 8 G (1 - zeros)) bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def rss_mb() -> str:
    """Resident memory: total, anonymous (heap) and file-backed (pages of the mapped file, which the
    kernel can drop again), in MB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) // 1024
    return f"{fields.get('VmRSS')} (anon {fields.get('RssAnon')}, file {fields.get('RssFile')})"


def synthetic_csr(n: int, g: int, zeros: float, seed: int = 0):
    """(indptr, indices, values) of an n x g table with about `zeros` of its values 0, drawn in row chunks."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    parts = []
    for r0 in range(0, n, 8192):
        rows = min(8192, n - r0)
        mask = rng.random((rows, g), dtype=np.float32) >= zeros
        values = np.zeros((rows, g), np.float32)
        values[mask] = rng.gamma(1.5, 2.0, size=int(mask.sum()))
        parts.append(sp.csr_matrix(values))
    return sp.vstack(parts, format="csr")


def measure(path: str, queries: int, k: int) -> dict:
    """Run in a fresh process: load, then impute."""
    from bleep_rs import Reference

    out = {"rss_before_load_mb": rss_mb()}
    t = time.perf_counter()
    ref = Reference.load(path)
    out["load_s"] = time.perf_counter() - t
    out["rss_after_load_mb"] = rss_mb()
    out["mapped"] = ref.mapped
    rng = np.random.default_rng(1)
    q = rng.standard_normal((queries, ref.dim)).astype(np.float32)
    t = time.perf_counter()
    _, idx, _ = ref.impute(q, k=k, return_neighbours=True)
    out["first_impute_s"] = time.perf_counter() - t
    out["rss_after_first_impute_mb"] = rss_mb()
    t = time.perf_counter()
    ref.impute(q, k=k)
    out["impute_s"] = time.perf_counter() - t
    out["impute_queries_per_s"] = queries / out["impute_s"]
    w = np.full(idx.shape, 1.0 / k, np.float32)
    ref.aggregate(idx, w)
    t = time.perf_counter()
    for _ in range(3):
        ref.aggregate(idx, w)
    out["aggregate_s"] = (time.perf_counter() - t) / 3
    out["aggregate_queries_per_s"] = queries / out["aggregate_s"]
    t = time.perf_counter()
    ref.neighbour_spread(idx)
    out["spread_s"] = time.perf_counter() - t
    out["rss_end_mb"] = rss_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--zeros", type=float, default=0.9)
    ap.add_argument("--queries", type=int, default=2048)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--dir", default="/tmp/bleep-sparse-bench")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.queries, args.k)))
        return

    from bleep_rs import Reference

    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    x = synthetic_csr(args.n, args.genes, args.zeros)
    emb = np.random.default_rng(2).standard_normal((args.n, args.dim)).astype(np.float32)
    genes = [f"g{i}" for i in range(args.genes)]
    print(f"synthetic {args.n} x {args.genes}, {1 - x.nnz / (args.n * args.genes):.3f} zeros, {time.perf_counter() - t:.1f} s",
          flush=True)
    results = {}
    for fmt in ("sparse", "dense"):
        t = time.perf_counter()
        ref = Reference.build(emb, x, genes, expression_format=fmt)
        build_s = time.perf_counter() - t
        path = d / f"{fmt}.safetensors"
        t = time.perf_counter()
        ref.save(path)
        save_s = time.perf_counter() - t
        results[fmt] = {"expression_bytes": ref.expression_nbytes, "file_bytes": os.path.getsize(path),
                        "build_s": build_s, "save_s": save_s}
        # The aggregation of the same table held in memory (as built), for comparison with the mapped one.
        q = np.random.default_rng(1).standard_normal((args.queries, args.dim)).astype(np.float32)
        idx, _ = ref.search(q, k=args.k)
        w = np.full(idx.shape, 1.0 / args.k, np.float32)
        ref.aggregate(idx, w)
        t = time.perf_counter()
        for _ in range(3):
            ref.aggregate(idx, w)
        results[fmt]["in_memory_aggregate_s"] = (time.perf_counter() - t) / 3
        del ref
        cmd = [sys.executable, __file__, "--measure", str(path), "--queries", str(args.queries), "--k", str(args.k)]
        results[fmt].update(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        print(fmt, json.dumps(results[fmt], indent=1), flush=True)
        if not args.keep:
            path.unlink()
    ratio = results["sparse"]["expression_bytes"] / results["dense"]["expression_bytes"]
    print(f"sparse / dense expression bytes: {ratio:.3f}")


if __name__ == "__main__":
    main()
