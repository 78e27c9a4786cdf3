"""HEST-1k samples: a small collection written by the package in HEST's layout (pyramidal LZW TIFF, HEST's
h5ad fields, the metadata JSON, the patch file) from the shared sections, then read back."""

import json
import warnings

import h5py
import numpy as np
import pytest

from bleep_rs import BleepError, Slide, read_section, section_patches
from bleep_rs.readers.hest import write_hest_sample
from bleep_rs.sections import expand_sections

from conftest import DATA

pytest.importorskip("tifffile")


@pytest.fixture(scope="module")
def hest(tmp_path_factory):
    """ROOT with C2 and C3 (legacy ST, tiny) and VIS (the Space Ranger section on its lowres PNG)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the target 0.5 um/px")  # HEST's patches are finer than these images
        root = tmp_path_factory.mktemp("hest")
        for name in ("C2", "C3"):
            write_hest_sample(read_section(DATA / "tiny" / name), root, name)
        v = read_section(DATA / "visium_v1")
        entry = v.uns["spatial"]["custom"]
        work = tmp_path_factory.mktemp("vis")
        Image.fromarray(entry["images"]["lowres"]).save(work / "he.png")
        v.obsm["spatial"] = v.obsm["spatial"] * entry["scalefactors"]["tissue_lowres_scalef"]
        del v.uns["spatial"], v.uns["bleep"]
        v.write_h5ad(work / "vis.h5ad")
        write_hest_sample(read_section(work / "vis.h5ad", image=work / "he.png", platform="visium"), root, "VIS")
    return root


def test_the_written_sample_has_hests_layout(hest):
    meta = json.loads((hest / "metadata" / "C2.json").read_text())
    assert meta["st_technology"] == "Spatial Transcriptomics" and meta["inter_spot_dist"] == 200.0
    assert meta["pixel_size_um_estimated"] == pytest.approx(1.3873) and meta["pixel_size_um_embedded"] == pytest.approx(1.3873, rel=1e-4)
    tif = Slide(hest / "wsis" / "C2.tif")
    assert tif.level_count >= 2 and tif.um_per_px_source == "TIFF resolution tags"
    import anndata as ad
    import tifffile

    with tifffile.TiffFile(hest / "wsis" / "C2.tif") as t:
        page = t.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.compression == tifffile.COMPRESSION.LZW
    st = ad.read_h5ad(hest / "st" / "C2.h5ad")
    assert set(st.obs) >= {"in_tissue", "array_row", "array_col", "pxl_col_in_fullres", "pxl_row_in_fullres"}
    assert {"downscaled_fullres"} == set(st.uns["spatial"]["ST"]["images"])
    with h5py.File(hest / "patches" / "C2.h5") as f:
        assert f["img"].shape == (25, 224, 224, 3) and f["barcode"].shape == (25, 1) and f["coords"].shape == (25, 2)
        assert f["img"].attrs["patch_size_target"] == 224 and f["img"].attrs["pixel_size"] * f["img"].attrs["downsample"] == pytest.approx(0.5)


def test_read_by_path_or_by_root_and_sample(hest):
    original = read_section(DATA / "tiny" / "C2")
    for a in (read_section(hest / "st" / "C2.h5ad"), read_section(hest, sample="C2")):
        info = a.uns["bleep"]
        assert info["layout"] == "hest" and info["library_id"] == "C2" and info["image_path"].endswith("wsis/C2.tif")
        assert info["platform"] == "legacy-st" and "st_technology" in info["platform_source"]
        assert info["um_per_px"] == pytest.approx(1.3873) and "pixel_size_um_estimated" in info["um_per_px_source"]
        assert np.array_equal(a.X.toarray(), original.X.toarray()) and list(a.var_names) == list(original.var_names)
        assert np.allclose(a.obsm["spatial"], original.obsm["spatial"])
        # The TIFF holds the JPEG's pixels losslessly: native-resolution patches are the same.
        assert np.array_equal(section_patches(a, 48), section_patches(original, 48))
    vis = read_section(hest, sample="VIS")
    assert vis.uns["bleep"]["platform"] == "visium"
    assert vis.uns["bleep"]["um_per_px"] == pytest.approx(0.7268 / 0.0450045, rel=0.02)


def test_hests_patch_file_is_used_at_its_size_and_resolution(hest, tmp_path):
    import shutil

    root = tmp_path / "hest"
    shutil.copytree(hest, root)
    with h5py.File(root / "patches" / "C3.h5", "a") as f:
        stored = f["img"][()]
        barcodes = [b.decode() for b in f["barcode"][:, 0]]
        f["img"][5] = 0  # mark one patch: only the patch file has it
    a = read_section(root, sample="C3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0.5 um/px is finer than the tiny image: interpolated
        got = section_patches(a, 224, 0.5)
        order = [barcodes.index(s) for s in a.obs_names]
        assert (got[order.index(5)] == 0).all()
        keep = np.ones(len(order), bool)
        keep[order.index(5)] = False
        assert np.array_equal(got[keep], stored[order][keep])
        # Cut from the WSI instead (the file dropped), the patches agree but for HEST's rounding of corners.
        del a.uns["bleep"]["patches_h5"]
        cut = section_patches(a, 224, 0.5)
    same = np.abs(cut[keep].astype(int) - got[keep]).mean()
    other = np.abs(cut[keep].astype(int) - np.roll(got[keep], 1, axis=0)).mean()
    assert same < 0.6 * other
    # At another size or resolution the file is not used.
    b = read_section(root, sample="C3")
    assert not (section_patches(b, 64) == 0).all(axis=(1, 2, 3)).any()


def test_spots_missing_from_the_patch_file_are_cut_from_the_image(hest, tmp_path):
    import shutil

    root = tmp_path / "hest"
    shutil.copytree(hest, root)
    with h5py.File(root / "patches" / "C2.h5", "a") as f:
        img, coords, barcode = f["img"][1:], f["coords"][1:], f["barcode"][1:]
        attrs = dict(f["img"].attrs)
        for key in ("img", "coords", "barcode"):
            del f[key]
        f["img"], f["coords"] = img, coords
        f.create_dataset("barcode", data=barcode, dtype=h5py.string_dtype("utf-8"))
        f["img"].attrs.update(attrs)
        first = barcode[0, 0].decode()
    a = read_section(root, sample="C2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = section_patches(a, 224, 0.5)
        del a.uns["bleep"]["patches_h5"]
        cut = section_patches(a, 224, 0.5)
    missing = [i for i, s in enumerate(a.obs_names) if s not in {b.decode() for b in barcode[:, 0]}]
    assert len(missing) == 1 and np.array_equal(got[missing], cut[missing])
    assert first in a.obs_names


def test_pixel_sizes_that_disagree_are_warned_about(hest, tmp_path):
    import shutil

    root = tmp_path / "hest"
    shutil.copytree(hest, root)
    meta = json.loads((root / "metadata" / "C2.json").read_text())
    meta["pixel_size_um_estimated"] = 1.0  # 28 % off the embedded value, the TIFF's tags and the pitch
    (root / "metadata" / "C2.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"pixel_size_um_estimated\) gives 1 um/px but C2.json \(pixel_size_um_embedded\) gives 1.387"):
        a = read_section(root, sample="C2")
    assert a.uns["bleep"]["um_per_px"] == 1.0
    # Without any stated size, the TIFF's tags and the 200 um legacy ST pitch agree.
    for key in ("pixel_size_um_estimated", "pixel_size_um_embedded"):
        del meta[key]
    (root / "metadata" / "C2.json").write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = read_section(root, sample="C2")
    assert b.uns["bleep"]["um_per_px_source"] == "C2.tif (TIFF resolution tags)"


def test_bad_hest_input_is_a_clear_error(hest, tmp_path):
    import shutil

    root = tmp_path / "hest"
    shutil.copytree(hest, root)
    with pytest.raises(BleepError, match=r"no sample 'C9'.*\['C2', 'C3', 'VIS'\]"):
        read_section(root, sample="C9")
    with pytest.raises(BleepError, match="a HEST folder holds many samples: pass sample=ID"):
        read_section(root)
    with pytest.raises(BleepError, match="sample= names a sample of a HEST folder"):
        read_section(DATA / "tiny" / "C2", sample="C2")
    (root / "wsis" / "C3.tif").unlink()
    with pytest.raises(BleepError, match=r"wsis/C3.tif is missing \(download the wsis/ of C3"):
        read_section(root / "st" / "C3.h5ad")
    meta = json.loads((root / "metadata" / "C2.json").read_text())
    meta["st_technology"] = "Xenium"
    (root / "metadata" / "C2.json").write_text(json.dumps(meta))
    with pytest.raises(BleepError, match="C2.json: st_technology 'Xenium' is not a spot platform"):
        read_section(root, sample="C2")
    (root / "metadata" / "VIS.json").write_text("{not json")
    with pytest.raises(BleepError, match="VIS.json: not valid JSON"):
        read_section(root, sample="VIS")


def test_command_line_sections_expand_hest_ids(hest):
    assert expand_sections([hest], ["C3", "C2"]) == [(hest, "C3"), (hest, "C2")]
    assert [s for _, s in expand_sections([hest, DATA / "tiny" / "C2"])] == ["C2", "C3", "VIS", None]
    with pytest.raises(BleepError, match="ids= names samples of a HEST folder"):
        expand_sections([DATA / "tiny" / "C2"], ["C2"])
