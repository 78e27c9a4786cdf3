"""The training configuration: one dataclass, the one source of the training options, their defaults and
their help (``bleep-rs train`` builds its flags from it). Free of torch, so the command line starts fast.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import List, Optional

from .._core import BleepError
from ..device import DEVICES, is_device_name
from ..inputs import InputSpec
from ..options import check, nested, option
from ..reference import METHODS

#: The default recipe's aggregation of the neighbours and their number (the retrieval API's own defaults
#: stay BLEEP's: the mean of 50).
RECIPE_METHOD = "softmax"
RECIPE_K = 100

__all__ = ["TrainConfig", "LOSSES", "RECIPE_METHOD", "RECIPE_K"]

#: The contrastive losses (see :mod:`bleep_rs.training.loss`).
LOSSES = ("bleep", "clip")


def _input_options_moved(cls):
    """TrainConfig(fields_of_view=...) as written before the input recipe was an InputSpec: an error that
    says where the option went (Python's own would only say 'unexpected keyword')."""
    init, moved = cls.__init__, {f.name for f in dataclasses.fields(InputSpec)} | {"patch_um_per_px"}

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        given = sorted(moved & set(kwargs))
        if given:
            raise BleepError(f"{', '.join(given)}: the input recipe's options are InputSpec's: TrainConfig(input=InputSpec(...)) "
                             "(patch_um_per_px is InputSpec's um_per_px)")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_input_options_moved
@dataclass
class TrainConfig:
    """Training arguments, all saved in the model's config.json. The defaults are the recipe measured
    best on held-out sections (README, "Prediction quality"); ``bleep-rs train`` takes each as a flag."""

    # What the image encoder sees of each spot (its flags: --patch-size, --patch-um-per-px, --fields-of-view,
    # --tta, --stain).
    input: InputSpec = nested(InputSpec, "the input recipe")
    backbone: str = option("efficientnet-lite0", "efficientnet-lite0 (default), efficientnet-lite1, efficientnet-lite2, timm:NAME (with "
                                               "backbone_weights=), timm:hf-hub:ORG/NAME (a model in the Hugging Face cache) or features:D",
                           check=lambda v: None if v.strip() else "must name a backbone")
    backbone_weights: Optional[str] = option(None, "a local weights file for the backbone", path=True)
    random_init: bool = option(False, "build the backbone with random weights (a timm backbone without weights is otherwise an error; "
                                      "an EfficientNet-Lite has its ImageNet weights)")
    freeze_backbone: bool = option(True, "train the heads on cached backbone features (default); freeze_backbone=False fine-tunes the whole "
                                         "encoder (a GPU job)")
    augment: bool = option(True, "flips and 90-degree rotations in training (with a frozen backbone: the 8 views' features cached)")
    color_jitter: float = option(0.0, "brightness / contrast jitter amplitude (fine-tuning only)", low=0, high=1)
    # HED stain jitter (0.5): HEG-50 +0.012 on MOB, +0.008 on HER2ST within the patient, level across
    # patients; 9 of the 11 folds up or level (docs/benchmarks.md, "Stain jitter").
    stain_jitter: float = option(0.5, "HED stain augmentation amplitude: each spot's haematoxylin, eosin and DAB densities scaled by up to "
                                      "1 +- A and shifted by up to +- A/4 (with a frozen backbone: the features of one jittered copy of the "
                                      "views cached beside the plain ones; fine-tuning: new jitter every step); 0 turns it off", low=0, high=1, high_open=True)
    # The heads and the loss.
    loss: str = option("bleep", "bleep (soft targets, method.md section 3) or clip", choices=list(LOSSES))
    temperature: float = option(4.0, "the BLEEP loss's temperature tau (logits = x.v / tau on LayerNorm outputs of length ~16)",
                              low=0, low_open=True)
    embedding_dim: int = option(256, "embedding dimension", low=1)
    heads: int = option(1, "pairs of projection heads trained side by side from different initialisations; retrieval compares "
                        "the mean of their cosine similarities (1: BLEEP's one pair)", low=1)
    dropout: float = option(0.1, "dropout in the projection heads", low=0, high=1, high_open=True)
    # Optimisation.
    epochs: int = option(60, "epochs (default 60)", low=1)
    batch_size: int = option(128, "contrastive batch per device (default 128; a batch contrasts its spots: at least 2)", low=2)
    lr: float = option(1e-3, "AdamW learning rate of the heads", low=0, low_open=True)
    backbone_lr: float = option(0.1, "fine-tuning: the backbone's learning rate as a fraction of lr=", low=0)
    warmup_epochs: float = option(1.0, "fine-tuning: linear learning-rate warm-up, in epochs", low=0)
    weight_decay: float = option(1e-3, "AdamW weight decay (never on biases and norm weights)", low=0)
    seed: int = option(0, "random seed", low=0, high=2**32 - 1)
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1 ...",
                         check=lambda v: None if is_device_name(v) else f"must be one of {DEVICES}, got {v!r}")
    amp: bool = option(True, "bfloat16 autocast on GPU")
    gather: bool = option(False, "several devices: contrast across every device's batch")
    # Validation and early stopping.
    val_fraction: float = option(0.0, "random spots held out for validation, to select the epoch and stop early "
                                     "(default 0: all spots train, the last best training loss is kept)", low=0, high=1, high_open=True)
    val_sections: List[str] = option([], "hold out these sections (library ids) instead")
    patience: int = option(15, "early stopping: epochs without a better validation loss", low=1)
    # The gene panel the expression encoder reads.
    n_top_genes: int = option(1000, "highly variable genes per section (default 1000)", low=1)
    panel_mode: str = option("union", "how the sections' gene sets combine", choices=["union", "intersection"], flag="--panel")
    genes: Optional[List[str]] = option(None, "a file with the gene panel, one gene per line (overrides n_top_genes=)", file=True)
    # Retrieval defaults recorded in the model (predict uses them unless told otherwise).
    # 100, not BLEEP's 50: the softmax gives the farther neighbours little weight where the near ones are
    # much closer (within a patient) and more where they are not (across patients): +0.007 HEG-50 from
    # C2-C4 to B4, up or level on 10 of 11 folds (docs/benchmarks.md, "Neighbours").
    k: int = option(RECIPE_K, "neighbours per prediction (default 100)", low=1)
    # softmax of cosine / 0.1 over the k neighbours, not BLEEP's plain mean: +0.013 HEG-50 on HER2ST (every
    # fold) and +0.007 across patients B4 -> C, level elsewhere (docs/benchmarks.md, "Read-out").
    method: str = option(RECIPE_METHOD, "aggregation of the neighbours recorded in the model", choices=list(METHODS))
    # The run.
    cache_dir: Optional[str] = option(None, "where backbone features are cached (default $BLEEP_RS_CACHE or ~/.cache/bleep-rs); 'none' to disable",
                                    path=True)
    progress: bool = option(True, "progress bars and a line per epoch")
    resume: bool = option(True, "start over instead of resuming from the output's checkpoint", flag="--fresh", invert=True)
    overwrite: bool = option(False, "replace an existing model directory")

    def __post_init__(self) -> None:
        if str(self.backbone).startswith("features:"):
            self.stain_jitter = 0.0  # precomputed features have no patches to jitter: recorded as off
        self.validate()

    def validate(self) -> None:
        """Checks every field against its declared type and range (:mod:`bleep_rs.options`): a
        :class:`BleepError` naming the field and the value."""
        check(self)

    def for_features(self, dim: int) -> "TrainConfig":
        """This config for precomputed patch features of dimension ``dim``: backbone ``features:D`` (a
        config naming an image backbone, the default, takes it), one field of view (a features file has
        one per patch), and so no stain jitter."""
        import dataclasses

        from ..backbones import DEFAULT_BACKBONE

        backbone = f"features:{int(dim)}"
        if self.backbone not in (DEFAULT_BACKBONE, backbone):
            raise BleepError(f"the features files hold {dim}-dimensional features: backbone must be {backbone}, not {self.backbone}")
        image_only = {"freeze_backbone=False": not self.freeze_backbone, "stain=macenko": self.input.stain != "none",
                      "backbone_weights=": self.backbone_weights is not None}
        given = [name for name, used in image_only.items() if used]
        if given:
            raise BleepError(f"{', '.join(given)}: not with precomputed features (they are an image backbone's options)")
        return dataclasses.replace(self, backbone=backbone, input=self.input.replace(fields_of_view=(1.0,)))
