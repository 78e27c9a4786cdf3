"""The reference file (round trip, atomic writes, damaged files) and every bad input: one clear error."""

import json
import os

import numpy as np
import pytest

import bleep_rs
from bleep_rs import BleepError, Reference

from conftest import random_reference


@pytest.fixture
def ref(rng):
    emb, expr, genes = random_reference(rng)
    return Reference.build(
        emb, expr, genes,
        spot_ids=[f"s{i}" for i in range(len(emb))],
        sections=["A"] * 100 + ["B"] * 100,
        metadata={"model": "test-model", "epochs": 3},
    )


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_keeps_everything(rng, tmp_path, dtype):
    emb, expr, genes = random_reference(rng)
    r = Reference.build(emb, expr, genes, sections=["x"] * len(emb), metadata={"m": [1, 2]}, expression_dtype=dtype)
    path = tmp_path / "ref.safetensors"
    r.save(path)
    back = Reference.load(path)
    assert (back.n_spots, back.dim, back.genes, back.expression_dtype) == (200, 32, genes, dtype)
    assert back.spot_ids == [str(i) for i in range(200)] and back.sections == ["x"] * 200
    assert back.metadata == {"m": [1, 2]}
    np.testing.assert_array_equal(back.embeddings, emb)
    np.testing.assert_array_equal(back.expression, r.expression)
    q = rng.standard_normal((9, 32))
    np.testing.assert_array_equal(back.impute(q, k=7), r.impute(q, k=7))
    assert os.listdir(tmp_path) == ["ref.safetensors"]


def test_file_is_plain_safetensors(ref, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "ref.safetensors"
    ref.save(path)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        assert meta["format"] == "bleep-rs.reference" and meta["format_version"] == "2"
        np.testing.assert_array_equal(f.get_tensor("embeddings"), ref.embeddings)
        # Dense expression in the 16-gene blocks the kernels read (zero-padded).
        assert meta["expression_format"] == "dense"
        np.testing.assert_array_equal(f.get_tensor("expression_blocks")[0, :, :12], ref.expression)
    assert ref.sections[:2] == ["A", "A"] and ref.spot_ids[0] == "s0"


def test_a_gene_list_out_of_step_with_the_expression_is_a_damaged_header(ref, tmp_path):
    """The dense table pads its genes to blocks of 16: a header whose gene list lost (or gained) a name
    within the padding was read without complaint, one gene short (or with a column of zeros). The
    metadata records n_genes; a file written before it did (no n_genes) still loads."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    ref.save(tmp_path / "ref.safetensors")
    with safe_open(str(tmp_path / "ref.safetensors"), framework="numpy") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert meta["n_genes"] == "12"
    genes = json.loads(meta["genes"])
    for changed in (genes[:-1], genes + ["EXTRA"]):
        save_file(tensors, str(tmp_path / "edited"), metadata={**meta, "genes": json.dumps(changed)})
        with pytest.raises(BleepError, match=f"lists {len(changed)} genes but records n_genes = \"12\": the header is damaged"):
            Reference.load(tmp_path / "edited")
    save_file(tensors, str(tmp_path / "older"), metadata={k: v for k, v in meta.items() if k != "n_genes"})
    np.testing.assert_array_equal(Reference.load(tmp_path / "older").expression, ref.expression)


def test_save_replaces_atomically_and_leaves_nothing_on_failure(ref, tmp_path):
    path = tmp_path / "ref.safetensors"
    path.write_bytes(b"old")
    ref.save(path)
    assert Reference.load(path).n_spots == 200
    assert os.listdir(tmp_path) == ["ref.safetensors"]
    # The target is a folder: the rename fails, and no temporary file is left behind.
    (tmp_path / "taken").mkdir()
    with pytest.raises(BleepError):
        ref.save(tmp_path / "taken")
    assert sorted(os.listdir(tmp_path)) == ["ref.safetensors", "taken"]
    with pytest.raises(BleepError, match="does not exist"):
        ref.save(tmp_path / "missing" / "ref.safetensors")


def test_damaged_and_foreign_files(ref, tmp_path):
    path = tmp_path / "ref.safetensors"
    ref.save(path)
    data = path.read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    with pytest.raises(BleepError, match="truncated"):
        Reference.load(tmp_path / "cut")
    (tmp_path / "junk").write_bytes(b"\x00" * 100)
    with pytest.raises(BleepError, match="safetensors"):
        Reference.load(tmp_path / "junk")
    with pytest.raises(BleepError, match="no such reference file"):
        Reference.load(tmp_path / "absent.safetensors")

    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "foreign"))
    with pytest.raises(BleepError, match="not a bleep-rs reference"):
        Reference.load(tmp_path / "foreign")
    meta = {"format": "bleep-rs.reference", "format_version": "1", "genes": "[\"a\"]", "spot_ids": "[\"0\"]"}
    save_file({"embeddings": np.ones((1, 2), np.float32)}, str(tmp_path / "partial"), metadata=meta)
    with pytest.raises(BleepError, match="missing tensor \"expression\""):
        Reference.load(tmp_path / "partial")
    save_file({"embeddings": np.ones((1, 2), np.float32), "expression": np.ones((1, 1), np.float32)},
              str(tmp_path / "future"), metadata={**meta, "format_version": "99"})
    with pytest.raises(BleepError, match="newer"):
        Reference.load(tmp_path / "future")


def test_bad_build_inputs(rng):
    emb, expr, genes = random_reference(rng, n=10, d=4, g=3)
    cases = [
        (dict(embeddings=emb[:0], expression=expr[:0]), "empty"),
        (dict(expression=expr[:5]), "embeddings have 10 rows but expression has 5"),
        (dict(genes=genes[:2]), "expression has 3 columns but 2 gene names"),
        (dict(genes=["a", "b", "a"]), "more than once"),
        (dict(embeddings=np.where(np.eye(10, 4) > 0, np.nan, emb)), "NaN or infinite"),
        (dict(expression=np.full_like(expr, np.inf)), "NaN or infinite"),
        (dict(embeddings=np.zeros_like(emb)), "all zeros"),
        (dict(embeddings=emb[:, 0]), "must be 2-D"),
        (dict(embeddings=np.array([["a"] * 4] * 10)), "must hold numbers"),
        (dict(spot_ids=["x"]), "spot_ids has 1 entries for 10 spots"),
        (dict(sections=["x"] * 3), "sections has 3 entries"),
        (dict(metadata={"f": object()}), "JSON-serialisable"),
        (dict(expression_dtype="int8"), "unknown expression dtype"),
        (dict(expression=np.full_like(expr, 1e6), expression_dtype="float16"), "float16 range"),
        (dict(genes="ABC"), "not a single string"),
    ]
    for change, message in cases:
        args = dict(embeddings=emb, expression=expr, genes=genes)
        extra = {k: change.pop(k) for k in list(change) if k not in args}
        args.update(change)
        with pytest.raises(BleepError, match=message):
            Reference.build(args["embeddings"], args["expression"], args["genes"], **extra)


def test_bad_query_inputs(ref):
    good = np.ones((2, 32))
    with pytest.raises(BleepError, match="queries have 31 columns but the reference embeddings have 32"):
        ref.impute(np.ones((2, 31)))
    for k in (0, -3):
        with pytest.raises(BleepError, match="k must be at least 1"):
            ref.impute(good, k=k)
    with pytest.raises(BleepError, match="whole number"):
        ref.search(good, k=2.5)
    bad = good.copy()
    bad[1, 3] = np.nan
    with pytest.raises(BleepError, match="queries row 1 has a NaN"):
        ref.impute(bad)
    with pytest.raises(BleepError, match="queries row 0 is all zeros"):
        ref.search(np.zeros((1, 32)))
    with pytest.raises(BleepError, match="unknown method 'median'"):
        ref.impute(good, method="median")
    with pytest.raises(BleepError, match="temperature"):
        ref.impute(good, method="softmax", temperature=0.0)
    with pytest.raises(BleepError, match="2-D"):
        ref.impute(np.ones(32))


def test_one_error_type_is_exported():
    assert bleep_rs.BleepError is bleep_rs._core.BleepError
    assert issubclass(BleepError, Exception)


def test_an_output_too_large_to_allocate_is_an_error_not_an_abort(rng):
    # 2^26 queries x 2^20 genes of float32 would be 256 TiB: refused with a message, the process lives on.
    # np.zeros: inputs the size check refuses before reading them are never touched (a broadcast view
    # was copied whole first, 512 MB of fresh pages: seconds of page faults on this project's machines).
    genes = [f"g{i}" for i in range(1 << 20)]
    r = Reference.build(np.ones((1, 2), np.float32), np.ones((1, len(genes)), np.float32), genes)
    with pytest.raises(BleepError, match="cannot be allocated"):
        r.aggregate(np.zeros((1 << 26, 1), np.int64), np.zeros((1 << 26, 1), np.float32))
