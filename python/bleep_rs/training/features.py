"""The backbone-feature cache of training with a frozen backbone: each section's features of every view,
computed once and kept on disk (``KEY-SHA.npy``: the key says what they depend on, the digest what they
hold), shared by ``train``, ``reference`` and the cluster's backbone pass."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .._core import BleepError
from ..augment import N_VIEWS
from ..model import BleepModel
from .config import TrainConfig

__all__ = ["FEATURE_CACHE_VERSION", "cache_entries", "feature_cache_key", "section_features", "training_features", "training_jitters", "feature_keys"]


#: Bump when the way features are computed changes (the stain jitter's formula included), so that no stale
#: cache entry is reused.
FEATURE_CACHE_VERSION = 2


def _cache_dir(config: TrainConfig) -> Optional[Path]:
    """The feature cache's folder, or None (no caching: asked for, or, with a warning, not a writable folder)."""
    from ..encode import cache_dir, usable_cache

    if config.cache_dir is not None and str(config.cache_dir).lower() == "none":
        return None
    return usable_cache(Path(config.cache_dir or cache_dir()) / "features", "backbone features")


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:32]


def cache_entries(folder: Path, key: str) -> list:
    """The cache entries of ``key`` (files ``KEY-SHA.npy``: the digest of their contents in their name)."""
    return sorted(folder.glob(f"{key}-*.npy"))


def _cached(folder: Path, key: str, shape: tuple) -> Optional[np.ndarray]:
    """The cache entry ``KEY-SHA.npy`` whose contents have the digest its name records and the expected
    shape; an entry that fails either (damaged, or replaced by other features) is a miss, with a warning."""
    import warnings

    for path in cache_entries(folder, key):
        try:
            cached = np.load(path, allow_pickle=False)
            ok = cached.shape == shape and cached.dtype == np.float32 and _digest(cached) == path.stem.split("-", 1)[1]
        except (OSError, ValueError, IndexError):
            ok = False
        if ok:
            return cached
        warnings.warn(f"{path}: the cached features do not match their checksum or shape (damaged or replaced): computing them again",
                      stacklevel=3)
    return None


def feature_cache_key(model: BleepModel, section, config: TrainConfig, um_per_px: Optional[float], views: int, stain_jitter: float = 0.0) -> str:
    """What the features of a section depend on: the backbone (name, a hash of its weights, input size
    and constants), the fields of view, patch size and resolution, the views, the stain jitter of the
    patches (training's augmented copy), the image's contents (a digest: a copy of the data elsewhere, or
    provisioned anew, finds the same entry) and the spot positions."""
    return _digest_of(_cache_description(model, section, config, um_per_px, views, stain_jitter))


def jitter_seed(model: BleepModel, section, config: TrainConfig, um_per_px: Optional[float], views: int, stain_jitter: float) -> int:
    """The seed of a section's stain-jittered copy: its cache description with the image's size only, so
    that a copy of the same data elsewhere (another checkout, a data folder copied anew) draws the same
    jitter, and trains the same heads. (Seeded by a key that held the image's path and modification time,
    the draw changed with every copy of the data, and moved the quality bench's default by up to 0.008
    HEG-50; the size alone keeps the draws made since.)"""
    return _seed_of(_cache_description(model, section, config, um_per_px, views, stain_jitter))


def _seed_of(desc: dict) -> int:
    """:func:`jitter_seed` of a cache description: its digest with the image's size only."""
    return int(_digest_of({**desc, "image": desc["image"][1]})[:16], 16)


def _digest_of(desc: dict) -> str:
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """A digest of a file's contents, read once per path, size and modification time in a process (a
    gigapixel slide takes seconds to read; its features, minutes to hours)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _cache_description(model: BleepModel, section, config: TrainConfig, um_per_px: Optional[float], views: int, stain_jitter: float) -> dict:
    from ..encode import weights_digest

    info = section.uns.get("bleep", {})
    image = info.get("image_path") or ""
    stat = os.stat(image) if image and os.path.exists(image) else None
    desc = {
        "version": FEATURE_CACHE_VERSION, "backbone": model.config.backbone, "weights": weights_digest(model.backbone),
        "input": [model.config.input_size, list(model.config.mean), list(model.config.std)],
        "norm": model.config.feature_norm, "fields": list(model.config.input.fields_of_view),
        **({"stain": model.config.input.stain} if model.config.input.stain != "none" else {}),  # the keys of unstained entries as before
        **({"wide_px": model.wide_fields_px} if model.wide_fields_px else {}),  # and those of every field at one size
        # "draw" 2: a jittered copy drawn by jitter_seed (1, the entries before: by the key itself).
        **({"stain_jitter": stain_jitter, "draw": 2} if stain_jitter else {}),
        "patch": config.input.patch_size, "um_per_px": um_per_px, "views": views,
        "image": [_file_digest(str(Path(image).resolve()), stat.st_size, stat.st_mtime_ns) if stat else "", stat.st_size if stat else 0],
        "spots": hashlib.sha256(np.ascontiguousarray(section.obsm["spatial"], dtype=np.float64).tobytes()).hexdigest(),
    }
    return desc


def _views(config: TrainConfig) -> int:
    return N_VIEWS if config.augment else 1


def training_jitters(config: TrainConfig) -> list:
    """The stain jitter of each cache entry training reads of a section: none (the plain features), then
    ``config.stain_jitter``'s copy when it is set."""
    return [0.0] + ([config.stain_jitter] if config.stain_jitter else [])


def feature_keys(model: BleepModel, section, config: TrainConfig, um_per_px: Optional[float]) -> list:
    """The cache keys of what training reads of a section (:func:`training_features`)."""
    return [feature_cache_key(model, section, config, um_per_px, _views(config), j) for j in training_jitters(config)]


def training_features(model: BleepModel, section, config: TrainConfig, um_per_px: Optional[float]) -> np.ndarray:
    """What training with a frozen backbone reads of a section: its features (views, n, fields * D), and
    with ``config.stain_jitter``, those of a stain-jittered copy of its patches after them (2 x views
    in all: training draws one of them per spot and step)."""
    parts = [section_features(model, section, config, um_per_px, stain_jitter=j) for j in training_jitters(config)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def section_features(model: BleepModel, section, config: TrainConfig, um_per_px: Optional[float], *, stain_jitter: float = 0.0) -> np.ndarray:
    """The frozen backbone's fused features (views, n, fields * D) of a section's spots, from the disk
    cache when an entry with the same key exists. ``stain_jitter``: of the patches HED-jittered with
    this amplitude (:func:`bleep_rs.augment.stain_jitter`; one draw per spot, the same for every view,
    seeded by :func:`jitter_seed`, so that the copy is the same wherever the data lie)."""
    views = _views(config)
    folder = _cache_dir(config)
    desc = _cache_description(model, section, config, um_per_px, views, stain_jitter)  # once: it hashes the backbone's weights
    key = _digest_of(desc)
    if folder is not None and (cached := _cached(folder, key, (views, section.n_obs, model.feature_dim))) is not None:
        return cached
    patches = config.input.replace(um_per_px=um_per_px).section_patches(section)
    if stain_jitter:
        from ..augment import stain_jitter as jitter

        patches = jitter(patches, stain_jitter, np.random.default_rng(_seed_of(desc)))
    feats = np.ascontiguousarray(model.features(patches, views=tuple(range(views)), progress=config.progress), dtype=np.float32)
    if folder is not None:
        import warnings

        from .._atomic import atomic_path

        # The entry's name carries the digest of its contents: a replaced or damaged entry is a miss.
        try:
            for old in cache_entries(folder, key):
                old.unlink()
            with atomic_path(folder / f"{key}-{_digest(feats)}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, feats, allow_pickle=False)
        except (OSError, BleepError) as e:
            warnings.warn(f"cannot cache the backbone features in {folder} ({e}): they are computed again next time", stacklevel=2)
    return feats
