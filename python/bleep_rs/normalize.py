"""Colour normalisation of patches, in Rust: Macenko and Reinhard stain normalisation (``fit(target)`` then
``transform(patches)``, as torchstain and TIAToolbox), and the per-channel mean/std conversion to the
float32 (n, 3, h, w) tensors an encoder takes.

Numerically these follow torchstain's torch backend (float32, its percentile rule, its LAB constants);
``bleep_rs._oracle`` holds plain NumPy transcriptions that the tests compare against.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from . import _core
from ._core import BleepError

__all__ = ["MacenkoNormalizer", "ReinhardNormalizer", "to_tensor", "IMAGENET_MEAN", "IMAGENET_STD", "STAINS"]

#: What a model's ``stain`` may be: patches as they are, or Macenko-normalised to torchstain's reference stains.
STAINS = ("none", "macenko")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _rgb(images: np.ndarray, what: str, batch: bool) -> np.ndarray:
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise BleepError(f"{what} must be uint8 RGB, not {a.dtype} (convert with .astype(np.uint8) if the values are 0-255)")
    if batch and a.ndim == 3:
        a = a[None]
    want = 4 if batch else a.ndim
    if a.ndim != want or a.shape[-1] != 3:
        raise BleepError(f"{what} must have shape {'(n, h, w, 3)' if batch else '(..., 3)'}, got {a.shape}")
    return np.ascontiguousarray(a)


class MacenkoNormalizer:
    """Macenko stain normalisation (Macenko et al., ISBI 2009) as in torchstain.

    ``fit(target)`` estimates the target's H&E stain vectors and 99th-percentile concentrations;
    ``transform(patches)`` estimates each patch's own, unmixes it and remixes it with the target's.
    Before ``fit`` the target is torchstain's reference. A patch with fewer than 1 % stained pixels
    (optical density below ``beta`` in some channel: background, glass) has no stain basis; it is
    returned unchanged and flagged in :attr:`last_skipped`.
    """

    def __init__(self, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15):
        self.io, self.alpha, self.beta = float(io), float(alpha), float(beta)
        if not (np.isfinite(self.io) and self.io > 0):
            raise BleepError(f"io must be a positive intensity (torchstain uses 240), not {io!r}")
        if not 0 <= self.alpha <= 100:
            raise BleepError(f"alpha is a percentile and must be between 0 and 100 (torchstain uses 1), not {alpha!r}")
        if not np.isfinite(self.beta):
            raise BleepError(f"beta must be a finite optical density (torchstain uses 0.15), not {beta!r}")
        self.stain_matrix = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]], dtype=np.float32)
        self.max_concentrations = np.array([1.9705, 1.0308], dtype=np.float32)
        self.last_skipped = np.zeros(0, dtype=bool)

    def fit(self, target: np.ndarray) -> "MacenkoNormalizer":
        """Fits to a target image (h, w, 3) or patch set (n, h, w, 3), its pixels pooled."""
        he, max_c = _core.macenko_fit(_rgb(target, "the target", False), self.io, self.alpha, self.beta)
        self.stain_matrix, self.max_concentrations = he, np.asarray(max_c, dtype=np.float32)
        return self

    def transform(self, patches: np.ndarray, *, threads: Optional[int] = None) -> np.ndarray:
        """Normalised copies of ``patches`` (n, h, w, 3) or one patch (h, w, 3), uint8."""
        single = np.asarray(patches).ndim == 3
        rgb = _rgb(patches, "patches", True)
        out = np.empty_like(rgb)
        done = _core.macenko_transform(
            rgb,
            np.ascontiguousarray(self.stain_matrix, dtype=np.float32),
            [float(v) for v in self.max_concentrations],
            self.io,
            self.alpha,
            self.beta,
            out,
            threads,
        )
        self.last_skipped = ~np.asarray(done, dtype=bool)
        return out[0] if single else out


class ReinhardNormalizer:
    """Reinhard colour transfer (Reinhard et al. 2001) as in torchstain: each LAB channel of a patch is
    standardised and given the target's mean and standard deviation. A channel with no spread (a
    uniform patch) is set to the target's mean."""

    def __init__(self):
        self.target_stats: Optional[np.ndarray] = None

    def fit(self, target: np.ndarray) -> "ReinhardNormalizer":
        """Fits to a target image (h, w, 3) or patch set (n, h, w, 3), its pixels pooled."""
        self.target_stats = _core.reinhard_fit(_rgb(target, "the target", False))
        return self

    def transform(self, patches: np.ndarray, *, threads: Optional[int] = None) -> np.ndarray:
        """Normalised copies of ``patches`` (n, h, w, 3) or one patch (h, w, 3), uint8."""
        if self.target_stats is None:
            raise BleepError("ReinhardNormalizer has no target: call fit(target_image) first")
        single = np.asarray(patches).ndim == 3
        rgb = _rgb(patches, "patches", True)
        # Allocated by NumPy, which asks for huge pages: fewer page faults than fresh 4 KiB pages.
        out = np.empty_like(rgb)
        _core.reinhard_transform(rgb, self.target_stats, out, threads)
        return out[0] if single else out


def _aligned_empty(shape) -> np.ndarray:
    """An uninitialised float32 array on a 64-byte boundary (the Rust kernel then streams its stores)."""
    size = int(np.prod(shape))
    raw = np.empty(size + 16, dtype=np.float32)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start : start + size].reshape(shape)


def to_tensor(
    patches: np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    out: Optional[np.ndarray] = None,
    threads: Optional[int] = None,
) -> np.ndarray:
    """uint8 patches (n, h, w, 3) to float32 (n, 3, h, w): ``(v / 255 - mean[c]) / std[c]``. Pass the
    backbone's own constants (the model carries them). ``out``: a float32 (n, 3, h, w) buffer to fill
    (reused across batches, it saves the page faults of fresh memory)."""
    mean3, std3 = [float(v) for v in mean], [float(v) for v in std]
    if len(mean3) != 3 or len(std3) != 3:
        raise BleepError("mean and std need one value per RGB channel")
    rgb = _rgb(patches, "patches", True)
    n, h, w, _ = rgb.shape
    if out is None:
        out = _aligned_empty((n, 3, h, w))
    elif not isinstance(out, np.ndarray) or out.dtype != np.float32:
        raise BleepError(f"out must be a float32 NumPy array, not {getattr(out, 'dtype', type(out).__name__)}")
    # A read-only or borrowed `out` is refused by the binding, with a BleepError.
    _core.to_tensor_into(rgb, mean3, std3, out, threads)
    return out
