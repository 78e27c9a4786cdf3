"""Training the two encoders: one readable loop (nanoGPT style: a config dataclass, eval under no_grad,
autocast, checkpoints that carry their own state).

    model = bleep_rs.train(["sec1/", "sec2/"], "model_dir")            # the default recipe
    model = bleep_rs.train(sections, "model_dir", bleep_rs.TrainConfig(freeze_backbone=False, epochs=30))

The default recipe (chosen by ``benches/bench_quality.py``, see the README): the image side sees three
fields of view around each spot (the spot patch and crops of 2x and 3x its side), the backbone is frozen
and its features of the eight dihedral views of every patch are computed once (and cached on disk), the
heads train on a random view per spot and step, and inference averages the eight views' embeddings.

One GPU, several (``torchrun --nproc_per_node N -m bleep_rs train ...``: DistributedDataParallel, the loss
on each device's own batch as the paper did, or across all devices with ``gather=True``), or a CPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .._core import BleepError
from ..augment import random_views
from ..device import pick_device
from ..expression import Panel, choose_panel, panel_expression
from ..inputs import InputSpec
from ..model import BleepModel, ModelConfig, save_model
from .config import TrainConfig
from .features import training_features
from .loss import bleep_loss, clip_loss

__all__ = ["TrainingData", "prepare_data", "train", "native_um_per_px"]


@dataclass
class TrainingData:
    """Paired inputs. ``images``: uint8 patches (n, fields, h, w, 3), or float32 backbone features
    (views, n, fields * D) (precomputed or cached); ``expression`` float32 (n, G) on the panel;
    ``sections`` the library id of each spot."""

    images: np.ndarray
    expression: np.ndarray
    sections: np.ndarray
    panel: Panel

    @property
    def are_features(self) -> bool:
        return self.images.dtype != np.uint8


def _as_sections(sections: Sequence) -> list:
    from ..sections import read_section

    if not sections:
        raise BleepError("training needs at least one section")
    return [read_section(s) if isinstance(s, (str, os.PathLike)) else s for s in sections]


def _library(section, i: int) -> str:
    return section.uns.get("bleep", {}).get("library_id", f"section{i}")


def native_um_per_px(sections: Sequence) -> Optional[float]:
    """The training sections' native resolution (the median of their pixel sizes), or None when a
    section does not know it."""
    values = [s.uns.get("bleep", {}).get("um_per_px") for s in sections]
    if not values or any(v is None for v in values):
        return None
    return float(np.median(values))


def resolved_input(config: TrainConfig, sections: Sequence) -> InputSpec:
    """The config's input recipe at its resolution: as given, else the sections' native one (their
    median; None without sections or where one does not know it)."""
    if config.input.um_per_px or not sections:
        return config.input
    return config.input.replace(um_per_px=native_um_per_px(sections))


def prepare_data(
    sections: Sequence,
    config: TrainConfig,
    *,
    panel: Optional[Panel] = None,
    features: Optional[Sequence[np.ndarray]] = None,
    model: Optional[BleepModel] = None,
) -> TrainingData:
    """Inputs and panel expression of every spot: the patches of every field of view at the config's
    resolution, or, given ``model`` with a frozen backbone, their (cached) backbone features; or the given
    per-section ``features`` (n_spots, D) for a ``features:D`` backbone."""
    sections = _as_sections(sections)
    panel = panel or choose_panel(sections, n_top_genes=config.n_top_genes, mode=config.panel_mode, genes=config.genes)
    spec = resolved_input(config, sections)
    inputs, expr, labels = [], [], []
    for i, s in enumerate(sections):
        lib = _library(s, i)
        if s.n_obs == 0:
            raise BleepError(f"{lib}: the section has no spots")
        if features is not None:
            f = np.asarray(features[i], dtype=np.float32)
            if f.ndim != 2 or len(f) != s.n_obs:
                raise BleepError(f"{lib}: features must be (n_spots, D) = ({s.n_obs}, D), got {f.shape}")
            inputs.append(f[None])
        elif model is not None:
            inputs.append(training_features(model, s, config, spec.um_per_px))
        else:
            inputs.append(spec.section_patches(s))
        expr.append(panel_expression(s, panel))
        labels += [lib] * s.n_obs
    shapes = {x.shape[2:] if x.dtype != np.uint8 else x.shape[1:] for x in inputs}
    if len(shapes) > 1:
        raise BleepError(f"the sections give inputs of different shapes {sorted(shapes)}: use one patch size (and feature model) for all")
    axis = 0 if inputs[0].dtype == np.uint8 else 1
    return TrainingData(np.concatenate(inputs, axis=axis), np.concatenate(expr), np.array(labels), panel)


#: Seconds between checkpoints of a training run (see train()).
CHECKPOINT_SECONDS = 30.0


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


# -- the trainer --------------------------------------------------------------------------------------


def _jitter(x: torch.Tensor, gen: torch.Generator, amplitude: float) -> torch.Tensor:
    """Brightness / contrast jitter per sample of a float batch (n, ...)."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    scale = 1 + amplitude * (2 * torch.rand(shape, generator=gen) - 1)
    shift = amplitude * (2 * torch.rand(shape, generator=gen) - 1)
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return (x - mean) * scale.to(x.device) + mean + shift.to(x.device)


def _param_groups(model: BleepModel, cfg: TrainConfig) -> list:
    """AdamW groups: the backbone at ``backbone_lr`` x lr, no weight decay on 1-D parameters (biases,
    norm weights, the temperature)."""
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        backbone = name.startswith("backbone.")
        decay = p.dim() > 1
        key = (backbone, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": cfg.lr * (cfg.backbone_lr if backbone else 1.0), "weight_decay": cfg.weight_decay if decay else 0.0}
        groups[key]["params"].append(p)
    for g in groups.values():
        g["base_lr"] = g["lr"]
    return list(groups.values())


class _Trainer:
    def __init__(self, model: BleepModel, data: TrainingData, config: TrainConfig, device, rank, world):
        self.model, self.data, self.cfg, self.device = model, data, config, device
        self.rank, self.world = rank, world
        self.features = data.are_features
        self.opt = torch.optim.AdamW(_param_groups(model, config))
        self.net = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        self.gen = torch.Generator().manual_seed(config.seed + 1000 * rank)
        self.step = 0

    def inputs(self, idx: np.ndarray, train: bool) -> torch.Tensor:
        if self.features:
            views = self.data.images.shape[0]
            pick = torch.randint(0, views, (len(idx),), generator=self.gen).numpy() if train and views > 1 else np.zeros(len(idx), int)
            return torch.from_numpy(np.ascontiguousarray(self.data.images[pick, idx], dtype=np.float32)).to(self.device)
        x = self.model.prepare_images(self.data.images[idx])
        if train and self.cfg.stain_jitter > 0:  # new stain jitter every step, on the batch's device
            x = self._stain_jitter(x)
        if train and self.cfg.augment:
            x = random_views(x, self.gen)
            if self.cfg.color_jitter > 0:
                x = _jitter(x, self.gen, self.cfg.color_jitter)
        return x

    def _stain_jitter(self, x: torch.Tensor) -> torch.Tensor:
        """HED stain jitter of a normalised batch (n, fields, 3, h, w): back to RGB, jittered (one draw
        per spot, shared by its fields), normalised again."""
        from ..augment import jitter_rgb, stain_draws

        seed = int(torch.randint(0, 2**62, (1,), generator=self.gen))
        scale, shift = stain_draws(len(x), self.cfg.stain_jitter, np.random.default_rng(seed))
        mean = torch.tensor(self.model.spec.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.model.spec.std, device=x.device).view(3, 1, 1)
        return ((jitter_rgb(x * std + mean, scale, shift, channel_dim=2) - mean) / std).contiguous()

    def loss(self, idx: np.ndarray, train: bool, split: bool = False) -> torch.Tensor:
        """The batch's loss; ``split``: ``idx`` is one batch per pair of an ensemble's heads, end to end."""
        x = self.inputs(idx, train)
        e = torch.from_numpy(self.data.expression[idx]).to(self.device)
        amp = self.cfg.amp and self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=amp):
            v, z = self.net(x, e, features=self.features, split=split)
        v, z = v.float(), z.float()
        if train and self.world > 1 and self.cfg.gather:
            v, z = _gather(v), _gather(z)
        if v.dim() == 3:  # a head ensemble (B, heads, d): each pair of heads its own loss, averaged
            return torch.stack([self._pair_loss(v[:, h], z[:, h]) for h in range(v.shape[1])]).mean()
        return self._pair_loss(v, z)

    def _pair_loss(self, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "clip":
            return clip_loss(v, z, self.model.logit_scale)
        return bleep_loss(v, z, self.cfg.temperature)

    def _warmup(self, steps_per_epoch: int) -> None:
        """Linear warm-up of every group's learning rate over ``warmup_epochs`` (fine-tuning only)."""
        if self.features or self.cfg.warmup_epochs <= 0:
            return
        f = min(1.0, (self.step + 1) / max(1.0, self.cfg.warmup_epochs * steps_per_epoch))
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f

    def epoch(self, order: np.ndarray) -> float:
        self.net.train()
        if self.cfg.freeze_backbone:
            self.model.backbone.eval()
        # Every process takes as many spots and batches of the same sizes: collectives must match.
        mine = order[self.rank :: self.world][: len(order) // self.world]
        # A head ensemble's pairs each see the spots in their own order, so their own batches (and views):
        # as diverse as separate runs, in one pass. Head 0 keeps the given order.
        heads = self.model.config.heads
        orders = [mine] + [mine[np.random.default_rng([self.cfg.seed, self.step, h]).permutation(len(mine))] for h in range(1, heads)]
        bs = self.cfg.batch_size
        starts = [s for s in range(0, len(mine), bs) if len(mine[s : s + bs]) >= 2]
        total = 0.0
        bar = None
        if self.cfg.progress and self.rank == 0 and not self.features:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(starts), desc="  batches", unit="batch", leave=False)
        for s in starts:
            self._warmup(len(starts))
            loss = self.loss(np.concatenate([o[s : s + bs] for o in orders]), train=True, split=heads > 1)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
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


def _run_identity(cfg: TrainConfig, panel: Panel) -> dict:
    """What a checkpoint must match to be resumed: every setting that changes the model or its data."""
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("epochs", "patience", "progress", "resume", "overwrite", "device", "cache_dir")}
    return json.loads(json.dumps({"config": keep, "panel": list(panel.genes)}))  # as state.json holds it (tuples as lists)


def _save_checkpoint(path: Path, trainer: _Trainer, state: dict, model_state: Optional[dict] = None) -> None:
    """The run's state (``model_state``: the model's own, by default its current one), optimizer and
    progress, written atomically."""
    from safetensors.torch import save_file

    from .._atomic import atomic_path

    own = _own_state(trainer.model) if model_state is None else model_state
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in own.items()}
    opt = trainer.opt.state_dict()
    for pid, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"opt.{pid}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "param_groups": opt["param_groups"], "step": trainer.step}))


def _own_state(model: BleepModel) -> dict:
    """The part of the model's state a run changes: all of it but a frozen backbone (whose weights are
    the pretrained ones), so that checkpoints and the kept best epoch stay small."""
    frozen = not any(p.requires_grad for p in model.backbone.parameters())
    return {k: v for k, v in model.state_dict().items() if not (frozen and k.startswith("backbone."))}


def _load_own_state(model: BleepModel, state: dict) -> None:
    model.load_state_dict({**model.state_dict(), **state})


def _load_checkpoint(path: Path, trainer: _Trainer, identity: dict, epochs: int) -> Optional[dict]:
    """The saved state of an interrupted run with the same settings, or None when there is none; a
    checkpoint of another run is an error that says how to start over."""
    from safetensors.torch import load_file

    if not path.exists():
        return None
    damaged = f"{path}: the checkpoint is damaged or not of this version ({{}}): pass resume=False to start over (or delete it)"
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except Exception as e:  # missing, truncated, not JSON or safetensors: safetensors raises its own kinds
        raise BleepError(damaged.format(e)) from e
    required = {"epoch": int, "best": (int, float), "stale": int, "history": list, "param_groups": list}
    wrong = [k for k, kind in required.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if wrong:
        raise BleepError(damaged.format(f"state.json lacks {', '.join(wrong)}" if isinstance(state, dict) else "state.json is not an object"))
    if state.get("identity") != identity:
        theirs = state.get("identity")
        older = isinstance(theirs, dict) and isinstance(theirs.get("config"), dict) and "input" not in theirs["config"]
        what = "an older bleep-rs (before the input recipe was one object)" if older else "a run with other settings or another gene panel"
        raise BleepError(f"{path}: the checkpoint is of {what}: pass resume=False to start over")
    if state["epoch"] >= epochs:
        raise BleepError(f"{path}: the checkpoint is past epoch {epochs} (it reached {state['epoch']}): raise epochs= or pass resume=False")
    try:
        _load_own_state(trainer.model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt_state: dict = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, key = k.split(".", 2)
                opt_state.setdefault(int(pid), {})[key] = v.to(trainer.device)
        trainer.opt.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # tensors of another shape, a foreign optimizer state
        raise BleepError(damaged.format(str(e).splitlines()[0] if str(e) else type(e).__name__)) from e
    trainer.step = state.pop("step", 0)
    return state


# -- the loop -----------------------------------------------------------------------------------------


def _check_out(out: Path, cfg: TrainConfig, sections: Sequence) -> None:
    """Refuses to start work whose result could not be written, would replace a model unasked, or would
    replace a section it reads (the one output check, bleep_rs._atomic.check_output)."""
    from .._atomic import check_output

    inputs = [s for s in sections if isinstance(s, (str, os.PathLike))] + [cfg.backbone_weights]
    check_output(out, inputs=inputs, overwrite=cfg.overwrite, option="out_dir")
    if out.exists() and not out.is_dir():
        raise BleepError(f"{out} exists and is not a model directory")


def _one_writer(train_fn):
    """Holds the model directory (bleep_rs._atomic.output_lock) for the whole run on rank 0: a second run
    writing the same model, or resuming its checkpoint, stops at once instead of replacing the first's."""
    import functools

    @functools.wraps(train_fn)
    def run(sections, out_dir, *args, **kwargs):
        import contextlib

        from .._atomic import check_output, output_lock

        first = os.environ.get("RANK", "0") == "0"
        if first:
            check_output(out_dir, overwrite=True, option="out_dir")  # a folder the lock can be made in; the rest once it is held
        with output_lock(out_dir) if first else contextlib.nullcontext():
            return train_fn(sections, out_dir, *args, **kwargs)

    return run


@_one_writer
def train(
    sections: Sequence,
    out_dir: "os.PathLike[str] | str",
    config: Optional[TrainConfig] = None,
    *,
    features: Optional[Sequence[np.ndarray]] = None,
    features_encoder: Optional[str] = None,
    data: Optional[TrainingData] = None,
    feature_pass: Optional[Callable] = None,
) -> BleepModel:
    """Trains BLEEP on ``sections`` (paths or AnnData from :func:`~bleep_rs.read_section`) and writes the
    best model (lowest validation loss) to ``out_dir``. ``features``: per-section precomputed patch
    features for a ``features:D`` backbone (see :func:`bleep_rs.readers.patch_features.features_for_sections`
    for TRIDENT / HEST files), and ``features_encoder`` the extractor's name, recorded in the model so that
    prediction refuses another's features; ``data``: inputs prepared already (see :func:`prepare_data`).
    ``feature_pass(model, sections, config, um_per_px)``: called before the frozen backbone's features
    are read from the feature cache, to fill it elsewhere (e.g. :func:`bleep_rs.cohort.cache_features`
    bound to a Dask client: ``functools.partial(cache_features, client)``). Returns the best model."""
    cfg = config or TrainConfig()
    cfg.validate()  # fields changed after construction
    out = Path(out_dir)
    rank, world, local = _distributed()
    if rank == 0:
        _check_out(out, cfg, sections)
    device = pick_device(cfg.device, local)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    secs = _as_sections(sections) if data is None or not data.are_features else list(sections)
    spec = resolved_input(cfg, secs)
    panel = data.panel if data is not None else choose_panel(secs, n_top_genes=cfg.n_top_genes, mode=cfg.panel_mode, genes=cfg.genes)
    from .. import __version__

    mcfg = ModelConfig(
        panel=panel, backbone=cfg.backbone, embedding_dim=cfg.embedding_dim, heads=cfg.heads, dropout=cfg.dropout,
        temperature=cfg.temperature, loss=cfg.loss, input=spec, k=cfg.k, method=cfg.method,
        training=asdict(cfg), package_version=__version__, features_encoder=features_encoder,
    )
    model = BleepModel(mcfg, backbone_weights=cfg.backbone_weights, random_init=cfg.random_init).to(device)
    frozen = cfg.freeze_backbone or not model.spec.takes_images
    if not frozen and cfg.input.stain != "none":  # fine-tuning reads its patches without BleepModel.features
        raise BleepError("stain= normalises the patches of a frozen backbone: not with freeze_backbone=False")
    if frozen:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    if feature_pass is not None:
        if not (frozen and model.spec.takes_images and features is None and data is None):
            raise BleepError("a feature pass (a cluster's) computes a frozen image backbone's features: "
                             "not with freeze_backbone=False, a features:D backbone or inputs prepared already")
        if world > 1:
            raise BleepError("a cluster's feature pass or torchrun: not both")
        feature_pass(model, secs, cfg, spec.um_per_px)
    if data is None:
        data = prepare_data(secs, cfg, panel=panel, features=features, model=model if frozen and features is None else None)
    if not frozen and data.are_features:
        raise BleepError("fine-tuning the backbone needs patches, not precomputed features")
    trainer = _Trainer(model, data, cfg, device, rank, world)
    train_idx, val_idx = _split(data, cfg, rng)
    if len(train_idx) // world < 2:
        raise BleepError(f"{len(train_idx)} training spots over {world} processes leave no batch of two spots (a batch contrasts "
                         "its spots): add sections, lower val_fraction=, or use fewer processes")
    ckpt = out.with_name(f".{out.name}.checkpoint")
    identity = _run_identity(cfg, panel)
    state = {"epoch": 0, "best": math.inf, "stale": 0, "history": [], "identity": identity}
    if not cfg.resume:
        shutil.rmtree(ckpt, ignore_errors=True)
    elif (loaded := _load_checkpoint(ckpt, trainer, identity, cfg.epochs)) is not None:
        state = loaded
        if rank == 0:
            print(f"resuming from {ckpt} after epoch {state['epoch']}")
    log = rank == 0 and cfg.progress
    if log:
        print(f"training on {device} ({world} process{'es' if world > 1 else ''}): {len(train_idx)} spots, "
              f"{len(val_idx)} for validation, {len(panel.genes)} genes, backbone {cfg.backbone}"
              f"{' (frozen, cached features)' if data.are_features and model.spec.takes_images else ''}, "
              f"fields of view {list(cfg.input.fields_of_view)}, loss {cfg.loss} (tau {cfg.temperature:g})")
    best_state, best_saved, last_save = None, True, time.perf_counter()
    for epoch in range(state["epoch"], cfg.epochs):
        t0 = time.perf_counter()
        order = train_idx[np.random.default_rng(cfg.seed + epoch).permutation(len(train_idx))]
        train_loss = trainer.epoch(order)
        val_loss = trainer.evaluate(val_idx) if len(val_idx) >= 2 else None
        # Without a validation split the epoch is scored by its training loss, measured during the
        # epoch's updates, before its last step: weights that step made non-finite must not count as an
        # improvement. Only what was measured is logged and kept in the history.
        score = train_loss if val_loss is None else val_loss
        improved = bool(np.isfinite(score) and score < state["best"] and _finite_weights(model))
        state.update(epoch=epoch + 1, stale=0 if improved else state["stale"] + 1)
        measured = {"train_loss": train_loss} if val_loss is None else {"train_loss": train_loss, "val_loss": val_loss}
        state["history"].append({"epoch": epoch + 1, **measured, "seconds": time.perf_counter() - t0})
        if improved:
            state["best"] = score
            best_state, best_saved = {k: v.detach().clone() for k, v in _own_state(model).items()}, False
        if log:
            print(f"epoch {epoch + 1:>3}/{cfg.epochs}  train {train_loss:.4f}{'' if val_loss is None else f'  val {val_loss:.4f}'}"
                  f"{'  *best' if improved else ''}  ({time.perf_counter() - t0:.1f} s)")
        # A checkpoint (and the best epoch's, when it changed) at most every CHECKPOINT_SECONDS: epochs on
        # cached features take a fraction of a second, and a kill loses at most that much work.
        if rank == 0 and time.perf_counter() - last_save >= CHECKPOINT_SECONDS:
            if not best_saved:
                _save_checkpoint(ckpt.with_name(ckpt.name + ".best"), trainer, state, best_state)
                best_saved = True
            _save_checkpoint(ckpt, trainer, state)
            last_save = time.perf_counter()
        if state["stale"] >= cfg.patience:
            if log:
                print(f"no better {'training' if len(val_idx) < 2 else 'validation'} loss for {cfg.patience} epochs: stopping")
            break
    if rank == 0:
        _finish(model, best_state, ckpt, out, state)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    from ..model import load_model

    return load_model(out, device=str(device))


def _finite_weights(model: BleepModel) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def _finish(model: BleepModel, best_state: Optional[dict], ckpt: Path, out: Path, state: dict) -> None:
    """Writes the best epoch's model (with its history) and removes the checkpoints; a run in which no
    epoch gave a finite validation loss writes nothing and says why."""
    best_ckpt = ckpt.with_name(ckpt.name + ".best")
    if best_state is None and (best_ckpt / "state.safetensors").exists():
        from safetensors.torch import load_file

        best_state = {k[6:]: v for k, v in load_file(str(best_ckpt / "state.safetensors")).items() if k.startswith("model.")}
    if best_state is None:
        losses = [h.get("val_loss", h["train_loss"]) for h in state["history"]]
        shutil.rmtree(ckpt, ignore_errors=True)
        raise BleepError(
            f"training gave no model: {len(losses)} epochs ran and none ended with a finite loss and finite weights (losses: {losses[-3:] or 'none'}); "
            "check the inputs for NaN, lower lr=, or raise epochs="
        )
    _load_own_state(model, best_state)
    save_model(model, out, history=state["history"])
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(best_ckpt, ignore_errors=True)

