"""Visium HD on generated Space Ranger 3.x binned outputs over a real H&E: bins as spots, pooling into
pseudo-spots, and a slide's bin grid aligned with a run's."""

import json
import shutil
import warnings

import numpy as np
import pytest

from bleep_rs import BleepError, Slide, read_section
from bleep_rs.predict import slide_grid

from conftest import DATA
from generated import make_hd_run

pytest.importorskip("pyarrow")
IMAGE = DATA / "tiny" / "C2" / "image.jpg"
UM = 1.3873


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_hd_run(tmp_path_factory.mktemp("hd") / "SAMPLE", IMAGE, UM)


def bins(run, size):
    return run / "outs" / "binned_outputs" / f"square_{size:03d}um"


def test_bins_are_spots(run):
    a = read_section(bins(run, 8), image=IMAGE)
    info = a.uns["bleep"]
    assert info["platform"] == "visium-hd" and info["bin_um"] == 8.0 and info["pitch_um"] == 8.0
    assert info["um_per_px"] == UM and info["um_per_px_source"] == "scalefactors_json.json (microns_per_pixel)"
    assert info["library_id"] == "HD1" and a.obs_names[0].startswith("s_008um_")
    entry = a.uns["spatial"]["HD1"]
    assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(8 / UM)
    for key in ("hires", "lowres"):  # every bin times its image's scale factor lands in that image
        xy = a.obsm["spatial"] * entry["scalefactors"][f"tissue_{key}_scalef"]
        h, w = entry["images"][key].shape[:2]
        assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
    import pandas as pd

    pos = pd.read_parquet(bins(run, 8) / "spatial" / "tissue_positions.parquet").set_index("barcode")
    assert np.array_equal(a.obsm["spatial"], pos.loc[a.obs_names, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
    assert (pos.loc[a.obs_names, "in_tissue"] == 1).all()
    # The run's folder and its outs/ read as its 8 um bins (spatialdata-io's default too).
    for path in (run, run / "outs", run / "outs" / "binned_outputs"):
        assert read_section(path).uns["bleep"]["layout"] == "visium-hd (square_008um)"


def test_pooling_8um_bins_to_16um_gives_space_rangers_16um_bins(run):
    pooled = read_section(bins(run, 8), image=IMAGE, bin_um=16)
    ref = read_section(bins(run, 16), image=IMAGE)
    assert pooled.uns["bleep"]["bin_um"] == 16.0 and pooled.uns["bleep"]["bins_per_spot"] == 4
    common = pooled.obs_names.intersection(ref.obs_names)
    assert len(common) > 0.95 * pooled.n_obs  # the rest: blocks under half tissue are dropped by pooling
    a, b = pooled[common], ref[common]
    assert np.array_equal(a.X.toarray(), b.X.toarray())
    assert np.abs(a.obsm["spatial"] - b.obsm["spatial"]).max() < 1e-6
    assert a.uns["spatial"]["HD1"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(16 / UM)


def test_pooling_to_a_visium_size(run):
    hd = read_section(bins(run, 8), image=IMAGE)
    with pytest.warns(UserWarning, match=r"55 um is not a multiple of the 8 um bins: pooling 7 x 7 bins \(56 um\)"):
        spots = read_section(bins(run, 8), image=IMAGE, bin_um=55)
    info = spots.uns["bleep"]
    assert info["bin_um"] == 56.0 and info["pitch_um"] == 56.0 and spots.obs_names[0].startswith("s_056um_")
    # Each pseudo-spot holds the sum of the bins of its block, and sits at the block's centre.
    rc = hd.obs[["array_row", "array_col"]].to_numpy() // 7
    blocks, counts = np.unique(rc, axis=0, return_counts=True)
    assert spots.n_obs == (counts >= 0.5 * 49).sum()  # blocks under half tissue are dropped
    for name in spots.obs_names[:30]:
        r, c = spots.obs.loc[name, ["array_row", "array_col"]]
        assert name == f"s_056um_{r:05d}_{c:05d}-1"
        members = (rc[:, 0] == r) & (rc[:, 1] == c)
        assert np.array_equal(spots[name].X.toarray().ravel(), np.asarray(hd.X[members].sum(0)).ravel())
        if members.sum() == 49:
            assert np.allclose(spots[name].obsm["spatial"][0], hd.obsm["spatial"][members].mean(0))
    # Every pseudo-spot is on the tissue: their patches can be cut.
    assert np.isfinite(spots.obsm["spatial"]).all()


def test_hd_grid_for_slide_prediction(run):
    slide = Slide(IMAGE, um_per_px=UM)
    mask = slide.tissue_mask()
    hd = read_section(bins(run, 8))
    ref16 = read_section(bins(run, 16))
    grid = slide_grid(slide, 64, UM, min_tissue=0.5, mask=mask, bin_um=16, hd_run=hd)
    assert grid.kind == "bins" and grid.side_px == pytest.approx(16 / UM)
    index = {b: i for i, b in enumerate(ref16.obs_names)}
    shared = [i for i, b in enumerate(grid.ids) if b in index]
    assert len(shared) == len(ref16.obs_names)  # every 16 um bin of the run is predicted, under its own barcode
    assert np.abs(grid.centres[shared] - ref16.obsm["spatial"][[index[grid.ids[i]] for i in shared]]).max() < 1e-6
    own = slide_grid(slide, 64, UM, min_tissue=0.5, mask=mask, hd_run=hd)  # default: the run's own bins
    assert own.ids == list(hd.obs_names) and np.allclose(own.centres, hd.obsm["spatial"])
    # Without a run: an axis-aligned grid of 16 um bins over the tissue.
    free = slide_grid(slide, 64, UM, min_tissue=0.5, mask=mask, bin_um=16)
    step = 16 / UM
    assert free.ids[0].startswith("bin_") and np.allclose(free.centres, (free.array_rc[:, ::-1] + 0.5) * step)
    assert free.ids == [f"bin_{r}_{c}" for r, c in free.array_rc]
    # A run made on another image is refused.
    small = Slide(DATA / "visium_v1" / "spatial" / "tissue_lowres_image.png", um_per_px=UM)
    with pytest.raises(BleepError, match="bins of the HD run lie outside this 600 x 600 px image"):
        slide_grid(small, 64, UM, min_tissue=0.5, mask=small.tissue_mask(), hd_run=read_section(bins(run, 8)))


def test_bad_hd_input(run, tmp_path):
    with pytest.raises(BleepError, match="bin_um= pools Visium HD bins; this section is legacy-st"):
        read_section(DATA / "tiny" / "C2", bin_um=55)
    with pytest.raises(BleepError, match="4 um is smaller than the 8 um bins"):
        read_section(bins(run, 8), bin_um=4)
    bad = tmp_path / "square_008um"
    shutil.copytree(bins(run, 8), bad)
    sf = json.loads((bad / "spatial" / "scalefactors_json.json").read_text())
    sf["microns_per_pixel"] = 0.5  # stale metadata: the bin side and the grid say 1.387
    (bad / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    with pytest.warns(UserWarning, match=r"microns_per_pixel\) gives 0.5 um/px but .*spot_diameter_fullres, the bin side\) gives 1.387"):
        read_section(bad)
    import pandas as pd

    pos = pd.read_parquet(bad / "spatial" / "tissue_positions.parquet")
    pos.drop(index=pos.index[pos["in_tissue"] == 1][0]).to_parquet(bad / "spatial" / "tissue_positions.parquet", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BleepError, match="barcodes of the matrix have no row in tissue_positions.parquet"):
            read_section(bad)
