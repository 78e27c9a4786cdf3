"""Evaluation (method.md section 6): per gene, Pearson r between predicted and measured expression over
the spots of ONE held-out section (never pooled across sections), and the means over HEG-50 (highest
total measured expression), HVG-50 (highest measured variance), the whole panel and named marker genes.
A gene constant in either vector has no r: it is reported (``constant``), never silently dropped.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from ._core import BleepError

__all__ = ["gene_correlations", "summarise"]


def gene_correlations(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Pearson r of each column (float64, NaN where either column is constant)."""
    p, m = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
    if p.shape != m.shape or p.ndim != 2:
        raise BleepError(f"predicted {p.shape} and measured {m.shape} must be the same (spots, genes) shape")
    if p.shape[0] < 2:
        raise BleepError("a correlation needs at least two spots")
    pc, mc = p - p.mean(0), m - m.mean(0)
    num = (pc * mc).sum(0)
    den = np.sqrt((pc * pc).sum(0) * (mc * mc).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[den == 0] = np.nan
    return r


def summarise(
    predicted: np.ndarray,
    measured: np.ndarray,
    genes: Sequence[str],
    *,
    markers: Optional[Sequence[str]] = None,
    top: int = 50,
) -> Dict[str, object]:
    """Per-gene r and the set means: ``{"genes": [...], "r": [...], "constant": [...], "heg": mean,
    "hvg": mean, "all": mean, "markers": mean, "heg_genes": [...], "hvg_genes": [...], ...}``. Set means
    are over the genes of the set that have an r; the constant ones are listed."""
    genes = [str(g) for g in genes]
    if len(genes) != np.asarray(measured).shape[1]:
        raise BleepError(f"{len(genes)} gene names for {np.asarray(measured).shape[1]} columns")
    r = gene_correlations(predicted, measured)
    m = np.asarray(measured, np.float64)
    order_total = np.argsort(-m.sum(0), kind="stable")[:top]
    order_var = np.argsort(-m.var(0), kind="stable")[:top]

    def mean_of(idx) -> Optional[float]:
        vals = r[np.asarray(idx, int)]
        vals = vals[~np.isnan(vals)]
        return float(vals.mean()) if len(vals) else None

    out: Dict[str, object] = {
        "n_spots": int(m.shape[0]),
        "n_genes": len(genes),
        "genes": genes,
        "r": [None if np.isnan(v) else float(v) for v in r],
        "constant": [g for g, v in zip(genes, r) if np.isnan(v)],
        f"heg{top}": mean_of(order_total),
        f"hvg{top}": mean_of(order_var),
        "all": mean_of(np.arange(len(genes))),
        f"heg{top}_genes": [genes[i] for i in order_total],
        f"hvg{top}_genes": [genes[i] for i in order_var],
    }
    if markers:
        index = {g: i for i, g in enumerate(genes)}
        found: List[int] = [index[g] for g in markers if g in index]
        out["markers"] = mean_of(found)
        out["markers_missing"] = [g for g in markers if g not in index]
    return out
