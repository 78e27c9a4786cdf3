"""The legacy Spatial Transcriptomics layout of ``../shared/data``: ``counts.tsv.gz`` (spots x genes),
``spots.tsv`` (array and pixel positions, ``selected``), ``image.jpg`` and ``meta.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .._core import BleepError
from ._common import build, check_unique, image_metadata, open_image, pitch_estimate, platform, resolve_um_per_px
from ._files import flags, is_input_file, metadata_number, numbers, read_json, read_table


def read_legacy_st(path, *, um_per_px: Optional[float] = None, image=None, library_id: Optional[str] = None):
    """A legacy ST section folder: the spots that are both counted and under tissue."""
    path = Path(path)
    where = str(path)
    # Spot ids stay strings ("001" is not 1, and must still match between the two files).
    counts = read_table(path / "counts.tsv.gz", "gzip-compressed, tab-separated counts: spots x genes", sep="\t", ids=True)
    spots = read_table(path / "spots.tsv", "tab-separated spot table: id, x, y, pixel_x, pixel_y, selected", sep="\t", ids=True)
    missing = {"x", "y", "pixel_x", "pixel_y", "selected"} - set(spots.columns)
    if missing:
        raise BleepError(f"{path / 'spots.tsv'}: missing columns {sorted(missing)} (id, x, y, pixel_x, pixel_y, selected)")
    if counts.shape[1] == 0:  # one column: its header is read as the first spot's id, and no gene is left
        raise BleepError(f"{path / 'counts.tsv.gz'}: no gene columns (spots x genes, the spot ids first): is it the counts table?")
    check_unique(counts.index, "spot ids", path / "counts.tsv.gz", "each row must be one spot")
    unnamed = [i for i, c in enumerate(counts.columns, start=2) if str(c).startswith("Unnamed: ")]
    if unnamed:  # pandas names an empty header cell "Unnamed: N": a gene without a name
        raise BleepError(f"{path / 'counts.tsv.gz'}: {len(unnamed)} gene names are empty (columns {unnamed[:5]}): name every gene or drop those columns")
    check_unique(spots.index, "spot ids", path / "spots.tsv", "each row must be one spot")
    spots = spots[flags(spots, "selected", path / "spots.tsv")]
    selected = set(spots.index.astype(str))
    keep = [s for s in counts.index.astype(str) if s in selected]
    counts, spots = counts.loc[keep], spots.loc[keep]
    meta = read_json(path / "meta.json", "the section's metadata: um_per_px, source, license", required=False)
    image = image or (str(path / "image.jpg") if is_input_file(path / "image.jpg") else None)
    array_rc = numbers(spots, ["y", "x"], path / "spots.tsv", whole=True).astype(np.int64)
    pixel_xy = numbers(spots, ["pixel_x", "pixel_y"], path / "spots.tsv")
    stated = metadata_number(meta, "um_per_px", path / "meta.json")
    metadata = [(stated, "meta.json (um_per_px)")] if stated is not None else []
    slide = open_image(image)
    plat = platform("legacy-st")
    um = resolve_um_per_px(um_per_px, metadata + image_metadata(slide), pitch_estimate(array_rc, pixel_xy, plat), where)
    return build(
        counts.to_numpy(), counts.columns, keep, array_rc, pixel_xy, None,
        where=where, layout="legacy-st", library_id=library_id or path.name, plat=plat,
        platform_source="a legacy ST folder", um_per_px=um, slide=slide,
        metadata={k: str(meta[k]) for k in ("source", "license") if k in meta},
    )
