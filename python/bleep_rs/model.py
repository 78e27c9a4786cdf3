"""The BLEEP model: an image encoder (backbone + projection head) and an expression encoder (a projection
head on the panel's expression), saved as a directory of ``model.safetensors`` + ``config.json``.

    model = bleep_rs.load_model("model_dir")
    v = model.embed_images(patches)            # uint8 (n, h, w, 3) -> float32 (n, 256)
    x = model.embed_expression(section)        # AnnData (or counts on the panel) -> float32 (n, 256)
    ref = bleep_rs.build_reference(model, [section_a, section_b])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ._core import BleepError
from .augment import N_VIEWS, TTA_VIEWS, view_counts
from .backbones import create_backbone
from .expression import MIN_SPOTS, Panel, panel_expression, reference_genes
from .inputs import InputSpec
from .reference import DEFAULT_K, DEFAULT_METHOD

__all__ = ["ProjectionHead", "ModelConfig", "BleepModel", "save_model", "load_model", "build_reference", "write_reference", "model_id",
           "MODEL_FORMAT_VERSION"]

#: 6: head ensembles ("heads"; 5 and before: one pair of heads);
#: 5: the views averaged at prediction recorded ("tta_views"; 4 and before: 8 on every field with TTA);
#: 4: the wider fields' input side recorded ("wide_fields_px"; 3 and before: every field at the backbone's
#: input size); 3: the input recipe as one object, "input" (2: its fields at the top level; 1: features not
#: normalised).
MODEL_FORMAT_VERSION = 6
#: What a config.json of format 1 or 2 meant by an input field it leaves out (those versions' defaults).
_LEGACY_INPUT = {"patch_size": 224, "um_per_px": None, "fields_of_view": [1.0], "wide_fields_px": 0, "tta": False, "tta_views": [8],
                 "stain": "none"}


#: Spots per chunk of :meth:`BleepModel.features` (a multiple of the CPU encoders' 64-patch batches).
FEATURE_CHUNK = 256


def _fields(patches: np.ndarray, idx: List[int]) -> np.ndarray:
    """patches[:, idx], a view when the fields are consecutive."""
    return patches[:, idx[0] : idx[-1] + 1] if idx == list(range(idx[0], idx[-1] + 1)) else patches[:, idx]


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


class HeadEnsemble(nn.Module):
    """``n`` projection heads side by side, each from its own initialisation: (..., in) -> (..., n, dim).
    Trained together (each pair of heads its own loss on its own batches, ``split``); retrieval compares the
    concatenation of their L2-normalised embeddings (:meth:`BleepModel.retrieval_embedding`), so a
    similarity is the mean of the heads' cosine similarities."""

    def __init__(self, in_dim: int, dim: int, dropout: float, n: int):
        super().__init__()
        self.members = nn.ModuleList(ProjectionHead(in_dim, dim, dropout) for _ in range(n))

    def forward(self, x: torch.Tensor, split: bool = False) -> torch.Tensor:
        """(B, n, dim); ``split``: ``x`` is n batches of B end to end, head i embeds batch i."""
        parts = x.chunk(len(self.members)) if split else [x] * len(self.members)
        return torch.stack([m(part) for m, part in zip(self.members, parts)], dim=-2)


def _head(in_dim: int, config: "ModelConfig") -> nn.Module:
    """The projection head of one side: BLEEP's one head, or an ensemble of ``config.heads``."""
    if config.heads == 1:
        return ProjectionHead(in_dim, config.embedding_dim, config.dropout)
    return HeadEnsemble(in_dim, config.embedding_dim, config.dropout, config.heads)


@dataclass
class ModelConfig:
    """Everything that describes a trained model; saved as config.json beside the weights."""

    panel: Panel
    backbone: str = "efficientnet-lite0"
    embedding_dim: int = 256
    # Head pairs trained side by side (HeadEnsemble); 1 (BLEEP's, and every model of format 5 and before):
    # one pair, whose raw embeddings retrieval compares.
    heads: int = 1
    dropout: float = 0.1
    temperature: float = 1.0
    loss: str = "bleep"
    # What the image encoder sees of each spot: patch size and resolution (training records it), fields
    # of view, test-time views, stain.
    input: InputSpec = field(default_factory=InputSpec)
    # Each field of view goes through the backbone; their features, each L2-normalised ("l2"; "none": as
    # they come), are concatenated for the head.
    feature_norm: str = "l2"
    k: int = DEFAULT_K  # the neighbours and aggregation predict uses unless told otherwise
    method: str = DEFAULT_METHOD
    # The backbone's input size and constants: BleepModel sets them from the backbone (kept here so that
    # config.json says how to feed the model).
    input_size: int = 224
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # A hub backbone's architecture (timm's config), so that the model loads without the hub's cache.
    backbone_build: dict = field(default_factory=dict)
    # features:D: the extractor named in the features files it was trained on (TRIDENT's 'encoder'), if any.
    features_encoder: Optional[str] = None
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
        except (ValueError, RecursionError) as e:  # not JSON, a number of thousands of digits, nesting too deep
            raise BleepError(f"{where}: config.json is not valid JSON ({type(e).__name__}: {e})") from e
        if not isinstance(d, dict) or d.pop("format", None) != "bleep-rs.model":
            raise BleepError(f"{where}: config.json is not a bleep-rs model config")
        if isinstance(d.get("format_version"), int) and d["format_version"] > MODEL_FORMAT_VERSION:
            raise BleepError(f"{where}: model format {d['format_version']} is newer than this bleep-rs reads ({MODEL_FORMAT_VERSION}): upgrade bleep-rs")
        version = d.get("format_version", 1)
        if isinstance(version, int) and version < 2:
            d.setdefault("feature_norm", "none")  # version 1 fed the backbone's features as they came
        if isinstance(version, int) and version < 3:
            if "input" in d:
                raise BleepError(f"{where}: config.json of format {version} has an \"input\" object (format 3's): the file is damaged")
            d["input"] = {k: d.pop(k, default) for k, default in _LEGACY_INPUT.items()}
        elif "input" not in d:
            raise BleepError(f"{where}: config.json: missing keys ['input']: the file is damaged or not from this version of bleep-rs")
        elif isinstance(version, int) and version in (3, 4) and isinstance(d["input"], dict):
            if version == 3:
                d["input"].setdefault("wide_fields_px", 0)  # format 3 ran every field at the backbone's input size
            d["input"].setdefault("tta_views", [N_VIEWS])  # formats 3 and 4 averaged all 8 views of every field
        if isinstance(version, int) and version < MODEL_FORMAT_VERSION:
            d["format_version"] = MODEL_FORMAT_VERSION  # what it is now (saved again, it is the current format)
        _check_fields(cls, d, f"{where}: config.json")
        _check_fields(Panel, d["panel"], f"{where}: config.json's panel")
        _check_fields(InputSpec, d["input"], f"{where}: config.json's input", every=True)
        try:
            spec = InputSpec(**d["input"])
        except BleepError as e:
            raise BleepError(f"{where}: config.json's input: {e}: the file is damaged") from e
        config = cls(**{**d, "panel": Panel.from_dict(d["panel"]), "input": spec})
        problem = config._problem()
        if problem:
            raise BleepError(f"{where}: config.json: {problem}: the file is damaged")
        return config

    def _problem(self) -> Optional[str]:
        """What makes the values unusable, if anything."""
        sizes = ("embedding_dim", "k", "heads") + (() if self.backbone.startswith("features:") else ("input_size",))
        for name in sizes:  # a features:D backbone has no image input (input_size 0)
            if getattr(self, name) < 1:
                return f"{name} is {getattr(self, name)}; it must be at least 1"
        if not 0 <= self.dropout < 1 or not self.temperature > 0:
            return f"dropout {self.dropout} must lie in [0, 1) and temperature {self.temperature} be positive"
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            return f"mean {self.mean} and std {self.std} must be three numbers each (RGB), std positive"
        genes = self.panel.genes
        if not genes or len(set(genes)) != len(genes):
            return f"the panel's {len(genes)} genes must be a non-empty list without repeats"
        if not isinstance(self.input, InputSpec):
            return f"input must be an InputSpec, not {type(self.input).__name__}"
        from .reference import METHODS

        if self.feature_norm not in ("l2", "none") or self.method not in METHODS:
            return f"feature_norm {self.feature_norm!r} or method {self.method!r} is not one this version knows"
        return None


def _is(value, hint) -> bool:
    """Whether a JSON value fits a dataclass field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_is(value, a) for a in args)
    if origin in (list, tuple):
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


def _check_fields(cls, d, where: str, *, every: bool = False) -> None:
    """Raises unless the JSON object ``d`` has exactly the fields of dataclass ``cls`` (those with
    defaults may be absent, unless ``every``), each of its type, naming the keys that are wrong."""
    if not isinstance(d, dict):
        raise BleepError(f"{where} must be a JSON object, not {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = {n for n, f in fields.items() if every or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)}
    extra, missing = sorted(set(d) - set(fields)), sorted(required - set(d))
    wrong = [f"{k} = {d[k]!r} (not {str(hints[k]).replace('typing.', '')})" for k in fields if k in d and not _is(d[k], hints[k])]
    if extra or missing or wrong:
        parts = [f"unknown keys {extra}"] * bool(extra) + [f"missing keys {missing}"] * bool(missing) + [f"wrong types: {'; '.join(wrong)}"] * bool(wrong)
        raise BleepError(f"{where}: {', '.join(parts)}: the file is damaged or not from this version of bleep-rs")


def _views_of(counts: Sequence[int]) -> tuple:
    """The views a tile runs for per-field view ``counts``, and each field's among them."""
    per_field = [TTA_VIEWS[c] for c in counts]
    return TTA_VIEWS[max(counts)], per_field


def fill_views(features: np.ndarray, views: Sequence[int], per_field: Sequence[Sequence[int]], dim: int, *, l2: bool) -> np.ndarray:
    """Fused features (len(views), n, fields * D) of which field f was computed only at ``per_field[f]``:
    its block at the other views is set, in place, to the mean of its computed ones (L2-normalised when
    the model normalises each field, ``l2``). A tile's mean embedding then gives the field the weight of
    all the views while its backbone ran only at its own (measured in docs/benchmarks.md, "The default
    model's cost per tile")."""
    views = list(views)
    for f, mine in enumerate(per_field):
        missing = [i for i, v in enumerate(views) if v not in mine]
        if not missing:
            continue
        block = slice(f * dim, (f + 1) * dim)
        mean = features[[views.index(v) for v in mine], :, block].mean(axis=0)
        if l2:
            mean /= np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
        features[missing, :, block] = mean
    return features


class BleepModel(nn.Module):
    """The two encoders. ``forward(images, expression)`` returns (image embeddings, expression
    embeddings), neither normalised (BLEEP trains on raw embeddings; retrieval normalises)."""

    def __init__(self, config: ModelConfig, *, backbone_weights: Optional[str] = None, pretrained: bool = True, random_init: bool = False):
        super().__init__()
        self.config = config
        self.backbone, self.spec = create_backbone(config.backbone, weights=backbone_weights, pretrained=pretrained, random_init=random_init,
                                                   build=config.backbone_build or None)
        # The input constants are the backbone's own: derived here, once, for training and inference alike.
        config.input_size, config.mean, config.std = self.spec.input_size, list(self.spec.mean), list(self.spec.std)
        config.backbone_build = dict(self.spec.build)
        problem = config._problem()
        if problem:
            raise BleepError(f"model config: {problem}")
        if not self.spec.takes_images and len(config.input.fields_of_view) != 1:
            raise BleepError(f"backbone {config.backbone} takes precomputed features: it has one field of view, not {list(config.input.fields_of_view)}")
        if config.input.wide_fields_px is None:  # the backbone's measured choice, recorded in the model
            config.input = config.input.replace(wide_fields_px=self.spec.wide_fields_px)
        self._check_wide_fields()
        self.image_head = _head(self.feature_dim, config)
        self.expression_head = _head(len(config.panel.genes), config)
        # CLIP's learnable temperature, log(1 / 0.07); unused by the BLEEP loss.
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    @property
    def n_fields(self) -> int:
        return len(self.config.input.fields_of_view)

    def field_groups(self) -> List[tuple]:
        """(field indices, backbone spec) of the fields that go through the backbone at one input size: the
        fields of view of 1 at the backbone's own size, the wider ones at ``input.wide_fields_px`` (when
        set). One group when every field runs at the same size."""
        fields, px = self.config.input.fields_of_view, self.config.input.wide_fields_px
        narrow = [i for i, f in enumerate(fields) if f <= 1.0]
        if not px or px == self.spec.input_size or not self.spec.takes_images or len(narrow) == len(fields):
            return [(list(range(len(fields))), self.spec)]
        wide = [i for i, f in enumerate(fields) if f > 1.0]
        return ([(narrow, self.spec)] if narrow else []) + [(wide, dataclasses.replace(self.spec, input_size=int(px)))]

    @property
    def wide_fields_px(self) -> int:
        """The input side the wider fields of view run at when it is not the backbone's, else 0."""
        return next((spec.input_size for _, spec in self.field_groups() if spec is not self.spec), 0)

    def _check_wide_fields(self) -> None:
        """The backbone takes the wider fields' input side (a ViT may take only its own): one image tried."""
        px = self.wide_fields_px
        if not px:
            return
        mode = self.backbone.training
        try:
            with torch.no_grad():
                self.backbone.eval()(torch.zeros(1, 3, px, px))
        except Exception as e:  # any failure of a foreign network at this size means the same
            raise BleepError(f"backbone {self.config.backbone} does not take {px} px inputs for the wider fields of view ({type(e).__name__}: "
                             f"{e}): set wide_fields_px to 0 (--wide-fields-px 0) to run them at its input size, {self.spec.input_size} px") from e
        finally:
            self.backbone.train(mode)

    @property
    def feature_dim(self) -> int:
        """The image head's input: the fused features of every field of view."""
        return self.n_fields * self.spec.feature_dim

    def fuse(self, f: torch.Tensor) -> torch.Tensor:
        """(B, fields, D) backbone features -> (B, fields * D) head input."""
        if self.config.feature_norm == "l2":
            f = nn.functional.normalize(f, dim=-1)
        return f.flatten(1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Fused features of a normalised image batch (B, fields, 3, H, W); the backbone sees every field,
        each group resized (bilinear, antialiased) to the size it runs at (:meth:`field_groups`), as
        :meth:`features` does."""
        from .encode import _resize

        b, nf = images.shape[:2]
        groups = self.field_groups()
        if len(groups) == 1:
            return self.fuse(self.backbone(_resize(images.flatten(0, 1), groups[0][1].input_size)).view(b, nf, -1))
        f = torch.empty((b, nf, self.spec.feature_dim), dtype=images.dtype, device=images.device)
        for idx, spec in groups:
            x = _resize(images[:, idx].flatten(0, 1), spec.input_size)
            f[:, idx] = self.backbone(x).view(b, len(idx), -1).to(f.dtype)
        return self.fuse(f)

    def forward(self, images: torch.Tensor, expression: torch.Tensor, *, features: bool = False, split: bool = False):
        """(image embeddings, expression embeddings): (B, d) each, or (B, heads, d) for an ensemble;
        ``split`` (an ensemble in training): the inputs are one batch of B per pair of heads, end to end,
        and pair i embeds batch i."""
        f = images if features else self.image_features(images)
        if self.config.heads == 1:
            return self.image_head(f), self.expression_head(expression)
        return self.image_head(f, split=split), self.expression_head(expression, split=split)

    @property
    def retrieval_dim(self) -> int:
        """The length of the embeddings that retrieval compares (and a reference of this model stores)."""
        return self.config.embedding_dim * self.config.heads

    def retrieval_embedding(self, e: torch.Tensor) -> torch.Tensor:
        """A head's output as retrieval compares it: as it is for one pair of heads; for an ensemble
        (..., heads, d) each head's embedding L2-normalised, concatenated and scaled by 1/sqrt(heads), so
        that the cosine similarity of two is the mean of the heads' cosine similarities."""
        if self.config.heads == 1:
            return e
        return nn.functional.normalize(e, dim=-1).flatten(-2) / float(np.sqrt(self.config.heads))

    # -- inference on numpy ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def prepare_images(self, patches: np.ndarray) -> torch.Tensor:
        """uint8 (n, fields, h, w, 3) patches to the backbone's normalised float input (n, fields, 3, h, w)
        on the model's device; :meth:`image_features` resizes each field to the size it runs at."""
        from .normalize import to_tensor

        n, nf, h, w = patches.shape[:4]
        x = torch.from_numpy(to_tensor(patches.reshape(n * nf, h, w, 3), self.spec.mean, self.spec.std)).to(self.device)
        return x.view(n, nf, *x.shape[1:])

    def check_patches(self, patches: np.ndarray) -> np.ndarray:
        """The model's input as (n, fields, h, w, 3) uint8 (a single field may come as (n, h, w, 3)), or
        (n, D) features for a ``features:D`` backbone; anything else is an error that says what it takes."""
        patches = np.asarray(patches)
        if not self.spec.takes_images:
            if patches.ndim != 2 or patches.shape[1] != self.spec.feature_dim:
                raise BleepError(f"this model takes precomputed features of dimension {self.spec.feature_dim}: got shape {patches.shape}")
            return patches
        if patches.ndim == 4 and self.n_fields == 1:
            patches = patches[:, None]
        if patches.ndim != 5 or patches.shape[1] != self.n_fields or patches.shape[-1] != 3 or patches.shape[2] != patches.shape[3]:
            raise BleepError(
                f"patches must be uint8 (n, {self.n_fields}, h, w, 3) with h == w: one square patch per field of view "
                f"{list(self.config.input.fields_of_view)} (model.config.input.section_patches(section)); got shape {patches.shape}"
            )
        if patches.dtype != np.uint8:
            raise BleepError(f"patches must be uint8, not {patches.dtype}")
        return patches

    def stained(self, patches: np.ndarray) -> np.ndarray:
        """uint8 patches (n, h, w, 3) as the backbone sees them: Macenko-normalised (in Rust) when the model's
        ``stain`` says so (a patch without stain, background or glass, stays as it is)."""
        if self.config.input.stain == "none" or len(patches) == 0:
            return patches
        from .normalize import MacenkoNormalizer

        return MacenkoNormalizer().transform(patches)

    def features(self, patches: np.ndarray, *, views: Sequence[int] = (0,), per_field: Optional[Sequence[Sequence[int]]] = None,
                 precision: str = "auto", progress: bool = False) -> np.ndarray:
        """Fused backbone features float32 (len(views), n, fields * D) of the dihedral ``views`` (see
        :mod:`bleep_rs.augment`) of patches (n, fields, h, w, 3); precomputed features pass through.
        ``per_field``: for each field of view, the views of ``views`` it goes through the backbone at
        (default: all); its other views are filled with the mean of those (:func:`fill_views`).
        ``precision``: see :func:`bleep_rs.encode.backbone_features`."""
        from .augment import dihedral_input, dihedral_view
        from .encode import backbone_features, input_features, to_inputs

        patches = self.check_patches(patches)
        if not self.spec.takes_images:
            return np.ascontiguousarray(patches, dtype=np.float32)[None]
        n, nf = patches.shape[:2]
        per_field = [tuple(views)] * nf if per_field is None else [tuple(v) for v in per_field]
        if len(per_field) != nf or any(not mine or not set(mine) <= set(views) for mine in per_field):
            raise BleepError(f"per_field must give each of the {nf} fields of view some of the views {tuple(views)}, got {per_field}")
        groups = [(idx, spec, self.stained(_fields(patches, idx).reshape(n * len(idx), *patches.shape[2:]))) for idx, spec in self.field_groups()]
        out = np.empty((len(views), n, self.feature_dim), np.float32)
        several = len(views) > 1
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(map(len, per_field)) * n, desc="backbone (8 views)" if len(views) == 8 else "backbone", unit="patch", leave=False)
        # A chunk of spots at a time, each of its views in turn. Fields resized to run at another size (the
        # wider fields of view) are resized once per chunk, not once per view (the views of the resized
        # input are those of the patches, resized, to float rounding), and only a chunk's is held.
        for start in range(0, n, FEATURE_CHUNK):
            m = min(n, start + FEATURE_CHUNK) - start
            chunk = [flat[start * len(idx) : (start + m) * len(idx)] for idx, _, flat in groups]
            resized = {j: to_inputs(chunk[j], spec) for j, (_, spec, _) in enumerate(groups) if several and chunk[j].shape[1] != spec.input_size}
            f = np.zeros((m, nf, self.spec.feature_dim), np.float32)
            for i, v in enumerate(views):
                for j, (idx, spec, _) in enumerate(groups):
                    wanted = [k for k, field in enumerate(idx) if v in per_field[field]]  # this view's fields of the group
                    if not wanted:
                        continue
                    x = resized[j] if j in resized else chunk[j]
                    if len(wanted) < len(idx):
                        rows = np.add.outer(np.arange(m) * len(idx), wanted).ravel()  # their patches, spot by spot
                        x = x[torch.from_numpy(rows)] if j in resized else x[rows]
                    if j in resized:
                        got = input_features(self.backbone, spec, dihedral_input(x, v), precision=precision)
                    else:
                        got = backbone_features(self.backbone, spec, dihedral_view(x, v), precision=precision)
                    f[:, [idx[k] for k in wanted]] = got.reshape(m, len(wanted), self.spec.feature_dim)
                    if bar is not None:
                        bar.update(m * len(wanted))
                with torch.no_grad():
                    out[i, start : start + m] = self.fuse(torch.from_numpy(f)).numpy()
        if bar is not None:
            bar.close()
        return fill_views(out, views, per_field, self.spec.feature_dim, l2=self.config.feature_norm == "l2")

    @torch.no_grad()
    def embed_features(self, features: np.ndarray) -> np.ndarray:
        """Image embeddings of fused features (..., n, fields * D); with a leading views axis, the mean of
        the views' L2-normalised embeddings."""
        self.eval()
        f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device)
        e = self.retrieval_embedding(self.image_head(f).float())
        if e.dim() == 3:
            e = nn.functional.normalize(e, dim=-1).mean(0)
        return e.cpu().numpy()

    def tta_views(self, n: "int | Sequence[int] | None" = None, *, tta: Optional[bool] = None) -> tuple:
        """Views averaged per patch, one count per field of view: ``n`` (one count of 1, 2, 4 or 8 for every
        field, or two: field 1's and the wider fields'; checked), or by default the model's
        ``input.tta_views`` with test-time augmentation (``tta``, default the model's) and 1 without; 1
        for precomputed features."""
        counts = view_counts(n) if n is not None else None
        if not self.spec.takes_images:
            return (1,)
        if counts is None:
            counts = self.config.input.tta_views if (self.config.input.tta if tta is None else tta) else (1,)
        return tuple(counts[0] if f <= 1.0 else counts[-1] for f in self.config.input.fields_of_view)

    def view_features(self, features: np.ndarray, counts: Sequence[int]) -> np.ndarray:
        """The features :meth:`embed_images` averages for per-field view ``counts`` (:meth:`tta_views`),
        taken from features of all 8 views (8, n, fields * D): those of the views it runs, each field's
        other views filled as :meth:`features` fills them. For benches over cached features."""
        views, per_field = _views_of(counts)
        return fill_views(np.ascontiguousarray(features[list(views)], dtype=np.float32), views, per_field, self.spec.feature_dim,
                          l2=self.config.feature_norm == "l2")

    def embed_images(self, patches: np.ndarray, *, tta: Optional[bool] = None, tta_views: Optional[int] = None, precision: str = "auto",
                     progress: bool = False) -> np.ndarray:
        """Image embeddings float32 (n, d) of uint8 patches (n, fields, h, w, 3) (one field: (n, h, w, 3)
        too), or of precomputed features (n, D) for a ``features:D`` backbone. ``tta`` (default: the
        model's): the mean of the dihedral views' embeddings, as many as the model's ``input.tta_views``;
        ``tta_views`` (one count of 1, 2, 4 or 8, or two: field 1's and the wider fields'; see
        :data:`bleep_rs.augment.TTA_VIEWS`) that many instead, each one backbone pass per field and view
        (a field's views beyond its count take the mean of its own). ``precision``: ``"auto"`` (the fastest inference that keeps the float32 answer) or
        ``"float32"`` (eager torch): see :mod:`bleep_rs.encode`."""
        views, per_field = _views_of(self.tta_views(tta_views, tta=tta))
        if len(self.check_patches(patches)) == 0:  # nothing to encode: the backbone is not run on no input
            return np.zeros((0, self.retrieval_dim), np.float32)
        f = self.features(patches, views=views, per_field=per_field, precision=precision, progress=progress)
        return self.embed_features(f if len(views) > 1 else f[0])

    @torch.no_grad()
    def embed_expression(self, expression, *, batch_size: int = 4096) -> np.ndarray:
        """Expression embeddings float32 (n, d) of an AnnData section (raw counts, put on the panel) or of
        an array already on the panel (normalised log expression, n x n_genes)."""
        self.eval()
        x = self.panel_expression(expression)
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if len(bad):
            names = list(expression.obs_names[bad[:3]]) if hasattr(expression, "obs_names") else list(bad[:3])
            raise BleepError(f"expression row {bad[0]} ({len(bad)} rows in all, e.g. {names}) holds NaN or infinite values: "
                             "embeddings of them would be NaN; remove or fix those spots")
        out = [
            self.retrieval_embedding(self.expression_head(torch.from_numpy(x[s : s + batch_size]).to(self.device)).float()).cpu().numpy()
            for s in range(0, len(x), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.retrieval_dim), np.float32)

    def panel_expression(self, expression) -> np.ndarray:
        """An AnnData section's expression on the panel; an array is checked and passed through."""
        if hasattr(expression, "var_names"):
            return panel_expression(expression, self.config.panel)
        x = np.ascontiguousarray(expression, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.config.panel.genes):
            raise BleepError(f"expression must be (n, {len(self.config.panel.genes)}) on the model's gene panel, got shape {x.shape}")
        return x


def save_model(model: BleepModel, path: "os.PathLike[str] | str", *, history: Optional[list] = None) -> Path:
    """Writes the model directory (``model.safetensors`` + ``config.json``, and the training
    ``history.json`` when given) atomically: into a temporary directory beside it, then renamed over any
    previous one."""
    from safetensors.torch import save_file

    from . import __version__
    from ._atomic import atomic_path

    path = Path(path)
    model.config.package_version = __version__
    with atomic_path(path, suffix="") as tmp:
        tmp.mkdir()
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "bleep-rs.model"})
        (tmp / "config.json").write_text(model.config.to_json())
        if history is not None:
            (tmp / "history.json").write_text(json.dumps(history, indent=1))
    return path


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
    # Models saved before the backbone dropped its unused classifier carry it: not needed, not an error.
    state = {k: v for k, v in state.items() if not k.startswith(UNUSED_KEYS)}
    problem = _weights_problem(state, model.state_dict())
    if problem:
        raise BleepError(f"{weights}: {problem}: the file is damaged or from another model")
    model.load_state_dict(state)
    model.eval()
    return model.to(device or "cpu")


#: Tensors of older model files that this version does not use (EfficientNet's ImageNet classifier).
UNUSED_KEYS = ("backbone.net._fc.",)


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


def build_reference(
    model: BleepModel,
    sections: Iterable,
    *,
    genes: "str | Sequence[str]" = "all",
    min_spots: int = MIN_SPOTS,
    name: Optional[str] = None,
    expression_dtype: str = "float32",
    expression_format: str = "auto",
    progress: bool = False,
):
    """The :class:`~bleep_rs.Reference` of reference sections, in memory: their spots' expression embeddings
    (the model's expression encoder on its panel) and the expression imputation returns (normalised log), on
    ``genes``: ``"all"`` (default: every gene with a non-zero count in at least ``min_spots`` spots of at
    least one section; a section whose file does not list a gene counts as zeros), ``"panel"`` (the
    model's input panel) or a list of gene names. Sparse counts stay sparse; ``expression_format`` says how
    the reference stores them ("auto": sparse where that is smaller). ``sections``: AnnData sections, or any
    iterable that yields them each time it is iterated (e.g. :class:`~bleep_rs.sections.SectionList`,
    which reads one section at a time). For a cohort larger than memory use :func:`write_reference`."""
    import scipy.sparse as sp

    from .reference import Reference

    out_genes, parts = _reference_parts(model, sections, genes, min_spots, expression_format, progress)
    emb, expr, ids, labels = [], [], [], []
    for e, x, i, lab in parts:
        emb.append(e)
        expr.append(x)
        ids += i
        labels += lab
    stacked = sp.vstack([sp.csr_matrix(x) for x in expr], format="csr") if any(sp.issparse(x) for x in expr) else np.concatenate(expr)
    return Reference.build(
        np.concatenate(emb), stacked, out_genes, spot_ids=ids, sections=labels,
        metadata=_reference_metadata(model, genes, min_spots, name), expression_dtype=expression_dtype,
        expression_format=expression_format,
    )


def write_reference(
    model: BleepModel,
    sections: Iterable,
    out: "os.PathLike[str] | str",
    *,
    shard_spots: int,
    genes: "str | Sequence[str]" = "all",
    min_spots: int = MIN_SPOTS,
    name: Optional[str] = None,
    expression_dtype: str = "float32",
    expression_format: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """:func:`build_reference` written section by section into a sharded reference folder ``out`` (shard
    files of at most ``shard_spots`` spots and a ``manifest.json``; open it with ``Reference.load(out)``).
    Peak memory is about one shard and one section, whatever the number of sections: ``sections`` should
    then be a :class:`~bleep_rs.sections.SectionList` (read one at a time, twice when ``genes="all"``)."""
    from .shards import ShardWriter

    out_genes, parts = _reference_parts(model, sections, genes, min_spots, expression_format, progress)
    meta = _reference_metadata(model, genes, min_spots, name)
    with ShardWriter(out, out_genes, shard_spots=shard_spots, metadata=meta, expression_dtype=expression_dtype,
                     expression_format=expression_format, overwrite=overwrite) as writer:
        for e, x, i, lab in parts:
            writer.add(e, x, spot_ids=i, sections=lab)
    return Path(out)


def _reference_parts(model, sections, genes, min_spots, expression_format, progress):
    """The reference's genes, and a generator of each section's (embeddings, expression, spot ids,
    section labels): one section in memory at a time."""
    from tqdm.auto import tqdm

    if expression_format not in ("auto", "dense", "sparse"):
        raise BleepError(f'expression_format must be "auto", "dense" or "sparse", not {expression_format!r}')
    if isinstance(sections, (str, bytes, os.PathLike)) or not isinstance(sections, Iterable):
        raise BleepError("sections must be a list of sections (AnnData) or a SectionList")
    if hasattr(sections, "__len__") and len(sections) == 0:
        raise BleepError("building a reference needs at least one section")
    out_genes = reference_genes(sections, genes, panel=model.config.panel, min_spots=min_spots)

    def parts():
        n = 0
        total = len(sections) if hasattr(sections, "__len__") else None
        for s in tqdm(sections, total=total, desc="reference sections", unit="section", disable=not progress):
            n += 1
            lib = s.uns.get("bleep", {}).get("library_id", "section")
            x = panel_expression(s, out_genes, warn=not isinstance(genes, str), sparse=expression_format != "dense")
            yield (model.embed_expression(model.panel_expression(s)), x, [f"{lib}:{i}" for i in s.obs_names], [lib] * s.n_obs)
        if n == 0:
            raise BleepError("building a reference needs at least one section")

    return out_genes, parts()


def model_id(model) -> str:
    """A fingerprint of a model's weights (sha256 of the expression and image heads), so that a
    reference remembers which model embedded it."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(("expression_head.", "image_head.")):
            h.update(name.encode())
            h.update(t.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _reference_metadata(model, genes, min_spots, name) -> dict:
    from . import __version__

    return {
        "model": name or "",
        "model_id": model_id(model),
        "backbone": model.config.backbone,
        "loss": model.config.loss,
        "panel_size": len(model.config.panel.genes),
        "genes": genes if isinstance(genes, str) else "given",
        "min_spots": int(min_spots),
        "package_version": __version__,
        "normalisation": "per-section median library size, log1p",
    }
