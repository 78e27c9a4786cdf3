"""SpatialData stores: sections written and read back, stores from spatialdata-io read with their
transformations applied, and spatialdata-plot drawing what bleep-rs writes."""

import warnings

import numpy as np
import pytest

from bleep_rs import BleepError, read_section, section_patches

from conftest import DATA

sd = pytest.importorskip("spatialdata")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")


def test_a_section_round_trips_through_a_store(tmp_path):
    from bleep_rs.sdata import write_zarr

    sec = read_section(DATA / "tiny" / "C2")
    write_zarr(sec, tmp_path / "c2.zarr")
    store = sd.read_zarr(tmp_path / "c2.zarr")
    assert set(store.images) == {"C2_image"} and set(store.shapes) == {"C2_spots"}
    assert store.images["C2_image"].shape == (3, 749, 748)
    back = read_section(tmp_path / "c2.zarr")
    info = back.uns["bleep"]
    assert info["library_id"] == "C2" and info["platform"] == "legacy-st" and info["um_per_px"] == pytest.approx(1.3873)
    assert list(back.obs_names) == list(sec.obs_names) and np.array_equal(back.X.toarray(), sec.X.toarray())
    assert np.allclose(back.obsm["spatial"], sec.obsm["spatial"])
    assert info["shape_diameter_px"] == pytest.approx(100 / 1.3873)
    # Patches from the zarr image match the built-in reader's: copied at native resolution, resampled alike.
    assert np.array_equal(section_patches(back, 48), section_patches(sec, 48))
    for um in (0.9, 2.0, 3.1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            diff = np.abs(section_patches(back, 40, um).astype(int) - section_patches(sec, 40, um))
        assert diff.max() <= 1
    # The pixel size also comes from the image's transformation to 'microns' alone.
    store.tables["table"].uns.pop("bleep")
    store.write(tmp_path / "bare.zarr")
    bare = read_section(tmp_path / "bare.zarr", platform="legacy-st")
    assert bare.uns["bleep"]["um_per_px"] == pytest.approx(1.3873)
    assert "the transformation of 'C2_image' to 'microns'" in bare.uns["bleep"]["um_per_px_source"]


def test_a_store_spatialdata_io_wrote_has_its_transformations_applied(tmp_path):
    sdio = pytest.importorskip("spatialdata_io")
    sdio.visium(DATA / "visium_v1", dataset_id="v1").write(tmp_path / "v1.zarr")
    folder = read_section(DATA / "visium_v1")
    entry = folder.uns["spatial"]["custom"]
    # The spots live in full-resolution pixels, the images are scaled into them: placed on the lowres
    # image, every spot is at its full-resolution position times the lowres scale factor.
    low = read_section(tmp_path / "v1.zarr", image="v1_lowres_image")
    assert low.uns["bleep"]["platform"] == "visium" and list(low.obs_names) == list(folder.obs_names)
    assert np.allclose(low.obsm["spatial"], folder.obsm["spatial"] * entry["scalefactors"]["tissue_lowres_scalef"], atol=1e-6)
    assert low.uns["bleep"]["um_per_px"] == pytest.approx(folder.uns["bleep"]["um_per_px"] / entry["scalefactors"]["tissue_lowres_scalef"], rel=0.02)
    lib = low.uns["bleep"]["library_id"]
    xy = np.round(low.obsm["spatial"]).astype(int)
    assert low.uns["spatial"][lib]["images"]["hires"][xy[:, 1], xy[:, 0]].mean() < 200  # on tissue
    # By default the largest image sharing the shapes' coordinate system.
    assert read_section(tmp_path / "v1.zarr").uns["bleep"]["spatialdata_image"] == "v1_hires_image"


def test_bad_stores(tmp_path):
    from bleep_rs.sdata import write_zarr

    sec = read_section(DATA / "tiny" / "C2")
    write_zarr(sec, tmp_path / "c2.zarr")
    with pytest.raises(BleepError, match="c2.zarr exists: choose another path= or pass overwrite=True"):
        write_zarr(sec, tmp_path / "c2.zarr")
    write_zarr(sec, tmp_path / "c2.zarr", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c2.zarr"]  # nothing half-written left beside
    with pytest.raises(BleepError, match=r"no image 'he' \(the store has \['C2_image'\]\)"):
        read_section(tmp_path / "c2.zarr", image="he")
    with pytest.raises(BleepError, match="no table 'counts'"):
        read_section(tmp_path / "c2.zarr", table="counts")
    store = sd.read_zarr(tmp_path / "c2.zarr")
    shapes = store.shapes["C2_spots"]
    store.shapes["C2_spots"] = shapes.iloc[1:]  # a table row whose spot is gone
    store.write(tmp_path / "broken.zarr")
    with pytest.raises(BleepError, match="1 rows of table 'table' name no shape of 'C2_spots'"):
        read_section(tmp_path / "broken.zarr")


def test_spatialdata_plot_draws_a_written_section(tmp_path):
    pytest.importorskip("spatialdata_plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bleep_rs.sdata import write_zarr

    write_zarr(read_section(DATA / "tiny" / "C3"), tmp_path / "c3.zarr")
    store = sd.read_zarr(tmp_path / "c3.zarr")
    gene = store.tables["table"].var_names[0]
    fig, ax = plt.subplots()
    store.pl.render_images("C3_image").pl.render_shapes("C3_spots", color=gene).pl.show(ax=ax, coordinate_systems="global")
    fig.savefig(tmp_path / "c3.png")
    assert (tmp_path / "c3.png").stat().st_size > 20_000
