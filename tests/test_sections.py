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
    with pytest.raises(BleepError, match="no pixel size"):
        read_section(tmp_path / "bare.h5ad", image=DATA / "tiny" / "C3" / "image.jpg")


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
    with pytest.raises(BleepError, match="outside the 748 x 749 px image"):
        with warnings.catch_warnings():
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
