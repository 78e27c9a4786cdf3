"""Visium HD (Space Ranger 3.x ``binned_outputs/square_002um|008um|016um``): every bin a spot, and bins
pooled into pseudo-spots of a chosen size (:func:`pool_bins`) so that a model trained on Visium spots also
serves HD, and predictions can be made on an HD run's own bin grid (:func:`bin_blocks`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .._core import BleepError
from ._common import array_affine, build, image_metadata, open_image, pitch_estimate, platform, resolve_um_per_px
from ._files import metadata_number
from .spaceranger import library_id_of, read_counts_and_positions, read_images, refuse_thumbnail

DEFAULT_BIN = "square_008um"  # spatialdata-io's default too


def hd_bin_folder(path: Path) -> Optional[Path]:
    """The ``square_*um`` folder to read for ``path``: the folder itself, or the 8 um bins (else the
    coarsest) of an ``outs/`` or ``binned_outputs/`` folder; None when ``path`` is no HD run."""
    for candidate in (path, path / "binned_outputs", path / "outs" / "binned_outputs"):
        if candidate.name.startswith("square_") and (candidate / "spatial" / "scalefactors_json.json").exists():
            return candidate
        if candidate.name == "binned_outputs" and candidate.is_dir():
            bins = sorted(p for p in candidate.iterdir() if p.name.startswith("square_") and p.is_dir())
            if not bins:
                raise BleepError(f"{candidate}: no square_*um folders in binned_outputs/")
            named = [p for p in bins if p.name == DEFAULT_BIN]
            return named[0] if named else bins[-1]
    return None


def read_visium_hd(path, *, image=None, um_per_px: Optional[float] = None, library_id: Optional[str] = None):
    """A ``square_*um`` folder of a Visium HD run: the bins under tissue as spots. ``image``: the
    full-resolution H&E given to Space Ranger."""
    import pandas as pd

    path = Path(path)
    where = str(path)
    X, genes, gene_ids, barcodes, pos, pos_file, attrs, scalef = read_counts_and_positions(path)
    sf_file = path / "spatial" / "scalefactors_json.json"
    bin_um = metadata_number(scalef, "bin_size_um", sf_file)
    if bin_um is None:
        raise BleepError(f"{sf_file}: no bin_size_um: not a Visium HD binned output")
    plat = platform("visium-hd", bin_um, where)
    pixel_xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    array_rc = pos[["array_row", "array_col"]].to_numpy()
    slide = open_image(image)
    if slide is not None:
        refuse_thumbnail(image, pixel_xy, slide)
    sizes = []
    if (stated := metadata_number(scalef, "microns_per_pixel", sf_file)) is not None:
        sizes.append((stated, "scalefactors_json.json (microns_per_pixel)"))
    if (side := metadata_number(scalef, "spot_diameter_fullres", sf_file)) is not None:
        sizes.append((bin_um / side, "scalefactors_json.json (spot_diameter_fullres, the bin side)"))
    um = resolve_um_per_px(um_per_px, sizes + image_metadata(slide), pitch_estimate(array_rc, pixel_xy, plat), where)
    spatial = path / "spatial"
    if not any((spatial / f"tissue_{k}_image.png").exists() for k in ("hires", "lowres")):
        spatial = path.parent.parent / "spatial"  # outs/spatial holds them in some runs
    meta = {k: attrs[k] for k in ("chemistry_description", "software_version") if k in attrs}
    return build(
        X, genes, barcodes, array_rc, pixel_xy, pos["in_tissue"].to_numpy(),
        where=where, layout=f"visium-hd ({path.name})", library_id=library_id or library_id_of(path, attrs),
        plat=plat, platform_source="a Space Ranger Visium HD binned output", um_per_px=um, slide=slide,
        images=read_images(spatial, scalef, where) if spatial.is_dir() else {}, scalefactors=scalef, metadata=meta,
        var=pd.DataFrame({"gene_ids": gene_ids, "feature_types": "Gene Expression"}), duplicate_genes="unique",
        extra={"bin_um": bin_um},
    )


def _factor(bin_um: float, wanted_um: float, where: str) -> int:
    """Bins per side of a block of about ``wanted_um``."""
    if not (np.isfinite(wanted_um) and wanted_um > 0):
        raise BleepError(f"{where}: the pooled size must be a positive number of micrometres, not {wanted_um!r}")
    k = int(round(wanted_um / bin_um))
    if k < 1:
        raise BleepError(f"{where}: {wanted_um:g} um is smaller than the {bin_um:g} um bins: pool to a multiple of {bin_um:g} um")
    if abs(k * bin_um - wanted_um) > 1e-6 * wanted_um:
        warnings.warn(f"{where}: {wanted_um:g} um is not a multiple of the {bin_um:g} um bins: pooling {k} x {k} bins ({k * bin_um:g} um)", stacklevel=3)
    return k


def bin_blocks(array_rc: np.ndarray, pixel_xy: np.ndarray, k: int, where: str):
    """Groups bins into k x k blocks of the HD grid: (block of each bin (n,), block rows and columns
    (m, 2), bins per block (m,), block centres (m, 2) in pixels). A centre is the mean of its bins'
    positions (Space Ranger's own, which follow its projective registration), moved by what the grid's
    affine fit says the missing bins of a partial block would have added."""
    rc = np.asarray(array_rc, dtype=np.int64)
    xy = np.asarray(pixel_xy, dtype=np.float64)
    coef = array_affine(rc, xy)
    if coef is None:
        raise BleepError(f"{where}: the bins do not span a grid (too few, or in one line): nothing to pool")
    keys, block_of, members = np.unique(rc // k, axis=0, return_inverse=True, return_counts=True)
    block_of = block_of.ravel()
    affine = lambda r, c: np.column_stack([c, r, np.ones(len(r))]) @ coef  # noqa: E731
    mean = lambda v: np.column_stack([np.bincount(block_of, v[:, i], len(keys)) for i in (0, 1)]) / members[:, None]  # noqa: E731
    centre_rc = keys * k + (k - 1) / 2.0
    centres = mean(xy) + affine(centre_rc[:, 0], centre_rc[:, 1]) - mean(affine(rc[:, 0], rc[:, 1]))
    return block_of, keys, members, centres


def bin_barcode(size_um: float, row: int, col: int) -> str:
    """Space Ranger's barcode of the bin at (row, col) of the ``size_um`` grid: s_008um_00301_00257-1."""
    size = f"{int(size_um):03d}" if float(size_um).is_integer() else f"{size_um:g}"
    return f"s_{size}um_{row:05d}_{col:05d}-1"


def pool_bins(section, bin_um: float, *, min_fraction: float = 0.5):
    """A Visium HD section with its bins summed into square pseudo-spots of about ``bin_um`` micrometres
    (k x k bins, k the nearest whole number), centred on their block of the HD grid. Blocks with fewer
    than ``min_fraction`` of their bins under tissue are dropped (a sliver of tissue is no spot). The
    pseudo-spots are named as Space Ranger names bins of that size, so 16 um blocks of 8 um bins carry
    the barcodes of the run's own 16 um bins."""
    import scipy.sparse as sp

    info = section.uns.get("bleep", {})
    where = info.get("library_id", "section")
    if info.get("platform") != "visium-hd":
        raise BleepError(f"{where}: bin_um= pools Visium HD bins; this section is {info.get('platform')} (drop bin_um=)")
    size = float(info.get("bin_um") or info["pitch_um"])
    k = _factor(size, float(bin_um), where)
    if k == 1:
        return section
    array_rc = section.obs[["array_row", "array_col"]].to_numpy()
    block_of, keys, members, centres = bin_blocks(array_rc, np.asarray(section.obsm["spatial"]), k, where)
    keep = members >= min_fraction * k * k
    if not keep.any():
        raise BleepError(f"{where}: no {k * size:g} um block has {min_fraction:.0%} of its bins under tissue: pool to a smaller size")
    pooling = sp.csr_matrix((np.ones(len(block_of), np.float32), (block_of, np.arange(len(block_of)))), shape=(len(keys), len(block_of)))
    X = (pooling @ section.X)[keep]
    keys, centres = keys[keep], centres[keep]
    pooled = k * size
    entry = next(iter(section.uns["spatial"].values()))
    images = {key: (img, entry["scalefactors"][f"tissue_{key}_scalef"]) for key, img in entry.get("images", {}).items()}
    scalef = {key: v for key, v in entry["scalefactors"].items() if not key.startswith("tissue_") and key != "spot_diameter_fullres"}
    scalef["bin_size_um"] = pooled
    um = float(info["um_per_px"])
    return build(
        X, section.var_names, [bin_barcode(pooled, r, c) for r, c in keys], keys, centres, None,
        where=where, layout=f"{info['layout']} pooled to {pooled:g} um", library_id=info["library_id"],
        plat=platform("visium-hd", pooled, where), platform_source=info.get("platform_source", ""),
        um_per_px=(um, info["um_per_px_source"]), slide=open_image(info.get("image_path")), images=images,
        scalefactors=scalef, metadata=dict(entry.get("metadata", {})), var=section.var,
        extra={"bin_um": pooled, "pooled_from_um": size, "bins_per_spot": int(k * k)},
    )


def block_grid(hd_section, bin_um: float) -> Tuple[np.ndarray, list, np.ndarray, float]:
    """An HD run's bin grid at ``bin_um`` (a multiple of its bins): (centres (m, 2) px, Space Ranger
    barcodes, (row, col) (m, 2), the bin side in px), one per block holding a bin under tissue."""
    info = hd_section.uns["bleep"]
    where = info.get("library_id", "section")
    if info.get("platform") != "visium-hd":
        raise BleepError(f"{where}: the grid to align to must be a Visium HD run, not {info.get('platform')}")
    size = float(info.get("bin_um") or info["pitch_um"])
    k = _factor(size, float(bin_um), where)
    array_rc = hd_section.obs[["array_row", "array_col"]].to_numpy()
    _, keys, _, centres = bin_blocks(array_rc, np.asarray(hd_section.obsm["spatial"]), k, where)
    return centres, [bin_barcode(k * size, r, c) for r, c in keys], keys, k * size / float(info["um_per_px"])
