"""Bad input on the Python side, as a careless or unlucky user makes it: each case is built from real
files and must be a BleepError that names the file or argument and the problem (exit status 2 on the
command line), never a raw exception or a silently wrong answer; and nothing a user wrote is lost.
The readers' damaged-file cases are those of ``tests/fuzz_readers.py``, run here in process."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import bleep_rs
from bleep_rs import BleepError, read_section
from bleep_rs._atomic import atomic_path, check_output, remove_stale
from bleep_rs.inputs import InputSpec

from conftest import DATA, cli as run_cli, refused, tiny_slides, writable_copy
from fuzz_readers import copy_section, mutations

C2 = DATA / "tiny" / "C2"


def cli(*args):
    """A command line run in process that may fail (the tests check its status)."""
    return run_cli(*args, ok=False)


def read(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_section(path, **kwargs)




# -- readers: every damaged copy of a real section reads or is a BleepError --------------------------


CASES = [m for m in mutations(seed=0, flips=6) if not m[1].startswith("image.jpg")]  # images: the native suite


@pytest.mark.parametrize("case", CASES, ids=[f"{s}: {n}" for s, n, _ in CASES])
def test_a_damaged_section_reads_or_is_a_clear_error(tmp_path, case):
    section, name, change = case
    root = copy_section(section, tmp_path / "s")
    change(root)
    try:
        a = read(root)
    except BleepError as e:
        assert str(root) in str(e) or "scalefactors" in str(e)  # names the section or the file
        return
    X = a.X.toarray()
    assert a.n_obs > 0 and np.isfinite(X).all() and (X >= 0).all() and np.isfinite(a.obsm["spatial"]).all()


@pytest.fixture
def st(tmp_path):
    return writable_copy(C2, tmp_path / "C2")


@pytest.fixture
def visium(tmp_path):
    return writable_copy(DATA / "visium_v1", tmp_path / "visium")


def edit_counts(folder, change):
    f = folder / "counts.tsv.gz"
    df = pd.read_csv(f, sep="\t", index_col=0)
    df = change(df)
    f.write_bytes(gzip.compress(df.to_csv(sep="\t").encode()))
    return df


def test_counts_not_gzip(st):
    (st / "counts.tsv.gz").write_bytes(gzip.decompress((st / "counts.tsv.gz").read_bytes()))
    with pytest.raises(BleepError, match=r"counts.tsv.gz: not a readable gzip-compressed.*Not a gzipped file"):
        read(st)


def test_counts_with_the_spot_ids_alone(st):
    """Its header is read as the first spot's id: a spot was lost and no gene left, without a word."""
    rows = gzip.decompress((st / "counts.tsv.gz").read_bytes()).decode().splitlines()
    (st / "counts.tsv.gz").write_bytes(gzip.compress("\n".join(r.split("\t")[0] for r in rows[1:]).encode() + b"\n"))
    with pytest.raises(BleepError, match="counts.tsv.gz: no gene columns"):
        read(st)


def test_a_count_that_is_not_a_number_names_its_spot_and_gene(st):
    df = edit_counts(st, lambda d: d.astype(object).where(~((d.index == d.index[4])[:, None] & (d.columns == "ERBB2")[None, :]), "12a"))
    with pytest.raises(BleepError, match=rf"'12a', not a number, at spot '{df.index[4]}', gene 'ERBB2'"):
        read(st)


def test_one_nan_count_is_an_error_naming_spot_and_gene(st):
    """It used to zero the spot's whole profile after normalisation."""
    df = edit_counts(st, lambda d: d.astype(float).where(~((d.index == d.index[7])[:, None] & (d.columns == "ACTB")[None, :]), np.nan))
    with pytest.raises(BleepError, match=rf"NaN.*at spot '{df.index[7]}', gene 'ACTB'"):
        read(st)


def test_nan_reaching_the_normalisation_is_an_error_not_a_zeroed_spot():
    import scipy.sparse as sp

    from bleep_rs.expression import Panel, normalize_log1p, panel_expression

    section = read(C2)
    X = section.X.toarray()
    X[3, 5] = np.nan
    section.X = sp.csr_matrix(X)
    with pytest.raises(BleepError, match=rf"NaN.*spot '{section.obs_names[3]}', gene '{section.var_names[5]}'"):
        panel_expression(section, Panel(genes=list(section.var_names)))
    with pytest.raises(BleepError, match=r"NaN.*row 3, column 5"):
        normalize_log1p(X)
    X[3, 5] = np.inf
    with pytest.raises(BleepError, match=r"inf"):
        normalize_log1p(sp.csr_matrix(X))


def test_duplicated_spot_ids(st):
    edit_counts(st, lambda d: pd.concat([d, d.iloc[[2]]]))
    with pytest.raises(BleepError, match=r"counts.tsv.gz: duplicated spot ids"):
        read(st)


def test_duplicated_spot_ids_in_spots_tsv(st):
    f = st / "spots.tsv"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines + [lines[3]]) + "\n")
    with pytest.raises(BleepError, match=r"spots.tsv: duplicated spot ids"):
        read(st)


def test_duplicated_gene_names_are_not_renamed_silently(st):
    f = st / "counts.tsv.gz"
    text = gzip.decompress(f.read_bytes()).decode().replace("\tERBB2\t", "\tIGKC\t", 1)
    f.write_bytes(gzip.compress(text.encode()))
    with pytest.raises(BleepError, match=r"counts.tsv.gz: duplicated column names \(\['IGKC'\]"):
        read(st)


@pytest.mark.parametrize("column, value, message", [
    ("selected", None, r"missing columns \['selected'\]"),
    ("selected", "yes", r"selected of .* is 'yes', not a whole number"),
    ("selected", "2", r"selected of .* is 2; it must be 0 or 1"),
    ("pixel_x", "abc", r"pixel_x of .* is 'abc', not a number"),
    ("x", "1.5", r"x of .* is '1.5', not a whole number"),
])
def test_bad_spot_tables(st, column, value, message):
    spots = pd.read_csv(st / "spots.tsv", sep="\t", dtype=str)
    if value is None:
        spots = spots.drop(columns=[column])
    else:
        spots.loc[2, column] = value
    spots.to_csv(st / "spots.tsv", sep="\t", index=False)
    with pytest.raises(BleepError, match=r"spots.tsv: .*" + message):
        read(st)


@pytest.mark.parametrize("text, message", [
    ('{"um_per_px": 1.38', r"meta.json: not valid JSON"),
    ('{"um_per_px": "1.38"}', r"meta.json: um_per_px is '1.38'; it must be a positive number"),
    ('{"um_per_px": -1}', r"meta.json: um_per_px is -1"),
    ('[1.38]', r"meta.json: a JSON object .* not a list"),
    (b"\xff\xfe{}", r"meta.json: not valid JSON"),
])
def test_malformed_meta_json(st, text, message):
    (st / "meta.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(BleepError, match=message):
        read(st)


def test_missing_meta_json_falls_back_to_the_spot_pitch(st):
    os.remove(st / "meta.json")
    a = read(st)
    assert a.uns["bleep"]["um_per_px_source"].startswith("the spot pitch")
    assert a.uns["bleep"]["um_per_px"] == pytest.approx(1.3873, rel=0.05)


@pytest.mark.parametrize("change, message", [
    (None, r"scalefactors_json.json: missing"),
    ('{"spot_diameter_fullres": 89.4', r"scalefactors_json.json: not valid JSON"),
    ({"spot_diameter_fullres": 0}, r"scalefactors_json.json: spot_diameter_fullres is 0"),
    ({"spot_diameter_fullres": "89"}, r"spot_diameter_fullres is '89'"),
    ({"tissue_lowres_scalef": [0.045]}, r"tissue_lowres_scalef is \[0.045\]"),
    ({"tissue_lowres_scalef": None}, r"tissue_lowres_image.png exists but scalefactors_json.json has no tissue_lowres_scalef"),
])
def test_malformed_scalefactors(visium, change, message):
    f = visium / "spatial" / "scalefactors_json.json"
    if change is None:
        os.remove(f)
    elif isinstance(change, str):
        f.write_text(change)
    else:
        f.write_text(json.dumps({**json.loads(f.read_text()), **change}))
    with pytest.raises(BleepError, match=message):
        read(visium)


def test_bad_tissue_positions(visium):
    f = visium / "spatial" / "tissue_positions_list.csv"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines + [lines[5]]) + "\n")
    with pytest.raises(BleepError, match=r"tissue_positions_list.csv: duplicated barcodes"):
        read(visium)
    cells = lines[5].split(",")
    cells[1] = "2"
    f.write_text("\n".join(lines[:5] + [",".join(cells)] + lines[6:]) + "\n")
    with pytest.raises(BleepError, match=r"in_tissue of .* is 2; it must be 0 or 1"):
        read(visium)


def rewrite_h5(folder, name, value, group="matrix"):
    import h5py

    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "r+") as f:
        m = f[group]
        old = m[name][()]
        del m[name]
        m[name] = value(old)


@pytest.mark.parametrize("name, value, message", [
    ("indptr", lambda a: a[:-1], r"indptr has 100 entries for 100 barcodes"),
    ("indices", lambda a: np.where(np.arange(len(a)) == 3, 10**6, a), r"gene indices must lie in 0..99"),
    ("data", lambda a: a[:-1], r"indices for .* values"),
    ("shape", lambda a: np.append(a, 1), r"matrix/shape must be two counts"),
    ("barcodes", lambda a: a[:-1], r"/matrix/barcodes must be 100 strings, not 99"),
    ("data", lambda a: a.astype("S4"), r"data \(\|S4\).* must be numbers"),
])
def test_a_10x_matrix_that_is_inconsistent(visium, name, value, message):
    rewrite_h5(visium, name, value)
    with pytest.raises(BleepError, match=r"filtered_feature_bc_matrix.h5: .*" + message):
        read(visium)


def test_a_10x_matrix_with_a_gene_name_missing(visium):
    rewrite_h5(visium, "name", lambda a: a[:-1], group="matrix/features")
    with pytest.raises(BleepError, match=r"/matrix/features/name must be 100 strings, not 99"):
        read(visium)


def test_h5ad_counts_with_nan_name_spot_and_gene(tmp_path):
    a = read(C2)
    X = a.X.toarray()
    X[2, 9] = np.nan
    a.X = X
    a.write_h5ad(tmp_path / "s.h5ad")
    with pytest.raises(BleepError, match=rf"X is not raw counts: it holds 1 NaN.*spot '{a.obs_names[2]}', gene '{a.var_names[9]}'"):
        read(tmp_path / "s.h5ad")


def test_metadata_numbers_in_an_h5ad_are_checked(tmp_path):
    a = read(C2)
    a.uns["bleep"]["um_per_px"] = "fast"
    a.write_h5ad(tmp_path / "s.h5ad")
    with pytest.raises(BleepError, match=r"s.h5ad \(uns\['bleep'\]\): um_per_px is 'fast'"):
        read(tmp_path / "s.h5ad")


# -- model directories --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A real model directory (untrained heads on EfficientNet-Lite0, as save_model writes it) and a
    reference built with it from tiny C2. The backbone has its ImageNet weights, as every other model of
    the suite: one ONNX export of it serves them all (random weights cost an export of their own)."""
    pytest.importorskip("torch")
    from bleep_rs.expression import Panel
    from bleep_rs.model import BleepModel, ModelConfig, build_reference, save_model

    d = tmp_path_factory.mktemp("model")
    section = read(C2)
    model = BleepModel(ModelConfig(panel=Panel(genes=list(section.var_names[:32])), embedding_dim=32,
                                   input=InputSpec(patch_size=64, fields_of_view=(1.0,), tta=False)))
    save_model(model, d / "model")
    build_reference(model, [section]).save(d / "ref.safetensors")
    return d


def broken_model(model_dir, tmp_path, config=None, state=None):
    out = tmp_path / "broken"
    shutil.copytree(model_dir / "model", out)
    if config is not None:
        cfg = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(config(cfg) if callable(config) else config)
    if state is not None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(out / "model.safetensors"))
        state(tensors)
        save_file(tensors, str(out / "model.safetensors"))
    return out


def json_with(**changes):
    return lambda cfg: json.dumps({k: v for k, v in {**cfg, **changes}.items() if v is not ...})


def panel_with(**changes):
    return lambda cfg: json.dumps({**cfg, "panel": {k: v for k, v in {**cfg["panel"], **changes}.items() if v is not ...}})


def input_with(**changes):
    return lambda cfg: json.dumps({**cfg, "input": {k: v for k, v in {**cfg["input"], **changes}.items() if v is not ...}})


@pytest.mark.parametrize("config, message", [
    ('{"format": "bleep-rs.model", ', r"config.json is not valid JSON"),
    ('{"format": "bleep-rs.model", "embedding_dim": ' + "9" * 5000 + "}", r"config.json is not valid JSON \(ValueError: Exceeds the limit"),
    ("[" * 100_000 + "]" * 100_000, r"config.json is not valid JSON \(RecursionError"),
    ("[1, 2]", r"config.json is not a bleep-rs model config"),
    (json_with(panel=...), r"config.json: missing keys \['panel'\]"),
    (json_with(colour="red"), r"config.json: unknown keys \['colour'\]"),
    (json_with(embedding_dim="32"), r"config.json: wrong types: embedding_dim = '32' \(not <class 'int'>\)"),
    (json_with(heads=0), r"config.json: heads is 0; it must be at least 1: the file is damaged"),
    (json_with(heads=2.0), r"config.json: wrong types: heads = 2.0"),
    (input_with(um_per_px="0.5"), r"config.json's input: wrong types: um_per_px = '0.5' \(not Optional\[float\]\)"),
    (input_with(fields_of_view=[0.5]), r"config.json's input: fields_of_view must be a finite number >= 1 .*: the file is damaged"),
    (input_with(stain="reinhard"), r"config.json's input: stain must be one of none, macenko, got 'reinhard'"),
    (input_with(views=8), r"config.json's input: unknown keys \['views'\]"),
    (json_with(input=...), r"config.json: missing keys \['input'\]"),
    (input_with(tta=...), r"config.json's input: missing keys \['tta'\]"),  # format 3 says every field: no default stands in
    (input_with(tta_views=...), r"config.json's input: missing keys \['tta_views'\]"),  # so does format 5
    (input_with(tta_views=[3]), r"config.json's input: tta_views must be one of 1, 2, 4, 8, got 3"),
    (input_with(tta_views=[2, 4, 8]), r"config.json's input: tta_views must be one count or two"),
    (json_with(format_version=2), r"config.json of format 2 has an \"input\" object"),
    (json_with(input=[224]), r"config.json: wrong types: input"),
    (json_with(mean=[0.5, "x", 0.5]), r"wrong types: mean"),
    (json_with(format_version="1"), r"wrong types: format_version"),
    (json_with(embedding_dim=-1), r"config.json: embedding_dim is -1; it must be at least 1"),
    (json_with(std=[0.5, 0.0, 0.5]), r"std positive"),
    (json_with(backbone="resnet-9000"), r"unknown backbone 'resnet-9000'"),
    (panel_with(genes="ERBB2"), r"config.json's panel: wrong types: genes = 'ERBB2'"),
    (panel_with(genes=...), r"config.json's panel: missing keys \['genes'\]"),
    (panel_with(colour=1), r"config.json's panel: unknown keys \['colour'\]"),
    (panel_with(genes=["A", "A"]), r"the panel's 2 genes must be a non-empty list without repeats"),
])
def test_a_damaged_model_config(model_dir, tmp_path, config, message):
    from bleep_rs.model import load_model

    with pytest.raises(BleepError, match=message):
        load_model(broken_model(model_dir, tmp_path, config=config))


def test_a_format_2_model_config_loads_with_its_input_fields_at_the_top(model_dir, tmp_path):
    """Models written before the input recipe was one object (format 2: patch_size, um_per_px, fields_of_view,
    tta, stain beside the other keys; a field left out meant that version's default) load as they were."""
    from bleep_rs.model import load_model

    model = load_model(model_dir / "model")
    cfg = json.loads((model_dir / "model" / "config.json").read_text())
    old = {**{k: v for k, v in cfg.items() if k != "input"}, **{k: v for k, v in cfg["input"].items() if k != "tta_views"},  # format 5's
           "tta": True, "format_version": 2}
    (tmp_path / "a").mkdir()
    loaded = load_model(broken_model(model_dir, tmp_path / "a", config=json.dumps(old))).config.input
    assert loaded == model.config.input.replace(tta=True, tta_views=(8,))  # format 2 averaged 8 views of every field
    old = {k: v for k, v in old.items() if k not in ("fields_of_view", "tta")}  # today's defaults are (1, 2, 3) and True
    (tmp_path / "b").mkdir()
    migrated = load_model(broken_model(model_dir, tmp_path / "b", config=json.dumps(old)))
    assert migrated.config.input == model.config.input.replace(tta=False, tta_views=(8,))
    # Saved again, it is a format-3 file that loads as it was (not migrated a second time).
    from bleep_rs.model import MODEL_FORMAT_VERSION, save_model

    save_model(migrated, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["format_version"] == MODEL_FORMAT_VERSION
    assert load_model(tmp_path / "again").config.input == migrated.config.input


def test_a_format_4_model_keeps_averaging_8_views_of_every_field(model_dir, tmp_path):
    """Models written before the views went per field (format 4: no "tta_views") predict as they did: all 8
    views of every field with TTA; format 5 records its own counts."""
    from bleep_rs.model import load_model

    cfg = json.loads((model_dir / "model" / "config.json").read_text())
    assert cfg["format_version"] == 6 and cfg["input"]["tta_views"] == [2, 4]
    old = {**cfg, "format_version": 4, "input": {k: v for k, v in cfg["input"].items() if k != "tta_views"}}
    loaded = load_model(broken_model(model_dir, tmp_path, config=json.dumps(old)))
    assert loaded.config.input.tta_views == (8,) and loaded.tta_views(tta=True) == (8,) * loaded.n_fields


def test_a_format_5_model_has_one_pair_of_heads(model_dir, tmp_path):
    """Models written before head ensembles (format 5: no "heads") load with BLEEP's one pair, whose raw
    embeddings retrieval compares, and predict as they did."""
    torch = pytest.importorskip("torch")
    from bleep_rs.model import load_model

    cfg = json.loads((model_dir / "model" / "config.json").read_text())
    old = {k: v for k, v in {**cfg, "format_version": 5}.items() if k != "heads"}
    loaded = load_model(broken_model(model_dir, tmp_path, config=json.dumps(old)))
    assert loaded.config.heads == 1 and loaded.retrieval_dim == loaded.config.embedding_dim == 32
    f = np.random.default_rng(0).standard_normal((4, loaded.feature_dim)).astype(np.float32)
    with torch.no_grad():
        raw = loaded.image_head(torch.from_numpy(f)).numpy()
    np.testing.assert_allclose(loaded.embed_features(f), raw, atol=1e-6)


def _set(name, value):
    return lambda t: t.__setitem__(name, value(t[name]))


@pytest.mark.parametrize("state, message", [
    (lambda t: t.pop("image_head.fc.weight"), r"missing tensors \['image_head.fc.weight'\] \(1\)"),
    (lambda t: t.__setitem__("extra.weight", t["image_head.fc.bias"].clone()), r"unexpected tensors \['extra.weight'\] \(1\)"),
    (_set("image_head.fc.bias", lambda v: v[:-1].clone()), r"tensor image_head.fc.bias has shape \(31,\), the config implies \(32,\)"),
    (_set("image_head.fc.bias", lambda v: v.long()), r"tensor image_head.fc.bias holds torch.int64 values"),
    (_set("image_head.fc.bias", lambda v: v * float("nan")), r"tensor image_head.fc.bias holds NaN or infinite values"),
])
def test_damaged_model_weights_list_what_is_wrong(model_dir, tmp_path, state, message):
    from bleep_rs.model import load_model

    with pytest.raises(BleepError, match=r"model.safetensors: " + message):
        load_model(broken_model(model_dir, tmp_path, state=state))


def test_a_model_directory_that_is_not_one(model_dir, tmp_path):
    from bleep_rs.model import load_model

    bad = broken_model(model_dir, tmp_path)
    (bad / "config.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(BleepError, match=r"config.json: unreadable"):
        load_model(bad)
    with pytest.raises(BleepError, match=r"not a bleep-rs model directory"):
        load_model(C2)
    (tmp_path / "empty").mkdir()  # (an output inside the --model folder is refused first)
    res = cli("reference", C2, "--model", tmp_path / "empty", "--out", tmp_path / "r.safetensors")
    refused(res, "not a bleep-rs model directory")


# -- evaluate ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prediction(model_dir):
    out = model_dir / "pred.h5ad"
    res = cli("predict", C2, "--model", model_dir / "model", "--reference", model_dir / "ref.safetensors", "--out", out, "--k", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_evaluate_on_a_file_that_is_not_a_prediction(prediction, tmp_path):
    refused(cli("evaluate", C2 / "image.jpg", C2, "--out", tmp_path / "r.json"), "image.jpg: not a readable .h5ad")
    half = tmp_path / "half.h5ad"
    half.write_bytes(prediction.read_bytes()[:5000])
    refused(cli("evaluate", half, C2, "--out", tmp_path / "r.json"), "half.h5ad: not a readable .h5ad")
    refused(cli("evaluate", tmp_path / "none.h5ad", C2, "--out", tmp_path / "r.json"), "none.h5ad: no such prediction")
    assert not (tmp_path / "r.json").exists()


def test_evaluate_with_duplicated_spot_ids_is_an_error(prediction, tmp_path):
    """They used to be matched to the last spot of that id."""
    import anndata as ad

    from bleep_rs.evaluate import evaluate_prediction

    pred = ad.read_h5ad(prediction)
    names = list(pred.obs_names)
    names[1] = names[0]
    pred.obs_names = names
    with pytest.raises(BleepError, match=rf"the prediction: duplicated spot ids \(\['{names[0]}'\]"):
        evaluate_prediction(pred, read(C2))
    pred.write_h5ad(tmp_path / "dup.h5ad")
    refused(cli("evaluate", tmp_path / "dup.h5ad", C2, "--out", tmp_path / "r.json"), "duplicated spot ids")


def test_evaluate_out_names_a_json_and_a_csv_and_never_an_input(prediction, tmp_path):
    res = cli("evaluate", prediction, C2, "--out", tmp_path / "r.csv")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0].startswith("gene,pearson_r") and len(rows) == report["n_genes"] + 1
    refused(cli("evaluate", prediction, C2, "--out", tmp_path / "r.json"), "r.json exists", "--overwrite")
    assert cli("evaluate", prediction, C2, "--out", tmp_path / "r.json", "--overwrite").returncode == 0
    before = prediction.read_bytes()
    refused(cli("evaluate", prediction, C2, "--out", prediction), "REPORT.json or REPORT.csv")
    refused(cli("evaluate", prediction, C2, "--out", tmp_path / "report.txt"), "REPORT.json or REPORT.csv")
    assert prediction.read_bytes() == before


def test_plot_checks_its_output_first(prediction, tmp_path):
    before = prediction.read_bytes()
    refused(cli("plot", prediction, "--genes", "ERBB2", "--out", prediction, "--overwrite"), "must end in .png")
    refused(cli("plot", prediction, "--genes", "ERBB2", "--out", tmp_path / "f.txt"), "must end in .png")
    assert prediction.read_bytes() == before


def test_plot_of_a_prediction_without_spot_positions(prediction, tmp_path):
    import anndata as ad

    pred = ad.read_h5ad(prediction)
    del pred.obsm["spatial"]
    pred.write_h5ad(tmp_path / "nowhere.h5ad")
    refused(cli("plot", tmp_path / "nowhere.h5ad", "--genes", str(pred.var_names[0]), "--out", tmp_path / "f.png"), "no spot positions (obsm['spatial'])")
    assert not (tmp_path / "f.png").exists()


def test_evaluate_refuses_non_finite_predictions_and_repeated_genes(prediction, tmp_path):
    import anndata as ad

    pred = ad.read_h5ad(prediction)
    X = np.asarray(pred.X, dtype=np.float32).copy()
    X[0, 1] = np.nan
    bad = ad.AnnData(X, obs=pred.obs, var=pred.var, obsm=dict(pred.obsm), uns=dict(pred.uns))
    bad.write_h5ad(tmp_path / "nan.h5ad")
    refused(cli("evaluate", tmp_path / "nan.h5ad", C2, "--out", tmp_path / "r.json"), "NaN or infinite values in 1 genes")
    names = list(pred.var_names)
    names[1] = names[0]
    twice = pred.copy()
    twice.var_names = names
    twice.write_h5ad(tmp_path / "twice.h5ad")
    refused(cli("evaluate", tmp_path / "twice.h5ad", C2, "--out", tmp_path / "r.json"), "duplicated gene names")
    assert not (tmp_path / "r.json").exists()


def test_a_full_disk_is_one_line(prediction, tmp_path, monkeypatch, capsys):
    """h5py, safetensors and the OS each report a full disk in their own exception type."""
    import errno

    import bleep_rs.cli as cli_module

    for raised in (OSError(errno.ENOSPC, "No space left on device"), RuntimeError("Can't write data (file write failed: No space left on device)")):
        def full(args, e=raised):
            raise e
        monkeypatch.setattr(cli_module, "_run_evaluate", full)
        assert cli_module.main(["evaluate", str(prediction), str(C2), "--out", str(tmp_path / "r.json")]) == 2
        assert "bleep-rs: error: the disk is full" in capsys.readouterr().err


def test_predict_section_names_arguments_of_the_wrong_kind(model_dir):
    from bleep_rs.predict import predict_section

    model, ref, sec = bleep_rs.load_model(model_dir / "model"), bleep_rs.Reference.load(model_dir / "ref.safetensors"), read(C2)
    with pytest.raises(BleepError, match="reference must be a Reference"):
        predict_section(model, None, sec)
    with pytest.raises(BleepError, match="model must be a loaded model"):
        predict_section(str(model_dir / "model"), ref, sec)
    del sec.obsm["spatial"]
    with pytest.raises(BleepError, match=r"no spot positions \(obsm\['spatial'\]\)"):
        bleep_rs.section_patches(sec, 32)


def test_counts_below_their_minimum_are_refused_before_any_work(tmp_path):
    reference = ("reference", C2, "--model", tmp_path / "m", "--out", tmp_path / "r.safetensors", "--min-spots", "-1")
    for args, message in ((("demo", "--k", "0"), "argument --k: 0 is less than 1"), (("demo", "--epochs", "0"), "argument --epochs: 0 is less than 1"),
                          (reference, "argument --min-spots: -1 is less than 1")):
        res = cli(*args, "--out", tmp_path / "d") if args[0] == "demo" else cli(*args)
        assert res.returncode == 2 and message in res.stderr, res.stderr[-500:]
    assert list(tmp_path.iterdir()) == []


def test_predict_refuses_shard_with_a_section(model_dir, tmp_path):
    refused(predict(model_dir, C2, "--shard", "2/2", "--out", tmp_path / "p.h5ad"), "--shard splits a list of --slide images")
    assert not (tmp_path / "p.h5ad").exists()


def test_the_demo_refuses_a_file_as_its_folder(tmp_path):
    (tmp_path / "d").write_text("mine")
    refused(cli("demo", "--out", tmp_path / "d"), "d is a file")
    assert (tmp_path / "d").read_text() == "mine"


# -- predict: outputs checked before any work, nothing a user wrote replaced ------------------------------


def predict(model_dir, *args):
    return cli("predict", "--model", model_dir / "model", "--reference", model_dir / "ref.safetensors", "--k", "3", *args)


def test_predict_checks_the_output_before_anything_else(model_dir, tmp_path):
    # A bogus model and reference: the output is refused before either is opened.
    existing = tmp_path / "p.h5ad"
    existing.write_text("a user's file")
    bad_names = (["--out", tmp_path / "p.csv"], ["--out", tmp_path / "p.csv", "--format", "h5ad"], ["--out", tmp_path / "p.h5ad", "--format", "zarr"])
    for args in (["--out", existing], *bad_names):
        res = cli("predict", C2, "--model", tmp_path / "no-model", "--reference", tmp_path / "no-ref", *args)
        assert res.returncode == 2 and "no-model" not in res.stderr and "no-ref" not in res.stderr, res.stderr
    refused(cli("predict", "--slide", C2 / "image.jpg", "--model", "x", "--reference", "y", "--out", existing), "p.h5ad exists", "--overwrite")
    (tmp_path / "file").write_text("")
    refused(predict(model_dir, C2, "--out", tmp_path / "file" / "p.h5ad"), "is a file, not a folder")
    assert existing.read_text() == "a user's file"


def test_predict_never_writes_over_an_input(model_dir, tmp_path):
    section = tmp_path / "C2.h5ad"
    read(C2).write_h5ad(section)
    before = section.read_bytes()
    refused(predict(model_dir, section, "--out", section, "--overwrite"), "is an input of this command")
    assert section.read_bytes() == before


def test_several_slides_with_one_file_name_are_refused_before_any_work(model_dir, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copyfile(C2 / "image.jpg", tmp_path / sub / "C2.jpg")
    out = tmp_path / "out"
    res = predict(model_dir, "--slide", tmp_path / "a" / "C2.jpg", tmp_path / "b" / "C2.jpg", "--um-per-px", "1.38", "--out", out)
    refused(res, str(tmp_path / "a" / "C2.jpg"), str(tmp_path / "b" / "C2.jpg"), "C2.h5ad")
    assert not out.exists()


def test_several_slides_never_overwrite_a_file_bleep_rs_did_not_write(model_dir, tmp_path):
    slides = tiny_slides(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "C3.h5ad").write_text("my notes")
    args = ["--slide", *slides, "--um-per-px", "1.38", "--min-tissue", "0.05", "--out", out]
    refused(predict(model_dir, *args), "not bleep-rs predictions", "C3.h5ad", "--overwrite")
    assert sorted(os.listdir(out)) == ["C3.h5ad"] and (out / "C3.h5ad").read_text() == "my notes"
    refused(predict(model_dir, *args[:-1], out / "x.h5ad"), "is a folder")


def test_prediction_outputs_are_told_apart(model_dir, prediction, tmp_path):
    import h5py

    from bleep_rs.predict import output_state

    assert output_state(tmp_path / "none.h5ad") == "absent"
    assert output_state(prediction) == "complete"
    own = tmp_path / "own.h5ad"
    shutil.copyfile(prediction, own)
    with h5py.File(own, "r+") as f:
        del f["uns/bleep/complete"]
    assert output_state(own) == "incomplete"
    (tmp_path / "junk.h5ad").write_bytes(b"half a file")
    assert output_state(tmp_path / "junk.h5ad") == "foreign"
    read(C2).write_h5ad(tmp_path / "section.h5ad")
    assert output_state(tmp_path / "section.h5ad") == "foreign"


# -- atomic writes: one helper, nothing half-written, no temporary left after a kill -------------------


KILLED_WRITER = """
import os, signal, sys
import anndata as ad, numpy as np
from bleep_rs.predict import write_h5ad

class Dying(ad.AnnData):
    def write_h5ad(self, path, **kw):
        with open(path, "wb") as f:
            f.write(b"half")
        os.kill(os.getpid(), signal.SIGKILL)

write_h5ad(Dying(np.ones((2, 2), np.float32)), sys.argv[1])
"""


def test_a_kill_during_a_save_leaves_nothing_after_the_next_run(tmp_path):
    import anndata as ad

    from bleep_rs.predict import write_h5ad

    out = tmp_path / "p.h5ad"
    res = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True, timeout=120)
    assert res.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert not out.exists() and len(leftovers) == 1 and leftovers[0].startswith(".p.h5ad.")
    write_h5ad(ad.AnnData(np.ones((2, 2), np.float32)), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.h5ad"]


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("new, half")
        raise RuntimeError("disk full")
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]
    for content in ("new", "newer"):
        with atomic_path(out) as tmp:
            tmp.write_text(content)
    assert out.read_text() == "newer" and os.listdir(tmp_path) == ["r.json"]


def test_atomic_path_replaces_a_folder(tmp_path):
    out = tmp_path / "model"
    for n in range(2):
        with atomic_path(out, suffix="") as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(str(n))
    assert (out / "f").read_text() == "1" and os.listdir(tmp_path) == ["model"]


def test_only_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = [tmp_path / f".r.safetensors.{dead}.tmp", tmp_path / f".r.safetensors.{dead}.tmp.zarr", tmp_path / f".r.safetensors.{dead}.old"]
    live = tmp_path / f".r.safetensors.{os.getppid()}.tmp"
    other = tmp_path / f".q.safetensors.{dead}.tmp"
    for p in [*stale, live, other]:
        p.write_text("")
    assert sorted(remove_stale(tmp_path / "r.safetensors")) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name])


def test_reference_save_removes_what_a_killed_save_left(tmp_path, rng):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f".ref.safetensors.{dead}.tmp").write_bytes(b"half a reference")
    emb = rng.standard_normal((10, 4)).astype(np.float32)
    bleep_rs.Reference.build(emb, np.abs(emb), ["a", "b", "c", "d"]).save(tmp_path / "ref.safetensors")
    assert os.listdir(tmp_path) == ["ref.safetensors"]


def test_check_output(tmp_path):
    (tmp_path / "in.h5ad").write_text("")
    with pytest.raises(BleepError, match=r"out=.*x.txt: the name must end in .h5ad or .zarr"):
        check_output(tmp_path / "x.txt", suffixes=(".h5ad", ".zarr"))
    with pytest.raises(BleepError, match=r"is an input of this command"):
        check_output(tmp_path / "sub" / ".." / "in.h5ad", inputs=[tmp_path / "in.h5ad"], overwrite=True)
    with pytest.raises(BleepError, match=r"in.h5ad exists: choose another out= or pass overwrite=True"):
        check_output(tmp_path / "in.h5ad")
    # The library's writers name their arguments, not the command line's flags.
    from bleep_rs._atomic import LIBRARY_OUTPUT
    from bleep_rs.predict import write_h5ad

    with pytest.raises(BleepError, match=r"in.h5ad exists: choose another path= or pass overwrite=True"):
        check_output(tmp_path / "in.h5ad", **LIBRARY_OUTPUT)
    with pytest.raises(BleepError, match=r"in.h5ad exists: choose another path= or pass overwrite=True"):
        write_h5ad(read(C2), tmp_path / "in.h5ad")
    assert check_output(tmp_path / "new" / "deeper" / "p.h5ad", suffixes=(".h5ad",)) == tmp_path / "new" / "deeper" / "p.h5ad"


def test_a_folder_is_never_replaced_by_a_file_nor_a_file_by_a_folder(tmp_path):
    (tmp_path / "model").write_text("a user's file")
    with pytest.raises(BleepError, match=r"model is a file, and a folder is to be written there"), atomic_path(tmp_path / "model", suffix="") as tmp:
        tmp.mkdir()
    (tmp_path / "p.h5ad").mkdir()
    with pytest.raises(BleepError, match=r"p.h5ad is a folder, and a file is to be written there"), atomic_path(tmp_path / "p.h5ad") as tmp:
        tmp.write_text("")
    assert sorted(os.listdir(tmp_path)) == ["model", "p.h5ad"] and (tmp_path / "model").read_text() == "a user's file"
