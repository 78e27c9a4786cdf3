"""The legacy Spatial Transcriptomics layout of ``../shared/data``: ``counts.tsv.gz`` (spots x genes),
``spots.tsv`` (array and pixel positions, ``selected``), ``image.jpg`` and ``meta.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from .._core import BleepError
from ._common import build, image_metadata, open_image, pitch_estimate, platform, resolve_um_per_px


def read_legacy_st(path, *, um_per_px: Optional[float] = None, image=None, library_id: Optional[str] = None):
    """A legacy ST section folder: the spots that are both counted and under tissue."""
    import pandas as pd

    path = Path(path)
    where = str(path)
    counts = pd.read_csv(path / "counts.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(path / "spots.tsv", sep="\t", index_col=0)
    missing = {"x", "y", "pixel_x", "pixel_y", "selected"} - set(spots.columns)
    if missing:
        raise BleepError(f"{path / 'spots.tsv'}: missing columns {sorted(missing)} (id, x, y, pixel_x, pixel_y, selected)")
    spots = spots[spots["selected"] == 1]
    selected = set(spots.index.astype(str))
    keep = [s for s in counts.index.astype(str) if s in selected]
    counts, spots = counts.loc[keep], spots.loc[keep]
    meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
    image = image or (str(path / "image.jpg") if (path / "image.jpg").exists() else None)
    array_rc = spots[["y", "x"]].to_numpy()
    pixel_xy = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    metadata = [(meta["um_per_px"], "meta.json (um_per_px)")] if "um_per_px" in meta else []
    slide = open_image(image)
    plat = platform("legacy-st")
    um = resolve_um_per_px(um_per_px, metadata + image_metadata(slide), pitch_estimate(array_rc, pixel_xy, plat), where)
    return build(
        counts.to_numpy(), counts.columns, keep, array_rc, pixel_xy, None,
        where=where, layout="legacy-st", library_id=library_id or path.name, plat=plat,
        platform_source="a legacy ST folder", um_per_px=um, slide=slide,
        metadata={k: meta[k] for k in ("source", "license") if k in meta},
    )
