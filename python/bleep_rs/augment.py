"""The eight dihedral views of a square patch (flips and 90-degree rotations): label-preserving for
histology. Training draws one view per spot and step; inference can average the eight views' embeddings
(test-time augmentation). One definition for NumPy patches and torch batches, so that cached features and
live augmentation mean the same views.

View ``v`` (0..7): a horizontal flip when ``v >= 4``, then ``v % 4`` quarter turns counter-clockwise.
"""

from __future__ import annotations

import numpy as np

__all__ = ["N_VIEWS", "TTA_VIEWS", "dihedral_view", "dihedral_input", "random_views", "tta_views"]

N_VIEWS = 8
#: The views averaged at prediction for 1, 2, 4 or 8 views a tile (each a backbone pass per field of view):
#: the identity; and its mirror; the two mirrors and the half turn; all eight. benches/bench_cost.py
#: measures what each costs and gives.
TTA_VIEWS = {1: (0,), 2: (0, 4), 4: (0, 2, 4, 6), 8: tuple(range(N_VIEWS))}


def tta_views(n) -> tuple:
    """The views of :data:`TTA_VIEWS` for ``n`` views a tile; any other ``n`` is an error naming it."""
    from ._core import BleepError

    if isinstance(n, bool) or n not in TTA_VIEWS:
        raise BleepError(f"tta_views must be one of {sorted(TTA_VIEWS)} (views averaged per tile), not {n!r}")
    return TTA_VIEWS[n]


def dihedral_view(patches: np.ndarray, view: int) -> np.ndarray:
    """View ``view`` of uint8 patches (..., h, w, 3), h == w (a C-contiguous copy)."""
    if not 0 <= view < N_VIEWS:
        raise ValueError(f"view must be 0..7, not {view}")
    p = patches[..., ::-1, :] if view >= 4 else patches
    return np.ascontiguousarray(np.rot90(p, view % 4, axes=(-3, -2)))


def dihedral_input(x, view: int):
    """View ``view`` of the backbone's input, a torch tensor (..., 3, h, w), h == w: the same view as
    :func:`dihedral_view` of the patches it was made from (the channel axis first here)."""
    import torch

    if not 0 <= view < N_VIEWS:
        raise ValueError(f"view must be 0..7, not {view}")
    x = x.flip(-1) if view >= 4 else x
    return torch.rot90(x, view % 4, dims=(-2, -1)).contiguous()


def random_views(x, generator):
    """A random dihedral view per sample of a torch batch (n, ..., h, w) with h == w (the same view for
    every field of view and channel of a sample)."""
    import torch

    n = x.shape[0]
    shape = (n,) + (1,) * (x.dim() - 1)
    pick = lambda: (torch.rand(n, generator=generator) < 0.5).to(x.device).view(shape)  # noqa: E731
    x = torch.where(pick(), x.flip(-1), x)
    x = torch.where(pick(), x.flip(-2), x)
    return torch.where(pick(), x.transpose(-1, -2), x)
