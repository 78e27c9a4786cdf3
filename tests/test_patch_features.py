"""Precomputed patch features end to end: TRIDENT / HEST .h5 files read, matched to spots (barcodes or
positions), trained on, predicted at spots and as tiles through the command line, with the errors a
foreign or damaged file must give."""

from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("torch")

import bleep_rs
from bleep_rs import BleepError
from bleep_rs.inputs import InputSpec
from bleep_rs.readers.patch_features import features_for_sections, read_patch_features

from conftest import DATA as SHARED, cli, refused

DATA = SHARED / "tiny"
DIM = 12
PATCH = 64  # the features' patch side in level-0 pixels


def spot_features(section, dim: int = DIM) -> np.ndarray:
    """Features a real extractor would give in spirit: a fixed random projection of each spot patch's
    colour statistics (so that they carry the image, and two extractors differ)."""
    patches = bleep_rs.section_patches(section, size=16).astype(np.float32) / 255  # (n, 16, 16, 3)
    stats = np.concatenate([patches.mean(axis=(1, 2)), patches.std(axis=(1, 2)), patches.max(axis=(1, 2))], axis=1)
    return (stats @ np.random.default_rng(7).standard_normal((stats.shape[1], dim))).astype(np.float32)


def write_trident(path, section, *, dim: int = DIM, encoder="conch_v15", order=None, barcodes: bool = False) -> Path:
    """A TRIDENT-style file: features + top-left coords (level 0) with patch_size_level0; rows shuffled."""
    feats = spot_features(section, dim)
    xy = np.asarray(section.obsm["spatial"], dtype=np.float64)
    order = np.random.default_rng(3).permutation(section.n_obs) if order is None else order
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", data=feats[order])
        if encoder:
            d.attrs["encoder"] = encoder
        c = f.create_dataset("coords", data=np.round(xy[order] - PATCH / 2).astype(np.int64))
        c.attrs.update(patch_size=PATCH // 2, level0_magnification=40, target_magnification=20, patch_size_level0=PATCH)
        if barcodes:
            f.create_dataset("barcodes", data=np.array([[s.encode()] for s in section.obs_names[order]]))
    return Path(path)


@pytest.fixture(scope="module")
def tiny():
    return [bleep_rs.read_section(DATA / s) for s in ("C2", "C3")]


def test_matched_by_position_and_by_barcode_alike(tiny, tmp_path):
    sec = tiny[0]
    want = spot_features(sec)
    by_xy = read_patch_features(write_trident(tmp_path / "a.h5", sec))
    by_code = read_patch_features(write_trident(tmp_path / "b.h5", sec, barcodes=True, order=np.arange(sec.n_obs)[::-1]))
    assert by_xy.encoder == "conch_v15" and by_xy.dim == DIM and by_xy.patch_size_level0 == PATCH
    for pf in (by_xy, by_code):
        spots, rows = pf.rows_for(sec)
        assert np.array_equal(spots, np.arange(sec.n_obs))
        np.testing.assert_array_equal(pf.features[rows], want)
    # HEST's layout: 'embeddings' and 'barcodes' only (no patch size): barcodes place them.
    with h5py.File(tmp_path / "hest.h5", "w") as f:
        f["embeddings"] = want[::-1]
        f["barcodes"] = np.array([[s.encode()] for s in sec.obs_names[::-1]])
    kept, arrays, encoder = features_for_sections([sec], [tmp_path / "hest.h5"])
    np.testing.assert_array_equal(arrays[0], want)
    assert encoder is None and kept[0].n_obs == sec.n_obs


def test_a_spot_anywhere_in_a_patch_square_is_covered(tiny, tmp_path):
    """A patch covers the spots inside its square, corners included (not only a disc around its centre)."""
    sec = tiny[0]
    xy = np.asarray(sec.obsm["spatial"], dtype=np.float64)
    corner = np.round(xy - PATCH + 2).astype(np.int64)  # each spot 2 px inside its patch's bottom-right corner
    with h5py.File(tmp_path / "corner.h5", "w") as f:
        f["features"] = spot_features(sec)
        f.create_dataset("coords", data=corner).attrs["patch_size_level0"] = PATCH
    spots, rows = read_patch_features(tmp_path / "corner.h5").rows_for(sec)
    assert np.array_equal(spots, np.arange(sec.n_obs)) and np.array_equal(rows, np.arange(sec.n_obs))


def test_spots_without_a_patch_are_left_out_with_a_warning(tiny, tmp_path):
    sec = tiny[0]
    keep = np.arange(3, sec.n_obs)
    path = write_trident(tmp_path / "part.h5", sec, order=keep)
    with pytest.warns(UserWarning, match=f"3 of the section's {sec.n_obs} spots have no patch"):
        kept, arrays, _ = features_for_sections([sec], [path])
    assert list(kept[0].obs_names) == list(sec.obs_names[keep])
    np.testing.assert_array_equal(arrays[0], spot_features(sec)[keep])
    # Another section's file covers few of these spots (a different grid): an error, not a silent subset.
    few = write_trident(tmp_path / "few.h5", sec, order=np.arange(5))
    with pytest.raises(BleepError, match=r"covers 5 of the section's \d+ spots: is it this section's features file"):
        features_for_sections([sec], [few])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.__delitem__("features"), r"no 'features' \(TRIDENT\) or 'embeddings' \(HEST\) dataset"),
        (lambda f: (f.__delitem__("features"), f.create_dataset("features", data=np.zeros((0, DIM), np.float32))), "holds no patches"),
        (lambda f: f["features"].__setitem__((2, 1), np.nan), "NaN or infinite values in 1 of"),
        (lambda f: (f.__delitem__("coords"), f.create_dataset("coords", data=np.zeros((3, 2)))), "coords must be 25 x 2 numbers"),
        (lambda f: f["coords"].attrs.__setitem__("patch_size_level0", -4), "patch size is -4.0"),
        (lambda f: (f.__delitem__("features"), f.create_dataset("features", data=np.array(["a", "b"], dtype="S1"))), "must be a numeric matrix"),
        (lambda f: f.create_dataset("barcodes", data=np.array([b"x"] * 4)), "4 barcodes for 25 patches"),
        (lambda f: f.create_dataset("barcodes", data=np.array([b"x"] * 25)), r"barcodes repeats barcodes \['x'\]"),
        (lambda f: f.create_dataset("barcodes", data=np.array([b"\xff%d" % i for i in range(25)])), "barcodes are not UTF-8 text"),
    ],
)
def test_damaged_files_name_the_problem(tiny, tmp_path, damage, message):
    path = write_trident(tmp_path / "f.h5", tiny[0])
    with h5py.File(path, "r+") as f:
        damage(f)
    with pytest.raises(BleepError, match=message):
        read_patch_features(path)


def test_another_sections_file_placed_by_position_is_said(tiny, tmp_path):
    """C2's file on C3: no barcode matches, and the two 5 x 5 windows overlap in pixels, so every spot of C3
    finds a patch by its coordinates; that fallback (meant for another naming of the same spots) is said."""
    f = read_patch_features(write_trident(tmp_path / "c2.h5", tiny[0], barcodes=True))
    with pytest.warns(UserWarning, match="none of the file's 25 barcodes .* is a spot id of the section .* if it is another section's features file"):
        f.rows_for(tiny[1])


def test_image_options_are_refused_with_features():
    assert bleep_rs.TrainConfig().for_features(DIM).backbone == f"features:{DIM}"
    for options, named in [({"input": InputSpec(stain="macenko")}, "stain=macenko"), ({"freeze_backbone": False}, "freeze_backbone=False"),
                           ({"backbone_weights": "w.pth"}, "backbone_weights=")]:
        with pytest.raises(BleepError, match=f"{named}: not with precomputed features"):
            bleep_rs.TrainConfig(**options).for_features(DIM)


def test_not_an_h5_file(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(BleepError, match="not an HDF5 file"):
        read_patch_features(tmp_path / "x.h5")
    with pytest.raises(BleepError, match="missing"):
        read_patch_features(tmp_path / "absent.h5")


def test_no_way_to_place_the_patches(tiny, tmp_path):
    with h5py.File(tmp_path / "bare.h5", "w") as f:
        f["features"] = spot_features(tiny[0])
        f["coords"] = np.zeros((tiny[0].n_obs, 2))  # no patch size: corners cannot become centres
    with pytest.raises(BleepError, match="no coords with a patch size"):
        read_patch_features(tmp_path / "bare.h5").rows_for(tiny[0])
    # Nor can they be predicted as tiles: they have no positions.
    from bleep_rs.model import BleepModel, ModelConfig, build_reference
    from bleep_rs.predict import predict_features

    model = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=list(tiny[0].var_names[:4])), backbone=f"features:{DIM}",
                                   input=InputSpec(fields_of_view=(1.0,), tta=False))).eval()
    with pytest.raises(BleepError, match="the patches have no positions"):
        predict_features(model, build_reference(model, tiny[:1]), tmp_path / "bare.h5")


def test_command_line_end_to_end(tiny, tmp_path):
    """train --features, reference, predict --features at a section's spots and as tiles, evaluate: the
    same numbers as the Python API, and the refusals of features that are not the model's."""
    c2, c3 = (write_trident(tmp_path / f"{s}.h5", sec) for s, sec in zip(("C2", "C3"), tiny))
    model_dir, ref = tmp_path / "model", tmp_path / "ref.safetensors"
    cli("train", DATA / "C2", DATA / "C3", "--features", c2, c3, "--out", model_dir, "--epochs", "3", "--n-top-genes", "16", "--no-progress")
    model = bleep_rs.load_model(model_dir)
    assert model.config.backbone == f"features:{DIM}" and model.config.features_encoder == "conch_v15"
    assert model.config.input.fields_of_view == (1.0,)
    cli("reference", DATA / "C2", "--model", model_dir, "--out", ref)
    reference = bleep_rs.Reference.load(ref)

    spots = cli("predict", DATA / "C3", "--features", c3, "--model", model_dir, "--reference", ref, "--out", tmp_path / "spots.h5ad")
    assert f"{tiny[1].n_obs} spots predicted" in spots.stdout
    pred = bleep_rs.read_prediction(tmp_path / "spots.h5ad")
    want = reference.impute(model.embed_images(spot_features(tiny[1])), k=model.config.k, method=model.config.method)
    assert list(pred.obs_names) == list(tiny[1].obs_names)
    np.testing.assert_allclose(pred.X, want, rtol=1e-5, atol=1e-6)
    assert pred.uns["bleep"]["features_encoder"] == "conch_v15" and pred.uns["bleep"]["mode"] == "spots"
    report = cli("evaluate", tmp_path / "spots.h5ad", DATA / "C3", "--out", tmp_path / "report.json")
    assert "HEG-50" in report.stdout

    cli("predict", "--features", c3, "--model", model_dir, "--reference", ref, "--out", tmp_path / "tiles.h5ad")
    tiles = bleep_rs.read_prediction(tmp_path / "tiles.h5ad")
    assert tiles.uns["bleep"]["mode"] == "tiles" and tiles.n_obs == tiny[1].n_obs
    # Tiles are the file's rows (shuffled), at the patch centres: the same predictions, reordered.
    order = np.lexsort(np.asarray(tiles.obsm["spatial"]).T[::-1])
    expect = np.lexsort(np.round(np.asarray(tiny[1].obsm["spatial"], dtype=np.float64) - PATCH / 2 + PATCH / 2).T[::-1])
    np.testing.assert_allclose(tiles.X[order], want[expect], rtol=1e-5, atol=1e-6)

    # Several files: one output each in a folder.
    folder = cli("predict", "--features", c2, c3, "--model", model_dir, "--reference", ref, "--out", tmp_path / "many")
    assert (tmp_path / "many" / "C2.h5ad").is_file() and (tmp_path / "many" / "C3.h5ad").is_file(), folder.stdout

    other = write_trident(tmp_path / "uni.h5", tiny[1], encoder="uni_v1")
    refused(cli("predict", "--features", other, "--model", model_dir, "--reference", ref, "--out", tmp_path / "o.h5ad", ok=False),
            "features from uni_v1", "trained on conch_v15")
    wide = write_trident(tmp_path / "wide.h5", tiny[1], dim=DIM + 4, encoder=None)
    refused(cli("predict", "--features", wide, "--model", model_dir, "--reference", ref, "--out", tmp_path / "w.h5ad", ok=False),
            f"dimension {DIM + 4}", f"takes {DIM}")
    refused(cli("predict", "--features", c3, "--slide", DATA / "C3" / "image.jpg", "--model", model_dir, "--reference", ref,
                "--out", tmp_path / "s.h5ad", ok=False), "--slide", "not with --features")
    refused(cli("train", DATA / "C2", "--features", c2, c3, "--out", tmp_path / "m2", ok=False), "2 features files for 1 sections")
    refused(cli("train", DATA / "C2", "--features", c2, "--backbone", "features:3", "--out", tmp_path / "m3", ok=False),
            f"backbone must be features:{DIM}")
