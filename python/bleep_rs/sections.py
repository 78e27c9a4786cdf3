"""Section readers: the files users have, as one AnnData per section, with a pixel size they can trust.

:func:`read_section` recognises the layout of a path:

* a 10x Space Ranger ``outs/`` folder (``filtered_feature_bc_matrix.h5``, ``spatial/`` with
  ``tissue_positions_list.csv`` (1.x), ``tissue_positions.csv`` (2.x) or ``tissue_positions.parquet``,
  told apart by their content, and ``scalefactors_json.json``); the full-resolution image is passed as
  ``image=`` (the hires/lowres PNGs are thumbnails and are refused as such);
* the legacy Spatial Transcriptomics layout of ``../shared/data`` (``counts.tsv.gz``, ``spots.tsv``,
  ``image.jpg``, ``meta.json``);
* an ``.h5ad`` with ``obsm["spatial"]`` in full-resolution pixels, plus ``image=``.

Every section comes back in one shape: ``X`` raw counts (CSR, float32), ``var_names`` genes, ``obs`` spot
ids with ``array_row`` / ``array_col`` / ``in_tissue``, ``obsm["spatial"]`` (x, y) full-resolution pixels,
``uns["spatial"][library_id]`` with a thumbnail and scale factors (scanpy / squidpy's layout), and
``uns["bleep"]``: ``um_per_px``, ``um_per_px_source``, ``image_path``, ``layout``, ``library_id``.

The pixel size (micrometres per full-resolution pixel) is resolved in one place,
:func:`resolve_um_per_px`: an explicit argument wins, then the files' metadata, then an estimate from the
spot pitch (Visium 100 um, legacy ST 200 um centre to centre); a disagreement of more than 10 % between
sources is warned about, naming both and how to settle it.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ._core import BleepError

__all__ = ["read_section", "resolve_um_per_px", "spot_pitch_px", "section_patches", "PITCH_UM"]

#: Centre-to-centre spot distance of each platform, micrometres.
PITCH_UM = {"visium": 100.0, "legacy-st": 200.0}
#: The diameter behind `spot_diameter_fullres`, micrometres: Space Ranger states it for a "theoretical
#: 65 um spot" (the 55 um spot plus margin); legacy ST spots are 100 um.
SPOT_DIAMETER_UM = {"visium": 65.0, "legacy-st": 100.0}
THUMBNAIL_SIDE = 2000


def resolve_um_per_px(
    explicit: Optional[float],
    metadata: List[Tuple[float, str]],
    estimate: Optional[Tuple[float, str]],
    where: str,
) -> Tuple[float, str]:
    """The pixel size and its source. ``metadata``: (value, source) pairs from the files, best first;
    ``estimate``: the spot-pitch estimate. Raises when there is nothing to go on."""
    candidates = [(float(v), s) for v, s in metadata if v is not None and np.isfinite(v) and v > 0]
    if estimate is not None:
        candidates.append(estimate)
    if explicit is not None:
        if not (np.isfinite(explicit) and explicit > 0):
            raise BleepError(f"{where}: um_per_px must be a positive number, not {explicit!r}")
        for value, source in candidates:
            if abs(value / explicit - 1) > 0.10:
                warnings.warn(
                    f"{where}: um_per_px={explicit} was given but {source} says {value:.4g}; using the given "
                    "value. Check which is right: a wrong pixel size makes every patch the wrong size.",
                    stacklevel=3,
                )
                break
        return float(explicit), "given"
    if not candidates:
        raise BleepError(
            f"{where}: no pixel size: no metadata states one and there are too few spots to estimate it "
            "from their pitch. Pass um_per_px=X (the scanner's micrometres per pixel)."
        )
    best = candidates[0]
    for value, source in candidates[1:]:
        if abs(value / best[0] - 1) > 0.10:
            warnings.warn(
                f"{where}: {best[1]} gives {best[0]:.4g} um/px but {source} gives {value:.4g}; using the "
                f"first. If the spots are not on the stated grid or the metadata is stale, pass um_per_px=.",
                stacklevel=3,
            )
    return best


def spot_pitch_px(array_rc: np.ndarray, pixel_xy: np.ndarray, platform: str) -> Optional[float]:
    """Pixels per spot pitch, from a least-squares affine fit of pixel positions on array positions.

    Visium's array columns step by 2 per pitch along a row and rows by sqrt(3)/2 pitch; legacy ST's
    array coordinates step by 1 per pitch in both directions."""
    if len(array_rc) < 3:
        return None
    rows, cols = array_rc[:, 0].astype(float), array_rc[:, 1].astype(float)
    design = np.column_stack([cols, rows, np.ones_like(rows)])
    if np.linalg.matrix_rank(design) < 3:
        return None
    coef, *_ = np.linalg.lstsq(design, pixel_xy.astype(float), rcond=None)
    per_col = float(np.hypot(*coef[0]))
    return per_col * 2.0 if platform == "visium" else per_col


def _pitch_estimate(array_rc, pixel_xy, platform) -> Optional[Tuple[float, str]]:
    px = spot_pitch_px(array_rc, pixel_xy, platform)
    if px is None or px <= 0:
        return None
    return PITCH_UM[platform] / px, f"the spot pitch ({PITCH_UM[platform]:.0f} um centre to centre, {px:.1f} px)"


def _open(image: Optional[str]):
    from .slide import Slide

    return None if image is None else Slide(image)


def _image_metadata(slide) -> List[Tuple[float, str]]:
    """The pixel size an image file states (TIFF tags, Aperio MPP, OME-XML), if any."""
    if slide is None or slide.um_per_px is None:
        return []
    return [(slide.um_per_px, f"{os.path.basename(slide.path)} ({slide.um_per_px_source})")]


def _build(
    counts,
    genes,
    spot_ids,
    array_rc,
    pixel_xy,
    in_tissue,
    *,
    layout: str,
    library_id: str,
    slide,
    thumbnail: Optional[np.ndarray],
    thumbnail_scale: Optional[float],
    um_per_px: Tuple[float, str],
    platform: str,
    where: str,
):
    """Assembles the AnnData every reader returns, checking spots against the image."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    image = None if slide is None else slide.path
    if slide is not None:
        w, h = slide.dimensions
        outside = (pixel_xy[:, 0] < 0) | (pixel_xy[:, 1] < 0) | (pixel_xy[:, 0] >= w) | (pixel_xy[:, 1] >= h)
        if outside.any():
            raise BleepError(
                f"{where}: {int(outside.sum())} of {len(pixel_xy)} spots lie outside the {w} x {h} px image "
                f"{image} (e.g. {spot_ids[int(np.flatnonzero(outside)[0])]} at {pixel_xy[outside][0].round(1).tolist()}): "
                "is this the full-resolution image the positions refer to?"
            )
        if thumbnail is None:
            thumbnail = slide.thumbnail(THUMBNAIL_SIDE)
            thumbnail_scale = thumbnail.shape[1] / w
    X = sp.csr_matrix(counts, dtype=np.float32)
    if X.shape[0] == 0:
        raise BleepError(f"{where}: no spots (none is both counted and under tissue)")
    obs = pd.DataFrame(
        {"array_row": array_rc[:, 0].astype(int), "array_col": array_rc[:, 1].astype(int), "in_tissue": in_tissue.astype(int)},
        index=pd.Index([str(s) for s in spot_ids], name="spot_id"),
    )
    var = pd.DataFrame(index=pd.Index([str(g) for g in genes], name="gene"))
    if not var.index.is_unique:
        dup = var.index[var.index.duplicated()].unique()[:3].tolist()
        warnings.warn(f"{where}: duplicate gene names made unique ({dup} ...)", stacklevel=3)
        var.index = pd.Index(ad.utils.make_index_unique(var.index), name="gene")
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm["spatial"] = np.asarray(pixel_xy, dtype=np.float64)
    um, um_source = um_per_px
    spatial = {"scalefactors": {"spot_diameter_fullres": SPOT_DIAMETER_UM[platform] / um}, "metadata": {"layout": layout}}
    if thumbnail is not None:
        spatial["images"] = {"hires": np.asarray(thumbnail)}
        spatial["scalefactors"]["tissue_hires_scalef"] = float(thumbnail_scale)
    adata.uns["spatial"] = {library_id: spatial}
    adata.uns["bleep"] = {
        "um_per_px": float(um),
        "um_per_px_source": um_source,
        "image_path": None if image is None else os.path.abspath(image),
        "layout": layout,
        "library_id": library_id,
        "platform": platform,
    }
    return adata


def read_legacy_st(path, *, um_per_px: Optional[float] = None, image: Optional[str] = None, library_id: Optional[str] = None):
    """A legacy Spatial Transcriptomics section folder: the spots that are both counted and under tissue."""
    import pandas as pd

    path = Path(path)
    where = str(path)
    counts = pd.read_csv(path / "counts.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(path / "spots.tsv", sep="\t", index_col=0)
    spots = spots[spots["selected"] == 1]
    keep = [s for s in counts.index.astype(str) if s in set(spots.index.astype(str))]
    counts, spots = counts.loc[keep], spots.loc[keep]
    meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
    image = image or (str(path / "image.jpg") if (path / "image.jpg").exists() else None)
    array_rc = spots[["y", "x"]].to_numpy()
    pixel_xy = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    metadata = [(meta["um_per_px"], "meta.json (um_per_px)")] if "um_per_px" in meta else []
    slide = _open(image)
    um = resolve_um_per_px(um_per_px, metadata + _image_metadata(slide), _pitch_estimate(array_rc, pixel_xy, "legacy-st"), where)
    return _build(
        counts.to_numpy(), counts.columns, keep, array_rc, pixel_xy, np.ones(len(keep)),
        layout="legacy-st", library_id=library_id or path.name, slide=slide, thumbnail=None, thumbnail_scale=None,
        um_per_px=um, platform="legacy-st", where=where,
    )


def _read_positions(spatial: Path):
    """Space Ranger's tissue positions in any of its three forms, recognised by content."""
    import pandas as pd

    names = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    for candidate in ["tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv"]:
        f = spatial / candidate
        if not f.exists():
            continue
        head = f.read_bytes()[:4]
        if head == b"PAR1":
            try:
                df = pd.read_parquet(f)
            except ImportError as e:
                raise BleepError(f"{f}: reading parquet positions needs pyarrow: pip install pyarrow") from e
        else:
            first = f.read_text().split("\n", 1)[0]
            has_header = first.split(",")[0].strip().lower() == "barcode"
            df = pd.read_csv(f, header=0 if has_header else None, names=None if has_header else names)
        missing = set(names) - set(df.columns)
        if missing:
            raise BleepError(f"{f}: not Space Ranger tissue positions (missing columns {sorted(missing)})")
        return df.set_index(df["barcode"].astype(str)), f
    raise BleepError(f"{spatial}: no tissue_positions.parquet, tissue_positions.csv or tissue_positions_list.csv")


def _read_10x_h5(f: Path):
    import h5py

    try:
        with h5py.File(f, "r") as h5:
            m = h5["matrix"]
            shape = tuple(m["shape"][()])
            import scipy.sparse as sp

            # Stored genes x barcodes, compressed by barcode (CSC of genes x spots).
            X = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=shape).T.tocsr()
            barcodes = [b.decode() for b in m["barcodes"][()]]
            feats = m["features"]
            names = [b.decode() for b in feats["name"][()]]
            kinds = [b.decode() for b in feats["feature_type"][()]] if "feature_type" in feats else ["Gene Expression"] * len(names)
    except (OSError, KeyError) as e:
        raise BleepError(f"{f}: not a readable 10x feature-barcode matrix ({e})") from e
    genes = np.array([k == "Gene Expression" for k in kinds])
    return X[:, genes], [n for n, g in zip(names, genes) if g], barcodes


def read_space_ranger(path, *, image: Optional[str] = None, um_per_px: Optional[float] = None, library_id: Optional[str] = None):
    """A Space Ranger ``outs/`` folder: the barcodes under tissue. ``image``: the full-resolution H&E
    the positions refer to (without it the section has a thumbnail but cannot give patches)."""
    from .slide import Slide

    path = Path(path)
    where = str(path)
    spatial = path / "spatial"
    X, genes, barcodes = _read_10x_h5(path / "filtered_feature_bc_matrix.h5")
    positions, pos_file = _read_positions(spatial)
    scalef = json.loads((spatial / "scalefactors_json.json").read_text())
    keep = [b for b in barcodes if b in positions.index and positions.at[b, "in_tissue"] == 1]
    rows = [barcodes.index(b) for b in keep] if len(keep) < len(barcodes) else list(range(len(barcodes)))
    pos = positions.loc[keep]
    pixel_xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    array_rc = pos[["array_row", "array_col"]].to_numpy()
    slide = _open(None if image is None else str(image))
    if slide is not None:
        w, h = slide.dimensions
        extent = max(pixel_xy[:, 0].max(), pixel_xy[:, 1].max()) if len(pixel_xy) else 0
        name = os.path.basename(image)
        if "tissue_hires_image" in name or "tissue_lowres_image" in name or (extent > 0 and max(w, h) < 0.5 * extent):
            raise BleepError(
                f"{image} ({w} x {h} px) is a Space Ranger thumbnail, not the full-resolution image: the spot "
                f"positions reach {extent:.0f} px. Pass the H&E image given to Space Ranger (often a .tif)."
            )
    # The thumbnail scanpy shows: hires if it is not blank, else lowres.
    thumbnail, thumb_scale = None, None
    for name, key in [("tissue_hires_image.png", "tissue_hires_scalef"), ("tissue_lowres_image.png", "tissue_lowres_scalef")]:
        f = spatial / name
        if f.exists() and key in scalef:
            pic = Slide(f).thumbnail(10**6)
            if pic.std() > 1.0:
                thumbnail, thumb_scale = pic, float(scalef[key])
                break
    metadata = []
    if "spot_diameter_fullres" in scalef:
        metadata.append((SPOT_DIAMETER_UM["visium"] / float(scalef["spot_diameter_fullres"]), "scalefactors_json.json (spot_diameter_fullres, 65 um per Space Ranger)"))
    um = resolve_um_per_px(um_per_px, metadata + _image_metadata(slide), _pitch_estimate(array_rc, pixel_xy, "visium"), where)
    adata = _build(
        X[rows], genes, keep, array_rc, pixel_xy, pos["in_tissue"].to_numpy(),
        layout=f"space-ranger ({pos_file.name})", library_id=library_id or path.name, slide=slide,
        thumbnail=thumbnail, thumbnail_scale=thumb_scale, um_per_px=um, platform="visium", where=where,
    )
    adata.uns["spatial"][adata.uns["bleep"]["library_id"]]["scalefactors"].update({k: float(v) for k, v in scalef.items()})
    return adata


def read_h5ad(path, *, image: Optional[str] = None, um_per_px: Optional[float] = None, platform: str = "visium", library_id: Optional[str] = None):
    """An ``.h5ad`` with ``obsm["spatial"]`` in full-resolution pixels; ``image`` the H&E they refer to
    (default: ``uns["bleep"]["image_path"]`` when the file was written by bleep-rs)."""
    import anndata as ad

    where = str(path)
    try:
        src = ad.read_h5ad(path)
    except Exception as e:  # anndata raises many kinds for a damaged file
        raise BleepError(f"{path}: not a readable .h5ad ({e})") from e
    if "spatial" not in src.obsm:
        raise BleepError(f'{path}: no obsm["spatial"]: the spot positions (x, y in full-resolution pixels) are needed')
    bleep = dict(src.uns.get("bleep", {}))
    image = image or bleep.get("image_path")
    lib = library_id or bleep.get("library_id") or next(iter(src.uns.get("spatial", {}) or {}), Path(path).stem)
    scalef = (src.uns.get("spatial", {}).get(lib, {}) or {}).get("scalefactors", {})
    metadata = []
    if "um_per_px" in bleep:
        metadata.append((float(bleep["um_per_px"]), 'uns["bleep"]["um_per_px"]'))
    if "spot_diameter_fullres" in scalef:
        metadata.append((SPOT_DIAMETER_UM[platform] / float(scalef["spot_diameter_fullres"]), f"scalefactors (spot_diameter_fullres, {SPOT_DIAMETER_UM[platform]:.0f} um spots)"))
    pixel_xy = np.asarray(src.obsm["spatial"], dtype=np.float64)[:, :2]
    array_rc = src.obs[["array_row", "array_col"]].to_numpy() if {"array_row", "array_col"} <= set(src.obs) else np.zeros((len(src), 2))
    slide = _open(image)
    um = resolve_um_per_px(um_per_px, metadata + _image_metadata(slide), _pitch_estimate(array_rc, pixel_xy, platform) if array_rc.any() else None, where)
    X = src.raw.X if src.raw is not None else src.X
    in_tissue = src.obs["in_tissue"].to_numpy() if "in_tissue" in src.obs else np.ones(len(src))
    return _build(
        X, src.var_names, src.obs_names, array_rc, pixel_xy, in_tissue,
        layout="h5ad", library_id=lib, slide=slide, thumbnail=None, thumbnail_scale=None,
        um_per_px=um, platform=platform, where=where,
    )


def read_section(path, *, image: Optional[str] = None, um_per_px: Optional[float] = None, library_id: Optional[str] = None, **kwargs):
    """Reads one section from any layout bleep-rs knows (see the module's docstring)."""
    p = Path(path)
    if not p.exists():
        raise BleepError(f"{p}: no such file or folder")
    if p.is_file() and p.suffix == ".h5ad":
        return read_h5ad(p, image=image, um_per_px=um_per_px, library_id=library_id, **kwargs)
    if p.is_dir() and (p / "counts.tsv.gz").exists() and (p / "spots.tsv").exists():
        return read_legacy_st(p, um_per_px=um_per_px, image=image, library_id=library_id)
    if p.is_dir() and (p / "filtered_feature_bc_matrix.h5").exists():
        return read_space_ranger(p, image=image, um_per_px=um_per_px, library_id=library_id)
    if p.is_dir() and (p / "outs" / "filtered_feature_bc_matrix.h5").exists():
        return read_space_ranger(p / "outs", image=image, um_per_px=um_per_px, library_id=library_id)
    raise BleepError(
        f"{p}: not a section bleep-rs can read: expected a Space Ranger outs/ folder "
        "(filtered_feature_bc_matrix.h5 + spatial/), a legacy ST folder (counts.tsv.gz + spots.tsv + "
        "image), or an .h5ad with obsm['spatial']"
    )


def section_patches(adata, size: int = 224, um_per_px: Optional[float] = None, **kwargs) -> np.ndarray:
    """Spot-centred patches (n, size, size, 3) of a section read by :func:`read_section`, at ``um_per_px``
    (default: the image's own resolution)."""
    from .slide import Slide

    info = adata.uns.get("bleep", {})
    if not info.get("image_path"):
        raise BleepError("this section has no full-resolution image: read it with image=PATH to extract patches")
    slide = Slide(info["image_path"], um_per_px=info["um_per_px"])
    return slide.spot_patches(adata.obsm["spatial"], size, um_per_px, **kwargs)
