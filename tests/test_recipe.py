"""The parts of the training recipe: dihedral views, fields of view, test-time augmentation, the feature
cache and its key, the resolution a model records, the command line built from the config, and how a
training run ends (an existing output, no usable epoch, a checkpoint of another run)."""

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bleep_rs  # noqa: E402
from bleep_rs import BleepError  # noqa: E402
from bleep_rs.augment import dihedral_view, random_views  # noqa: E402
from bleep_rs.inputs import InputSpec  # noqa: E402
from bleep_rs.model import BleepModel, ModelConfig  # noqa: E402
from bleep_rs.sections import section_patches  # noqa: E402
from bleep_rs.training import TrainConfig, native_um_per_px, train  # noqa: E402
from bleep_rs.training.features import feature_cache_key, section_features  # noqa: E402

from conftest import DATA  # noqa: E402

TINY = [DATA / "tiny" / "C2", DATA / "tiny" / "C3"]


@pytest.fixture(scope="module")
def tiny():
    return [bleep_rs.read_section(p) for p in TINY]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["a", "b"]), input=InputSpec(fields_of_view=(1.0, 2.0), patch_size=64, tta=False))).eval()


def test_dihedral_views_are_the_eight_symmetries(rng):
    x = rng.integers(0, 255, (2, 1, 6, 6, 3), dtype=np.uint8)
    views = [dihedral_view(x, v) for v in range(8)]
    assert len({v.tobytes() for v in views}) == 8 and np.array_equal(views[0], x)
    assert np.array_equal(dihedral_view(views[1], 1), views[2])  # two quarter turns
    assert np.array_equal(dihedral_view(views[4], 4), x)  # a flip undone
    with pytest.raises(ValueError):
        dihedral_view(x, 8)
    # The torch batch augmentation only ever produces one of these views per sample, the same for every field.
    t = torch.from_numpy(np.moveaxis(x.astype(np.float32), -1, 2).copy())  # (n, fields, 3, h, w)
    out = random_views(t, torch.Generator().manual_seed(3)).numpy()
    for i in range(len(x)):
        got = np.moveaxis(out[i], 1, -1).astype(np.uint8)
        assert any(np.array_equal(got, v[i]) for v in views)


def test_fields_of_view_are_wider_crops_around_the_same_centre(tiny):
    s = tiny[0]
    um = s.uns["bleep"]["um_per_px"]
    p = section_patches(s, 64, fields=(1, 2, 3))
    assert p.shape == (s.n_obs, 3, 64, 64, 3)
    assert np.array_equal(p[:, 0], section_patches(s, 64))
    assert np.array_equal(p[:, 1], section_patches(s, 64, um * 2))
    assert np.array_equal(p[:, 2], section_patches(s, 64, um * 3))
    for bad in [(0.5,), (), (1, 1), ("a",), (1, float("nan"))]:
        with pytest.raises(BleepError, match="fields of view"):
            section_patches(s, 64, fields=bad)


def test_the_wider_fields_run_at_their_own_size(model, tiny, tmp_path):
    """EfficientNet-Lite0's wider fields of view go through the backbone at 112 px (its measured default),
    field 1 at 224: inference and fine-tuning compute the same features, the feature cache keeps the sizes
    apart, a model of format 3 runs every field at 224 as it did, and a backbone that cannot take the size
    is refused when the model is made."""
    import dataclasses

    from bleep_rs.encode import backbone_features
    from bleep_rs.model import load_model, save_model

    assert model.config.input.wide_fields_px == 112 and [(g, s.input_size) for g, s in model.field_groups()] == [([0], 224), ([1], 112)]
    p = section_patches(tiny[0], 64, fields=(1, 2))[:5]
    got = model.features(p, views=(0, 5), precision="float32")
    for i, v in enumerate((0, 5)):
        for field, size in ((0, 224), (1, 112)):
            spec = dataclasses.replace(model.spec, input_size=size)
            want = backbone_features(model.backbone, spec, dihedral_view(p, v)[:, field], precision="float32")
            want /= np.linalg.norm(want, axis=1, keepdims=True)
            assert np.allclose(got[i, :, field * 1280 : (field + 1) * 1280], want, atol=1e-5)
    with torch.no_grad():  # the fine-tuning path
        assert np.allclose(model.image_features(model.prepare_images(p)).numpy(), got[0], atol=1e-5)
    same = BleepModel(ModelConfig(panel=model.config.panel, input=model.config.input.replace(wide_fields_px=0))).eval()
    full = same.features(p, precision="float32")
    assert np.allclose(full[0, :, :1280], got[0, :, :1280], atol=1e-5) and not np.allclose(full[0, :, 1280:], got[0, :, 1280:], atol=1e-3)
    cfg = TrainConfig(input=InputSpec(patch_size=64, fields_of_view=(1.0, 2.0)))
    assert feature_cache_key(model, tiny[0], cfg, 1.38, 8) != feature_cache_key(same, tiny[0], cfg, 1.38, 8)

    save_model(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format_version"] == 6 and config["input"]["wide_fields_px"] == 112
    config["format_version"] = 3  # as saved before the size (and the views, format 5) were recorded
    del config["input"]["wide_fields_px"], config["input"]["tta_views"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    old = load_model(tmp_path / "m")
    assert old.config.input.wide_fields_px == 0 and np.allclose(old.features(p, precision="float32"), full, atol=1e-5)

    pytest.importorskip("timm")
    with pytest.raises(BleepError, match=r"does not take 112 px inputs.*--wide-fields-px 0"):
        BleepModel(ModelConfig(panel=model.config.panel, backbone="timm:vit_tiny_patch16_224", input=InputSpec(wide_fields_px=112)), random_init=True)
    vit = BleepModel(ModelConfig(panel=model.config.panel, backbone="timm:vit_tiny_patch16_224"), random_init=True)
    assert vit.config.input.wide_fields_px == 0 and len(vit.field_groups()) == 1  # not measured there: its own size


def test_the_wider_fields_are_resized_once_for_all_views(model, tiny, monkeypatch):
    """With several views, the wider fields' input is made once per chunk of spots and its views taken
    after (the features of each view as when it runs alone, which makes its input from its view of the
    patches), for patches smaller and larger than the 112 px they run at, in one chunk or several;
    dihedral_input is dihedral_view on the channel-first input."""
    import bleep_rs.model
    from bleep_rs.augment import dihedral_input
    from bleep_rs.encode import to_inputs

    for size in (64, 160):
        p = section_patches(tiny[0], size, fields=(1, 2))[:3]
        together = model.features(p, views=range(8))
        alone = np.concatenate([model.features(p, views=(v,)) for v in range(8)])
        assert np.abs(together - alone).max() < 1e-5
    monkeypatch.setattr(bleep_rs.model, "FEATURE_CHUNK", 2)  # 3 spots: chunks of 2 and 1
    assert np.abs(model.features(p, views=range(8)) - together).max() < 1e-5
    assert model.features(p[:0], views=range(8)).shape == (8, 0, model.feature_dim)
    spec = model.field_groups()[1][1]
    x = to_inputs(p[:, 1], spec, chunk=2)
    for v in range(8):
        assert torch.allclose(dihedral_input(x, v), to_inputs(dihedral_view(p[:, 1], v), spec), atol=1e-5)


def test_tta_is_the_mean_of_the_eight_views(model, tiny):
    p = section_patches(tiny[0], 64, fields=model.config.input.fields_of_view)[:6]
    tta = model.embed_images(p, tta_views=8)
    views = np.stack([model.embed_images(dihedral_view(p, v), tta=False) for v in range(8)])
    views /= np.linalg.norm(views, axis=-1, keepdims=True)
    assert np.allclose(tta, views.mean(0), atol=1e-5)
    assert not np.allclose(tta / np.linalg.norm(tta, axis=1, keepdims=True), views[0], atol=1e-3)
    with pytest.raises(BleepError, match=r"\(n, 2, h, w, 3\)"):
        model.embed_images(p[:, 0])  # one field given to a two-field model


def test_views_per_field_fill_the_fewer_views_with_their_mean(model, tiny):
    """tta_views (2, 4), the default: field 1 through the backbone at views 0 and 4 only, the wider field at
    0, 2, 4, 6; the mean embedding of those 4 views, field 1's block at views 2 and 6 being the normalised
    mean of its own two. The same from features of all 8 views (view_features, the benches' path)."""
    from bleep_rs.model import fill_views

    p = section_patches(tiny[0], 64, fields=model.config.input.fields_of_view)[:5]
    tta = copy.deepcopy(model)
    tta.config.input = tta.config.input.replace(tta=True)
    assert tta.config.input.tta_views == (2, 4) and tta.tta_views() == (2, 4) and tta.tta_views(8) == (8, 8) and tta.tta_views(tta=False) == (1, 1)
    all8 = tta.features(p, views=tuple(range(8)))
    dim = tta.spec.feature_dim
    f1 = all8[[0, 4], :, :dim].mean(0)
    f1 /= np.linalg.norm(f1, axis=-1, keepdims=True)
    want = all8[[0, 2, 4, 6]].copy()
    want[[1, 3], :, :dim] = f1
    np.testing.assert_allclose(tta.view_features(all8, (2, 4)), want, atol=1e-6)
    np.testing.assert_allclose(tta.embed_images(p), tta.embed_features(want), atol=1e-5)
    np.testing.assert_allclose(tta.embed_images(p, tta_views=(1, 8)), tta.embed_features(tta.view_features(all8, (1, 8))), atol=1e-5)
    # The fields' own views only go through the backbone: 2 + 4 passes a tile, not 8.
    calls = []
    net = tta.backbone
    tta.backbone = type("Counting", (torch.nn.Module,), {"forward": lambda self, x: calls.append(len(x)) or net(x)})()
    tta.embed_images(p, precision="float32")
    assert sum(calls) == len(p) * (2 + 4)
    tta.backbone = net
    # fill_views leaves computed blocks alone and fills unnormalised features with the plain mean.
    x = np.arange(2 * 1 * 4, dtype=np.float32).reshape(2, 1, 4)
    np.testing.assert_array_equal(fill_views(x.copy(), (0, 4), [(0,), (0, 4)], 2, l2=False), [[[0, 1, 2, 3]], [[0, 1, 6, 7]]])
    for bad in (3, (2, 4, 8), (), True, "2"):
        with pytest.raises(BleepError, match="tta_views must be"):
            tta.embed_images(p, tta_views=bad)
    with pytest.raises(BleepError, match="per_field must give each of the 2 fields"):
        tta.features(p, views=(0, 4), per_field=[(0,), (2,)])  # view 2 is not among those computed


def test_feature_cache_key_follows_every_input(model, tiny, tmp_path):
    cfg = TrainConfig(cache_dir=str(tmp_path), input=InputSpec(patch_size=64, fields_of_view=(1.0, 2.0)))
    key = feature_cache_key(model, tiny[0], cfg, 1.38, 8)
    assert key == feature_cache_key(model, tiny[0], cfg, 1.38, 8)
    assert key != feature_cache_key(model, tiny[1], cfg, 1.38, 8)
    assert key != feature_cache_key(model, tiny[0], cfg, 1.0, 8)
    assert key != feature_cache_key(model, tiny[0], cfg, 1.38, 1)
    assert key != feature_cache_key(model, tiny[0], TrainConfig(input=InputSpec(patch_size=96, fields_of_view=(1.0, 2.0))), 1.38, 8)
    other = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["a"]), input=InputSpec(fields_of_view=(1.0, 3.0), patch_size=64, tta=False)))
    assert key != feature_cache_key(other, tiny[0], cfg, 1.38, 8)
    # A fresh model of the same backbone (another process, another run) finds the same entry: nothing
    # random (the unused ImageNet classifier was) enters the key.
    other.config.input = other.config.input.replace(fields_of_view=(1.0, 2.0))
    assert key == feature_cache_key(other, tiny[0], cfg, 1.38, 8)
    with torch.no_grad():
        other.backbone.net._conv_stem.weight.mul_(1.01)
    assert key != feature_cache_key(other, tiny[0], cfg, 1.38, 8)


def test_stain_normalises_every_patch_the_backbone_sees(model, tiny, tmp_path):
    """stain="macenko": the backbone sees each patch Macenko-normalised (the Rust normaliser, torchstain's
    reference stains), in training and prediction alike; the cache keeps the two apart; fine-tuning refuses it."""
    stained = BleepModel(ModelConfig(panel=model.config.panel, input=InputSpec(fields_of_view=(1.0, 2.0), patch_size=64, stain="macenko", tta=False))).eval()
    stained.load_state_dict(model.state_dict())
    patches = section_patches(tiny[0], 64, fields=(1, 2))[:6]
    normalised = bleep_rs.MacenkoNormalizer().transform(patches.reshape(-1, 64, 64, 3)).reshape(patches.shape)
    assert not np.array_equal(normalised, patches)
    want = model.features(normalised, precision="float32")
    np.testing.assert_array_equal(stained.features(patches, precision="float32"), want)
    np.testing.assert_array_equal(stained.embed_images(patches, tta=False, precision="float32"), model.embed_images(normalised, tta=False, precision="float32"))
    cfg = TrainConfig(cache_dir=str(tmp_path), input=InputSpec(patch_size=64, fields_of_view=(1.0, 2.0)))
    assert feature_cache_key(stained, tiny[0], cfg, 1.38, 8) != feature_cache_key(model, tiny[0], cfg, 1.38, 8)
    bleep_rs.save_model(stained, tmp_path / "m")
    np.testing.assert_array_equal(bleep_rs.load_model(tmp_path / "m").features(patches, precision="float32"), want)
    with pytest.raises(BleepError, match="stain= normalises the patches of a frozen backbone"):
        train(tiny, tmp_path / "ft", TrainConfig(freeze_backbone=False, progress=False, device="cpu", input=InputSpec(stain="macenko")))
    assert not (tmp_path / "ft").exists()
    with pytest.raises(BleepError, match="stain"):
        TrainConfig(input=InputSpec(stain="reinhard"))


def test_section_features_come_from_the_cache_when_they_can(model, tiny, tmp_path):
    cfg = TrainConfig(cache_dir=str(tmp_path), progress=False, augment=False, input=InputSpec(patch_size=64, fields_of_view=(1.0, 2.0)))
    first = section_features(model, tiny[0], cfg, None)
    files = list((tmp_path / "features").glob("*.npy"))
    assert first.shape == (1, tiny[0].n_obs, model.feature_dim) and len(files) == 1
    np.save(files[0], np.ones_like(first))  # a replaced entry fails the checksum its name records ...
    with pytest.warns(UserWarning, match="do not match their checksum"):
        assert np.array_equal(section_features(model, tiny[0], cfg, None), first)
    files[0].write_bytes(b"not a numpy file")  # ... and so does a damaged one: both are recomputed and replaced
    with pytest.warns(UserWarning, match="do not match their checksum"):
        assert np.array_equal(section_features(model, tiny[0], cfg, None), first)
    assert np.array_equal(np.load(files[0]), first)
    none = TrainConfig(cache_dir="none", progress=False, augment=False, input=InputSpec(patch_size=64, fields_of_view=(1.0, 2.0)))
    assert np.array_equal(section_features(model, tiny[1], none, None), section_features(model, tiny[1], cfg, None))
    assert len(list((tmp_path / "features").glob("*.npy"))) == 2
    default = TrainConfig(progress=False, augment=False, input=InputSpec(patch_size=64, fields_of_view=(1.0, 2.0)))  # $BLEEP_RS_CACHE (conftest)
    section_features(model, tiny[1], default, None)
    assert len(list((Path(os.environ["BLEEP_RS_CACHE"]) / "features").glob("*.npy"))) >= 1


def _quick(tmp_path, **kw):
    return TrainConfig(**{"epochs": 2, "input": InputSpec(patch_size=64, fields_of_view=(1.0,)), "augment": False, "n_top_genes": 32,
                          "progress": False, "cache_dir": str(tmp_path / "cache"), **kw})


def _scanned_at(src, out, factor: int):
    """A copy of a legacy ST section as if scanned at ``factor`` x the resolution (every pixel repeated
    factor x factor, lossless PNG), with its spots on whole original pixels so that both copies align."""
    import pandas as pd
    from PIL import Image

    out.mkdir()
    (out / "counts.tsv.gz").write_bytes((src / "counts.tsv.gz").read_bytes())
    spots = pd.read_csv(src / "spots.tsv", sep="\t")
    for c in ("pixel_x", "pixel_y"):
        spots[c] = spots[c].round() * factor
    spots.to_csv(out / "spots.tsv", sep="\t", index=False)
    meta = json.loads((src / "meta.json").read_text())
    meta["um_per_px"] = meta["um_per_px"] / factor
    (out / "meta.json").write_text(json.dumps(meta))
    slide = bleep_rs.Slide(src / "image.jpg")
    image = slide.read_region((0, 0), 0, slide.dimensions)
    Image.fromarray(image.repeat(factor, 0).repeat(factor, 1)).save(out / "image.png")
    return bleep_rs.read_section(out, image=str(out / "image.png"))


def test_a_model_records_its_resolution_and_predict_reads_every_image_at_it(tiny, tmp_path):
    """A model trained at the sections' native resolution predicts a copy of a section scanned at twice
    the resolution from the same patches: the area filter undoes the 2 x 2 repetition."""
    from bleep_rs.predict import predict_section

    model = train(tiny, tmp_path / "m", _quick(tmp_path))
    native = native_um_per_px(tiny)
    assert model.config.input.um_per_px == pytest.approx(native) and native == pytest.approx(tiny[0].uns["bleep"]["um_per_px"], rel=0.01)
    once, twice = _scanned_at(TINY[1], tmp_path / "x1", 1), _scanned_at(TINY[1], tmp_path / "x2", 2)
    assert twice.uns["bleep"]["um_per_px"] == pytest.approx(once.uns["bleep"]["um_per_px"] / 2)
    ref = bleep_rs.build_reference(model, tiny)
    model.config.input = model.config.input.replace(um_per_px=once.uns["bleep"]["um_per_px"])  # exactly 2x: the area filter inverts the copy
    a = predict_section(model, ref, once, k=5, progress=False)
    b = predict_section(model, ref, twice, k=5, progress=False)
    assert a.uns["bleep"]["um_per_px"] == b.uns["bleep"]["um_per_px"] == model.config.input.um_per_px
    assert np.abs(a.X - b.X).max() < 1e-4


def test_the_train_command_is_built_from_the_config():
    import argparse

    from bleep_rs.cli import _add_config_options, _config_from_args

    p = argparse.ArgumentParser()
    _add_config_options(p, TrainConfig)
    assert _config_from_args(TrainConfig, p.parse_args([])) == TrainConfig()
    cfg = _config_from_args(TrainConfig, p.parse_args(["--fields-of-view", "1", "4", "--no-tta", "--temperature", "8", "--fresh", "--panel", "intersection"]))
    assert cfg.input.fields_of_view == (1.0, 4.0) and not cfg.input.tta and cfg.temperature == 8 and not cfg.resume and cfg.panel_mode == "intersection"


def test_training_refuses_an_existing_output_before_any_work(tiny, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BleepError, match="exists.*overwrite=True"):
        train(tiny, out, _quick(tmp_path))
    assert (out / "notes.txt").read_text() == "mine" and not (tmp_path / "cache").exists()


def test_no_usable_epoch_is_an_error_and_writes_nothing(tiny, tmp_path):
    with pytest.raises(BleepError, match="no model"):
        train(tiny, tmp_path / "nan", _quick(tmp_path, temperature=1e-38))  # logits overflow (a NaN lr is refused by the config)
    assert not (tmp_path / "nan").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".nan")]


def test_a_checkpoint_of_another_run_is_not_resumed_silently(tiny, tmp_path):
    from bleep_rs.training.loop import _run_identity, _save_checkpoint, _Trainer, prepare_data

    cfg = _quick(tmp_path, epochs=3)
    model = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["ERBB2", "IGKC"]), input=InputSpec(fields_of_view=(1.0,), patch_size=64, tta=False)))
    data = prepare_data(tiny, cfg, panel=model.config.panel, model=model)
    trainer = _Trainer(model, data, cfg, torch.device("cpu"), 0, 1)
    ckpt = tmp_path / ".out.checkpoint"
    state = {"epoch": 1, "best": 1.0, "stale": 0, "history": [], "identity": _run_identity(_quick(tmp_path, epochs=3, lr=0.5), model.config.panel)}
    _save_checkpoint(ckpt, trainer, state)
    with pytest.raises(BleepError, match="other settings.*resume=False"):
        train(tiny, tmp_path / "out", cfg, data=data)
    # A checkpoint of a version before InputSpec (its fields at the config's top level) says so.
    identity = _run_identity(cfg, model.config.panel)
    flat = {**{k: v for k, v in identity["config"].items() if k != "input"}, **identity["config"]["input"]}
    _save_checkpoint(ckpt, trainer, {**state, "identity": {**identity, "config": flat}})
    with pytest.raises(BleepError, match=r"an older bleep-rs \(before the input recipe was one object\): pass resume=False"):
        train(tiny, tmp_path / "out", cfg, data=data)
    state = {**state, "identity": _run_identity(_quick(tmp_path, epochs=3), model.config.panel), "epoch": 5}
    _save_checkpoint(ckpt, trainer, state)
    with pytest.raises(BleepError, match="past epoch 3"):
        train(tiny, tmp_path / "out", cfg, data=data)
    model = train(tiny, tmp_path / "out", _quick(tmp_path, epochs=3, resume=False), data=data)
    assert (tmp_path / "out" / "history.json").exists() and not ckpt.exists()


def test_a_timm_backbone_without_weights_is_an_error_unless_asked():
    pytest.importorskip("timm")
    cfg = ModelConfig(panel=bleep_rs.Panel(genes=["a"]), backbone="timm:resnet18", input=InputSpec(fields_of_view=(1.0,), tta=False))
    with pytest.raises(BleepError, match="no weights"):
        BleepModel(cfg)
    BleepModel(cfg, random_init=True)


def test_weights_that_do_not_fit_are_an_error_listing_the_keys(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "w.safetensors"
    save_file({"not_a_layer.weight": torch.zeros(3)}, str(bad))
    with pytest.raises(BleepError, match="missing.*unexpected.*not_a_layer"):
        BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["a"]), input=InputSpec(fields_of_view=(1.0,), tta=False)), backbone_weights=str(bad))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(BleepError, match="not a readable weights file"):
        BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["a"]),
                               input=InputSpec(fields_of_view=(1.0,), tta=False)), backbone_weights=str(tmp_path / "junk.pth"))


def test_an_interrupted_run_resumes_from_its_checkpoint(tiny, tmp_path, monkeypatch):
    """Killed after its last checkpoint (simulated: the final write fails), a rerun continues from the
    epoch the checkpoint reached; frozen backbone weights are not part of the checkpoint."""
    from safetensors.torch import load_file

    import bleep_rs.training.loop as tr

    monkeypatch.setattr(tr, "CHECKPOINT_SECONDS", 0.0)
    real_finish = tr._finish

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "_finish", killed)
    cfg = _quick(tmp_path, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny, tmp_path / "out", cfg)
    ckpt = tmp_path / ".out.checkpoint"
    saved = load_file(str(ckpt / "state.safetensors"))
    assert saved and not [k for k in saved if k.startswith("model.backbone.")]
    first = json.loads((ckpt / "state.json").read_text())["history"]
    monkeypatch.setattr(tr, "_finish", real_finish)
    train(tiny, tmp_path / "out", _quick(tmp_path, epochs=4))
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and history[:2] == first
    assert not ckpt.exists()


def test_a_model_file_with_the_old_classifier_still_loads(model, tmp_path):
    """Models saved while the backbone kept EfficientNet's unused ImageNet classifier load as before."""
    from safetensors.torch import load_file, save_file

    from bleep_rs.model import load_model, save_model

    save_model(model, tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert not [k for k in state if "_fc." in k]
    state.update({"backbone.net._fc.weight": torch.zeros(1000, 1280), "backbone.net._fc.bias": torch.zeros(1000)})
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "bleep-rs.model"})
    again = load_model(tmp_path / "m")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


def test_a_model_on_precomputed_features_saves_and_loads(tmp_path, rng):
    """A features:D backbone has no image input (input_size 0): its config.json is valid, and so is a
    bad value caught when the model is built, not only when a file is read."""
    from bleep_rs.model import load_model, save_model

    model = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["a", "b"]), backbone="features:8", input=InputSpec(fields_of_view=(1.0,), tta=False))).eval()
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    x = rng.standard_normal((5, 8)).astype(np.float32)
    assert np.array_equal(model.embed_images(x), again.embed_images(x))
    with pytest.raises(BleepError, match="model config: feature_norm 'l3'"):
        BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["a"]), feature_norm="l3", input=InputSpec(fields_of_view=(1.0,), tta=False)))
    with pytest.raises(BleepError, match="fields_of_view must be a finite number >= 1 and <= 64, got 0.5"):
        InputSpec(fields_of_view=(0.5,))  # the recipe is checked where it is made
