"""The training configuration: one dataclass, the one source of the training options, their defaults and
their help (``bleep-rs train`` builds its flags from it). Free of torch, so the command line starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

__all__ = ["TrainConfig", "LOSSES"]

#: The contrastive losses (see :mod:`bleep_rs.loss`).
LOSSES = ("bleep", "clip")


def _opt(default, help: str, **kw):
    """A config field with its command-line help (the CLI is built from these fields)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Training arguments, all saved in the model's config.json. The defaults are the recipe measured
    best on held-out sections (README, "Prediction quality"); ``bleep-rs train`` takes each as a flag."""

    # What the image encoder sees.
    fields_of_view: List[float] = _opt([1.0, 2.0, 3.0],
                                        "fields of view around each spot, multiples of the patch's side, each through the backbone (default 1 2 3)")
    patch_size: int = _opt(224, "patch side in pixels at --um-per-px (default 224)")
    um_per_px: Optional[float] = _opt(None, "resolution of the patches (default: the training sections' native one, their median; "
                                                     "recorded in the model and used by predict)")
    backbone: str = _opt("efficientnet-lite0", "efficientnet-lite0 (default), timm:NAME (with --backbone-weights) or features:D")
    backbone_weights: Optional[str] = _opt(None, "a local weights file for the backbone")
    random_init: bool = _opt(False, "build a timm backbone with random weights (only when asked: without weights it is an error)")
    freeze_backbone: bool = _opt(True, "train the heads on cached backbone features (default); --no-freeze-backbone fine-tunes the whole encoder (a GPU job)")
    augment: bool = _opt(True, "flips and 90-degree rotations in training (with a frozen backbone: the 8 views' features cached)")
    tta: bool = _opt(True, "predict from the mean of the 8 dihedral views' embeddings (recorded in the model)")
    color_jitter: float = _opt(0.0, "brightness / contrast jitter amplitude (fine-tuning only)")
    # The heads and the loss.
    loss: str = _opt("bleep", "bleep (soft targets, method.md section 3) or clip", choices=list(LOSSES))
    temperature: float = _opt(4.0, "the BLEEP loss's temperature tau (logits = x.v / tau on LayerNorm outputs of length ~16)")
    embedding_dim: int = _opt(256, "embedding dimension")
    dropout: float = _opt(0.1, "dropout in the projection heads")
    # Optimisation.
    epochs: int = _opt(60, "epochs (default 60)")
    batch_size: int = _opt(128, "contrastive batch per device (default 128)")
    lr: float = _opt(1e-3, "AdamW learning rate of the heads")
    backbone_lr: float = _opt(0.1, "fine-tuning: the backbone's learning rate as a fraction of --lr")
    warmup_epochs: float = _opt(1.0, "fine-tuning: linear learning-rate warm-up, in epochs")
    weight_decay: float = _opt(1e-3, "AdamW weight decay (never on biases and norm weights)")
    seed: int = _opt(0, "random seed")
    device: str = _opt("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1 ...")
    amp: bool = _opt(True, "bfloat16 autocast on GPU")
    gather: bool = _opt(False, "several devices: contrast across every device's batch")
    # Validation and early stopping.
    val_fraction: float = _opt(0.0, "random spots held out for validation, to select the epoch and stop early "
                                     "(default 0: all spots train, the last best training loss is kept)")
    val_sections: List[str] = _opt([], "hold out these sections (library ids) instead")
    patience: int = _opt(15, "early stopping: epochs without a better validation loss")
    # The gene panel the expression encoder reads.
    n_top_genes: int = _opt(1000, "highly variable genes per section (default 1000)")
    panel_mode: str = _opt("union", "how the sections' gene sets combine", choices=["union", "intersection"], flag="--panel")
    genes: Optional[List[str]] = _opt(None, "a file with the gene panel, one gene per line (overrides --n-top-genes)", file=True)
    # Retrieval defaults recorded in the model (predict uses them unless told otherwise).
    k: int = _opt(50, "neighbours per prediction")
    method: str = _opt("mean", "aggregation of the neighbours", choices=["mean", "weighted", "softmax", "top1"])
    # The run.
    cache_dir: Optional[str] = _opt(None, "where backbone features are cached (default $BLEEP_RS_CACHE or ~/.cache/bleep-rs); 'none' to disable")
    progress: bool = _opt(True, "progress bars and a line per epoch")
    resume: bool = _opt(True, "start over instead of resuming from the output's checkpoint", flag="--fresh", invert=True)
    overwrite: bool = _opt(False, "replace an existing model directory")
