"""Where torch runs: the one choice of device, for training and for the image encoder of prediction."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ._core import BleepError

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICES", "pick_device", "is_device_name"]

#: The devices a run may name (whether the machine has them is checked when the run starts).
DEVICES = "auto, cpu, cuda, cuda:N, mps"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def is_device_name(name: str) -> bool:
    """Whether ``name`` is one of :data:`DEVICES` (checked before torch is imported)."""
    return bool(_DEVICE.match(name))


def pick_device(name: str = "auto", local_rank: int = 0) -> "torch.device":
    """CUDA, then MPS, then CPU for "auto"; otherwise the named device (an error if it is not there)."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if mps:
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise BleepError(f"device {name!r} is not a device: use one of {DEVICES}") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise BleepError(f"device {name!r}: bleep-rs runs on {DEVICES}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BleepError(f"device {name!r} was asked for but torch sees no CUDA device: use device=cpu or device=auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BleepError(f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA devices (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not mps:
        raise BleepError(f"device {name!r} was asked for but torch sees no MPS device: use device=cpu or device=auto")
    return dev
