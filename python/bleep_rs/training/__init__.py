"""Training the two encoders (``pip install bleep-rs[train]``): the application on top of the library, as
open_clip_train is on open_clip.

    config.py    TrainConfig: every training option, each also a ``bleep-rs train`` flag (no torch)
    loss.py      the BLEEP and CLIP losses
    features.py  the backbone-feature cache (frozen backbone: each section's features computed once)
    loop.py      ``train``: the loop, checkpoints, several devices

``from bleep_rs.training import TrainConfig`` does not import torch; the other names do, on first use.
"""

from __future__ import annotations

from typing import Any

from .config import RECIPE_K, RECIPE_METHOD, TrainConfig

__all__ = ["TrainConfig", "RECIPE_K", "RECIPE_METHOD", "TrainingData", "prepare_data", "train", "native_um_per_px"]

_IN_LOOP = {"TrainingData", "prepare_data", "train", "native_um_per_px"}


def __getattr__(name: str) -> Any:
    if name in _IN_LOOP:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
