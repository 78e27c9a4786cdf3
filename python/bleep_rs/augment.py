"""The eight dihedral views of a square patch (flips and 90-degree rotations): label-preserving for
histology. Training draws one view per spot and step; inference can average the eight views' embeddings
(test-time augmentation). One definition for NumPy patches and torch batches, so that cached features and
live augmentation mean the same views.

View ``v`` (0..7): a horizontal flip when ``v >= 4``, then ``v % 4`` quarter turns counter-clockwise.
"""

from __future__ import annotations

import numpy as np

__all__ = ["N_VIEWS", "TTA_VIEWS", "dihedral_view", "dihedral_input", "random_views", "tta_views", "view_counts", "stain_jitter"]

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


def counts_problem(counts) -> "str | None":
    """What is wrong with a ``tta_views`` list of counts as a config field (their values are checked as
    choices): one count, or two."""
    return None if 1 <= len(counts) <= 2 else f"must be one count or two (field 1's, the wider fields'), got {list(counts)}"


def as_counts(value):
    """A ``tta_views`` value given as one count (an int) as a tuple of it; anything else as it is (the
    configs and :func:`view_counts` check it)."""
    return (value,) if isinstance(value, int) and not isinstance(value, bool) else value


def view_counts(value) -> tuple:
    """Views averaged per tile as given (``tta_views``): one count for every field of view, or two: field
    1's and the wider fields' (each 1, 2, 4 or 8), as a tuple; anything else is an error naming it. The
    views of a smaller count are among a larger one's, so a tile's fields share their first views."""
    from ._core import BleepError

    counts = as_counts(value)
    if not isinstance(counts, (tuple, list)) or counts_problem(counts) or any(isinstance(c, bool) or c not in TTA_VIEWS for c in counts):
        raise BleepError(f"tta_views must be one count of {sorted(TTA_VIEWS)} for every field of view, or two (field 1's and the "
                         f"wider fields'), not {value!r}")
    return tuple(int(c) for c in counts)


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


#: Colour deconvolution into haematoxylin, eosin and DAB optical densities (Ruifrok and Johnston 2001, the
#: matrix of scikit-image's ``rgb2hed``): rows are the stains' RGB optical-density vectors.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
#: The shift's amplitude as a fraction of the scale's, in optical density (a stain's density is 0.1-1).
SHIFT_PER_SCALE = 0.25


def stain_draws(n: int, amplitude: float, rng: np.random.Generator) -> tuple:
    """The random part of :func:`stain_jitter` for ``n`` patches: per stain, a scale from [1 - a, 1 + a],
    then a shift from [-a/4, a/4] (optical density), each float64 (n, 3)."""
    scale = rng.uniform(1 - amplitude, 1 + amplitude, (n, 3))
    return scale, rng.uniform(-amplitude, amplitude, (n, 3)) * SHIFT_PER_SCALE


def jitter_rgb(x, scale, shift, channel_dim: int):
    """HED stain jitter of a float torch tensor of RGB values in [0, 1], (n, ...) with the 3 channels at
    ``channel_dim``: each sample's optical density taken into stains, scaled and shifted by its row of
    ``scale`` and ``shift`` (n, 3), and back (one affine map of the density per sample); dark values read
    as 1/255 (a density of 5.5). Runs where ``x`` is (the fine-tuning batch on its GPU)."""
    import torch

    n = x.shape[0]
    m = torch.as_tensor(HED_FROM_RGB)[None] * torch.as_tensor(scale)[:, None, :] @ torch.as_tensor(RGB_FROM_HED)  # (n, 3, 3)
    b = torch.as_tensor(shift)[:, None, :] @ torch.as_tensor(RGB_FROM_HED)  # (n, 1, 3)
    od = -torch.log(torch.movedim(x, channel_dim, -1).clamp_min(1 / 255)).reshape(n, -1, 3)
    od = torch.baddbmm(b.to(x), od, m.to(x))
    out = torch.exp(-od).clamp_(0, 1).reshape(torch.movedim(x, channel_dim, -1).shape)
    return torch.movedim(out, -1, channel_dim)


def stain_jitter(patches: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """HED stain augmentation (Tellez et al. 2018) of uint8 patches (n, ..., h, w, 3): each patch's
    haematoxylin, eosin and DAB densities scaled by a factor from [1 - a, 1 + a] and shifted by one from
    [-a/4, a/4] (optical density), one draw per stain and per patch (its fields of view share it:
    :func:`stain_draws`), so that a model learns expression from tissue, not from one lab's staining.
    ``amplitude`` 0 returns the patches unchanged (a copy)."""
    import torch

    patches = np.asarray(patches)
    if patches.dtype != np.uint8 or patches.ndim < 4 or patches.shape[-1] != 3:
        raise ValueError(f"patches must be uint8 (n, ..., h, w, 3), got {patches.dtype} {patches.shape}")
    if amplitude == 0:
        return patches.copy()
    scale, shift = stain_draws(len(patches), amplitude, rng)
    out = np.empty_like(patches)
    for i in range(0, len(patches), 16):  # a float copy of 16 patches at a time
        x = torch.from_numpy(np.ascontiguousarray(patches[i : i + 16])).float().div_(255)
        y = jitter_rgb(x, scale[i : i + 16], shift[i : i + 16], channel_dim=-1)
        out[i : i + 16] = y.mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()
    return out
