"""Figures a biologist can read: for each gene, measured and predicted expression side by side over the
H&E thumbnail, and a bar chart of the per-gene Pearson r."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ._core import BleepError

__all__ = ["plot_genes", "FIGURE_SUFFIXES"]

#: What matplotlib writes (it picks the format by the suffix).
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".tif", ".tiff", ".eps", ".ps", ".webp")


def _thumbnail(adata):
    lib = adata.uns.get("bleep", {}).get("library_id") or next(iter(adata.uns.get("spatial", {})), None)
    entry = adata.uns.get("spatial", {}).get(lib, {}) if lib else {}
    images = entry.get("images", {})
    # The largest image that is not blank (a Space Ranger hires PNG can be empty).
    for key in sorted(images, key=lambda k: -np.asarray(images[k]).shape[1]):
        img = np.asarray(images[key])
        if img.std() > (1.0 if img.dtype == np.uint8 else 1 / 255):
            return img, float(entry.get("scalefactors", {}).get(f"tissue_{key}_scalef", 1.0))
    return None, 1.0


def plot_genes(pred, genes: Sequence[str], out, *, truth=None, point_size: Optional[float] = None, overwrite: bool = False) -> Path:
    """Draws ``genes`` of a prediction AnnData (and of the measured section ``truth``, matched by spot id)
    over the thumbnail; with ``truth`` also a bar chart of each gene's r. Writes a PNG (or PDF, SVG ...
    by the suffix of ``out``: :data:`FIGURE_SUFFIXES`); an existing file is an error unless ``overwrite``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._atomic import atomic_path, check_output
    from .evaluate import gene_correlations, measured_on, predicted_of

    out = check_output(out, suffixes=FIGURE_SUFFIXES, overwrite=overwrite)
    if "spatial" not in pred.obsm:
        raise BleepError("the prediction has no spot positions (obsm['spatial']): plot a prediction that bleep-rs predict wrote, or add them")
    genes = list(genes)
    unknown = [g for g in genes if g not in set(pred.var_names)]
    if unknown:
        raise BleepError(f"genes {unknown} are not in the prediction's panel (e.g. {list(pred.var_names[:5])})")
    cols = [list(pred.var_names).index(g) for g in genes]
    predicted = predicted_of(pred)[:, cols]
    measured = measured_on(pred, truth)[:, cols] if truth is not None else None
    img, scale = _thumbnail(pred)
    xy = np.asarray(pred.obsm["spatial"]) * scale
    panels = 2 if measured is not None else 1
    extra = 1 if measured is not None else 0
    fig, axes = plt.subplots(len(genes) + extra, panels, figsize=(4.2 * panels, 3.9 * (len(genes) + extra)), squeeze=False)
    size = point_size or max(4.0, 4000.0 / max(len(xy), 1))
    for row, g in enumerate(genes):
        views = ([("measured", measured[:, row])] if measured is not None else []) + [("predicted", predicted[:, row])]
        lo = min(v.min() for _, v in views)
        hi = max(v.max() for _, v in views)
        for c, (title, values) in enumerate(views):
            ax = axes[row][c]
            if img is not None:
                ax.imshow(img)
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=size, cmap="viridis", vmin=lo, vmax=hi, edgecolors="none")
            ax.set_title(f"{g}: {title}", fontsize=11)
            ax.set_axis_off()
            if img is None:
                ax.invert_yaxis()
                ax.set_aspect("equal")
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02, label="log normalised expression")
    if measured is not None:
        r = gene_correlations(predicted, measured)
        ax = axes[-1][0]
        labels = [f"{g}" for g in genes]
        vals = np.nan_to_num(r, nan=0.0)
        ax.barh(labels[::-1], vals[::-1], color=["#4c72b0" if v >= 0 else "#c44e52" for v in vals[::-1]])
        for i, v in enumerate(r[::-1]):
            right = np.isnan(v) or v >= 0
            ax.text(0.01 if right else v - 0.01, i, "constant" if np.isnan(v) else f"{v:.2f}", va="center", fontsize=9, ha="left" if right else "right")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("Pearson r (measured vs predicted, across spots)")
        ax.set_title("per-gene correlation")
        ax.set_xlim(min(-0.1, float(np.nanmin(r)) - 0.1) if np.isfinite(r).any() else -0.1, 1.0)
        axes[-1][1].set_axis_off()
    what = "measured and predicted expression" if measured is not None else "predicted expression"
    fig.suptitle(f"{pred.uns.get('bleep', {}).get('library_id', '')}: {what}", fontsize=13)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out
