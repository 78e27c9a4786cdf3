"""AnnData input: an ``.h5ad`` (or an AnnData another reader found, such as a HEST sample's or a
SpatialData table) with ``obsm["spatial"]`` in full-resolution pixels of its H&E image."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .._core import BleepError
from ._common import build, counts_problem, image_metadata, infer_platform, open_image, pitch_estimate, resolve_um_per_px
from ._files import metadata_number


def _matrix(src, layer: Optional[str], where: str):
    """(matrix, gene names, layer) for ``layer``: None is the "counts" layer when there is one, else X;
    "raw" is ``.raw`` with its own var_names."""
    if layer is None:
        layer = "counts" if "counts" in src.layers else "X"
    if layer == "X":
        return src.X, list(src.var_names), layer
    if layer == "raw":
        if src.raw is None:
            raise BleepError(f"{where}: layer='raw' but the file has no .raw")
        return src.raw.X, list(src.raw.var_names), layer
    if layer not in src.layers:
        raise BleepError(f"{where}: no layer {layer!r} (layers: {list(src.layers) or 'none'}; also 'X' and 'raw')")
    return src.layers[layer], list(src.var_names), layer


def _counts_fix(src, tried: str) -> str:
    """The error's fix: the matrices of the file that do hold counts."""
    options = [("X", src.X)] + [(name, m) for name, m in src.layers.items()]
    if src.raw is not None:
        options.append(("raw", src.raw.X))
    good = [name for name, m in options if name != tried and m is not None and counts_problem(_sparse(m)) is None]
    if good:
        return f": {' and '.join(repr(g) for g in good)} {'holds' if len(good) == 1 else 'hold'} counts: pass layer={good[0]!r} (--layer {good[0]})"
    return ": none of X, .raw and the layers holds counts; store the raw counts in a layer (adata.layers['counts']) and pass layer='counts'"


def _sparse(m):
    import scipy.sparse as sp

    return m if sp.issparse(m) else np.asarray(m)


def _spatial_entry(src, lib: str) -> dict:
    entry = (src.uns.get("spatial") or {}).get(lib) or {}
    return entry if isinstance(entry, dict) else {}


def _stated_platforms(src, platform_arg, entry: dict, extra: Sequence[Tuple[Optional[str], str]]):
    """What the file says its platform is, most trusted first."""
    bleep = dict(src.uns.get("bleep", {}))
    stated: List[Tuple[Optional[str], str]] = [(platform_arg, "platform="), (bleep.get("platform"), 'uns["bleep"]["platform"]')]
    stated += list(extra)
    scalef = entry.get("scalefactors") or {}
    meta = entry.get("metadata") or {}
    if "bin_size_um" in scalef:
        stated.append(("visium-hd", "scalefactors (bin_size_um: Visium HD)"))
    if "fiducial_diameter_fullres" in scalef or str(meta.get("software_version", "")).startswith("spaceranger"):
        stated.append(("visium", "Space Ranger scale factors / metadata"))
    return stated


def read_anndata(
    src,
    where: str,
    *,
    image=None,
    um_per_px: Optional[float] = None,
    platform: Optional[str] = None,
    library_id: Optional[str] = None,
    layer: Optional[str] = None,
    pixel_xy: Optional[np.ndarray] = None,
    stated: Sequence[Tuple[Optional[str], str]] = (),
    metadata: Sequence[Tuple[float, str]] = (),
    layout: str = "h5ad",
    extra: Optional[dict] = None,
    check_counts: bool = True,
):
    """The section of an AnnData already in memory. ``pixel_xy`` overrides ``obsm["spatial"]``;
    ``stated`` and ``metadata``: what other files say of the platform and the pixel size."""
    bleep = dict(src.uns.get("bleep", {}))
    spatial = src.uns.get("spatial") or {}
    lib = library_id or bleep.get("library_id") or (next(iter(spatial)) if len(spatial) == 1 else None) or Path(where).stem
    entry = _spatial_entry(src, lib) or (_spatial_entry(src, next(iter(spatial))) if len(spatial) == 1 else {})
    if pixel_xy is None:
        if "spatial" not in src.obsm:
            raise BleepError(f'{where}: no obsm["spatial"]: the spot positions (x, y in full-resolution pixels) are needed')
        pixel_xy = np.asarray(src.obsm["spatial"], dtype=np.float64)
        if pixel_xy.ndim != 2 or pixel_xy.shape[1] < 2:
            raise BleepError(f'{where}: obsm["spatial"] must be (n_spots, 2) = (x, y), not {pixel_xy.shape}')
        pixel_xy = pixel_xy[:, :2]
    X, genes, layer = _matrix(src, layer, where)
    problem = counts_problem(_sparse(X), src.obs_names, genes) if check_counts else None
    if problem:
        what = layer if layer in ("X", "raw") else f"layer {layer!r}"
        raise BleepError(f"{where}: {what} is not raw counts: {problem}{_counts_fix(src, layer)}")
    meta = entry.get("metadata") or {}
    image = image or bleep.get("image_path") or meta.get("source_image_path")
    has_array = {"array_row", "array_col"} <= set(src.obs)
    array_rc = src.obs[["array_row", "array_col"]].to_numpy() if has_array else None
    scalef = dict(entry.get("scalefactors") or {})
    where_sf = f"{where} (uns['spatial'][{lib!r}]['scalefactors'])"
    bin_um = metadata_number(scalef, "bin_size_um", where_sf) or metadata_number(bleep, "bin_um", f"{where} (uns['bleep'])")
    plat, plat_source = infer_platform(where, _stated_platforms(src, platform, entry, stated), array_rc, bin_um)
    sizes = list(metadata)
    if (stated_um := metadata_number(bleep, "um_per_px", f"{where} (uns['bleep'])")) is not None:
        sizes.insert(0, (stated_um, 'uns["bleep"]["um_per_px"]'))
    if (stated_um := metadata_number(scalef, "microns_per_pixel", where_sf)) is not None:
        sizes.append((stated_um, "scalefactors (microns_per_pixel)"))
    slide = open_image(image)
    um = resolve_um_per_px(um_per_px, sizes + image_metadata(slide), pitch_estimate(array_rc, pixel_xy, plat), where)
    images = {}
    for key, picture in (entry.get("images") or {}).items():
        if (factor := metadata_number(scalef, f"tissue_{key}_scalef", where_sf)) is not None:
            images[key] = (np.asarray(picture), factor)
    scalef.pop("spot_diameter_fullres", None)  # other tools state it for other diameters: ours follows the platform
    in_tissue = src.obs["in_tissue"].to_numpy() if "in_tissue" in src.obs else None
    kept = {k: str(v) for k, v in meta.items() if k != "source_image_path" and isinstance(v, (str, bytes, np.ndarray))}
    var = src.var[[c for c in ("gene_ids", "feature_types") if c in src.var]] if layer != "raw" else None
    return build(
        X, genes, src.obs_names, array_rc, pixel_xy, in_tissue,
        where=where, layout=layout, library_id=lib, plat=plat, platform_source=plat_source, um_per_px=um,
        slide=slide, images=images, scalefactors=scalef, metadata=kept, var=var,
        check_counts=check_counts, extra={**({"bin_um": float(bin_um)} if bin_um else {}), **(extra or {})},
    )


def read_h5ad(path, **kwargs):
    """An ``.h5ad`` file (see :func:`read_anndata` for the arguments)."""
    import anndata as ad

    try:
        src = ad.read_h5ad(path)
    except Exception as e:  # anndata raises many kinds for a damaged file
        raise BleepError(f"{path}: not a readable .h5ad ({e})") from e
    return read_anndata(src, str(path), **kwargs)
