"""The command line end to end on ../shared/data/tiny, as a user runs it (in process, through the entry point's
``main``), and its outputs read back."""

import json
import os
import re

import numpy as np
import pytest

pytest.importorskip("torch")
import anndata as ad

import bleep_rs
from bleep_rs import BleepError

from conftest import DATA, cli, refused, tiny_slides

C2, C3 = str(DATA / "tiny" / "C2"), str(DATA / "tiny" / "C3")
#: Training flags of the models these tests train: one field of view, no flips or rotations.
CHEAP = ("--fields-of-view", "1", "--no-tta", "--no-augment")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    # A panel of 16 of the tiny sections' 64 genes: the reference and the prediction carry all 64. One field
    # of view and no test-time views: the backbone runs once per spot or tile, not 24 times (the default
    # recipe's flags are tested in test_recipe; here, what the commands do with any model).
    cli("train", C2, "--out", d / "model", "--epochs", "15", "--freeze-backbone", "--n-top-genes", "16",
        "--patch-size", "128", "--batch-size", "32", "--val-fraction", "0", *CHEAP)
    cli("reference", "--model", d / "model", C2, "--out", d / "ref.safetensors")
    cli("predict", C3, "--model", d / "model", "--reference", d / "ref.safetensors", "--out", d / "pred.h5ad", "--k", "5", "--neighbours")
    return d


def test_prediction_anndata_fields(run):
    pred = ad.read_h5ad(run / "pred.h5ad")
    section = bleep_rs.read_section(C3)
    ref = bleep_rs.Reference.load(run / "ref.safetensors")
    assert pred.shape == (section.n_obs, len(ref.genes)) and list(pred.var_names) == ref.genes
    assert list(pred.obs_names) == list(section.obs_names)
    assert np.allclose(pred.obsm["spatial"], section.obsm["spatial"])
    lib = pred.uns["bleep"]["library_id"]
    assert pred.uns["spatial"][lib]["images"]["hires"].ndim == 3 and "tissue_hires_scalef" in pred.uns["spatial"][lib]["scalefactors"]
    info = pred.uns["bleep"]
    assert info["k"] == 5 and info["method"] == "softmax" and info["package_version"] == bleep_rs.__version__
    assert pred.obsm["bleep_neighbours"].shape == (section.n_obs, 5) and (pred.obs["uncertainty"] >= 0).all()
    # The prediction is the default read-out of the stored neighbours: their reference expression weighted
    # by the softmax of their similarity / 0.1 (the NumPy oracle's weights).
    from bleep_rs._oracle import weights

    w = weights("softmax", pred.obsm["bleep_similarities"].astype(np.float64), None, None)
    assert np.allclose(pred.X, (w[..., None] * ref.expression[pred.obsm["bleep_neighbours"]]).sum(1), atol=1e-5)


def test_tta_views_on_the_command_line_are_used_and_recorded(run, tmp_path):
    """--tta-views N averages N views per spot (the model's own, 1 here, when not given), is recorded in the
    prediction, and anything but 1, 2, 4 or 8 is refused by the command line."""
    from bleep_rs.augment import TTA_VIEWS

    model = bleep_rs.load_model(run / "model")
    ref = bleep_rs.Reference.load(run / "ref.safetensors")
    section = bleep_rs.read_section(C3)
    cli("predict", C3, "--model", run / "model", "--reference", run / "ref.safetensors", "--out", tmp_path / "p2.h5ad", "--k", "5",
        "--tta-views", "2")
    pred = ad.read_h5ad(tmp_path / "p2.h5ad")
    assert list(pred.uns["bleep"]["tta_views"]) == [2] and list(ad.read_h5ad(run / "pred.h5ad").uns["bleep"]["tta_views"]) == [1]
    patches = model.config.input.section_patches(section)
    want = ref.impute(model.embed_features(model.features(patches, views=TTA_VIEWS[2])), k=5, method=model.config.method)
    assert np.allclose(pred.X, want, atol=1e-4)
    res = cli("predict", C3, "--model", run / "model", "--reference", run / "ref.safetensors", "--out", tmp_path / "p3.h5ad",
              "--tta-views", "3", ok=False)
    assert res.returncode == 2 and "--tta-views" in res.stderr and not (tmp_path / "p3.h5ad").exists()


def test_evaluate_matches_a_hand_computed_r(run):
    cli("evaluate", run / "pred.h5ad", C3, "--out", run / "report.json")
    report = json.loads((run / "report.json").read_text())
    pred = ad.read_h5ad(run / "pred.h5ad")
    from bleep_rs.expression import Panel, panel_expression

    truth = panel_expression(bleep_rs.read_section(C3), Panel(genes=list(pred.var_names)), warn=False)
    g = next(i for i, r in enumerate(report["r"]) if r is not None)
    a, b = np.asarray(pred.X)[:, g].astype(float), truth[:, g].astype(float)
    by_hand = ((a - a.mean()) * (b - b.mean())).sum() / np.sqrt(((a - a.mean()) ** 2).sum() * ((b - b.mean()) ** 2).sum())
    assert report["r"][g] == pytest.approx(by_hand, abs=1e-6)
    rows = (run / "report.csv").read_text().splitlines()
    assert rows[0].startswith("gene,pearson_r") and len(rows) == len(pred.var_names) + 1
    assert set(report) >= {"heg50", "hvg50", "all", "constant"}


def test_plot_writes_a_figure(run):
    pred = ad.read_h5ad(run / "pred.h5ad")
    genes = list(pred.var_names[:2])
    cli("plot", run / "pred.h5ad", "--truth", C3, "--genes", *genes, "--out", run / "fig.png")
    assert (run / "fig.png").stat().st_size > 10_000
    res = cli("plot", run / "pred.h5ad", "--genes", "NOT_A_GENE", "--out", run / "x.png", ok=False)
    assert res.returncode == 2 and "not in the prediction's panel" in res.stderr


def test_every_detected_gene_is_predicted_evaluated_and_drawn(run, tmp_path):
    pred = ad.read_h5ad(run / "pred.h5ad")
    panel = json.loads((run / "model" / "config.json").read_text())["panel"]["genes"]
    extra = [g for g in pred.var_names if g not in panel]
    assert len(panel) < 64 and pred.n_vars == 64 and "ERBB2" in pred.var_names, (len(panel), pred.n_vars)
    cli("evaluate", run / "pred.h5ad", C3, "--out", tmp_path / "r.json", "--markers", extra[0], "ERBB2")
    report = json.loads((tmp_path / "r.json").read_text())
    assert np.isfinite(report["markers"]) and len(report["r"]) == 64
    cli("plot", run / "pred.h5ad", "--truth", C3, "--genes", extra[0], "ERBB2", "--out", tmp_path / "erbb2.png")
    assert (tmp_path / "erbb2.png").stat().st_size > 10_000
    panel_ref = tmp_path / "panel.safetensors"
    cli("reference", "--model", run / "model", C2, "--out", panel_ref, "--genes", "panel", "--dtype", "bfloat16")
    ref = bleep_rs.Reference.load(panel_ref)
    assert ref.genes == panel and ref.expression_dtype == "bfloat16"


def test_predict_float32_precision_agrees_with_the_default(run, tmp_path):
    cli("predict", C3, "--model", run / "model", "--reference", run / "ref.safetensors", "--out", tmp_path / "f32.h5ad",
        "--k", "5", "--neighbours", "--precision", "float32")
    auto, f32 = ad.read_h5ad(run / "pred.h5ad"), ad.read_h5ad(tmp_path / "f32.h5ad")
    shared = [len(set(a) & set(b)) / 5 for a, b in zip(auto.obsm["bleep_neighbours"], f32.obsm["bleep_neighbours"])]
    assert np.mean(shared) >= 0.9
    assert cli("predict", C3, "--model", run / "model", "--reference", run / "ref.safetensors", "--out", tmp_path / "x.h5ad",
               "--precision", "bf16", ok=False).returncode == 2


def test_predict_slides_with_shards_and_reruns(run, tmp_path):
    slides = tiny_slides(tmp_path)
    out = run / "slides"
    args = ["predict", "--model", run / "model", "--reference", run / "ref.safetensors", "--slide", *slides,
            "--um-per-px", "1.38", "--min-tissue", "0.05", "--k", "5", "--out", out]
    cli(*args, "--shard", "1/2")
    assert os.listdir(out) == ["C2.h5ad"]
    cli(*args, "--shard", "2/2")
    assert sorted(os.listdir(out)) == ["C2.h5ad", "C3.h5ad"]
    tiles = ad.read_h5ad(out / "C3.h5ad")
    assert tiles.n_obs > 0 and tiles.uns["bleep"]["mode"] == "tiles" and tiles.obs_names[0].startswith("tile_")
    assert tiles.uns["spatial"]["C3"]["images"]["hires"].ndim == 3
    # A rerun skips what is complete and redoes an output of its own without the completion mark; a file
    # bleep-rs did not write is replaced only with --overwrite.
    assert "complete, skipped" in cli(*args).stdout
    import h5py

    with h5py.File(out / "C2.h5ad", "r+") as f:
        del f["uns/bleep/complete"]
    rerun = cli(*args)
    assert "C2.h5ad: complete" not in rerun.stdout and "C3.h5ad: complete, skipped" in rerun.stdout
    assert ad.read_h5ad(out / "C2.h5ad").uns["bleep"]["complete"]
    (out / "C2.h5ad").write_bytes(b"half a file")
    res = cli(*args, ok=False)
    assert res.returncode == 2 and "not bleep-rs predictions" in res.stderr and (out / "C2.h5ad").read_bytes() == b"half a file"
    cli(*args, "--overwrite")
    assert ad.read_h5ad(out / "C2.h5ad").n_obs > 0


def test_clear_errors(run, tmp_path):
    res = cli("predict", C3, "--model", run / "model", "--reference", run / "ref.safetensors", "--out", run / "pred.h5ad", ok=False)
    assert res.returncode == 2 and "exists" in res.stderr
    res = cli("predict", "--model", run / "model", "--reference", run / "ref.safetensors", "--slide", DATA / "tiny" / "C3" / "image.jpg",
              "--out", tmp_path / "s.h5ad", ok=False)
    assert res.returncode == 2 and "pixel size" in res.stderr
    # A reference built with another model (same panel, other weights) and one on other genes.
    cli("train", C2, "--out", tmp_path / "other", "--epochs", "2", "--freeze-backbone", "--n-top-genes", "64",
        "--patch-size", "128", "--seed", "7", "--val-fraction", "0", *CHEAP)
    res = cli("predict", C3, "--model", tmp_path / "other", "--reference", run / "ref.safetensors", "--out", tmp_path / "p.h5ad", ok=False)
    assert res.returncode == 2 and "another model" in res.stderr
    # A reference that does not name its model is refused; its genes are its own (not the model's panel).
    ref = bleep_rs.Reference.load(run / "ref.safetensors")
    renamed = [g + "x" for g in ref.genes]
    bleep_rs.Reference.build(ref.embeddings, ref.expression, renamed).save(tmp_path / "anon.safetensors")
    res = cli("predict", C3, "--model", run / "model", "--reference", tmp_path / "anon.safetensors", "--out", tmp_path / "p.h5ad", ok=False)
    assert res.returncode == 2 and "which model" in res.stderr
    bleep_rs.Reference.build(ref.embeddings, ref.expression, renamed, metadata=ref.metadata).save(tmp_path / "genes.safetensors")
    cli("predict", C3, "--model", run / "model", "--reference", tmp_path / "genes.safetensors", "--out", tmp_path / "p.h5ad")
    assert list(ad.read_h5ad(tmp_path / "p.h5ad").var_names) == renamed
    with pytest.raises(BleepError, match="I/N"):
        from bleep_rs.cli import shard

        shard(["a"], "3")
    with pytest.raises(BleepError, match=r"--shard 2/2 selects none of the 1 slide\(s\)"):
        shard(["a"], "2/2")
    assert shard(["b", "a", "c"], "2/2") == ["b"]


def test_library_errors_say_flags_on_the_command_line():
    """The library names its arguments; the command line rewrites them as its flags, and nothing else."""
    from bleep_rs.cli import as_flags

    assert as_flags("pass um_per_px=X (the scanner's)") == "pass --um-per-px X (the scanner's)"
    assert as_flags("a exists: choose another out= or pass overwrite=True") == "a exists: choose another --out or pass --overwrite"
    assert as_flags("give fmt= with a name; pass resume=False, backbone_weights=FILE") == "give --format with a name; pass --fresh, --backbone-weights FILE"
    assert as_flags("layer='counts' (x.layer=1, my_out=2, --out=3)") == "--layer 'counts' (x.layer=1, my_out=2, --out=3)"
    # Never inside a path: a folder may well be called sample=A1 or lr=0.001.
    assert as_flags("out=/data/sample=A1/p.txt: no; /runs/lr=0.1/m exists") == "--out /data/sample=A1/p.txt: no; /runs/lr=0.1/m exists"


def test_scanpy_draws_the_prediction_as_is(run, tmp_path):
    sc = pytest.importorskip("scanpy")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = ad.read_h5ad(run / "pred.h5ad")
    sc.pl.spatial(pred, color=list(pred.var_names[:2]), library_id=pred.uns["bleep"]["library_id"], img_key="hires", show=False)
    plt.savefig(tmp_path / "spatial.png")
    assert (tmp_path / "spatial.png").stat().st_size > 10_000


def test_squidpy_draws_the_prediction_as_is(run, tmp_path):
    sq = pytest.importorskip("squidpy")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = ad.read_h5ad(run / "pred.h5ad")
    sq.pl.spatial_scatter(pred, color=list(pred.var_names[:2]), library_id=pred.uns["bleep"]["library_id"])
    plt.savefig(tmp_path / "squidpy.png")
    assert (tmp_path / "squidpy.png").stat().st_size > 10_000


def test_hest_samples_through_the_command_line(run, tmp_path):
    pytest.importorskip("tifffile")
    from bleep_rs.readers.hest import write_hest_sample

    hest = tmp_path / "hest"
    for name, path in (("C2", C2), ("C3", C3)):
        write_hest_sample(bleep_rs.read_section(path), hest, name, patches=False)
    cli("train", hest, "--ids", "C2", "C3", "--out", tmp_path / "model", "--epochs", "1", "--freeze-backbone",
        "--n-top-genes", "64", "--patch-size", "128", "--val-fraction", "0", *CHEAP)
    cli("reference", "--model", run / "model", hest, "--ids", "C2", "--out", tmp_path / "ref.safetensors")
    ref = bleep_rs.Reference.load(tmp_path / "ref.safetensors")
    assert set(ref.sections) == {"C2"} and ref.n_spots == 25
    cli("predict", hest / "st" / "C3.h5ad", "--model", run / "model", "--reference", tmp_path / "ref.safetensors", "--out", tmp_path / "p.h5ad", "--k", "5")
    cli("predict", hest, "--ids", "C3", "--model", run / "model", "--reference", tmp_path / "ref.safetensors", "--out", tmp_path / "p2.h5ad", "--k", "5")
    a, b = ad.read_h5ad(tmp_path / "p.h5ad"), ad.read_h5ad(tmp_path / "p2.h5ad")
    assert list(a.obs_names) == list(bleep_rs.read_section(C3).obs_names) and np.allclose(a.X, b.X)
    cli("evaluate", tmp_path / "p.h5ad", hest, "--ids", "C3", "--out", tmp_path / "r.json")
    res = cli("predict", hest, "--model", run / "model", "--reference", tmp_path / "ref.safetensors", "--out", tmp_path / "p3.h5ad", ok=False)
    assert res.returncode == 2 and "2 samples: name one with --ids ID" in res.stderr
    res = cli("reference", "--model", run / "model", C2, "--ids", "C2", "--out", tmp_path / "x.safetensors", ok=False)
    assert res.returncode == 2 and "--ids names samples of a HEST folder" in res.stderr


def test_visium_hd_through_the_command_line(run, tmp_path):
    pytest.importorskip("pyarrow")
    from generated import make_hd_run

    hd = make_hd_run(tmp_path / "HD", DATA / "tiny" / "C3" / "image.jpg", 1.3793, genes=bleep_rs.read_section(C3).var_names)
    b8, b16 = (hd / "outs" / "binned_outputs" / f"square_{s:03d}um" for s in (8, 16))
    image = DATA / "tiny" / "C3" / "image.jpg"
    # Pseudo-spots of Visium's size from the HD bins: a reference the Visium-trained model can use.
    cli("reference", "--model", run / "model", b8, "--bin-um", "56", "--out", tmp_path / "ref.safetensors")
    assert bleep_rs.Reference.load(tmp_path / "ref.safetensors").spot_ids[0].startswith("HD1:s_056um_")
    cli("predict", b16, "--image", image, "--bin-um", "48", "--model", run / "model", "--reference", run / "ref.safetensors",
        "--out", tmp_path / "spots.h5ad", "--k", "5")
    spots = ad.read_h5ad(tmp_path / "spots.h5ad")
    assert list(spots.obs_names) == list(bleep_rs.read_section(b16, bin_um=48).obs_names)
    # A slide tiled on the HD run's grid at 32 um: the outputs carry Space Ranger's barcodes and the
    # positions of the run's bins pooled to that size.
    cli("predict", "--slide", image, "--um-per-px", "1.3793", "--bin-um", "32", "--hd-run", b8, "--model", run / "model",
        "--reference", run / "ref.safetensors", "--out", tmp_path / "slide.h5ad", "--k", "5")
    pred, pooled = ad.read_h5ad(tmp_path / "slide.h5ad"), bleep_rs.read_section(b8, bin_um=32)
    assert pred.uns["bleep"]["mode"] == "bins" and pred.uns["bleep"]["bin_um"] == pytest.approx(32)
    assert set(pooled.obs_names) <= set(pred.obs_names) and pred.obs_names[0].startswith("s_032um_")
    assert np.abs(pred[pooled.obs_names].obsm["spatial"] - pooled.obsm["spatial"]).max() < 1e-6


def test_predictions_as_spatialdata_drawn_by_spatialdata_plot(run, tmp_path):
    sd = pytest.importorskip("spatialdata")
    pytest.importorskip("spatialdata_plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cli("predict", C3, "--model", run / "model", "--reference", run / "ref.safetensors", "--out", tmp_path / "spots.zarr", "--k", "5")
    cli("predict", "--slide", DATA / "tiny" / "C3" / "image.jpg", "--um-per-px", "1.38", "--min-tissue", "0.05",
        "--model", run / "model", "--reference", run / "ref.safetensors", "--out", tmp_path / "tiles", "--format", "zarr", "--k", "5")
    spots, tiles = sd.read_zarr(tmp_path / "spots.zarr"), sd.read_zarr(tmp_path / "tiles")
    assert set(spots.shapes) == {"C3_spots"} and spots.shapes["C3_spots"].geometry.geom_type.iloc[0] == "Point"
    assert set(tiles.shapes) == {"image_tiles"} and tiles.shapes["image_tiles"].geometry.geom_type.iloc[0] == "Polygon"
    h5 = ad.read_h5ad(run / "pred.h5ad")
    table = spots.tables["table"]
    assert list(table.obs_names) == list(h5.obs_names) and np.allclose(table.X, h5.X)
    assert table.uns["spatialdata_attrs"]["region"] == "C3_spots"
    # evaluate and plot read a store as they read an .h5ad.
    cli("evaluate", tmp_path / "spots.zarr", C3, "--out", tmp_path / "r.json")
    cli("evaluate", run / "pred.h5ad", C3, "--out", tmp_path / "r2.json")
    assert json.loads((tmp_path / "r.json").read_text())["r"] == json.loads((tmp_path / "r2.json").read_text())["r"]
    gene = str(table.var_names[0])
    for store, shapes, name in ((spots, "C3_spots", "spots"), (tiles, "image_tiles", "tiles")):
        fig, ax = plt.subplots()
        store.pl.render_images().pl.render_shapes(shapes, color=gene).pl.show(ax=ax, coordinate_systems="global")
        fig.savefig(tmp_path / f"{name}.png")
        plt.close(fig)
        assert (tmp_path / f"{name}.png").stat().st_size > 20_000


def test_a_sharded_reference_is_written_section_by_section_and_answers_as_one_file(run, tmp_path):
    """reference --shard-spots: sections read one at a time, shards written as they fill; the folder searches and
    imputes as the single file built from the same sections, and predict takes it."""
    from bleep_rs.cli import main

    assert main(["reference", "--model", str(run / "model"), C2, C3, "--out", str(tmp_path / "atlas"), "--shard-spots", "20"]) == 0
    assert main(["reference", "--model", str(run / "model"), C2, C3, "--out", str(tmp_path / "one.safetensors")]) == 0
    atlas, one = bleep_rs.Reference.load(tmp_path / "atlas"), bleep_rs.Reference.load(tmp_path / "one.safetensors")
    assert len(atlas.shards) == 3 and atlas.n_spots == one.n_spots == 49 and atlas.genes == one.genes
    assert atlas.spot_ids == one.spot_ids and atlas.sections == one.sections and atlas.metadata == one.metadata
    q = one.embeddings[::3] + 0.01
    (ia, sa), (io, so) = atlas.search(q, k=10), one.search(q, k=10)
    np.testing.assert_array_equal(ia, io)
    np.testing.assert_array_equal(sa, so)
    np.testing.assert_allclose(atlas.impute(q, k=10), one.impute(q, k=10), rtol=1e-5, atol=1e-6)
    assert main(["predict", C3, "--model", str(run / "model"), "--reference", str(tmp_path / "atlas"), "--out", str(tmp_path / "p.h5ad"),
                 "--k", "5"]) == 0
    assert ad.read_h5ad(tmp_path / "p.h5ad").shape[1] == len(atlas.genes)


def test_um_per_px_has_one_meaning_across_commands(tmp_path):
    """--um-per-px is an image's pixel size (predict); training's patch resolution is --patch-um-per-px."""
    res = cli("train", DATA / "tiny" / "C2", "--out", tmp_path / "m", "--um-per-px", "1.0", ok=False)
    refused(res, "--patch-um-per-px", "--um-per-px is an image's pixel size")
    res = cli("train", DATA / "tiny" / "C2", "--out", tmp_path / "m", "--patch-um-per-px", "0", ok=False)
    refused(res, "--patch-um-per-px must be a positive finite number, got 0")
    assert not (tmp_path / "m").exists()


def test_the_predict_command_is_built_from_predict_config():
    """One PredictConfig: its fields are predict's flags (defaults, ranges, help), as TrainConfig's are train's."""
    import argparse
    import dataclasses

    from bleep_rs.cli import _add_config_options, _config_from_args
    from bleep_rs.predict import PredictConfig

    p = argparse.ArgumentParser()
    _add_config_options(p, PredictConfig)
    assert _config_from_args(PredictConfig, p.parse_args([])) == PredictConfig()
    cfg = _config_from_args(PredictConfig, p.parse_args(["--k", "7", "--method", "mean", "--tta-views", "2", "--neighbours", "--um-per-px", "0.25",
                                                         "--min-tissue", "0", "--queue-depth", "3"]))
    assert cfg == PredictConfig(k=7, method="mean", tta_views=2, neighbours=True, um_per_px=0.25, min_tissue=0.0, queue_depth=3)
    assert {f.name for f in dataclasses.fields(PredictConfig)} <= set(vars(p.parse_args([])))


BAD_PREDICT = [
    ("k", 0, "--k", "must be a whole number >= 1, got 0"),
    ("min_tissue", 1.5, "--min-tissue", "must be a finite number >= 0 and <= 1, got 1.5"),
    ("tta_views", 3, "--tta-views", "must be one of 1, 2, 4, 8, got 3"),
    ("queue_depth", 0, "--queue-depth", "must be a whole number >= 1, got 0"),
    ("batch_size", -4, "--batch-size", "must be a whole number >= 1, got -4"),
    ("bin_um", -8.0, "--bin-um", "must be a positive finite number, got -8"),
    ("um_per_px", float("nan"), "--um-per-px", "must be a positive finite number, got nan"),
]


@pytest.mark.parametrize("name,value,flag,message", BAD_PREDICT, ids=[f"{b[0]}={b[1]}" for b in BAD_PREDICT])
def test_every_predict_option_has_a_range_checked_where_the_config_is_made(run, tmp_path, name, value, flag, message):
    """The library names the option (predict_section's keywords too), the command line the flag, before any work."""
    from bleep_rs.predict import PredictConfig, predict_slide

    with pytest.raises(BleepError, match=re.escape(f"{name} {message}")):
        PredictConfig(**{name: value})
    with pytest.raises(BleepError, match=re.escape(f"{name} {message}")):
        next(iter([predict_slide(None, None, "slide.svs", **{name: value})]))
    out = tmp_path / "p.h5ad"
    res = cli("predict", "--slide", DATA / "tiny" / "C3" / "image.jpg", "--model", run / "model", "--reference", run / "ref.safetensors",
              "--out", out, flag, str(value), ok=False)
    if name == "tta_views":  # a flag with choices: argparse refuses it first, in its own words
        assert res.returncode == 2 and "argument --tta-views: invalid choice: 3" in res.stderr
    else:
        refused(res, f"{flag} {message}")
    assert not out.exists()


def test_options_a_prediction_does_not_use_are_refused_not_ignored(run, tmp_path):
    """A section is read as it is (a slide's pixel size or tissue threshold would be ignored); precomputed features
    take no image options; an unknown keyword is named."""
    from bleep_rs.predict import predict_section

    model, ref = bleep_rs.load_model(run / "model"), bleep_rs.Reference.load(run / "ref.safetensors")
    section = bleep_rs.read_section(C3)
    with pytest.raises(BleepError, match=r"um_per_px=0.5: options of whole slides"):
        predict_section(model, ref, section, um_per_px=0.5)
    with pytest.raises(BleepError, match=r"min_tissue=0.2: options of whole slides"):
        predict_section(model, ref, section, bleep_rs.PredictConfig(min_tissue=0.2))
    with pytest.raises(BleepError, match=r"unknown options \['kk'\]"):
        predict_section(model, ref, section, kk=5)
    with pytest.raises(BleepError, match="config must be a PredictConfig, not dict"):
        predict_section(model, ref, section, {"k": 5})
    for flag, value in [("--um-per-px", "0.5"), ("--min-tissue", "0.2")]:
        refused(cli("predict", C3, "--model", run / "model", "--reference", run / "ref.safetensors", "--out", tmp_path / "p.h5ad",
                    flag, value, ok=False), f"{flag} {value}: options of whole slides")
    with pytest.raises(BleepError, match=r"precision=float32, batch_size=8: options of images"):
        bleep_rs.predict_features(model, ref, tmp_path / "any.h5", precision="float32", batch_size=8)
    assert not (tmp_path / "p.h5ad").exists()
