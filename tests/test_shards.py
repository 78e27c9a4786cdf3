"""Sharded references (bleep_rs.shards) against one reference holding every spot: the same neighbour
lists (ties across shard boundaries included), the same imputations within float32 rounding, and files
that are written atomically and checked when opened."""

import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import bleep_rs
from bleep_rs import BleepError, Reference, ShardedReference, ShardWriter
from bleep_rs.shards import MANIFEST, merge_topk


def atlas_data(rng, n, d=8, g=5, dup_every=None):
    """Embeddings with duplicated rows (identical similarities, so ties) and gamma expression."""
    emb = rng.standard_normal((n, d)).astype(np.float32) * rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)
    if dup_every:  # copies of earlier rows a few spots later, across the shard boundaries
        for i in range(dup_every, n, dup_every):
            emb[i] = emb[max(0, i - 3)]
    return emb, rng.gamma(2.0, 1.0, size=(n, g)).astype(np.float32)


def assert_same_answers(single, sharded, queries, k):
    idx, sims = single.search(queries, k)
    idx2, sims2 = sharded.search(queries, k)
    np.testing.assert_array_equal(idx2, idx)  # exact: the same lists in the same order
    np.testing.assert_array_equal(sims2, sims)
    for method in bleep_rs.METHODS:
        want = single.impute(queries, k, method, temperature=0.2)
        got, i3, s3 = sharded.impute(queries, k, method, temperature=0.2, return_neighbours=True)
        np.testing.assert_array_equal(i3, idx)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=method)
        centred = sharded.impute(queries, k, method, temperature=0.2, centre_sections=True)  # the section means from the shards
        np.testing.assert_allclose(centred, single.impute(queries, k, method, temperature=0.2, centre_sections=True), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sharded.neighbour_spread(idx), single.neighbour_spread(idx), rtol=1e-4, atol=1e-5)
    w = np.random.default_rng(0).uniform(0, 1, idx.shape).astype(np.float32)
    np.testing.assert_allclose(sharded.aggregate(idx, w), single.aggregate(idx, w), rtol=2e-5, atol=2e-5)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 120),
    shard_spots=st.integers(1, 50),
    nq=st.integers(0, 12),
    k=st.integers(1, 140),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_sharded_answers_equal_one_reference(n, shard_spots, nq, k, dtype, seed):
    rng = np.random.default_rng(seed)
    emb, expr = atlas_data(rng, n, dup_every=int(rng.integers(2, 9)))
    sections = [f"s{i * 3 // n}" for i in range(n)]  # three sections across the shards
    single = Reference.build(emb, expr, [f"g{i}" for i in range(expr.shape[1])], expression_dtype=dtype, sections=sections)
    # queries: random ones and copies of reference rows (exact ties with the duplicates)
    queries = np.concatenate([rng.standard_normal((nq, emb.shape[1])), emb[rng.integers(0, n, nq)]]).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        single.save(Path(tmp) / "atlas", shard_spots=shard_spots)
        sharded = Reference.load(Path(tmp) / "atlas")
        assert isinstance(sharded, ShardedReference) and len(sharded.shards) == -(-n // shard_spots)
        assert_same_answers(single, sharded, queries, k)


def test_ties_across_shards_go_to_the_lower_global_index(tmp_path):
    emb = np.ones((10, 4), np.float32)  # every spot equally similar to any query
    expr = np.arange(10, dtype=np.float32).reshape(10, 1)
    Reference.build(emb, expr, ["g"]).save(tmp_path / "a", shard_spots=3)
    sharded = Reference.load(tmp_path / "a")
    idx, _ = sharded.search(np.ones((2, 4), np.float32), k=5)
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3, 4]] * 2)
    np.testing.assert_allclose(sharded.impute(np.ones((1, 4)), k=4), [[1.5]])


def test_merge_topk_orders_by_similarity_then_index():
    a = (np.array([[7, 2]]), np.array([[0.9, 0.5]], np.float32), np.array([[1.0, 2.0]]))
    b = (np.array([[1, 9]]), np.array([[0.9, 0.5]], np.float32), np.array([[3.0, 4.0]]))
    idx, sims, extra = merge_topk([a, b], 3)
    np.testing.assert_array_equal(idx, [[1, 7, 2]])
    np.testing.assert_array_equal(extra, [[3.0, 1.0, 2.0]])  # extras travel with their neighbour
    assert merge_topk([a, b], 10)[0].shape == (1, 4)


@settings(max_examples=60, deadline=None)
@given(q=st.integers(0, 5), widths=st.lists(st.integers(0, 6), min_size=1, max_size=5), k=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_merge_topk_matches_a_plain_sort(q, widths, k, seed):
    rng = np.random.default_rng(seed)
    values = np.array([-1.0, -0.5, -0.0, 0.0, 1e-30, -1e-30, 0.5, 1.0, 3.4e38, -3.4e38], np.float32)  # ties, signed zeros
    spots = rng.permutation(1000)[:sum(widths)]
    parts, at = [], 0
    for w in widths:
        sims = -np.sort(-rng.choice(values, (q, w)), axis=1)
        parts.append((np.tile(spots[at:at + w], (q, 1)), sims))
        at += w
    idx, sims = merge_topk(parts, k)
    all_idx, all_sims = np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1)
    for r in range(q):
        want = sorted(zip(-all_sims[r].astype(np.float64), all_idx[r]))[:k]  # -0.0 == 0.0 here too
        assert list(zip(-sims[r].astype(np.float64), idx[r])) == want


def test_labels_metadata_and_tables_round_trip(tmp_path, rng):
    emb, expr = atlas_data(rng, 25)
    single = Reference.build(emb, expr, list("abcde"), spot_ids=[f"s{i}" for i in range(25)], sections=[f"sec{i // 10}" for i in range(25)],
                             metadata={"model_id": "f00d", "note": [1, 2]}, expression_dtype="float16")
    single.save(tmp_path / "a", shard_spots=7)
    sharded = Reference.load(tmp_path / "a")
    assert (sharded.n_spots, sharded.dim, sharded.genes, sharded.n_genes, len(sharded)) == (25, 8, list("abcde"), 5, 25)
    assert sharded.spot_ids == single.spot_ids and sharded.sections == single.sections
    assert sharded.metadata == single.metadata and sharded.expression_dtype == "float16"
    np.testing.assert_array_equal(sharded.embeddings, single.embeddings)
    np.testing.assert_array_equal(sharded.expression, single.expression)
    assert "25 spots in 4 shards" in repr(sharded)
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert manifest["model_id"] == "f00d" and [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 7), (7, 14), (14, 21), (21, 25)]
    sharded.verify()
    # saved again, as shards of another size or as one file: the same reference
    sharded.save(tmp_path / "b", shard_spots=10)
    sharded.save(tmp_path / "one.safetensors")
    for other in (Reference.load(tmp_path / "b"), Reference.load(tmp_path / "one.safetensors")):
        assert other.spot_ids == single.spot_ids and other.metadata == single.metadata
        np.testing.assert_array_equal(other.expression, single.expression)


def test_writer_streams_dense_and_sparse_batches(tmp_path, rng, monkeypatch):
    sparse = pytest.importorskip("scipy.sparse")
    monkeypatch.setattr(bleep_rs.shards, "_GATHER_VALUES", 20)  # gather a few rows at a time
    emb, expr = atlas_data(rng, 50, g=6)
    expr[expr < 2] = 0
    genes = [f"g{i}" for i in range(6)]
    with ShardWriter(tmp_path / "a", genes, shard_spots=16, metadata={"model_id": "m"}) as w:
        at = 0
        for size, as_sparse in ((5, False), (20, True), (1, False), (24, True)):
            block = expr[at:at + size]
            w.add(emb[at:at + size], sparse.csr_matrix(block) if as_sparse else block, sections=["s"] * size)
            at += size
            # full shards are written as they fill; the buffer holds one shard at most
            assert sum(len(e) for e in w._emb) == w._fill < 16
            assert len(list(w._tmp.glob("shard-*.safetensors"))) == at // 16
        assert not (tmp_path / "a").exists()  # nothing at the destination before close
    sharded = Reference.load(tmp_path / "a")
    single = Reference.build(emb, expr, genes, sections=["s"] * 50)
    assert sharded.spot_ids == [str(i) for i in range(50)]  # default ids: the global index
    assert [s["stop"] - s["start"] for s in sharded.shards] == [16, 16, 16, 2]
    assert_same_answers(single, sharded, emb[::7] + 0.1, k=9)


def test_writer_checks_its_input(tmp_path, rng):
    emb, expr = atlas_data(rng, 4)
    with pytest.raises(BleepError, match="shard_spots"):
        ShardWriter(tmp_path / "a", list("abcde"), shard_spots=0)
    with pytest.raises(BleepError, match="unique"):
        ShardWriter(tmp_path / "a", ["a", "a"], shard_spots=2)
    with ShardWriter(tmp_path / "a", list("abcde"), shard_spots=2) as w:
        with pytest.raises(BleepError, match="shape"):
            w.add(emb, expr[:, :3])
        w.add(emb[:2], expr[:2])
        with pytest.raises(BleepError, match="columns"):
            w.add(emb[:, :3], expr)
        with pytest.raises(BleepError, match="every batch or for none"):
            w.add(emb[:1], expr[:1], sections=["x"])
    bad = expr.copy()
    bad[3, 1] = np.nan
    with pytest.raises(BleepError, match="abandoned"), ShardWriter(tmp_path / "b", list("abcde"), shard_spots=2) as w:
        with pytest.raises(BleepError, match="spots 2 to 3.*nothing was written"):  # the global spots of the failing shard
            w.add(emb, bad)
        with pytest.raises(BleepError, match="abandoned"):
            w.add(emb, expr)
    assert not (tmp_path / "b").exists()
    with pytest.raises(BleepError, match="no spots"):
        ShardWriter(tmp_path / "c", ["a"], shard_spots=2).close()


def test_interrupted_write_leaves_nothing_that_looks_complete(tmp_path, rng):
    emb, expr = atlas_data(rng, 30)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "a", list("abcde"), shard_spots=4) as w:
        w.add(emb, expr)
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    # a folder without a manifest (an interrupted copy, anything) is refused
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "shard-00000.safetensors").write_bytes(b"x")
    with pytest.raises(BleepError, match="not a sharded reference"):
        Reference.load(tmp_path / "b")


def test_a_killed_write_leaves_no_reference_and_its_leftovers_go(tmp_path):
    code = ("import os, sys, numpy as np; from bleep_rs import ShardWriter\n"
            "w = ShardWriter(sys.argv[1], ['a', 'b'], shard_spots=5)\n"
            "w.add(np.ones((12, 3), np.float32), np.ones((12, 2), np.float32))\n"
            "os._exit(9)  # killed before close: two shards written, no manifest\n")
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], capture_output=True, text=True)
    assert child.returncode == 9, child.stderr
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".a.") and leftovers[0].endswith(".tmp")
    with pytest.raises(BleepError, match="no such reference file"):
        Reference.load(tmp_path / "a")
    with ShardWriter(tmp_path / "a", ["a", "b"], shard_spots=5) as w:  # the next write clears them
        w.add(np.ones((3, 3), np.float32), np.ones((3, 2), np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and Reference.load(tmp_path / "a").n_spots == 3


def test_overwrite_replaces_only_a_sharded_reference(tmp_path, rng):
    emb, expr = atlas_data(rng, 10)
    ref = Reference.build(emb, expr, list("abcde"))
    ref.save(tmp_path / "a", shard_spots=4)
    with pytest.raises(BleepError, match="exists"):
        ShardWriter(tmp_path / "a", list("abcde"), shard_spots=4)
    ref.save(tmp_path / "a", shard_spots=3)  # save replaces a sharded reference, as it replaces a file
    assert len(Reference.load(tmp_path / "a").shards) == 4
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(BleepError, match="not a sharded reference"):
        ref.save(tmp_path / "mine", shard_spots=3)
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(BleepError, match="is a file"):
        ref.save(tmp_path / "file", shard_spots=3)


@pytest.fixture
def atlas(tmp_path, rng):
    emb, expr = atlas_data(rng, 20)
    Reference.build(emb, expr, list("abcde"), expression_format="dense").save(tmp_path / "a", shard_spots=8)
    return tmp_path / "a"


def test_missing_shard_is_an_error_naming_it(atlas):
    (atlas / "shard-00001.safetensors").unlink()
    with pytest.raises(BleepError, match=r"shard-00001\.safetensors: shard file missing"):
        Reference.load(atlas)


def test_changed_shard_is_an_error_naming_it(atlas, rng):
    emb, expr = atlas_data(rng, 8)
    first = atlas / "shard-00000.safetensors"
    original = first.read_bytes()
    ids = [str(i) for i in range(8)]  # the ids and storage of the first shard: the same size, other values
    Reference.build(emb, expr, list("abcde"), spot_ids=ids, expression_format="dense").save(first)
    assert first.stat().st_size == len(original)
    with pytest.raises(BleepError, match=r"shard-00000\.safetensors: shard file changed .*sample digest"):
        Reference.load(atlas)
    first.write_bytes(original)
    with open(atlas / "shard-00002.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BleepError, match=r"shard-00002\.safetensors: shard file changed .*bytes"):
        ShardedReference(atlas)


def test_changed_values_are_found_by_verify(tmp_path, rng):
    emb, expr = atlas_data(rng, 3000, g=40)  # shards of ~600 kB: more than the four 64 KiB spans sampled
    Reference.build(emb, expr, [f"g{i}" for i in range(40)]).save(tmp_path / "a", shard_spots=3000)
    path = tmp_path / "a" / "shard-00000.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last expression value: in the sampled spans, found at load
    path.write_bytes(bytes(data))
    with pytest.raises(BleepError, match=r"shard-00000\.safetensors: shard file changed .*sample digest"):
        Reference.load(tmp_path / "a")
    data[-1] ^= 1
    data[-200_000] ^= 1  # one bit between the spans: the fast check cannot see it, verify does
    path.write_bytes(bytes(data))
    sharded = Reference.load(tmp_path / "a")
    with pytest.raises(BleepError, match=r"shard-00000\.safetensors: contents differ"):
        sharded.verify()


def test_shard_changed_after_load_is_found_when_opened(atlas, rng):
    sharded = Reference.load(atlas)  # shards are read on first use
    (atlas / "shard-00002.safetensors").unlink()
    with pytest.raises(BleepError, match=r"shard-00002\.safetensors: shard file missing"):
        sharded.search(np.ones((1, 8), np.float32), k=3)


def test_bad_manifests_are_refused(atlas):
    manifest = json.loads((atlas / MANIFEST).read_text())
    for change, message in (
        (lambda m: m["shards"][0].update(file="../elsewhere.safetensors"), "bad shard file name"),
        (lambda m: m["shards"][1].update(start=9), "expected to start at 8"),
        (lambda m: m.update(n_spots=21), "cover 20 spots"),
        (lambda m: m.update(format_version=99), "upgrade bleep-rs"),
        (lambda m: m.pop("genes"), "malformed manifest"),
        # Checked against the shards' own: the answers are labelled by the manifest.
        (lambda m: m["genes"].reverse(), r"its genes \(\d+ genes starting .*\) differ from the shards'"),
        (lambda m: m["genes"].pop(), "its genes .* differ from the shards'"),
        (lambda m: m.update(dim=9), r"its dim \(9\) differ from the shards' \(8\)"),
        (lambda m: m.update(has_sections=not m["has_sections"]), "its has_sections .* differ from the shards'"),
    ):
        m = json.loads(json.dumps(manifest))
        change(m)
        (atlas / MANIFEST).write_text(json.dumps(m))
        with pytest.raises(BleepError, match=message):
            Reference.load(atlas)


def test_bad_queries_and_indices(atlas):
    sharded = Reference.load(atlas)
    with pytest.raises(BleepError, match="columns"):
        sharded.search(np.ones((1, 3)), k=2)
    with pytest.raises(BleepError, match="k must be"):
        sharded.search(np.ones((1, 8)), k=0)
    with pytest.raises(BleepError, match="unknown method"):
        sharded.impute(np.ones((1, 8)), method="max")
    with pytest.raises(BleepError, match="NaN"):
        sharded.search(np.full((1, 8), np.nan), k=2)
    with pytest.raises(BleepError, match="out of range"):
        sharded.neighbour_spread(np.array([[0, 20]]))
    with pytest.raises(BleepError, match="out of range"):
        sharded.aggregate(np.array([[-1]]), np.ones((1, 1)))
    with pytest.raises(BleepError, match="same shape"):
        sharded.aggregate(np.array([[1, 2]]), np.ones((1, 1)))


def test_references_pickle_by_path(atlas, tmp_path, rng):
    emb, expr = atlas_data(rng, 6)
    built = Reference.build(emb, expr, list("abcde"))
    with pytest.raises(BleepError, match="built in memory cannot be pickled"):
        pickle.dumps(built)
    built.save(tmp_path / "one.safetensors")
    loaded = Reference.load(tmp_path / "one.safetensors")
    blob = pickle.dumps(loaded)
    assert len(blob) < 500  # the path, not the table
    np.testing.assert_array_equal(pickle.loads(blob).expression, expr)
    sharded = Reference.load(atlas)
    again = pickle.loads(pickle.dumps(sharded))
    np.testing.assert_array_equal(again.search(emb, 3)[0], sharded.search(emb, 3)[0])


def test_import_and_local_load_do_not_import_dask(atlas):
    code = ("import sys, bleep_rs; r = bleep_rs.Reference.load(sys.argv[1]); r.search([[1.0] * 8], 2); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'dask', 'distributed'}))")
    out = subprocess.run([sys.executable, "-c", code, str(atlas)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_released_pages_read_back_the_same(tmp_path, rng):
    """A shard's mapped pages dropped from the process (what a Dask worker near its memory limit does)
    are read again from the file: the same answers; a reference built in memory has none to drop."""
    emb, expr = rng.standard_normal((120, 8)).astype(np.float32), rng.gamma(2.0, 1.0, (120, 5)).astype(np.float32)
    ref = Reference.build(emb, expr, [f"g{i}" for i in range(5)])
    ref.save(tmp_path / "atlas", shard_spots=50)
    entry = json.loads((tmp_path / "atlas" / MANIFEST).read_text())["shards"][0]
    shard = bleep_rs.shards._open_shard(str(tmp_path / "atlas" / entry["file"]), entry)
    q = rng.standard_normal((7, 8)).astype(np.float32)
    before = shard.core.impute(q, 5, "mean")
    shard.release_pages()
    np.testing.assert_array_equal(shard.core.impute(q, 5, "mean"), before)
    assert shard.core.release_pages() is True and ref._core.release_pages() is False
