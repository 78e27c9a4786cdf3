"""The sparse and the memory-mapped reference against the dense NumPy oracle (bleep_rs._oracle).

Sparse rows (compressed sparse rows, from a dense array or from scipy.sparse), every value type, both
storage formats, and the file: version 2 is mapped, version 1 (crafted here with the safetensors
package, as bleep-rs wrote it before) still loads, a damaged file is a BleepError.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings, strategies as st

import bleep_rs
from bleep_rs import BleepError, Reference, _oracle

from conftest import random_reference

KINDS = ("dense", "csr", "csc", "coo", "csr_array")


def as_kind(table: np.ndarray, kind: str):
    if kind == "dense":
        return table
    if kind == "csr_array":
        return sp.csr_array(table)
    return getattr(sp, f"{kind}_matrix")(table)


def random_table(rng, n, g, zeros):
    t = rng.gamma(1.5, 2.0, size=(n, g)).astype(np.float32)
    t[rng.uniform(size=(n, g)) < zeros] = 0.0
    return t


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 90),
    nq=st.integers(0, 70),
    g=st.integers(1, 60),
    k=st.integers(1, 120),
    zeros=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    fmt=st.sampled_from(["auto", "dense", "sparse"]),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**32 - 1),
)
def test_aggregate_and_spread_match_the_dense_oracle(n, nq, g, k, zeros, dtype, fmt, kind, seed):
    """Empty rows and all-zero genes (zeros = 0.9, 1.0), k > N, repeated neighbours, three value types,
    the table given dense or as any scipy.sparse layout, stored either way."""
    rng = np.random.default_rng(seed)
    table = random_table(rng, n, g, zeros)
    table[:, rng.uniform(size=g) < 0.2] = 0.0  # whole genes of zeros
    emb = rng.standard_normal((n, 6)).astype(np.float32) + 3
    genes = [f"g{i}" for i in range(g)]
    ref = Reference.build(emb, as_kind(table, kind), genes, expression_dtype=dtype, expression_format=fmt)
    if fmt != "auto":
        assert ref.expression_format == fmt
    # The stored table is the dense one rounded to the value type, whatever the layout.
    stored = Reference.build(emb, table, genes, expression_dtype=dtype, expression_format="dense").expression
    np.testing.assert_array_equal(ref.expression, stored)
    idx = rng.integers(0, n, size=(nq, k))
    w = rng.uniform(-1, 1, size=(nq, k)) * (rng.uniform(size=(nq, k)) < 0.8)
    got = ref.aggregate(idx, w)
    assert got.shape == (nq, g) and got.dtype == np.float32
    np.testing.assert_allclose(got, _oracle.aggregate(stored, idx, w), rtol=1e-4, atol=1e-4)
    spread = ref.neighbour_spread(idx)
    np.testing.assert_allclose(spread, _oracle.neighbour_spread(stored.astype(np.float64), idx), rtol=1e-4, atol=1e-5)
    # Added into an output that holds values (how a sharded reference sums its shards).
    base = rng.standard_normal((nq, g)).astype(np.float32)
    out = base.copy()
    ref._core.aggregate_add(idx.astype(np.int64), w.astype(np.float32), out)
    np.testing.assert_allclose(out, base + _oracle.aggregate(stored, idx, w), rtol=1e-4, atol=1e-4)


def test_aggregate_add_checks_its_output(rng):
    ref = Reference.build(*random_reference(rng, n=20, g=5))
    idx, w = np.zeros((3, 2), np.int64), np.ones((3, 2), np.float32)
    for out, message in ((np.zeros((3, 4), np.float32), r"shape \[3, 4\] but 3 queries x 5 genes"),
                         (np.zeros((3, 5), np.float64), "must be a NumPy array of float32"),
                         (np.zeros((5, 3), np.float32).T, "out must be C-contiguous")):
        with pytest.raises(BleepError, match=message):
            ref._core.aggregate_add(idx, w, out)
    # A Fortran-ordered input is refused too, not read in the wrong order (the binding's one check).
    with pytest.raises(BleepError, match="indices must be C-contiguous"):
        ref._core.aggregate(np.asfortranarray(np.zeros((3, 2), np.int64)), w)
    frozen = np.zeros((3, 5), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(BleepError, match="writable"):
        ref._core.aggregate_add(idx, w, frozen)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 120),
    nq=st.integers(1, 30),
    g=st.integers(1, 40),
    k=st.integers(1, 150),
    method=st.sampled_from(bleep_rs.METHODS),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_sparse_impute_matches_oracle(n, nq, g, k, method, dtype, seed):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, 12)).astype(np.float32)
    table = random_table(rng, n, g, 0.85)
    q = rng.standard_normal((nq, 12)).astype(np.float32)
    ref = Reference.build(emb, sp.csr_matrix(table), [f"g{i}" for i in range(g)], expression_dtype=dtype,
                          expression_format="sparse")
    pred, idx, sims = ref.impute(q, k=k, method=method, temperature=0.2, return_neighbours=True)
    want_idx, _ = _oracle.search(emb, q, k)
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(want_idx, axis=1))
    qn = np.linalg.norm(q.astype(np.float64), axis=1)
    rn = np.linalg.norm(emb.astype(np.float64), axis=1)
    w = _oracle.weights(method, sims.astype(np.float64), qn, rn[idx], temperature=0.2)
    np.testing.assert_allclose(pred, _oracle.aggregate(ref.expression, idx, w), rtol=2e-4, atol=2e-4)


def test_scipy_input_is_canonicalised_not_modified(rng):
    # Unsorted columns and a duplicate entry (which adds up), as COO and CSR allow.
    rows, cols, vals = [0, 0, 1, 1, 1], [3, 1, 2, 2, 0], [1.0, 2.0, 3.0, 4.0, 5.0]
    coo = sp.coo_matrix((vals, (rows, cols)), shape=(3, 4))
    csr = sp.csr_matrix((np.array(vals), np.array(cols), np.array([0, 2, 5, 5])), shape=(3, 4))
    before = csr.indices.copy()
    emb = rng.standard_normal((3, 4)).astype(np.float32)
    for x in (coo, csr, sp.csc_array(coo)):
        ref = Reference.build(emb, x, list("ABCD"), expression_format="sparse")
        np.testing.assert_array_equal(ref.expression, [[0, 2, 0, 1], [5, 0, 7, 0], [0, 0, 0, 0]])
        assert (ref.expression_sparse() != sp.csr_matrix(ref.expression)).nnz == 0
    np.testing.assert_array_equal(csr.indices, before)


def test_auto_picks_the_smaller_and_sparse_meets_a_quarter_of_dense(rng):
    emb = rng.standard_normal((2000, 8)).astype(np.float32)
    genes = [f"g{i}" for i in range(512)]
    sparse_table = random_table(rng, 2000, 512, 0.9)
    for dtype in ("float32", "float16", "bfloat16"):
        dense = Reference.build(emb, sparse_table, genes, expression_format="dense", expression_dtype=dtype)
        auto = Reference.build(emb, sparse_table, genes, expression_dtype=dtype)
        assert auto.expression_format == "sparse" and "sparse" in repr(auto)
        assert auto.expression_nbytes <= 0.25 * dense.expression_nbytes, dtype
    full = Reference.build(emb, random_table(rng, 2000, 512, 0.0), genes)
    assert full.expression_format == "dense"


@pytest.mark.parametrize(("n_genes", "dtype"), [(300, np.uint16), (65_536, np.uint16), (70_000, np.uint32)])
def test_gene_columns_take_16_bits_up_to_65536_genes(rng, tmp_path, n_genes, dtype):
    from safetensors import safe_open

    cols = np.array([0, 7, n_genes - 1, 3, n_genes // 2])
    x = sp.csr_matrix((np.arange(1.0, 6.0), cols, [0, 3, 3, 5]), shape=(3, n_genes))
    emb = rng.standard_normal((3, 4)).astype(np.float32)
    ref = Reference.build(emb, x, [f"g{i}" for i in range(n_genes)], expression_format="sparse")
    ref.save(tmp_path / "r.safetensors")
    with safe_open(str(tmp_path / "r.safetensors"), "np") as f:
        assert f.get_tensor("expression_indices").dtype == dtype
    back = Reference.load(tmp_path / "r.safetensors")
    assert (back.expression_sparse() != x).nnz == 0
    idx = np.array([[0, 2], [1, 0]])
    np.testing.assert_allclose(back.aggregate(idx, np.ones((2, 2))), _oracle.aggregate(x.toarray(), idx, np.ones((2, 2))))


def test_bad_formats_and_sparse_shapes_are_named(rng):
    emb, expr, genes = random_reference(rng, n=10, g=4)
    with pytest.raises(BleepError, match="expression_format"):
        Reference.build(emb, expr, genes, expression_format="csr")
    with pytest.raises(BleepError, match="4 columns but 3 gene names"):
        Reference.build(emb, sp.csr_matrix(expr), genes[:3])
    with pytest.raises(BleepError, match="10 rows but expression has 9"):
        Reference.build(emb, sp.csr_matrix(expr[:9]), genes)
    bad = sp.csr_matrix(expr)
    bad.data[0] = np.nan
    with pytest.raises(BleepError, match="NaN"):
        Reference.build(emb, bad, genes)


def test_sparse_input_is_never_densified(tmp_path):
    """20,000 spots x 50,000 genes at 0.01 % density: 4 GB dense, 1.6 MB sparse; the build, a save, a
    load and an imputation peak far below the dense size (a child process, to measure its own peak)."""
    code = """
import sys, numpy as np, scipy.sparse as sp
from bleep_rs import Reference
rng = np.random.default_rng(0)
# scipy.sparse.random itself peaks at 7 GB for this shape: draw the 100,000 entries directly.
x = sp.coo_matrix((rng.uniform(1, 5, 100000).astype(np.float32),
                   (rng.integers(0, 20000, 100000), rng.integers(0, 50000, 100000))), shape=(20000, 50000)).tocsr()
emb = rng.standard_normal((20000, 16)).astype(np.float32)
ref = Reference.build(emb, x, [f"g{i}" for i in range(50000)])
assert ref.expression_format == "sparse", ref
ref.save(sys.argv[1])
back = Reference.load(sys.argv[1])
assert back.mapped
pred = back.impute(emb[:8], k=20)
np.testing.assert_allclose(pred[0], np.asarray(x[back.search(emb[:1], k=20)[0][0]].mean(0)).ravel(), rtol=1e-5)
# VmHWM: this process's own peak (ru_maxrss also counts the parent's memory when the child was vforked).
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.safetensors")], capture_output=True, text=True,
                         check=True)
    peak_kib = int(out.stdout.split()[-1])
    assert peak_kib < 1_000_000, f"peak {peak_kib} KiB: the 4 GB dense table was made"


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_files_are_mapped_and_round_trip(rng, tmp_path, fmt, dtype):
    emb, expr, genes = random_reference(rng, n=300, g=37)
    expr[rng.uniform(size=expr.shape) < 0.7] = 0
    ref = Reference.build(emb, expr, genes, expression_dtype=dtype, expression_format=fmt, sections=["s"] * 300,
                          metadata={"model": "m"})
    ref.save(tmp_path / "r.safetensors")
    back = Reference.load(tmp_path / "r.safetensors")
    assert back.mapped and not ref.mapped
    assert (back.expression_format, back.expression_dtype) == (fmt, dtype)
    assert back.sections == ["s"] * 300 and back.metadata == {"model": "m"}
    np.testing.assert_array_equal(back.expression, ref.expression)
    np.testing.assert_array_equal(back.embeddings, emb)
    q = rng.standard_normal((40, emb.shape[1])).astype(np.float32)
    for method in bleep_rs.METHODS:
        a = ref.impute(q, k=9, method=method, return_neighbours=True)
        b = back.impute(q, k=9, method=method, return_neighbours=True)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    idx = a[1]
    np.testing.assert_array_equal(back._core.norms_of(idx), ref._core.norms_of(idx))
    np.testing.assert_array_equal(back.neighbour_spread(idx), ref.neighbour_spread(idx))
    # Saved again over the file it maps: the mapped reference is unchanged, the new file equal.
    back.save(tmp_path / "r.safetensors")
    np.testing.assert_array_equal(back.expression, ref.expression)
    np.testing.assert_array_equal(Reference.load(tmp_path / "r.safetensors").impute(q, k=9), ref.impute(q, k=9))


def test_version_1_files_still_load(rng, tmp_path):
    """A file as bleep-rs wrote it in format version 1: row-major `expression`, no norms."""
    from safetensors.numpy import save_file

    emb, expr, genes = random_reference(rng, n=50, g=7)
    meta = {"format": "bleep-rs.reference", "format_version": "1", "n_spots": "50", "dim": str(emb.shape[1]),
            "expression_dtype": "float32", "genes": json.dumps(genes),
            "spot_ids": json.dumps([f"s{i}" for i in range(50)]), "provenance": "{}"}
    save_file({"embeddings": emb, "expression": expr}, str(tmp_path / "v1.safetensors"), metadata=meta)
    ref = Reference.load(tmp_path / "v1.safetensors")
    assert not ref.mapped and ref.spot_ids[3] == "s3"
    np.testing.assert_array_equal(ref.expression, expr)
    q = rng.standard_normal((5, emb.shape[1])).astype(np.float32)
    np.testing.assert_allclose(ref.impute(q, k=5), _oracle.impute(emb, expr, q, 5), rtol=1e-5, atol=1e-5)
    # Saved again: version 2.
    ref.save(tmp_path / "v2.safetensors")
    assert Reference.load(tmp_path / "v2.safetensors").mapped


def test_damaged_files_are_errors(rng, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    emb, expr, genes = random_reference(rng, n=20, g=5)
    expr[expr < 2] = 0
    Reference.build(emb, expr, genes, expression_format="sparse").save(tmp_path / "r.safetensors")
    with safe_open(str(tmp_path / "r.safetensors"), "np") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "r.safetensors"))

    def damaged(**changes):
        save_file({**tensors, **changes}, str(tmp_path / "bad.safetensors"), metadata=meta)
        return Reference.load(tmp_path / "bad.safetensors")

    idx = np.arange(20)[:, None]
    cols = tensors["expression_indices"].copy()
    cols[-1] = 99
    with pytest.raises(BleepError, match="malformed at spot row"):
        damaged(expression_indices=cols).aggregate(idx, np.ones((20, 1)))
    indptr = tensors["expression_indptr"].copy()
    indptr[-1] += 1
    with pytest.raises(BleepError, match="last row offset"):
        damaged(expression_indptr=indptr)
    values = tensors["expression_values"].copy()
    values[0] = np.inf
    with pytest.raises(BleepError, match="NaN or infinite"):
        damaged(expression_values=values).aggregate(idx, np.ones((20, 1)))
    norms = tensors["norms"].copy()
    norms[4] *= 2
    with pytest.raises(BleepError, match="damaged"):
        damaged(norms=norms).search(emb[:2], k=3)
    with pytest.raises(BleepError, match="expression_indices"):
        damaged(expression_indices=cols.astype(np.int64))
    with pytest.raises(BleepError, match="norms"):
        damaged(norms=norms[:5])
    # Stored search panels that differ from the rows are not trusted: the search packs its own and
    # stays exact (a wrong panel would otherwise change the neighbours silently).
    panels = tensors["search_panels_f32"].copy()
    panels[0, :, :] = -panels[0, :, :]
    bf16 = tensors["search_panels_bf16"].copy()
    bf16[0] ^= 0x80008000  # flip the signs of both halves of each word
    q = rng.standard_normal((7, emb.shape[1])).astype(np.float32)
    want = Reference.build(emb, expr, genes).search(q, k=6)
    got = damaged(search_panels_f32=panels, search_panels_bf16=bf16).search(q, k=6)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # Names are parsed when first asked for: a damaged list is an error then, not at load.
    ids = damaged(spot_ids=np.frombuffer(b'["a", 1', np.uint8))
    assert ids.n_spots == 20
    with pytest.raises(BleepError, match="spot_ids are not a JSON list"):
        _ = ids.spot_ids
    with pytest.raises(BleepError, match="3 spot_ids for 20 spots"):
        _ = damaged(spot_ids=np.frombuffer(b'["a", "b", "c"]', np.uint8)).spot_ids


def test_spot_ids_and_sections_are_tensors_parsed_on_demand(rng, tmp_path):
    from safetensors import safe_open

    emb, expr, genes = random_reference(rng, n=30, g=3)
    ids, sections = [f"spot-{i}" for i in range(30)], ["A"] * 10 + ["B"] * 20
    ref = Reference.build(emb, expr, genes, spot_ids=ids, sections=sections)
    ref.save(tmp_path / "r.safetensors")
    with safe_open(str(tmp_path / "r.safetensors"), "np") as f:
        assert json.loads(f.get_tensor("spot_ids").tobytes()) == ids
        assert json.loads(f.get_tensor("sections").tobytes()) == sections
    back = Reference.load(tmp_path / "r.safetensors")
    assert back.spot_ids == ids and back.sections == sections
    # Default ids are not stored, and read back as the default.
    Reference.build(emb, expr, genes).save(tmp_path / "d.safetensors")
    with safe_open(str(tmp_path / "d.safetensors"), "np") as f:
        keys = set(f.keys())
        assert "spot_ids" not in keys and "sections" not in keys
    assert Reference.load(tmp_path / "d.safetensors").spot_ids == [str(i) for i in range(30)]
