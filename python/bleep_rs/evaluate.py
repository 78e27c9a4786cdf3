"""Evaluation (method.md section 6): per gene, Pearson r between predicted and measured expression over
the spots of ONE held-out section (never pooled across sections), and the means over HEG-50 (highest
total measured expression), HVG-50 (highest measured variance), the whole panel and named marker genes.
A gene constant in either vector has no r: it is reported (``constant``), never silently dropped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._core import BleepError

__all__ = ["gene_correlations", "summarise", "evaluate_prediction", "report_paths", "write_report"]


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


def check_prediction(pred) -> None:
    """Refuses an AnnData that bleep-rs's predict did not write (a measured section given as the
    prediction would be scored against itself or another section's counts): a prediction carries
    ``uns["bleep"]`` with its ``mode`` (spots, tiles or bins) and the neighbours ``k`` it used."""
    from collections.abc import Mapping

    info = pred.uns.get("bleep") if hasattr(pred, "uns") else None
    if not (isinstance(info, Mapping) and "mode" in info and "k" in info):
        raise BleepError("this is not a bleep-rs prediction (its uns['bleep'] does not say how it was predicted): give the output "
                         "of bleep-rs predict as the prediction, and the measured section second")


def predicted_of(pred) -> np.ndarray:
    """A prediction AnnData's expression as a dense array (spots, genes); anything but a bleep-rs
    prediction is an error (:func:`check_prediction`)."""
    import scipy.sparse as sp

    check_prediction(pred)
    X = pred.X.toarray() if sp.issparse(pred.X) else np.asarray(pred.X)
    if X.ndim != 2 or X.dtype.kind not in "iuf":
        raise BleepError(f"the prediction's X is {X.dtype} {X.shape}, not numbers (spots, genes): is this a bleep-rs prediction?")
    bad = np.flatnonzero(~np.isfinite(X).all(axis=0)) if X.dtype.kind == "f" else []
    if len(bad):
        raise BleepError(f"the prediction has NaN or infinite values in {len(bad)} genes (e.g. {list(pred.var_names[bad[:3]])}): "
                         "a bleep-rs prediction is finite; is the file damaged?")
    return X


def measured_on(pred, section) -> np.ndarray:
    """The section's measured expression, normalised as the reference's (median library size, log1p),
    on the prediction's genes and in its spot order (spots matched by id: each must be unique)."""
    from .expression import Panel, panel_expression
    from .readers._files import check_unique

    check_unique(pred.obs_names, "spot ids", "the prediction", "each predicted spot must be one spot of the section")
    check_unique(section.obs_names, "spot ids", "the measured section", "each spot needs its own id")
    measured = set(section.obs_names)
    missing = [i for i in pred.obs_names if i not in measured]
    if missing:
        raise BleepError(f"{len(missing)} predicted spots are not in the measured section (e.g. {missing[:3]}): "
                         "evaluate a prediction against the section it was made for")
    truth = panel_expression(section, Panel(genes=list(pred.var_names)), warn=False)
    order = {s: i for i, s in enumerate(section.obs_names)}
    return truth[[order[s] for s in pred.obs_names]]


def evaluate_prediction(pred, section, *, markers: Optional[Sequence[str]] = None, top: int = 50) -> Dict[str, object]:
    """:func:`summarise` of a prediction AnnData against the measured section (spots matched by id)."""
    from .readers._files import check_unique

    check_prediction(pred)
    check_unique(pred.var_names, "gene names", "the prediction", "each predicted gene is scored once")
    present = set(section.var_names)
    if not any(g in present for g in pred.var_names):
        raise BleepError("none of the predicted genes is in the measured section: are they the same kind of gene names?")
    return summarise(predicted_of(pred), measured_on(pred, section), list(pred.var_names), markers=markers, top=top)


def report_paths(path: "os.PathLike[str] | str") -> Tuple[Path, Path]:
    """What a report path names: REPORT.json (set means + per-gene r) and REPORT.csv beside it (one row per
    gene); ``path`` may end in either suffix, and names both."""
    path = Path(path)
    if path.suffix.lower() not in (".json", ".csv"):
        raise BleepError(f"out={path}: name the report REPORT.json or REPORT.csv (both are written)")
    return path.with_suffix(".json"), path.with_suffix(".csv")


def write_report(report: Dict[str, object], path: "os.PathLike[str] | str", *, top: int = 50, overwrite: bool = False) -> Tuple[Path, Path]:
    """Writes the report as REPORT.json and REPORT.csv (see :func:`report_paths`), each atomically;
    existing files are an error unless ``overwrite``."""
    import csv
    import io
    import json

    from ._atomic import LIBRARY_OUTPUT, atomic_path, check_output

    json_path, csv_path = report_paths(path)
    for p in (json_path, csv_path):
        check_output(p, overwrite=overwrite, **LIBRARY_OUTPUT)
    heg, hvg = set(report[f"heg{top}_genes"]), set(report[f"hvg{top}_genes"])
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["gene", "pearson_r", "constant", f"heg{top}", f"hvg{top}"])
    for g, r in zip(report["genes"], report["r"]):
        w.writerow([g, "" if r is None else f"{r:.6f}", int(r is None), int(g in heg), int(g in hvg)])
    for p, text in ((json_path, json.dumps(report, indent=1)), (csv_path, table.getvalue())):
        with atomic_path(p) as tmp:
            tmp.write_text(text)
    return json_path, csv_path
