"""The Python API against the plain NumPy oracle (bleep_rs._oracle) on random shapes and edge cases."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import bleep_rs
from bleep_rs import Reference, _oracle

from conftest import random_reference, run_with_kernel


def assert_same_neighbours(ref_emb, queries, k, idx, sims):
    """Same sets as the float64 oracle, except swaps explained by a near-tie at the k-th score."""
    want_idx, want_sims = _oracle.search(ref_emb, queries, k)
    assert idx.shape == want_idx.shape and sims.shape == want_idx.shape
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    for q in range(len(queries)):
        kth = want_sims[q, -1]
        for j, s in zip(want_idx[q], want_sims[q]):
            if abs(s - kth) > 1e-5:
                assert j in idx[q], f"query {q}: reference row {j} missing"


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    nq=st.integers(0, 60),
    d=st.integers(1, 80),
    k=st.integers(1, 120),
    seed=st.integers(0, 2**32 - 1),
)
def test_search_matches_oracle(n, nq, d, k, seed):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    emb[np.linalg.norm(emb, axis=1) == 0, 0] = 1.0
    q = rng.standard_normal((nq, d)).astype(np.float32)
    q[np.linalg.norm(q, axis=1) == 0, 0] = 1.0
    ref = Reference.build(emb, np.ones((n, 1)), ["g"])
    idx, sims = ref.search(q, k=k)
    assert idx.dtype == np.int64 and sims.dtype == np.float32
    assert idx.shape == (nq, min(k, n))
    assert_same_neighbours(emb, q, k, idx, sims)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 150),
    nq=st.integers(1, 40),
    g=st.integers(1, 70),
    k=st.integers(1, 60),
    method=st.sampled_from(bleep_rs.METHODS),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_impute_matches_oracle(n, nq, g, k, method, dtype, seed):
    rng = np.random.default_rng(seed)
    d = 16
    emb = rng.standard_normal((n, d)).astype(np.float32) * rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)
    expr = rng.gamma(2.0, 1.0, size=(n, g)).astype(np.float32)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    ref = Reference.build(emb, expr, [f"g{i}" for i in range(g)], expression_dtype=dtype)
    pred, idx, sims = ref.impute(q, k=k, method=method, temperature=0.2, return_neighbours=True)
    assert pred.shape == (nq, g) and pred.dtype == np.float32
    assert_same_neighbours(emb, q, k, idx, sims)
    # The aggregation over the neighbours the core chose, in float64, from the table it stores.
    table = ref.expression.astype(np.float64)
    qn = np.linalg.norm(q.astype(np.float64), axis=1)
    rn = np.linalg.norm(emb.astype(np.float64), axis=1)
    w = _oracle.weights(method, sims.astype(np.float64), qn, rn[idx], temperature=0.2)
    want = np.einsum("qk,qkg->qg", w, table[idx])
    np.testing.assert_allclose(pred, want, rtol=2e-4, atol=2e-4)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 120),
    nq=st.integers(0, 30),
    g=st.integers(1, 40),
    k=st.integers(1, 150),
    n_sections=st.integers(0, 5),
    method=st.sampled_from(bleep_rs.METHODS),
    sparse=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_centred_sections_match_the_oracle(n, nq, g, k, n_sections, method, sparse, seed):
    """centre_sections=True equals imputing from a table whose every section is moved onto the mean of all
    spots (float64 oracle), for every method, k > N, sparse tables, exact ties (duplicated rows) and
    empty queries; with one section or no labels it is the plain prediction."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, 8)).astype(np.float32)
    emb[1::3] = emb[0]  # exact ties
    expr = rng.gamma(1.0, 1.0, (n, g)) * (rng.uniform(size=(n, g)) < 0.6)
    labels = [f"s{int(c)}" for c in rng.integers(0, max(1, n_sections), n)] if n_sections else None
    if labels:
        expr += np.array([int(x[1:]) for x in labels])[:, None]  # sections offset from each other
    expr = expr.astype(np.float32)
    ref = Reference.build(emb, expr, [f"g{i}" for i in range(g)], sections=labels, expression_format="sparse" if sparse else "dense")
    q = np.concatenate([rng.standard_normal((nq, 8)), emb[rng.integers(0, n, min(nq, 3))]]).astype(np.float32)
    got, idx, sims = ref.impute(q, k=k, method=method, temperature=0.2, return_neighbours=True, centre_sections=True)
    table = expr.astype(np.float64)
    if labels:
        lab = np.array(labels)
        for s in set(labels):
            table[lab == s] += expr.astype(np.float64).mean(0) - table[lab == s].mean(0)
    qn = np.linalg.norm(q.astype(np.float64), axis=1)
    rn = np.linalg.norm(emb.astype(np.float64), axis=1)
    w = _oracle.weights(method, sims.astype(np.float64), qn, rn[idx], temperature=0.2)
    np.testing.assert_allclose(got, np.einsum("qk,qkg->qg", w, table[idx]), rtol=2e-4, atol=2e-4)
    if not labels or len(set(labels)) == 1:
        np.testing.assert_array_equal(got, ref.impute(q, k=k, method=method, temperature=0.2))


def test_impute_equals_full_oracle_on_generic_input(rng):
    emb, expr, genes = random_reference(rng, n=500, d=24, g=40)
    q = rng.standard_normal((70, 24)).astype(np.float32)
    ref = Reference.build(emb, expr, genes)
    for method in bleep_rs.METHODS:
        got = ref.impute(q, k=50, method=method, temperature=0.1)
        want = _oracle.impute(emb, expr, q, 50, method, temperature=0.1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=method)


def test_k_at_least_n_returns_every_spot(rng):
    emb, expr, genes = random_reference(rng, n=7)
    ref = Reference.build(emb, expr, genes)
    q = rng.standard_normal((3, emb.shape[1]))
    for k in (7, 8, 1000):
        idx, sims = ref.search(q, k=k)
        assert idx.shape == (3, 7)
        assert all(sorted(row) == list(range(7)) for row in idx)
        pred = ref.impute(q, k=k)
        np.testing.assert_allclose(pred, np.broadcast_to(expr.mean(0), pred.shape), rtol=1e-5)


def test_k1_and_top1_take_the_nearest_spot(rng):
    emb, expr, genes = random_reference(rng)
    ref = Reference.build(emb, expr, genes)
    q = emb[[5, 17, 199]] * 3.0  # same direction as reference rows
    idx, _ = ref.search(q, k=1)
    assert idx[:, 0].tolist() == [5, 17, 199]
    np.testing.assert_array_equal(ref.impute(q, k=1), expr[[5, 17, 199]])
    np.testing.assert_array_equal(ref.impute(q, k=30, method="top1"), expr[[5, 17, 199]])


def test_exact_ties_go_to_the_lower_index():
    emb = np.tile(np.array([[1.0, 2.0, 3.0]], np.float32), (100, 1))
    ref = Reference.build(emb, np.arange(100, dtype=np.float32)[:, None], ["g"])
    idx, sims = ref.search(np.array([[2.0, 4.0, 6.0], [1.0, 2.0, 3.0]]), k=5)
    assert idx.tolist() == [[0, 1, 2, 3, 4]] * 2
    np.testing.assert_allclose(sims, 1.0, atol=1e-6)


def test_empty_query_set(rng):
    emb, expr, genes = random_reference(rng)
    ref = Reference.build(emb, expr, genes)
    assert ref.impute(np.zeros((0, emb.shape[1])), k=5).shape == (0, len(genes))
    idx, sims = ref.search(np.zeros((0, emb.shape[1])), k=5)
    assert idx.shape == (0, 5)


def test_float64_and_noncontiguous_inputs_are_converted(rng):
    emb, expr, genes = random_reference(rng)
    ref = Reference.build(emb.astype(np.float64), expr.astype(np.float64), genes)
    q = rng.standard_normal((10, 2 * emb.shape[1]))[:, ::2]  # float64, strided
    assert not q.flags.c_contiguous
    np.testing.assert_allclose(ref.impute(q, k=5), ref.impute(np.ascontiguousarray(q, np.float32), k=5))
    ints = Reference.build(np.arange(20).reshape(10, 2) + 1, np.ones((10, 1), np.int64), ["g"])
    assert ints.n_spots == 10


def test_sixteen_bit_tables_are_close_and_smaller(rng):
    emb, expr, genes = random_reference(rng)
    q = rng.standard_normal((20, emb.shape[1]))
    exact = Reference.build(emb, expr, genes).impute(q, k=10)
    for dtype, tol in (("float16", 1e-3), ("bfloat16", 8e-3)):
        ref = Reference.build(emb, expr, genes, expression_dtype=dtype)
        assert ref.expression_dtype == dtype
        np.testing.assert_allclose(ref.impute(q, k=10), exact, rtol=tol)


def test_threads_argument_and_setting(rng):
    emb, expr, genes = random_reference(rng)
    ref = Reference.build(emb, expr, genes)
    q = rng.standard_normal((30, emb.shape[1]))
    base = ref.impute(q, k=10)
    for t in (1, 3):
        np.testing.assert_array_equal(ref.impute(q, k=10, threads=t), base)
    old = bleep_rs.get_num_threads()
    try:
        bleep_rs.set_num_threads(1)
        assert bleep_rs.get_num_threads() == 1
        np.testing.assert_array_equal(ref.impute(q, k=10), base)
    finally:
        bleep_rs.set_num_threads(0)
    assert bleep_rs.get_num_threads() == old
    with pytest.raises(bleep_rs.BleepError, match="threads"):
        ref.impute(q, k=10, threads=0)


@pytest.mark.parametrize("kernel", ["portable", "avx2", "avx512", "avx512bf16"])
def test_every_score_kernel_gives_the_same_neighbours(rng, tmp_path, kernel):
    """Each score kernel, run in a child process with BLEEP_RS_KERNEL (read once per process), against the
    float64 oracle; a kernel this CPU lacks is reported as skipped, not passed."""
    if kernel not in bleep_rs._core.available_kernels():
        pytest.skip(f"this CPU has no {kernel} kernel (it runs {', '.join(bleep_rs._core.available_kernels())})")
    emb, _, _ = random_reference(rng, n=400, d=40)
    q = rng.standard_normal((50, 40)).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    np.save(tmp_path / "q.npy", q)
    code = (
        "import numpy as np, bleep_rs, sys; d=sys.argv[1];"
        "r=bleep_rs.Reference.build(np.load(d+'/emb.npy'), np.ones((400,1)), ['g']);"
        "np.save(d+'/idx.npy', r.search(np.load(d+'/q.npy'), k=20)[0])"
    )
    assert run_with_kernel(kernel, code, tmp_path) == kernel
    idx, sims = Reference.build(emb, np.ones((400, 1)), ["g"]).search(q, k=20)
    assert_same_neighbours(emb, q, 20, np.load(tmp_path / "idx.npy"), sims)


def test_return_neighbors_is_an_alias_of_return_neighbours(rng):
    emb, expr, genes = random_reference(rng, n=60, g=5)
    ref, q = Reference.build(emb, expr, genes), emb[:4]
    new, old = ref.impute(q, 3, return_neighbours=True), ref.impute(q, 3, return_neighbors=True)
    assert len(new) == len(old) == 3 and all(np.array_equal(a, b) for a, b in zip(new, old))
    assert isinstance(ref.impute(q, 3, return_neighbors=False), np.ndarray)


def test_aggregate_alone_matches_oracle(rng):
    emb, expr, genes = random_reference(rng, n=300, g=50)
    ref = Reference.build(emb, expr, genes)
    idx = rng.integers(0, 300, size=(40, 7))
    w = rng.uniform(0, 1, size=(40, 7))
    want = np.einsum("qk,qkg->qg", w, expr.astype(np.float64)[idx])
    np.testing.assert_allclose(ref.aggregate(idx, w), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(bleep_rs.BleepError, match="out of range"):
        ref.aggregate(idx + 300, w)
    with pytest.raises(bleep_rs.BleepError, match="same shape"):
        ref.aggregate(idx, w[:, :3])
    with pytest.raises(bleep_rs.BleepError, match="integer"):
        ref.aggregate(idx.astype(float), w)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 80),
    nq=st.integers(0, 70),
    g=st.integers(1, 70),
    k=st.integers(1, 100),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_neighbour_spread_matches_oracle(n, nq, g, k, dtype, seed):
    """Random shapes (more queries than one parallel chunk, genes not a multiple of the block width,
    k larger than the reference with repeated neighbours), each storage type, against NumPy's std."""
    rng = np.random.default_rng(seed)
    expr = rng.gamma(1.0, 2.0, size=(n, g)).astype(np.float32)
    expr[rng.uniform(size=(n, g)) < 0.3] = 0.0  # ties: the sparse zeros of real counts
    ref = Reference.build(rng.standard_normal((n, 4)).astype(np.float32) + 5, expr, [f"g{i}" for i in range(g)],
                          expression_dtype=dtype)
    idx = rng.integers(0, n, size=(nq, k))
    want = _oracle.neighbour_spread(ref.expression.astype(np.float64), idx)
    got = ref.neighbour_spread(idx)
    assert got.shape == (nq,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_neighbour_spread_bad_indices(rng):
    emb, expr, genes = random_reference(rng, n=30, g=5)
    ref = Reference.build(emb, expr, genes)
    with pytest.raises(bleep_rs.BleepError, match="out of range"):
        ref.neighbour_spread(np.array([[0, 30]]))
    with pytest.raises(bleep_rs.BleepError, match="out of range"):
        ref.neighbour_spread(np.array([[-1, 3]]))
    with pytest.raises(bleep_rs.BleepError, match="at least one column"):
        ref.neighbour_spread(np.zeros((3, 0), np.int64))
    with pytest.raises(bleep_rs.BleepError, match="integer"):
        ref.neighbour_spread(np.zeros((3, 2)))
    np.testing.assert_allclose(ref.neighbour_spread(np.array([[4, 4, 4]])), [0.0], atol=1e-6)  # one spot: no spread
