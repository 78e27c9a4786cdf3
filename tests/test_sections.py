"""Section readers on every set in ../shared/data and on generated Space Ranger 2.x / parquet layouts."""

import warnings

import numpy as np
import pandas as pd
import pytest

import bleep_rs
from bleep_rs import BleepError, read_section, section_patches

from conftest import DATA, writable_copy


@pytest.mark.parametrize(
    "section, spots, um",
    [("tiny/C2", 25, 1.3873), ("tiny/C3", 24, None), ("her2st/C4", 184, None), ("mob/MOB2", 407, None)],
)
def test_legacy_st(section, spots, um):
    a = read_section(DATA / section)
    assert a.n_obs == spots and a.X.dtype == np.float32 and a.X.format == "csr"
    assert np.array_equal(a.X.toarray(), np.round(a.X.toarray()))  # raw counts
    info = a.uns["bleep"]
    assert info["um_per_px_source"] == "meta.json (um_per_px)"
    if um is not None:
        assert info["um_per_px"] == pytest.approx(um)
    # The spot-pitch estimate agrees with the fitted value (else the reader would have warned).
    lib = a.uns["spatial"][info["library_id"]]
    assert lib["images"]["hires"].ndim == 3 and 0 < lib["scalefactors"]["tissue_hires_scalef"] <= 1
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(100 / info["um_per_px"])
    assert a.obsm["spatial"].shape == (spots, 2)


def test_legacy_st_patches_are_centred(tiny_image):
    a = read_section(DATA / "tiny" / "C2")
    p = section_patches(a, 32)
    x, y = np.round(a.obsm["spatial"][0] - 16).astype(int)
    assert np.array_equal(p[0], tiny_image[y : y + 32, x : x + 32])


def visium_copy(tmp_path, form):
    """The Space Ranger 1.x folder rewritten with 2.x positions (header) or parquet."""
    out = writable_copy(DATA / "visium_v1", tmp_path / "outs")
    sp = out / "spatial"
    names = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    df = pd.read_csv(sp / "tissue_positions_list.csv", header=None, names=names)
    (sp / "tissue_positions_list.csv").unlink()
    if form == "csv":
        df.to_csv(sp / "tissue_positions.csv", index=False)
    else:
        df.to_parquet(sp / "tissue_positions.parquet", index=False)
    return out


@pytest.mark.parametrize("form", ["1.x", "csv", "parquet"])
def test_space_ranger_layouts(tmp_path, form):
    path = DATA / "visium_v1" if form == "1.x" else visium_copy(tmp_path, form)
    a = read_section(path)
    assert a.shape == (100, 100)
    info = a.uns["bleep"]
    # 65 um over spot_diameter_fullres, and the 100 um pitch agrees: no warning needed.
    assert info["um_per_px"] == pytest.approx(65 / 89.42751063343188)
    assert "scalefactors_json.json" in info["um_per_px_source"]
    lib = a.uns["spatial"][info["library_id"]]
    assert lib["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(0.045004502)
    assert lib["images"]["hires"].shape[2] == 3  # the lowres PNG: the hires one is blank
    assert {"array_row", "array_col", "in_tissue"} <= set(a.obs)


def test_space_ranger_thumbnail_as_image_is_refused():
    with pytest.raises(BleepError, match="thumbnail, not the full-resolution"):
        read_section(DATA / "visium_v1", image=DATA / "visium_v1" / "spatial" / "tissue_lowres_image.png")


def test_h5ad_round_trip_and_pixel_size_rules(tmp_path):
    a = read_section(DATA / "tiny" / "C3")
    del a.uns["spatial"]  # images do not matter here
    a.write_h5ad(tmp_path / "c3.h5ad")
    b = read_section(tmp_path / "c3.h5ad", platform="legacy-st")
    assert b.uns["bleep"]["um_per_px"] == pytest.approx(a.uns["bleep"]["um_per_px"])
    assert np.array_equal(b.X.toarray(), a.X.toarray()) and list(b.var_names) == list(a.var_names)
    # An explicit value wins; one 30 % off what the files say is warned about.
    with pytest.warns(UserWarning, match="was given"):
        c = read_section(tmp_path / "c3.h5ad", um_per_px=1.8, platform="legacy-st")
    assert c.uns["bleep"]["um_per_px"] == 1.8 and c.uns["bleep"]["um_per_px_source"] == "given"
    # No metadata, no array coordinates, an image without a pixel size: nothing to go on.
    bare = a.copy()
    bare.uns = {}
    bare.obs = bare.obs.drop(columns=["array_row", "array_col"])
    bare.write_h5ad(tmp_path / "bare.h5ad")
    with pytest.raises(BleepError, match="cannot tell the platform.*pass platform="):
        read_section(tmp_path / "bare.h5ad", image=DATA / "tiny" / "C3" / "image.jpg")
    with pytest.raises(BleepError, match="no pixel size"):
        read_section(tmp_path / "bare.h5ad", image=DATA / "tiny" / "C3" / "image.jpg", platform="legacy-st")


def test_metadata_that_disagrees_with_the_spot_pitch_is_warned_about(tmp_path):
    sec = writable_copy(DATA / "tiny" / "C2", tmp_path / "C2")
    meta = (sec / "meta.json").read_text().replace('"um_per_px": 1.3873', '"um_per_px": 0.69')
    (sec / "meta.json").write_text(meta)
    with pytest.warns(UserWarning, match="spot pitch"):
        read_section(sec)


def test_spots_outside_the_image_are_an_error(tmp_path):
    sec = writable_copy(DATA / "tiny" / "C2", tmp_path / "C2")
    spots = pd.read_csv(sec / "spots.tsv", sep="\t")
    spots.loc[0, "pixel_x"] = 5000.0
    spots.to_csv(sec / "spots.tsv", sep="\t", index=False)
    with pytest.raises(BleepError, match="outside the 748 x 749 px image"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_section(sec)


def test_unknown_layouts(tmp_path):
    with pytest.raises(BleepError, match="not a section"):
        read_section(tmp_path)
    with pytest.raises(BleepError, match="no such"):
        read_section(tmp_path / "nothing")
    (tmp_path / "bad.h5ad").write_bytes(b"not hdf5")
    with pytest.raises(BleepError, match="not a readable .h5ad"):
        read_section(tmp_path / "bad.h5ad")


def test_import_stays_light():
    import subprocess
    import sys

    code = "import sys, bleep_rs; print(any(m.split('.')[0] in ('anndata', 'pandas', 'torch', 'scipy') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert bleep_rs.read_section is read_section


# -- scverse conventions, exactly --------------------------------------------------------------------


def _quiet_scanpy():
    sc = pytest.importorskip("scanpy")
    warnings.filterwarnings("ignore", category=FutureWarning)
    return sc


def test_space_ranger_matches_scanpy_read_visium():
    sc = _quiet_scanpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sc.read_visium(DATA / "visium_v1")
    a = read_section(DATA / "visium_v1")
    lib = a.uns["bleep"]["library_id"]
    assert list(ref.uns["spatial"]) == [lib] == ["custom"]  # the h5's library_ids
    assert list(a.obs_names) == list(ref.obs_names) and list(a.var_names) == list(ref.var_names)
    assert np.array_equal(a.obsm["spatial"], ref.obsm["spatial"])
    assert np.array_equal(a.X.toarray(), ref.X.toarray())
    for col in ("in_tissue", "array_row", "array_col"):
        assert np.array_equal(a.obs[col].to_numpy(), ref.obs[col].to_numpy())
    mine, theirs = a.uns["spatial"][lib], ref.uns["spatial"][lib]
    assert mine["scalefactors"] == pytest.approx(theirs["scalefactors"])
    assert set(mine["images"]) == set(theirs["images"]) == {"hires", "lowres"}
    for key in ("hires", "lowres"):
        ours, scanpys = mine["images"][key], theirs["images"][key]
        assert ours.shape[:2] == scanpys.shape[:2] and ours.dtype == np.uint8
        assert np.abs(ours / 255.0 - scanpys[..., :3]).max() <= 1 / 255 + 1e-6
    assert mine["metadata"]["software_version"] == theirs["metadata"]["software_version"]


def _inside_every_image(a):
    """Every spot times each image's own scale factor lands inside that image."""
    lib = a.uns["bleep"]["library_id"]
    entry = a.uns["spatial"][lib]
    assert entry["images"], "no image"
    for key, img in entry["images"].items():
        xy = a.obsm["spatial"] * entry["scalefactors"][f"tissue_{key}_scalef"]
        h, w = img.shape[:2]
        assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all(), key


@pytest.mark.parametrize("section", ["visium_v1", "tiny/C2", "mob/MOB1", "her2st/B4"])
def test_every_spot_times_its_scale_factor_lands_in_its_image(section):
    a = read_section(DATA / section)
    _inside_every_image(a)
    # The lowres PNG of the Space Ranger folder is tissue, not blank: the spots land on stained pixels.
    if section == "visium_v1":
        entry = a.uns["spatial"]["custom"]
        xy = np.round(a.obsm["spatial"] * entry["scalefactors"]["tissue_lowres_scalef"]).astype(int)
        under = entry["images"]["lowres"][xy[:, 1], xy[:, 0]].astype(float)
        assert under.mean() < 200  # white glass is 255


def test_a_scale_factor_that_does_not_fit_its_image_is_an_error(tmp_path):
    import json

    out = writable_copy(DATA / "visium_v1", tmp_path / "S1")
    sf = json.loads((out / "spatial" / "scalefactors_json.json").read_text())
    sf["tissue_lowres_scalef"] = sf["tissue_hires_scalef"]  # the bug of old: a hires factor on the lowres image
    (out / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    with pytest.raises(BleepError, match="lowres image.*outside it"):
        read_section(out)


def test_library_id_is_never_outs(tmp_path):
    import h5py

    outs = writable_copy(DATA / "visium_v1", tmp_path / "SAMPLE7" / "outs")
    with h5py.File(outs / "filtered_feature_bc_matrix.h5", "a") as f:
        del f.attrs["library_ids"]
    for path in (outs, outs.parent):
        a = read_section(path)
        assert a.uns["bleep"]["library_id"] == "SAMPLE7" and list(a.uns["spatial"]) == ["SAMPLE7"]


def _log_normalised(counts):
    import scipy.sparse as sp

    x = sp.csr_matrix(counts, dtype=np.float32)
    x = sp.diags(1e4 / np.maximum(np.asarray(x.sum(1)).ravel(), 1)) @ x
    x.data = np.log1p(x.data)
    return sp.csr_matrix(x, dtype=np.float32)


def test_h5ad_layers_raw_and_the_counts_check(tmp_path):
    import anndata as ad

    sec = read_section(DATA / "tiny" / "C3")
    counts = sec.X.copy()
    # The scanpy way: X log-normalised, the counts in a layer, .raw on its own (fewer) genes.
    a = sec.copy()
    a.layers["counts"] = counts
    a.X = _log_normalised(counts)
    raw = ad.AnnData(X=counts[:, ::2], obs=a.obs[[]], var=pd.DataFrame(index=a.var_names[::2]))
    a.raw = raw
    a.write_h5ad(tmp_path / "a.h5ad")
    b = read_section(tmp_path / "a.h5ad")  # default: the counts layer
    assert np.array_equal(b.X.toarray(), counts.toarray()) and list(b.var_names) == list(sec.var_names)
    r = read_section(tmp_path / "a.h5ad", layer="raw")  # .raw with its own gene names
    assert list(r.var_names) == list(sec.var_names[::2]) and np.array_equal(r.X.toarray(), counts[:, ::2].toarray())
    with pytest.raises(BleepError, match=r"X is not raw counts: it holds non-integer values.*'counts' and 'raw' hold counts: pass layer='counts'"):
        read_section(tmp_path / "a.h5ad", layer="X")
    with pytest.raises(BleepError, match="no layer 'spliced'"):
        read_section(tmp_path / "a.h5ad", layer="spliced")
    # Nothing holds counts: the error says how to provide them.
    del a.layers["counts"]
    a.raw = None
    a.write_h5ad(tmp_path / "log.h5ad")
    with pytest.raises(BleepError, match=r"none of X, .raw and the layers holds counts.*adata.layers\['counts'\]"):
        read_section(tmp_path / "log.h5ad")
    # Negative values (scaled data) are not counts either; predicting needs no counts.
    a.X = a.X.toarray() - 1
    a.write_h5ad(tmp_path / "neg.h5ad")
    with pytest.raises(BleepError, match="negative values"):
        read_section(tmp_path / "neg.h5ad")
    assert read_section(tmp_path / "neg.h5ad", check_counts=False).n_obs == sec.n_obs


def test_h5ad_platform_is_read_from_the_file_never_assumed(tmp_path):
    sec = read_section(DATA / "her2st" / "C3")
    a = sec.copy()
    del a.uns["bleep"]  # what another tool would write: no statement of platform or pixel size
    a.write_h5ad(tmp_path / "st.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pitch agrees with the image's scale: no warning
        b = read_section(tmp_path / "st.h5ad", image=sec.uns["bleep"]["image_path"])
    info = b.uns["bleep"]
    assert info["platform"] == "legacy-st" and "square grid" in info["platform_source"]
    # The 200 um pitch, not Visium's 100 um: the pixel size of meta.json within 2 %, the 100 um spot.
    assert info["um_per_px"] == pytest.approx(sec.uns["bleep"]["um_per_px"], rel=0.02)
    assert "spot pitch (200 um" in info["um_per_px_source"]
    assert b.uns["spatial"]["C3"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(100 / info["um_per_px"])
    # A file that says Visium while its spots are on a square grid: an error, not a 2x wrong pixel size.
    a.uns["spatial"]["C3"]["scalefactors"]["fiducial_diameter_fullres"] = 100.0
    a.write_h5ad(tmp_path / "claims_visium.h5ad")
    with pytest.raises(BleepError, match="says visium, but the array coordinates are on a square grid: pass platform="):
        read_section(tmp_path / "claims_visium.h5ad")
    assert read_section(tmp_path / "claims_visium.h5ad", platform="legacy-st").uns["bleep"]["platform"] == "legacy-st"
    # Visium's hexagonal packing is told apart the same way.
    v = read_section(DATA / "visium_v1")
    del v.uns["bleep"]
    del v.uns["spatial"]
    v.write_h5ad(tmp_path / "v.h5ad")
    with pytest.warns(UserWarning, match="was given"):  # no statement: pitch estimate only, then the given value wins
        w = read_section(tmp_path / "v.h5ad", um_per_px=0.5)
    assert w.uns["bleep"]["platform"] == "visium" and "hexagonal" in w.uns["bleep"]["platform_source"]
    assert read_section(tmp_path / "v.h5ad").uns["bleep"]["um_per_px"] == pytest.approx(0.727, rel=0.05)


def test_duplicates_and_missing_positions_are_errors(tmp_path):
    sec = read_section(DATA / "tiny" / "C2")
    dup_spots = sec.copy()
    dup_spots.obs_names = [sec.obs_names[0]] * 2 + list(sec.obs_names[2:])
    dup_genes = sec.copy()
    dup_genes.var_names = [sec.var_names[1]] + list(sec.var_names[1:])
    nan = sec.copy()
    nan.obsm["spatial"][3] = np.nan
    cases = [(dup_spots, "duplicated spot ids"), (dup_genes, r"duplicated gene names.*var_names_make_unique"), (nan, r"1 of 25 spots have no position.*NaN")]
    for i, (bad, message) in enumerate(cases):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anndata's own notes about non-unique names
            bad.write_h5ad(tmp_path / f"bad{i}.h5ad")
            with pytest.raises(BleepError, match=message) as err:
                read_section(tmp_path / f"bad{i}.h5ad")
        assert f"bad{i}.h5ad" in str(err.value)


def test_a_section_squidpy_wrote_reads_as_the_folder(tmp_path):
    sq = pytest.importorskip("squidpy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = sq.read.visium(DATA / "visium_v1")
        a.write_h5ad(tmp_path / "sq.h5ad")
    b = read_section(tmp_path / "sq.h5ad")
    direct = read_section(DATA / "visium_v1")
    assert b.uns["bleep"]["platform"] == "visium" and "Space Ranger" in b.uns["bleep"]["platform_source"]
    assert b.uns["bleep"]["library_id"] == "custom"
    assert b.uns["bleep"]["um_per_px"] == pytest.approx(direct.uns["bleep"]["um_per_px"], rel=0.02)
    assert np.array_equal(b.obsm["spatial"], direct.obsm["spatial"]) and np.array_equal(b.X.toarray(), direct.X.toarray())
    _inside_every_image(b)
