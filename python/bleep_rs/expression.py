"""The expression side: per-section normalisation, highly variable genes, and the model's gene panel.

Per section (BLEEP, method.md section 1): counts are scaled so that every spot has the section's median
library size, then ``log1p``; the top-n highly variable genes use scanpy's "seurat" flavour. The panel is
the union (or intersection) of the training sections' sets, or a list the user gives. The panel and every
parameter travel with the model (:class:`Panel`), and every later section is put on that panel, missing
genes as zeros, reported.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from ._core import BleepError

__all__ = ["Panel", "normalize_log1p", "normalise_log1p", "highly_variable_genes", "choose_panel", "panel_expression", "detected_genes", "reference_genes",
           "read_gene_list", "MIN_SPOTS"]

#: A gene is "detected" in a section when at least this many of its spots have a non-zero count.
MIN_SPOTS = 3


@dataclass
class Panel:
    """The model's gene panel and how expression is put on it."""

    genes: List[str]
    n_top_genes: int = 1000
    flavor: str = "seurat"
    mode: str = "union"
    target_sum: str = "median"  # per section: the median library size
    transform: str = "log1p"
    sources: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Panel":
        return cls(**d)


def _counts(adata) -> "np.ndarray | object":
    import scipy.sparse as sp

    from .readers._common import check_finite

    X = adata.X.tocsr() if sp.issparse(adata.X) else np.asarray(adata.X)
    check_finite(X, adata.uns.get("bleep", {}).get("library_id", "the section"), adata.obs_names, adata.var_names)
    return X


def normalize_log1p(X, *, sparse: bool = False):
    """float32 ``log1p(counts * median_total / total)`` per spot (spots with no counts stay 0): dense, or
    with ``sparse=True`` and sparse counts a scipy CSR matrix (log1p keeps zeros zero, so a sparse section
    is never densified). A NaN or infinite count is an error (it would zero its spot's whole profile)."""
    import scipy.sparse as sp

    from .readers._common import check_finite

    check_finite(X, "normalize_log1p")

    X = X.astype(np.float64) if not sp.issparse(X) else X.astype(np.float64).tocsr()
    totals = np.asarray(X.sum(axis=1)).ravel()
    if X.shape[0] == 0:
        return sp.csr_matrix(X.shape, dtype=np.float32) if sparse and sp.issparse(X) else np.zeros(X.shape, np.float32)
    target = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
    scale = np.divide(target, totals, out=np.zeros_like(totals), where=totals > 0)
    if sp.issparse(X):
        scaled = (sp.diags(scale) @ X).tocsr()
        if sparse:
            scaled.data = np.log1p(scaled.data)
            return scaled.astype(np.float32)
        return np.log1p(scaled.toarray()).astype(np.float32)
    return np.log1p(X * scale[:, None]).astype(np.float32)


#: The older spelling, kept as an alias.
normalise_log1p = normalize_log1p


def highly_variable_genes(log_expression: np.ndarray, n_top: int, n_bins: int = 20) -> np.ndarray:
    """Boolean mask of the highly variable genes, scanpy's ``flavor="seurat"`` with ``n_top_genes``:
    dispersions of ``expm1`` data, normalised within 20 mean bins, the top n (ties included)."""
    import pandas as pd

    X = np.expm1(log_expression.astype(np.float64))
    mean = X.mean(0)
    var = X.var(0, ddof=1) if X.shape[0] > 1 else np.zeros_like(mean)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    dispersion = np.log(dispersion)
    mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    grouped = df.groupby("mean_bin", observed=False)["dispersions"]
    bin_mean, bin_std = grouped.mean(), grouped.std(ddof=1)
    single = bin_std.isnull()
    bin_std[single] = bin_mean[single]
    bin_mean[single] = 0
    norm = (df["dispersions"].to_numpy() - bin_mean[df["mean_bin"]].to_numpy()) / bin_std[df["mean_bin"]].to_numpy()
    valid = np.sort(norm[~np.isnan(norm)])[::-1]
    if len(valid) == 0:
        return np.zeros(len(norm), bool)
    cut = valid[min(n_top, len(valid)) - 1]
    return np.nan_to_num(norm, nan=-np.inf) >= cut


def choose_panel(
    sections: Sequence,
    *,
    n_top_genes: int = 1000,
    mode: str = "union",
    genes: Optional[Sequence[str]] = None,
) -> Panel:
    """The gene panel of training sections: the union (``mode="union"``) or intersection of each one's
    top ``n_top_genes`` highly variable genes, or ``genes`` as given. Order: as first seen."""
    names = [s.uns.get("bleep", {}).get("library_id", f"section {i}") for i, s in enumerate(sections)]
    if genes is not None:
        genes = [str(g) for g in genes]
        if len(set(genes)) != len(genes):
            raise BleepError("the gene list has duplicates")
        return Panel(genes=genes, n_top_genes=0, mode="given", sources=names)
    if mode not in ("union", "intersection"):
        raise BleepError(f'panel mode must be "union" or "intersection", not {mode!r}')
    chosen: List[List[str]] = []
    for s, name in zip(sections, names):
        if s.n_obs < 2:
            raise BleepError(f"{name}: {s.n_obs} spots; a section needs at least two to choose variable genes")
        mask = highly_variable_genes(normalize_log1p(_counts(s)), n_top_genes)
        chosen.append([g for g, m in zip(s.var_names, mask) if m])
    if mode == "union":
        seen, panel = set(), []
        for lst in chosen:
            for g in lst:
                if g not in seen:
                    seen.add(g)
                    panel.append(g)
    else:
        common = set(chosen[0]).intersection(*chosen[1:])
        panel = [g for g in chosen[0] if g in common]
    if not panel:
        raise BleepError(f"the {mode} of the sections' variable genes is empty: use mode='union' or give genes=")
    return Panel(genes=panel, n_top_genes=n_top_genes, mode=mode, sources=names)


def panel_expression(adata, panel: "Panel | Sequence[str]", *, warn: bool = True, sparse: bool = False):
    """The section's normalised log expression on the panel (or on a list of genes), float32 (n_spots,
    n_genes): a dense array, or with ``sparse=True`` and sparse counts a scipy CSR matrix (an all-gene
    reference of a cohort is mostly zeros). Genes the section lacks are zeros, with a warning naming how many."""
    import scipy.sparse as sp

    genes = list(panel.genes) if isinstance(panel, Panel) else [str(g) for g in panel]
    if adata.n_obs == 0:
        raise BleepError("the section has no spots")
    log = normalize_log1p(_counts(adata), sparse=sparse)
    index = {g: i for i, g in enumerate(adata.var_names)}
    cols = np.array([index.get(g, -1) for g in genes], dtype=np.int64)
    missing = [g for g, c in zip(genes, cols) if c < 0]
    if len(missing) == len(genes):
        raise BleepError(
            f"none of the panel's {len(genes)} genes is in this section (e.g. {genes[:3]} vs "
            f"{list(adata.var_names[:3])}): are the gene names of the same kind (symbols vs Ensembl ids)?"
        )
    if missing and warn:
        warnings.warn(f"{len(missing)} of the panel's {len(genes)} genes are missing from this section and set to 0 (e.g. {missing[:5]})", stacklevel=2)
    present = cols >= 0
    if sp.issparse(log):
        # Select the section's columns in panel order, then renumber them to the panel's positions.
        picked = log[:, cols[present]].tocsr()
        where = np.flatnonzero(present).astype(np.int64)
        out = sp.csr_matrix((picked.data, where[picked.indices], picked.indptr), shape=(adata.n_obs, len(genes)))
        out.sort_indices()
        return out
    out = np.zeros((adata.n_obs, len(genes)), np.float32)
    out[:, present] = log[:, cols[present]]
    return out


def detected_genes(adata, min_spots: int = MIN_SPOTS) -> List[str]:
    """The genes of a section with a non-zero count in at least ``min_spots`` of its spots."""
    import scipy.sparse as sp

    X = _counts(adata)
    nonzero = np.asarray((X > 0).sum(axis=0)).ravel() if sp.issparse(X) else (X > 0).sum(axis=0)
    return [str(g) for g, n in zip(adata.var_names, nonzero) if n >= min_spots]


def read_gene_list(path) -> List[str]:
    """The genes of a gene-list file: one name per line, UTF-8 text, blank lines ignored, each name
    stripped. A file that is not one (missing, a named pipe, binary, not UTF-8, no gene) is an error
    naming it and the line at fault."""
    from .readers._files import checked_input

    what = "a gene list: one gene per line (or give all, or panel)"
    path = checked_input(path, what)
    raw = path.read_bytes()
    if b"\0" in raw:
        raise BleepError(f"{path}: a binary file, not {what}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise BleepError(f"{path}: line {line} is not UTF-8 text: save {what} as UTF-8") from None
    genes = [g.strip() for g in text.splitlines() if g.strip()]
    if not genes:
        raise BleepError(f"{path}: no gene in it ({what})")
    return genes


def reference_genes(sections: Sequence, genes: "str | Sequence[str]" = "all", *, panel: Optional[Panel] = None, min_spots: int = MIN_SPOTS) -> List[str]:
    """The genes a reference stores: ``"all"`` (every gene detected, non-zero in at least ``min_spots``
    spots, in at least one section; in first-seen order), ``"panel"`` (the model's input panel) or a list.
    A section whose file does not list a gene is taken to have measured no counts of it (zeros)."""
    if isinstance(genes, str):
        if genes == "panel":
            if panel is None:
                raise BleepError('genes="panel" needs the model\'s panel')
            return list(panel.genes)
        if genes != "all":
            raise BleepError(f'genes must be "all", "panel" or a list of gene names, not {genes!r}')
        out = list(dict.fromkeys(g for s in sections for g in detected_genes(s, min_spots)))
        if not out:
            raise BleepError(f"no gene has a non-zero count in {min_spots} spots of any reference section: are these raw counts?")
        return out
    out = [str(g) for g in genes]
    if not out:
        raise BleepError("the gene list is empty")
    if len(set(out)) != len(out):
        raise BleepError("the gene list has duplicates")
    return out
