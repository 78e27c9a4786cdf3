"""The BLEEP model: an image encoder (backbone + projection head) and an expression encoder (a projection
head on the panel's expression), saved as a directory of ``model.safetensors`` + ``config.json``.

    model = bleep_rs.load_model("model_dir")
    v = model.embed_images(patches)            # uint8 (n, h, w, 3) -> float32 (n, 256), see bleep_rs.encode
    x = model.embed_expression(section)        # AnnData (or counts on the panel) -> float32 (n, 256)
    ref = bleep_rs.build_reference(model, [section_a, section_b])
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ._core import BleepError
from .backbones import BackboneSpec, create_backbone
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
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise BleepError(f"{where}: config.json is not valid JSON ({e})") from e
        if d.pop("format", None) != "bleep-rs.model":
            raise BleepError(f"{where}: config.json is not a bleep-rs model config")
        if d.get("format_version", 0) > MODEL_FORMAT_VERSION:
            raise BleepError(f"{where}: model format {d['format_version']} is newer than this bleep-rs reads ({MODEL_FORMAT_VERSION}): upgrade bleep-rs")
        d["panel"] = Panel.from_dict(d["panel"])
        try:
            return cls(**d)
        except TypeError as e:
            raise BleepError(f"{where}: config.json has unexpected fields ({e})") from e


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
        from .encode import to_input

        return to_input(patches, self.spec, self.device)

    @torch.no_grad()
    def embed_images(self, patches: np.ndarray, *, precision: str = "auto", batch_size: Optional[int] = None, progress: bool = False) -> np.ndarray:
        """Image embeddings float32 (n, d) of uint8 patches (n, h, w, 3), or of precomputed features
        (n, D) for a ``features:D`` backbone. ``precision``: ``"auto"`` (the fastest inference that keeps
        the float32 answer) or ``"float32"`` (eager torch): see :mod:`bleep_rs.encode`."""
        from .encode import backbone_features

        self.eval()
        patches = np.asarray(patches)
        if not self.spec.takes_images:
            if patches.ndim != 2 or patches.shape[1] != self.spec.feature_dim:
                raise BleepError(f"this model takes precomputed features of dimension {self.spec.feature_dim}: got shape {patches.shape}")
            features = np.ascontiguousarray(patches, dtype=np.float32)
        else:
            features = backbone_features(self.backbone, self.spec, patches, precision=precision, batch_size=batch_size, progress=progress)
        out = [self.image_head(torch.from_numpy(features[s : s + 4096]).to(self.device)).float().cpu().numpy() for s in range(0, len(features), 4096)]
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

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.config.package_version = __version__
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "bleep-rs.model"})
        (tmp / "config.json").write_text(model.config.to_json())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_model(path: "os.PathLike[str] | str", *, device: Optional[str] = None) -> BleepModel:
    """Loads a model directory written by :func:`save_model` (or by training) in evaluation mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise BleepError(f"{path}: not a bleep-rs model directory (needs config.json and model.safetensors)")
    config = ModelConfig.from_json(cfg_file.read_text(), str(path))
    model = BleepModel(config, pretrained=False)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise BleepError(f"{weights}: unreadable ({e})") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise BleepError(f"{weights}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}: the file is damaged or from another model")
    wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        raise BleepError(f"{weights}: tensor {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the config implies {tuple(expected[wrong[0]].shape)}")
    model.load_state_dict(state)
    model.eval()
    return model.to(device or "cpu")


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
