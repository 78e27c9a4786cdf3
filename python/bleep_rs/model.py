"""The BLEEP model: an image encoder (backbone + projection head) and an expression encoder (a projection
head on the panel's expression), saved as a directory of ``model.safetensors`` + ``config.json``.

    model = bleep_rs.load_model("model_dir")
    v = model.embed_images(patches)            # uint8 (n, h, w, 3) -> float32 (n, 256)
    x = model.embed_expression(section)        # AnnData (or counts on the panel) -> float32 (n, 256)
    ref = bleep_rs.build_reference(model, [section_a, section_b])
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ._core import BleepError
from .backbones import create_backbone
from .expression import Panel, panel_expression

__all__ = ["ProjectionHead", "ModelConfig", "BleepModel", "save_model", "load_model", "build_reference", "MODEL_FORMAT_VERSION"]

MODEL_FORMAT_VERSION = 1


class ProjectionHead(nn.Module):
    """BLEEP's head, the same for both sides: ``p = Linear(in, d)(x)``, then ``LayerNorm(p + Dropout(
    Linear(d, d)(GELU(p))))``."""

    def __init__(self, in_dim: int, dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_dim, dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.projection(x)
        h = self.dropout(self.fc(self.gelu(p)))
        return self.layer_norm(h + p)


@dataclass
class ModelConfig:
    """Everything that describes a trained model; saved as config.json beside the weights."""

    panel: Panel
    backbone: str = "efficientnet-lite0"
    embedding_dim: int = 256
    dropout: float = 0.1
    temperature: float = 1.0
    loss: str = "bleep"
    patch_size: int = 224
    um_per_px: Optional[float] = None  # None: each section's native resolution
    # The backbone's input size and constants: BleepModel sets them from the backbone (kept here so that
    # config.json says how to feed the model).
    input_size: int = 224
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    training: dict = field(default_factory=dict)
    package_version: str = ""
    format_version: int = MODEL_FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = "bleep-rs.model"
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> "ModelConfig":
        """The config in ``text`` (config.json of the model directory ``where``); a damaged or foreign
        file is an error naming what is wrong."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise BleepError(f"{where}: config.json is not valid JSON ({e})") from e
        if not isinstance(d, dict) or d.pop("format", None) != "bleep-rs.model":
            raise BleepError(f"{where}: config.json is not a bleep-rs model config")
        if isinstance(d.get("format_version"), int) and d["format_version"] > MODEL_FORMAT_VERSION:
            raise BleepError(f"{where}: model format {d['format_version']} is newer than this bleep-rs reads ({MODEL_FORMAT_VERSION}): upgrade bleep-rs")
        _check_fields(cls, d, f"{where}: config.json")
        _check_fields(Panel, d["panel"], f"{where}: config.json's panel")
        config = cls(**{**d, "panel": Panel.from_dict(d["panel"])})
        problem = config._problem()
        if problem:
            raise BleepError(f"{where}: config.json: {problem}: the file is damaged")
        return config

    def _problem(self) -> Optional[str]:
        """What makes the values unusable, if anything."""
        for name in ("embedding_dim", "patch_size", "input_size"):
            if getattr(self, name) < 1:
                return f"{name} is {getattr(self, name)}; it must be at least 1"
        if not 0 <= self.dropout < 1 or not self.temperature > 0:
            return f"dropout {self.dropout} must lie in [0, 1) and temperature {self.temperature} be positive"
        if self.um_per_px is not None and not self.um_per_px > 0:
            return f"um_per_px is {self.um_per_px}; it must be positive (or null: each section's own)"
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            return f"mean {self.mean} and std {self.std} must be three numbers each (RGB), std positive"
        genes = self.panel.genes
        if not genes or len(set(genes)) != len(genes):
            return f"the panel's {len(genes)} genes must be a non-empty list without repeats"
        return None


def _is(value, hint) -> bool:
    """Whether a JSON value fits a dataclass field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_is(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_is(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    return isinstance(value, dict)  # dict fields and nested dataclasses (checked on their own)


def _check_fields(cls, d, where: str) -> None:
    """Raises unless the JSON object ``d`` has exactly the fields of dataclass ``cls`` (those with
    defaults may be absent), each of its type, naming the keys that are wrong."""
    if not isinstance(d, dict):
        raise BleepError(f"{where} must be a JSON object, not {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = {n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    extra, missing = sorted(set(d) - set(fields)), sorted(required - set(d))
    wrong = [f"{k} = {d[k]!r} (not {str(hints[k]).replace('typing.', '')})" for k in fields if k in d and not _is(d[k], hints[k])]
    if extra or missing or wrong:
        parts = [f"unknown keys {extra}"] * bool(extra) + [f"missing keys {missing}"] * bool(missing) + [f"wrong types: {'; '.join(wrong)}"] * bool(wrong)
        raise BleepError(f"{where}: {', '.join(parts)}: the file is damaged or not from this version of bleep-rs")


class BleepModel(nn.Module):
    """The two encoders. ``forward(images, expression)`` returns (image embeddings, expression
    embeddings), neither normalised (BLEEP trains on raw embeddings; retrieval normalises)."""

    def __init__(self, config: ModelConfig, *, backbone_weights: Optional[str] = None, pretrained: bool = True):
        super().__init__()
        self.config = config
        self.backbone, self.spec = create_backbone(config.backbone, weights=backbone_weights, pretrained=pretrained)
        # The input constants are the backbone's own: derived here, once, for training and inference alike.
        config.input_size, config.mean, config.std = self.spec.input_size, list(self.spec.mean), list(self.spec.std)
        self.image_head = ProjectionHead(self.spec.feature_dim, config.embedding_dim, config.dropout)
        self.expression_head = ProjectionHead(len(config.panel.genes), config.embedding_dim, config.dropout)
        # CLIP's learnable temperature, log(1 / 0.07); unused by the BLEEP loss.
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor, expression: torch.Tensor, *, features: bool = False):
        f = images if features else self.image_features(images)
        return self.image_head(f), self.expression_head(expression)

    # -- inference on numpy ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def prepare_images(self, patches: np.ndarray) -> torch.Tensor:
        """uint8 (n, h, w, 3) patches to the backbone's normalised float input on the model's device,
        resized (bilinear, antialiased) to its input size when they differ."""
        from .normalize import to_tensor

        x = torch.from_numpy(to_tensor(patches, self.config.mean, self.config.std))
        size = self.config.input_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.to(self.device)

    @torch.no_grad()
    def embed_images(self, patches: np.ndarray, *, batch_size: int = 128, progress: bool = False) -> np.ndarray:
        """Image embeddings float32 (n, d) of uint8 patches (n, h, w, 3), or of precomputed features
        (n, D) for a ``features:D`` backbone."""
        self.eval()
        patches = np.asarray(patches)
        if not self.spec.takes_images:
            if patches.ndim != 2 or patches.shape[1] != self.spec.feature_dim:
                raise BleepError(f"this model takes precomputed features of dimension {self.spec.feature_dim}: got shape {patches.shape}")
        elif patches.ndim != 4 or patches.shape[-1] != 3:
            raise BleepError(f"patches must be uint8 (n, h, w, 3), got shape {patches.shape}")
        out = []
        steps = range(0, len(patches), batch_size)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="embedding patches", unit="batch")
        for start in steps:
            block = patches[start : start + batch_size]
            if self.spec.takes_images:
                f = self.image_features(self.prepare_images(block))
            else:
                f = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(self.device)
            out.append(self.image_head(f.float()).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.embedding_dim), np.float32)

    @torch.no_grad()
    def embed_expression(self, expression, *, batch_size: int = 4096) -> np.ndarray:
        """Expression embeddings float32 (n, d) of an AnnData section (raw counts, put on the panel) or of
        an array already on the panel (normalised log expression, n x n_genes)."""
        self.eval()
        x = self.panel_expression(expression)
        out = [
            self.expression_head(torch.from_numpy(x[s : s + batch_size]).to(self.device)).float().cpu().numpy()
            for s in range(0, len(x), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.config.embedding_dim), np.float32)

    def panel_expression(self, expression) -> np.ndarray:
        """An AnnData section's expression on the panel; an array is checked and passed through."""
        if hasattr(expression, "var_names"):
            return panel_expression(expression, self.config.panel)
        x = np.ascontiguousarray(expression, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.config.panel.genes):
            raise BleepError(f"expression must be (n, {len(self.config.panel.genes)}) on the model's gene panel, got shape {x.shape}")
        return x


def save_model(model: BleepModel, path: "os.PathLike[str] | str") -> Path:
    """Writes the model directory (``model.safetensors`` + ``config.json``) atomically: into a temporary
    directory beside it, then renamed over any previous one."""
    from safetensors.torch import save_file

    from . import __version__
    from ._atomic import atomic_path

    model.config.package_version = __version__
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path, suffix="") as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "bleep-rs.model"})
        (tmp / "config.json").write_text(model.config.to_json())
    return Path(path)


def load_model(path: "os.PathLike[str] | str", *, device: Optional[str] = None) -> BleepModel:
    """Loads a model directory written by :func:`save_model` (or by training) in evaluation mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise BleepError(f"{path}: not a bleep-rs model directory (needs config.json and model.safetensors)")
    try:
        text = cfg_file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BleepError(f"{cfg_file}: unreadable ({e})") from e
    config = ModelConfig.from_json(text, str(path))
    model = BleepModel(config, pretrained=False)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise BleepError(f"{weights}: unreadable ({e})") from e
    problem = _weights_problem(state, model.state_dict())
    if problem:
        raise BleepError(f"{weights}: {problem}: the file is damaged or from another model")
    model.load_state_dict(state)
    model.eval()
    return model.to(device or "cpu")


def _weights_problem(state: dict, expected: dict) -> Optional[str]:
    """What keeps ``state`` from being loaded as ``expected`` (names, shapes, kinds, finiteness)."""
    listed = lambda names: f"{names[:5]}{' ...' if len(names) > 5 else ''} ({len(names)})"  # noqa: E731
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        return "; ".join([f"missing tensors {listed(missing)}"] * bool(missing) + [f"unexpected tensors {listed(unexpected)}"] * bool(unexpected))
    for k, want in expected.items():
        got = state[k]
        if got.shape != want.shape:
            return f"tensor {k} has shape {tuple(got.shape)}, the config implies {tuple(want.shape)}"
        if got.dtype.is_floating_point != want.dtype.is_floating_point:
            return f"tensor {k} holds {got.dtype} values, not {want.dtype}"
        if got.dtype.is_floating_point and not torch.isfinite(got).all():
            return f"tensor {k} holds NaN or infinite values"
    return None


def build_reference(model: BleepModel, sections: Sequence, *, name: Optional[str] = None, expression_dtype: str = "float32", progress: bool = False):
    """The :class:`~bleep_rs.Reference` of reference sections: their spots' expression embeddings, their
    expression on the model's panel (normalised log), the panel's genes, and provenance naming the model."""
    from . import __version__
    from .reference import Reference

    if not sections:
        raise BleepError("build_reference needs at least one section")
    emb, expr, ids, labels = [], [], [], []
    for s in sections:
        x = model.panel_expression(s)
        emb.append(model.embed_expression(x))
        expr.append(x)
        lib = s.uns.get("bleep", {}).get("library_id", "section")
        ids += [f"{lib}:{i}" for i in s.obs_names]
        labels += [lib] * s.n_obs
    from .predict import model_id

    meta = {
        "model": name or "",
        "model_id": model_id(model),
        "backbone": model.config.backbone,
        "loss": model.config.loss,
        "panel_size": len(model.config.panel.genes),
        "package_version": __version__,
        "normalisation": "per-section median library size, log1p",
    }
    return Reference.build(
        np.concatenate(emb), np.concatenate(expr), list(model.config.panel.genes),
        spot_ids=ids, sections=labels, metadata=meta, expression_dtype=expression_dtype,
    )
