"""Generated Visium HD runs: Space Ranger 3.x binned_outputs over a real H&E of ../shared/data, with bins on
a slightly rotated grid and counts whose 16 um bins are the sums of their four 8 um bins, as Space
Ranger's are."""

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp


def write_10x_h5(path: Path, X, barcodes, genes, library_id: str = "HD1") -> None:
    """A 10x feature-barcode matrix (genes x barcodes, CSC by barcode) with Space Ranger's attributes."""
    m = sp.csc_matrix(sp.csr_matrix(X).T)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        g["data"], g["indices"], g["indptr"] = m.data.astype(np.int32), m.indices.astype(np.int64), m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        feats = g.create_group("features")
        feats["name"] = np.array([n.encode() for n in genes])
        feats["id"] = np.array([f"ENSG{i:011d}".encode() for i in range(len(genes))])
        feats["feature_type"] = np.array([b"Gene Expression"] * len(genes))
        feats["genome"] = np.array([b"GRCh38"] * len(genes))
        f.attrs["library_ids"] = np.array([library_id.encode()])
        f.attrs["software_version"] = "spaceranger-3.0.0"
        f.attrs["chemistry_description"] = "Visium HD v1"


def _bin_folder(out: Path, size_um, um_per_px, rows, cols, xy, in_tissue, X, genes, slide) -> None:
    from PIL import Image

    spatial = out / "spatial"
    spatial.mkdir(parents=True)
    barcodes = [f"s_{int(size_um):03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)]
    pd.DataFrame({
        "barcode": barcodes, "in_tissue": in_tissue.astype(int), "array_row": rows, "array_col": cols,
        "pxl_row_in_fullres": xy[:, 1], "pxl_col_in_fullres": xy[:, 0],
    }).to_parquet(spatial / "tissue_positions.parquet", index=False)
    keep = np.flatnonzero(in_tissue)
    write_10x_h5(out / "filtered_feature_bc_matrix.h5", X[keep], [barcodes[i] for i in keep], genes)
    w = slide.dimensions[0]
    factors = {"bin_size_um": float(size_um), "microns_per_pixel": um_per_px, "spot_diameter_fullres": size_um / um_per_px}
    for key, side in (("hires", 600), ("lowres", 200)):
        thumb = slide.thumbnail(side)
        Image.fromarray(thumb).save(spatial / f"tissue_{key}_image.png")
        factors[f"tissue_{key}_scalef"] = thumb.shape[1] / w
    (spatial / "scalefactors_json.json").write_text(json.dumps(factors))


def make_hd_run(root: Path, image, um_per_px: float, *, angle_deg: float = 1.5, genes=None, seed: int = 0) -> Path:
    """ROOT/outs/binned_outputs/square_008um and square_016um over ``image``; returns ROOT. Tissue is a
    disk in the image's middle; 16 um bins sum their 8 um bins. ``genes``: names (default GENE0..11)."""
    from bleep_rs import Slide

    rng = np.random.default_rng(seed)
    slide = Slide(image)
    w, h = slide.dimensions
    step = 8.0 / um_per_px
    t = np.deg2rad(angle_deg)
    axes = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]]) * step  # column step, row step (px)
    n = int(max(w, h) / step) + 4
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    origin = np.array([-0.02 * w, -0.03 * h])
    centre_of = lambda r, c: origin + np.outer(c + 0.5, axes[0]) + np.outer(r + 0.5, axes[1])  # noqa: E731
    xy = centre_of(rows, cols)
    inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < w) & (xy[:, 1] < h)
    rows, cols, xy = rows[inside], cols[inside], xy[inside]
    tissue = np.hypot(xy[:, 0] - w / 2, xy[:, 1] - h / 2) < 0.4 * min(w, h)
    genes = list(genes) if genes is not None else [f"GENE{i}" for i in range(12)]
    n_genes = len(genes)
    rate = 0.5 + 2.0 * np.outer((xy[:, 0] / w), np.linspace(0, 1, n_genes)) + rng.random((len(xy), n_genes))
    X8 = rng.poisson(rate).astype(np.int64) * tissue[:, None]
    binned = root / "outs" / "binned_outputs"
    _bin_folder(binned / "square_008um", 8, um_per_px, rows, cols, xy, tissue, X8, genes, slide)
    # 16 um bins: the 2 x 2 blocks of 8 um bins, as Space Ranger sums its 2 um bins.
    key = pd.MultiIndex.from_arrays([rows // 2, cols // 2])
    blocks = pd.DataFrame(X8, index=key).groupby(level=[0, 1]).sum()
    r16, c16 = blocks.index.get_level_values(0).to_numpy(), blocks.index.get_level_values(1).to_numpy()
    xy16 = origin + np.outer(2 * c16 + 1.0, axes[0]) + np.outer(2 * r16 + 1.0, axes[1])
    in16 = blocks.to_numpy().sum(1) > 0
    inside16 = (xy16[:, 0] >= 0) & (xy16[:, 1] >= 0) & (xy16[:, 0] < w) & (xy16[:, 1] < h)
    _bin_folder(binned / "square_016um", 16, um_per_px, r16[inside16], c16[inside16], xy16[inside16], in16[inside16],
                blocks.to_numpy()[inside16], genes, slide)
    return root
