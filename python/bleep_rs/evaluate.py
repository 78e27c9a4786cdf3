"""Evaluation (method.md section 6): per gene, Pearson r between predicted and measured expression over
the spots of ONE held-out section (never pooled across sections), and the means over HEG-50 (highest
total measured expression), HVG-50 (highest measured variance), the whole panel and named marker genes.
A gene constant in either vector has no r: it is reported (``constant``), never silently dropped.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from ._core import BleepError

__all__ = ["gene_correlations", "summarise", "evaluate_prediction", "write_report"]


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


def measured_on(pred, section) -> np.ndarray:
    """The section's measured expression, normalised as the reference's (median library size, log1p),
    on the prediction's genes and in its spot order."""
    from .expression import Panel, panel_expression

    missing = [i for i in pred.obs_names if i not in set(section.obs_names)]
    if missing:
        raise BleepError(f"{len(missing)} predicted spots are not in the measured section (e.g. {missing[:3]}): evaluate a prediction against the section it was made for")
    truth = panel_expression(section, Panel(genes=list(pred.var_names)), warn=False)
    order = {s: i for i, s in enumerate(section.obs_names)}
    return truth[[order[s] for s in pred.obs_names]]


def evaluate_prediction(pred, section, *, markers: Optional[Sequence[str]] = None, top: int = 50) -> Dict[str, object]:
    """:func:`summarise` of a prediction AnnData against the measured section (spots matched by id)."""
    present = set(section.var_names)
    if not any(g in present for g in pred.var_names):
        raise BleepError("none of the predicted genes is in the measured section: are they the same kind of gene names?")
    return summarise(np.asarray(pred.X), measured_on(pred, section), list(pred.var_names), markers=markers, top=top)


def write_report(report: Dict[str, object], path, *, top: int = 50) -> tuple:
    """Writes the report as JSON (set means + per-gene r) and, beside it, CSV (one row per gene)."""
    import csv
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heg, hvg = set(report[f"heg{top}_genes"]), set(report[f"hvg{top}_genes"])
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)
    csv_path = path.with_suffix(".csv")
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["gene", "pearson_r", "constant", f"heg{top}", f"hvg{top}"])
        for g, r in zip(report["genes"], report["r"]):
            w.writerow([g, "" if r is None else f"{r:.6f}", int(r is None), int(g in heg), int(g in hvg)])
    tmp.replace(csv_path)
    return path, csv_path
