"""The contrastive losses, one module: BLEEP's (method.md section 3, quirks included) and CLIP's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LOSSES

__all__ = ["bleep_loss", "clip_loss", "LOSSES"]


def bleep_loss(image: torch.Tensor, expression: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BLEEP's loss: logits ``X V^T / tau``, soft targets ``softmax((V V^T + X X^T) / 2 / tau)`` (not
    detached), the spot term with T and the image term with T^T (whose rows need not sum to 1), averaged.
    ``image`` = V, ``expression`` = X, both (B, d), not normalised."""
    v, x = image, expression
    logits = x @ v.T / temperature
    targets = F.softmax((v @ v.T + x @ x.T) / 2 / temperature, dim=-1)
    spot = -(targets * F.log_softmax(logits, dim=-1)).sum(1)
    img = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(1)
    return ((spot + img) / 2).mean()


def clip_loss(image: torch.Tensor, expression: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy on L2-normalised embeddings, identity targets, learnable scale
    (``logit_scale`` is log(1 / temperature), clamped at log(100) as open_clip does)."""
    v, x = F.normalize(image, dim=-1), F.normalize(expression, dim=-1)
    logits = logit_scale.clamp(max=4.6052).exp() * x @ v.T
    labels = torch.arange(len(v), device=v.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

