"""Training the two encoders: one readable loop (nanoGPT style: a config dataclass, eval under no_grad,
autocast, checkpoints that carry their own state).

    model = bleep_rs.train(["sec1/", "sec2/"], "model_dir", bleep_rs.TrainConfig(epochs=30))

One GPU, several (``torchrun --nproc_per_node N -m bleep_rs train ...``: DistributedDataParallel, the loss
on each device's own batch as the paper did, or across all devices with ``gather=True``), or a CPU.
With ``freeze_backbone=True`` the backbone's features are computed once per patch and only the heads
train: fast on a CPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from ._core import BleepError
from .expression import Panel, choose_panel, panel_expression
from .loss import LOSSES, bleep_loss, clip_loss
from .model import BleepModel, ModelConfig, save_model

__all__ = ["TrainConfig", "TrainingData", "prepare_data", "train", "pick_device"]


@dataclass
class TrainConfig:
    """Training arguments (all saved in the model's config.json)."""

    epochs: int = 30
    batch_size: int = 128  # the contrastive batch, per device
    lr: float = 1e-3
    weight_decay: float = 1e-3
    seed: int = 0
    device: str = "auto"  # auto: CUDA, then MPS, then CPU
    amp: bool = True  # bfloat16 autocast on GPU
    augment: bool = True  # flips and 90-degree rotations, training only
    color_jitter: float = 0.0  # brightness / contrast / saturation jitter amplitude, training only
    val_fraction: float = 0.2  # random held-out spots of the training sections ...
    val_sections: List[str] = field(default_factory=list)  # ... or these sections (library ids)
    patience: int = 10  # epochs without a better validation loss before stopping
    freeze_backbone: bool = False
    loss: str = "bleep"  # or "clip"
    gather: bool = False  # several devices: contrast against every device's batch
    backbone: str = "efficientnet-lite0"
    backbone_weights: Optional[str] = None
    embedding_dim: int = 256
    dropout: float = 0.1
    temperature: float = 1.0
    patch_size: int = 224
    um_per_px: Optional[float] = None  # None: each section's native resolution
    n_top_genes: int = 1000
    panel_mode: str = "union"
    genes: Optional[List[str]] = None
    progress: bool = True
    resume: bool = True  # continue from out_dir's checkpoint when one exists


@dataclass
class TrainingData:
    """Paired inputs: ``images`` uint8 (n, h, w, 3) patches or float32 (n, D) features, ``expression``
    float32 (n, G) on the panel, ``sections`` the library id of each spot."""

    images: np.ndarray
    expression: np.ndarray
    sections: np.ndarray
    panel: Panel


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """CUDA, then MPS, then CPU for "auto"; otherwise the named device (an error if it is not there)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BleepError(f"device {name!r} was asked for but torch sees no CUDA device: use --device cpu or auto")
    return dev


def _as_sections(sections: Sequence) -> list:
    from .sections import read_section

    if not sections:
        raise BleepError("training needs at least one section")
    return [read_section(s) if isinstance(s, (str, os.PathLike)) else s for s in sections]


def prepare_data(
    sections: Sequence,
    config: TrainConfig,
    *,
    panel: Optional[Panel] = None,
    features: Optional[Sequence[np.ndarray]] = None,
) -> TrainingData:
    """Patches (or the given per-section features) and panel expression of every spot."""
    from .sections import section_patches

    sections = _as_sections(sections)
    panel = panel or choose_panel(sections, n_top_genes=config.n_top_genes, mode=config.panel_mode, genes=config.genes)
    images, expr, labels = [], [], []
    for i, s in enumerate(sections):
        lib = s.uns.get("bleep", {}).get("library_id", f"section{i}")
        if s.n_obs == 0:
            raise BleepError(f"{lib}: the section has no spots")
        if features is not None:
            f = np.asarray(features[i], dtype=np.float32)
            if f.ndim != 2 or len(f) != s.n_obs:
                raise BleepError(f"{lib}: features must be (n_spots, D) = ({s.n_obs}, D), got {f.shape}")
            images.append(f)
        else:
            images.append(section_patches(s, config.patch_size, config.um_per_px))
        expr.append(panel_expression(s, panel))
        labels += [lib] * s.n_obs
    shapes = {im.shape[1:] for im in images}
    if len(shapes) > 1:
        raise BleepError(f"the sections give inputs of different shapes {sorted(shapes)}: use one patch size (and feature model) for all")
    return TrainingData(np.concatenate(images), np.concatenate(expr), np.array(labels), panel)


# -- distributed --------------------------------------------------------------------------------------


def _distributed() -> tuple:
    """(rank, world size, local rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _gather(t: torch.Tensor) -> torch.Tensor:
    """All devices' embeddings, concatenated, gradients flowing back to each device's own."""
    import torch.distributed.nn.functional as dnn

    return torch.cat(dnn.all_gather(t), dim=0)


# -- batches ------------------------------------------------------------------------------------------


def _augment(x: torch.Tensor, gen: torch.Generator, jitter: float) -> torch.Tensor:
    """Random flips and 90-degree rotations per sample (the 8 symmetries of the square), optional
    brightness / contrast jitter, on a float (n, 3, h, w) batch."""
    n = x.shape[0]
    pick = lambda: torch.rand(n, generator=gen).to(x.device)[:, None, None, None] < 0.5  # noqa: E731
    x = torch.where(pick(), x.flip(-1), x)
    x = torch.where(pick(), x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        x = torch.where(pick(), x.transpose(-1, -2), x)
    if jitter > 0:
        scale = 1 + jitter * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
        shift = jitter * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * scale.to(x.device) + mean + shift.to(x.device)
    return x


class _Trainer:
    def __init__(self, model: BleepModel, data: TrainingData, config: TrainConfig, device, rank, world):
        self.model, self.data, self.cfg, self.device = model, data, config, device
        self.rank, self.world = rank, world
        self.features = not model.spec.takes_images or config.freeze_backbone
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.net = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        self.gen = torch.Generator().manual_seed(config.seed + 1000 * rank)

    def inputs(self, idx: np.ndarray, train: bool) -> torch.Tensor:
        block = self.data.images[idx]
        if self.features:
            return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(self.device)
        x = self.model.prepare_images(block)
        return _augment(x, self.gen, self.cfg.color_jitter) if train and self.cfg.augment else x

    def loss(self, idx: np.ndarray, train: bool) -> torch.Tensor:
        x = self.inputs(idx, train)
        e = torch.from_numpy(self.data.expression[idx]).to(self.device)
        amp = self.cfg.amp and self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=amp):
            v, z = self.net(x, e, features=self.features)
        v, z = v.float(), z.float()
        if train and self.world > 1 and self.cfg.gather:
            v, z = _gather(v), _gather(z)
        if self.cfg.loss == "clip":
            return clip_loss(v, z, self.model.logit_scale)
        return bleep_loss(v, z, self.cfg.temperature)

    def epoch(self, order: np.ndarray) -> float:
        self.net.train()
        if self.features:
            self.model.backbone.eval()
        # Every process takes as many spots and batches of the same sizes: collectives must match.
        mine = order[self.rank :: self.world][: len(order) // self.world]
        bs = self.cfg.batch_size
        starts = [s for s in range(0, len(mine), bs) if len(mine[s : s + bs]) >= 2]
        total = 0.0
        bar = None
        if self.cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(starts), desc="  batches", unit="batch", leave=False)
        for s in starts:
            loss = self.loss(mine[s : s + bs], train=True)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += float(loss.detach())
            if bar is not None:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                bar.update()
        if bar is not None:
            bar.close()
        return total / max(1, len(starts))

    @torch.no_grad()
    def evaluate(self, idx: np.ndarray) -> float:
        self.net.eval()
        bs = self.cfg.batch_size
        losses = [float(self.loss(idx[s : s + bs], train=False)) for s in range(0, len(idx), bs) if len(idx[s : s + bs]) >= 2]
        return float(np.mean(losses)) if losses else float("nan")


def _split(data: TrainingData, cfg: TrainConfig, rng: np.random.Generator):
    n = len(data.expression)
    if cfg.val_sections:
        unknown = set(cfg.val_sections) - set(data.sections)
        if unknown:
            raise BleepError(f"validation sections {sorted(unknown)} are not among the training sections {sorted(set(data.sections))}")
        val = np.flatnonzero(np.isin(data.sections, cfg.val_sections))
    else:
        val = np.sort(rng.permutation(n)[: int(round(cfg.val_fraction * n))])
    train = np.setdiff1d(np.arange(n), val)
    if len(train) < 2:
        raise BleepError(f"{len(train)} training spots: at least two are needed (lower val_fraction or add sections)")
    return train, val


# -- checkpoints (safetensors + JSON, never pickle) ---------------------------------------------------


def _save_checkpoint(path: Path, trainer: _Trainer, state: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in trainer.model.state_dict().items()}
    opt = trainer.opt.state_dict()
    for pid, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"opt.{pid}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "param_groups": opt["param_groups"]}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _load_checkpoint(path: Path, trainer: _Trainer) -> Optional[dict]:
    from safetensors.torch import load_file

    if not (path / "state.json").exists():
        return None
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    trainer.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[key] = v.to(trainer.device)
    trainer.opt.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    return state


# -- the loop -----------------------------------------------------------------------------------------


def train(
    sections: Sequence,
    out_dir: "os.PathLike[str] | str",
    config: Optional[TrainConfig] = None,
    *,
    features: Optional[Sequence[np.ndarray]] = None,
    data: Optional[TrainingData] = None,
) -> BleepModel:
    """Trains BLEEP on ``sections`` (paths or AnnData from :func:`~bleep_rs.read_section`) and writes the
    best model (lowest validation loss) to ``out_dir``. ``features``: per-section precomputed patch
    features for a ``features:D`` backbone. Returns the best model."""
    cfg = config or TrainConfig()
    if cfg.loss not in LOSSES:
        raise BleepError(f"loss must be one of {LOSSES}, not {cfg.loss!r}")
    rank, world, local = _distributed()
    device = pick_device(cfg.device, local)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data = data or prepare_data(sections, cfg, features=features)
    from . import __version__

    mcfg = ModelConfig(
        panel=data.panel, backbone=cfg.backbone, embedding_dim=cfg.embedding_dim, dropout=cfg.dropout,
        temperature=cfg.temperature, loss=cfg.loss, patch_size=cfg.patch_size, um_per_px=cfg.um_per_px,
        training=asdict(cfg), package_version=__version__,
    )
    model = BleepModel(mcfg, backbone_weights=cfg.backbone_weights).to(device)
    spec = model.spec
    if cfg.freeze_backbone and spec.takes_images:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        data = _cache_features(model, data, cfg)
    trainer = _Trainer(model, data, cfg, device, rank, world)
    train_idx, val_idx = _split(data, cfg, rng)
    out = Path(out_dir)
    ckpt = out.with_name(f".{out.name}.checkpoint")
    state = {"epoch": 0, "best": math.inf, "stale": 0, "history": []}
    if cfg.resume and (loaded := _load_checkpoint(ckpt, trainer)) is not None:
        state = loaded
        if rank == 0:
            print(f"resuming from {ckpt} after epoch {state['epoch']}")
    log = rank == 0 and cfg.progress
    if log:
        print(f"training on {device} ({world} process{'es' if world > 1 else ''}): {len(train_idx)} spots, "
              f"{len(val_idx)} for validation, {len(data.panel.genes)} genes, backbone {cfg.backbone}"
              f"{' (frozen, cached features)' if trainer.features and spec.takes_images else ''}, loss {cfg.loss}")
    for epoch in range(state["epoch"], cfg.epochs):
        t0 = time.perf_counter()
        order = train_idx[np.random.default_rng(cfg.seed + epoch).permutation(len(train_idx))]
        train_loss = trainer.epoch(order)
        val_loss = trainer.evaluate(val_idx) if len(val_idx) >= 2 else train_loss
        improved = val_loss < state["best"]
        state.update(epoch=epoch + 1, stale=0 if improved else state["stale"] + 1)
        state["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "seconds": time.perf_counter() - t0})
        if improved:
            state["best"] = val_loss
            if rank == 0:
                save_model(model, out)
        if log:
            print(f"epoch {epoch + 1:>3}/{cfg.epochs}  train {train_loss:.4f}  val {val_loss:.4f}"
                  f"{'  *best' if improved else ''}  ({time.perf_counter() - t0:.1f} s)")
        if rank == 0:
            _save_checkpoint(ckpt, trainer, state)
        if state["stale"] >= cfg.patience:
            if log:
                print(f"no better validation loss for {cfg.patience} epochs: stopping")
            break
    if rank == 0:
        (out / "history.json").write_text(json.dumps(state["history"], indent=1))
        shutil.rmtree(ckpt, ignore_errors=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    from .model import load_model

    return load_model(out, device=str(device))


@torch.no_grad()
def _cache_features(model: BleepModel, data: TrainingData, cfg: TrainConfig) -> TrainingData:
    """The frozen backbone's features of every patch, computed once (in eval mode, no augmentation)."""
    model.backbone.eval()
    out = []
    steps = range(0, len(data.images), 64)
    if cfg.progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="backbone features", unit="batch", leave=False)
    for s in steps:
        out.append(model.image_features(model.prepare_images(data.images[s : s + 64])).float().cpu().numpy())
    return TrainingData(np.concatenate(out), data.expression, data.sections, data.panel)

