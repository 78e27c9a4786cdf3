"""The input recipe: what the image encoder sees of each spot.

One frozen dataclass, checked once where it is made: the patch's side and resolution, the fields of view
around the spot and the size the wider ones go through the backbone at, the views averaged at prediction, the
stain normalisation. Training takes it whole
(``TrainConfig.input``), the model carries it (``model.config.input``, config.json's ``"input"``), and
prediction reads every section and slide by it::

    spec = bleep_rs.InputSpec(patch_size=224, um_per_px=0.5, fields_of_view=(1, 2, 3))
    patches = spec.section_patches(section)            # uint8 (n, 3, 224, 224, 3)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .augment import as_counts, counts_problem
from .normalize import STAINS
from .options import check, option

__all__ = ["InputSpec"]


def _distinct(fields) -> Optional[str]:
    return None if len(set(fields)) == len(fields) else f"must be distinct, got {list(fields)}"


@dataclass(frozen=True)
class InputSpec:
    """What the image encoder sees of each spot. The defaults are the recipe measured best on held-out
    sections (docs/benchmarks.md); ``um_per_px`` None means each image's own resolution (training records
    its sections' median in the model)."""

    patch_size: int = option(224, "patch side in pixels at the patches' resolution (default 224)", low=8, high=4096)
    um_per_px: Optional[float] = option(None, "micrometres per pixel of the patches (default: the training sections' native one, "
                                              "their median; recorded in the model and used by predict)",
                                        low=0, low_open=True, flag="--patch-um-per-px", metavar="X")
    fields_of_view: Tuple[float, ...] = option((1.0, 2.0, 3.0), "fields of view around each spot, distinct multiples of the patch's "
                                                                "side, each through the backbone (default 1 2 3)",
                                               low=1, high=64, check=_distinct)
    wide_fields_px: Optional[int] = option(None, "input side in pixels at which the fields of view wider than 1 go through the backbone "
                                                 "(downsampled from their patch): default the backbone's measured choice (112 for "
                                                 "efficientnet-lite0, a third of the cost, as accurate; the others: their input size); "
                                                 "0: the backbone's input size, as field 1 (recorded in the model)",
                                           low=0, high=4096, metavar="PX")
    tta: bool = option(True, "predict from the mean of dihedral views' embeddings, --tta-views of them (recorded in the model)")
    tta_views: Tuple[int, ...] = option((2, 4), "dihedral views averaged per tile at prediction with TTA: one count (1, 2, 4 or 8) for "
                                                "every field of view, or two: field 1's and the wider fields' (default 2 4: a third of "
                                                "the cost of 8 views, within 0.01 of its accuracy; recorded in the model, docs/benchmarks.md)",
                                        choices=(1, 2, 4, 8), low=1, check=counts_problem)
    stain: str = option("none", "macenko: every patch Macenko-normalised to one reference stain before the backbone, in training "
                                "and prediction (recorded in the model); helps HER2ST across patients, hurts MOB (docs/benchmarks.md)",
                        choices=STAINS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tta_views", as_counts(self.tta_views))  # one count: for every field
        check(self)

    def replace(self, **changes) -> "InputSpec":
        """This spec with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def resolution(self, native: float) -> float:
        """The um/px patches are read at from an image of ``native`` um/px."""
        return float(self.um_per_px or native)

    def section_patches(self, section, *, slide=None) -> np.ndarray:
        """uint8 (n, fields, size, size, 3) patches of a section's spots (see :func:`bleep_rs.section_patches`)."""
        from .sections import section_patches

        return section_patches(section, self.patch_size, self.um_per_px, fields=self.fields_of_view, slide=slide)

    def slide_patches(self, slide, centres: np.ndarray) -> np.ndarray:
        """uint8 (n, fields, size, size, 3) patches of a :class:`~bleep_rs.Slide` around ``centres`` (level-0 px)."""
        return slide.spot_patches(centres, self.patch_size, self.resolution(slide.um_per_px), fields=self.fields_of_view)
