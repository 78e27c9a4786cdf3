"""The training configuration: one dataclass, the one source of the training options, their defaults and
their help (``bleep-rs train`` builds its flags from it). Free of torch, so the command line starts fast.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, fields
from typing import List, Optional

from .._core import BleepError
from ..device import DEVICES, is_device_name
from ..normalize import STAINS
from ..reference import DEFAULT_K, METHODS

#: The default recipe's aggregation of the neighbours (the retrieval API's own default stays BLEEP's mean).
RECIPE_METHOD = "softmax"

__all__ = ["TrainConfig", "LOSSES", "RECIPE_METHOD"]

#: The contrastive losses (see :mod:`bleep_rs.training.loss`).
LOSSES = ("bleep", "clip")


def _opt(default, help: str, *, low=None, high=None, low_open: bool = False, high_open: bool = False, **kw):
    """A config field with its command-line help (the CLI is built from these fields) and its range:
    numbers (each element of a list) must be finite and within [low, high] (``low_open`` / ``high_open``:
    the bound excluded); :meth:`TrainConfig.validate` checks every field by this metadata."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag(f) -> str:
    """The command-line flag of a config field."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _range(meta) -> str:
    low, high = meta["low"], meta["high"]
    if low == 0 and meta["low_open"] and high is None:
        return "a positive finite number"
    parts = []
    if low is not None:
        parts.append(f"{'>' if meta['low_open'] else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if meta['high_open'] else '<='} {high}")
    return "a finite number " + " and ".join(parts) if parts else "a finite number"


def _problem(value, kind, meta) -> Optional[str]:
    """What is wrong with one value of a field (None: nothing)."""
    base = getattr(kind, "__origin__", None)
    args = [a for a in getattr(kind, "__args__", ()) if a is not type(None)]
    if value is None:
        return None if type(None) in getattr(kind, "__args__", ()) else "must be given"
    if base is list or (args and getattr(args[0], "__origin__", None) is list):
        elem = (kind if base is list else args[0]).__args__[0]
        if not isinstance(value, (list, tuple)):
            return f"must be a list, got {value!r}"
        if meta["low"] is not None and not value:
            return "must list at least one value"
        return next((p for v in value if (p := _problem(v, elem, meta))), None)
    if args:
        kind = args[0]
    if kind is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if kind is str:
        if meta.get("path") and isinstance(value, os.PathLike):
            return None
        if not isinstance(value, str):
            return f"must be a string, got {value!r}"
        choices = meta.get("choices")
        return None if not choices or value in choices else f"must be one of {', '.join(choices)}, got {value!r}"
    if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        return f"must be a whole number, got {value!r}"
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"must be a number, got {value!r}"
        low, high = meta["low"], meta["high"]
        bad = not math.isfinite(value)
        bad |= low is not None and (value <= low if meta["low_open"] else value < low)
        bad |= high is not None and (value >= high if meta["high_open"] else value > high)
        if bad:
            what = "a whole number" if kind is int else _range(meta)
            if kind is int and (low is not None or high is not None):
                what += " " + _range(meta).removeprefix("a finite number ")
            return f"must be {what}, got {value!r}"
    return None


@dataclass
class TrainConfig:
    """Training arguments, all saved in the model's config.json. The defaults are the recipe measured
    best on held-out sections (README, "Prediction quality"); ``bleep-rs train`` takes each as a flag."""

    # What the image encoder sees.
    fields_of_view: List[float] = _opt([1.0, 2.0, 3.0],
                                        "fields of view around each spot, multiples of the patch's side, each through the backbone (default 1 2 3)",
                                        low=0, low_open=True, high=64)
    patch_size: int = _opt(224, "patch side in pixels at patch_um_per_px= (default 224)", low=8, high=4096)
    patch_um_per_px: Optional[float] = _opt(None, "micrometres per pixel of the patches (default: the training sections' native one, their median; "
                                                     "recorded in the model and used by predict)", low=0, low_open=True)
    backbone: str = _opt("efficientnet-lite0", "efficientnet-lite0 (default), efficientnet-lite1, efficientnet-lite2, timm:NAME (with "
                                               "backbone_weights=), timm:hf-hub:ORG/NAME (a model in the Hugging Face cache) or features:D")
    backbone_weights: Optional[str] = _opt(None, "a local weights file for the backbone", path=True)
    random_init: bool = _opt(False, "build a timm backbone with random weights (only when asked: without weights it is an error)")
    freeze_backbone: bool = _opt(True, "train the heads on cached backbone features (default); freeze_backbone=False fine-tunes the whole encoder (a GPU job)")
    augment: bool = _opt(True, "flips and 90-degree rotations in training (with a frozen backbone: the 8 views' features cached)")
    tta: bool = _opt(True, "predict from the mean of the 8 dihedral views' embeddings (recorded in the model)")
    color_jitter: float = _opt(0.0, "brightness / contrast jitter amplitude (fine-tuning only)", low=0, high=1)
    stain: str = _opt("none", "macenko: every patch Macenko-normalised to one reference stain before the backbone, in training and "
                              "prediction (recorded in the model); helps HER2ST across patients, hurts MOB (docs/benchmarks.md)",
                      choices=list(STAINS))
    # The heads and the loss.
    loss: str = _opt("bleep", "bleep (soft targets, method.md section 3) or clip", choices=list(LOSSES))
    temperature: float = _opt(4.0, "the BLEEP loss's temperature tau (logits = x.v / tau on LayerNorm outputs of length ~16)",
                              low=0, low_open=True)
    embedding_dim: int = _opt(256, "embedding dimension", low=1)
    dropout: float = _opt(0.1, "dropout in the projection heads", low=0, high=1, high_open=True)
    # Optimisation.
    epochs: int = _opt(60, "epochs (default 60)", low=1)
    batch_size: int = _opt(128, "contrastive batch per device (default 128; a batch contrasts its spots: at least 2)", low=2)
    lr: float = _opt(1e-3, "AdamW learning rate of the heads", low=0, low_open=True)
    backbone_lr: float = _opt(0.1, "fine-tuning: the backbone's learning rate as a fraction of lr=", low=0)
    warmup_epochs: float = _opt(1.0, "fine-tuning: linear learning-rate warm-up, in epochs", low=0)
    weight_decay: float = _opt(1e-3, "AdamW weight decay (never on biases and norm weights)", low=0)
    seed: int = _opt(0, "random seed", low=0, high=2**32 - 1)
    device: str = _opt("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1 ...")
    amp: bool = _opt(True, "bfloat16 autocast on GPU")
    gather: bool = _opt(False, "several devices: contrast across every device's batch")
    # Validation and early stopping.
    val_fraction: float = _opt(0.0, "random spots held out for validation, to select the epoch and stop early "
                                     "(default 0: all spots train, the last best training loss is kept)", low=0, high=1, high_open=True)
    val_sections: List[str] = _opt([], "hold out these sections (library ids) instead")
    patience: int = _opt(15, "early stopping: epochs without a better validation loss", low=1)
    # The gene panel the expression encoder reads.
    n_top_genes: int = _opt(1000, "highly variable genes per section (default 1000)", low=1)
    panel_mode: str = _opt("union", "how the sections' gene sets combine", choices=["union", "intersection"], flag="--panel")
    genes: Optional[List[str]] = _opt(None, "a file with the gene panel, one gene per line (overrides n_top_genes=)", file=True)
    # Retrieval defaults recorded in the model (predict uses them unless told otherwise).
    k: int = _opt(DEFAULT_K, "neighbours per prediction", low=1)
    # softmax of cosine / 0.1 over the k neighbours, not BLEEP's plain mean: +0.013 HEG-50 on HER2ST (every
    # fold) and +0.007 across patients B4 -> C, level elsewhere (docs/benchmarks.md, "Read-out").
    method: str = _opt(RECIPE_METHOD, "aggregation of the neighbours recorded in the model", choices=list(METHODS))
    # The run.
    cache_dir: Optional[str] = _opt(None, "where backbone features are cached (default $BLEEP_RS_CACHE or ~/.cache/bleep-rs); 'none' to disable",
                                    path=True)
    progress: bool = _opt(True, "progress bars and a line per epoch")
    resume: bool = _opt(True, "start over instead of resuming from the output's checkpoint", flag="--fresh", invert=True)
    overwrite: bool = _opt(False, "replace an existing model directory")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, *, flags: bool = False) -> None:
        """Checks every field against its declared type and range (the field metadata): a
        :class:`BleepError` naming the field (``flags``: the command-line flag) and the value."""
        import typing

        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            why = _problem(value, hints[f.name], f.metadata)
            if why is None and f.name == "device" and not is_device_name(value):
                why = f"must be one of {DEVICES}, got {value!r}"
            if why is None and f.name == "backbone" and not value.strip():
                why = "must name a backbone"
            if why:
                raise BleepError(f"{flag(f) if flags else f.name} {why}")
            if hints[f.name] in (int, float) and not isinstance(value, bool):
                setattr(self, f.name, hints[f.name](value))  # numpy numbers as Python's (config.json)
            if f.metadata.get("path") and isinstance(value, os.PathLike):
                setattr(self, f.name, os.fspath(value))

    def for_features(self, dim: int) -> "TrainConfig":
        """This config for precomputed patch features of dimension ``dim``: backbone ``features:D`` (a
        config naming an image backbone, the default, takes it), one field of view (a features file has
        one per patch)."""
        import dataclasses

        from ..backbones import DEFAULT_BACKBONE

        backbone = f"features:{int(dim)}"
        if self.backbone not in (DEFAULT_BACKBONE, backbone):
            raise BleepError(f"the features files hold {dim}-dimensional features: backbone must be {backbone}, not {self.backbone}")
        image_only = {"freeze_backbone=False": not self.freeze_backbone, "stain=macenko": self.stain != "none",
                      "backbone_weights=": self.backbone_weights is not None}
        given = [name for name, used in image_only.items() if used]
        if given:
            raise BleepError(f"{', '.join(given)}: not with precomputed features (they are an image backbone's options)")
        return dataclasses.replace(self, backbone=backbone, fields_of_view=[1.0])

    @classmethod
    def from_flags(cls, values: dict) -> "TrainConfig":
        """The config of ``bleep-rs train``'s options: the same checks, the errors naming the flags."""
        self = cls.__new__(cls)
        for key, value in values.items():
            setattr(self, key, value)
        self.validate(flags=True)
        return cls(**values)
