"""10x Space Ranger ``outs/`` folders (Visium): the feature-barcode matrix, the tissue positions in any of
their three forms, the scale factors and the hires / lowres images, as scanpy's ``read_visium`` keeps
them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from .._core import BleepError
from ._common import build, check_unique, compressed_problem, image_metadata, open_image, pitch_estimate, platform, resolve_um_per_px, under_tissue
from ._files import checked_input, flags, is_input_file, metadata_number, numbers, read_json, read_table

POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def read_positions(spatial: Path):
    """Space Ranger's tissue positions in any of its three forms, recognised by content: (DataFrame
    indexed by barcode, the file)."""
    import pandas as pd

    for candidate in ["tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv"]:
        f = spatial / candidate
        if not is_input_file(f):
            continue
        with checked_input(f, "Space Ranger tissue positions").open("rb") as fh:
            magic = fh.read(4)
        if magic == b"PAR1":
            try:
                df = pd.read_parquet(f)
            except ImportError as e:
                raise BleepError(f"{f}: reading parquet positions needs pyarrow: pip install 'bleep-rs[parquet]'") from e
            except Exception as e:  # pyarrow raises its own kinds for a damaged file
                raise BleepError(f"{f}: not a readable parquet file ({e})") from e
        else:
            first = read_table(f, "Space Ranger tissue positions", header=None, nrows=1, dtype=str)
            has_header = str(first.iloc[0, 0]).strip().lower() == "barcode"
            # Barcodes stay strings ("001" is not 1): else they no longer match the matrix's.
            df = read_table(f, "Space Ranger tissue positions", header=0 if has_header else None, names=None if has_header else POSITION_COLUMNS,
                            dtype={"barcode": str})
        missing = set(POSITION_COLUMNS) - set(df.columns)
        if missing:
            raise BleepError(f"{f}: not Space Ranger tissue positions (missing columns {sorted(missing)})")
        df = df.set_index(df["barcode"].astype(str))
        check_unique(df.index, "barcodes", f, "each row must be one spot")
        df["in_tissue"] = flags(df, "in_tissue", f).astype(np.int64)
        df[POSITION_COLUMNS[2:4]] = numbers(df, POSITION_COLUMNS[2:4], f, whole=True).astype(np.int64)
        df[POSITION_COLUMNS[4:]] = numbers(df, POSITION_COLUMNS[4:], f)
        return df, f
    raise BleepError(f"{spatial}: no tissue_positions.parquet, tissue_positions.csv or tissue_positions_list.csv")


def _text(value) -> str:
    value = np.asarray(value).ravel()[0] if isinstance(value, np.ndarray) else value
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _strings(group, name: str, n: int, f: Path) -> list:
    """The ``n`` strings of dataset ``name``; one that is not UTF-8 is an error naming it (replacing its
    bytes would rename a gene or a barcode without a word)."""
    values = np.asarray(group[name][()]).ravel()
    if values.dtype.kind not in "SUO" or len(values) != n:
        raise BleepError(f"{f}: {group.name}/{name} must be {n} strings, not {len(values)} {values.dtype} values: the matrix is damaged")
    out = []
    for i, v in enumerate(values):
        try:
            out.append(v.decode() if isinstance(v, bytes) else str(v))
        except UnicodeDecodeError:
            raise BleepError(f"{f}: {group.name}/{name}[{i}] ({bytes(v)!r:.60}) is not UTF-8 text: the matrix is damaged; copy it again") from None
    return out


def _sparse_matrix(m, f: Path):
    """The genes x barcodes CSC matrix of a 10x ``matrix`` group, checked before scipy sees it (an index
    past the genes would make it allocate without bound)."""
    import scipy.sparse as sp

    shape = np.asarray(m["shape"][()]).ravel()
    if shape.dtype.kind not in "iu" or len(shape) != 2 or (shape < 0).any():
        raise BleepError(f"{f}: matrix/shape must be two counts (genes, barcodes), not {shape.tolist()}")
    n_genes, n_barcodes = (int(v) for v in shape)
    data, indices, indptr = (np.asarray(m[k][()]).ravel() for k in ("data", "indices", "indptr"))
    problem = compressed_problem(data, indices, indptr, n_barcodes, n_genes, "barcode", "gene")
    if problem and len(indptr) != n_barcodes + 1:
        problem += f" (shape {shape.tolist()})"
    if problem:
        raise BleepError(f"{f}: an inconsistent feature-barcode matrix ({problem}): the file is damaged; copy it again from the Space Ranger outs/")
    return sp.csc_matrix((data, indices.astype(np.int64), indptr.astype(np.int64)), shape=(n_genes, n_barcodes))


def read_10x_h5(f: Path):
    """(X spots x genes CSR, gene names, gene ids, barcodes, file attributes) of the gene-expression
    features of a 10x feature-barcode matrix."""
    import h5py

    checked_input(f, "a Space Ranger folder has filtered_feature_bc_matrix.h5")
    try:
        with h5py.File(f, "r") as h5:
            m = h5["matrix"]
            # Stored genes x barcodes, compressed by barcode (CSC of genes x spots).
            X = _sparse_matrix(m, f).T.tocsr()
            n_genes, n_barcodes = X.shape[1], X.shape[0]
            barcodes = _strings(m, "barcodes", n_barcodes, f)
            feats = m["features"]
            names = _strings(feats, "name", n_genes, f)
            ids = _strings(feats, "id", n_genes, f) if "id" in feats else names
            kinds = _strings(feats, "feature_type", n_genes, f) if "feature_type" in feats else ["Gene Expression"] * n_genes
            attrs = {k: _text(v) if k != "library_ids" else [_text(x) for x in np.asarray(v).ravel()] for k, v in h5.attrs.items()}
    except (OSError, KeyError, TypeError, ValueError) as e:  # h5py: damaged file, missing or unreadable dataset
        raise BleepError(f"{f}: not a readable 10x feature-barcode matrix ({type(e).__name__}: {e})") from e
    genes = np.array([k == "Gene Expression" for k in kinds])
    pick = lambda values: [v for v, g in zip(values, genes) if g]  # noqa: E731
    return X[:, genes], pick(names), pick(ids), barcodes, attrs


def sample_name(path: Path) -> str:
    """The sample folder's name: the first folder above ``outs/``, ``binned_outputs/`` and ``square_*``."""
    path = path.resolve()
    while path.name in ("outs", "binned_outputs", "spatial") or path.name.startswith("square_"):
        if path.parent == path:
            break
        path = path.parent
    return path.name


def library_id_of(path: Path, attrs: dict) -> str:
    """scanpy's rule: the h5's first ``library_ids`` entry, else the sample folder's name."""
    ids = attrs.get("library_ids") or []
    return ids[0] if ids and ids[0] else sample_name(path)


def read_images(spatial: Path, scalef: dict, where: str) -> Dict[str, Tuple[np.ndarray, float]]:
    """The hires and lowres PNGs that exist, each with its own scale factor."""
    from ..slide import Slide

    images = {}
    for key in ("hires", "lowres"):
        f = spatial / f"tissue_{key}_image.png"
        if not is_input_file(f):
            continue
        checked_input(f, f"Space Ranger's {key} image")
        factor = metadata_number(scalef, f"tissue_{key}_scalef", spatial / "scalefactors_json.json")
        if factor is None:
            raise BleepError(f"{where}: {f.name} exists but scalefactors_json.json has no tissue_{key}_scalef")
        images[key] = (Slide(f).thumbnail(10**6), factor)
    return images


def refuse_thumbnail(image, pixel_xy: np.ndarray, slide) -> None:
    """A Space Ranger PNG given as the full-resolution image is an error, not a 10x shrunken section."""
    w, h = slide.dimensions
    extent = float(max(pixel_xy[:, 0].max(), pixel_xy[:, 1].max())) if len(pixel_xy) else 0.0
    name = os.path.basename(str(image))
    if "tissue_hires_image" in name or "tissue_lowres_image" in name or (extent > 0 and max(w, h) < 0.5 * extent):
        raise BleepError(
            f"{image} ({w} x {h} px) is a Space Ranger thumbnail, not the full-resolution image: the spot "
            f"positions reach {extent:.0f} px. Pass the H&E image given to Space Ranger (often a .tif)."
        )


def read_counts_and_positions(path: Path):
    """The spots of a Space Ranger folder that are counted and under tissue: (X, genes, gene ids,
    barcodes, positions rows, positions file, h5 attributes, scale factors)."""
    spatial = path / "spatial"
    X, genes, gene_ids, barcodes, attrs = read_10x_h5(path / "filtered_feature_bc_matrix.h5")
    positions, pos_file = read_positions(spatial)
    scalef = read_json(spatial / "scalefactors_json.json", "Space Ranger writes it beside the tissue positions")
    in_tissue = positions["in_tissue"].reindex(barcodes).to_numpy()
    unplaced = np.isnan(in_tissue.astype(float)).sum()
    if unplaced:
        raise BleepError(
            f"{path}: {unplaced} barcodes of the matrix have no row in {pos_file.name} (e.g. "
            f"{[b for b, t in zip(barcodes, in_tissue) if t != t][:2]}): the matrix and the positions come from different runs"
        )
    keep = np.flatnonzero(under_tissue(in_tissue, len(barcodes), str(path), f"in_tissue of {pos_file.name}"))
    kept = [barcodes[i] for i in keep]
    return X[keep], genes, gene_ids, kept, positions.loc[kept], pos_file, attrs, scalef


def read_space_ranger(path, *, image=None, um_per_px: Optional[float] = None, library_id: Optional[str] = None):
    """A Space Ranger ``outs/`` folder: the barcodes under tissue. ``image``: the full-resolution H&E the
    positions refer to (without it the section has the thumbnails but cannot give patches)."""
    import pandas as pd

    path = Path(path)
    where = str(path)
    X, genes, gene_ids, barcodes, pos, pos_file, attrs, scalef = read_counts_and_positions(path)
    pixel_xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    array_rc = pos[["array_row", "array_col"]].to_numpy()
    slide = open_image(image)
    if slide is not None:
        refuse_thumbnail(image, pixel_xy, slide)
    plat = platform("visium")
    metadata = []
    diameter = metadata_number(scalef, "spot_diameter_fullres", path / "spatial" / "scalefactors_json.json")
    if diameter is not None:
        metadata.append((plat.diameter_um / diameter, "scalefactors_json.json (spot_diameter_fullres, 65 um per Space Ranger)"))
    um = resolve_um_per_px(um_per_px, metadata + image_metadata(slide), pitch_estimate(array_rc, pixel_xy, plat), where)
    meta = {k: attrs[k] for k in ("chemistry_description", "software_version") if k in attrs}
    return build(
        X, genes, barcodes, array_rc, pixel_xy, pos["in_tissue"].to_numpy(),
        where=where, layout=f"space-ranger ({pos_file.name})", library_id=library_id or library_id_of(path, attrs),
        plat=plat, platform_source="a Space Ranger Visium folder", um_per_px=um, slide=slide,
        images=read_images(path / "spatial", scalef, where), scalefactors=scalef, metadata=meta,
        var=pd.DataFrame({"gene_ids": gene_ids, "feature_types": "Gene Expression"}), duplicate_genes="unique",
    )
