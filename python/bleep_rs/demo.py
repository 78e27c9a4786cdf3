"""A small end-to-end example that needs no data files: generated sections, a reference, imputation of
a held-out section, and its per-gene Pearson r (method.md, section 6).

The generated sections stand in for a trained model's output: every spot has a latent tissue state
(a few tissue types laid out in space); its expression is drawn from that state, and its image and
expression embeddings are two noisy views of the same state, as a trained BLEEP joint space would give.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bleep_rs.reference import METHODS, Reference


@dataclass
class Section:
    name: str
    image_embeddings: np.ndarray  # spots x d
    expression_embeddings: np.ndarray  # spots x d
    expression: np.ndarray  # spots x genes, log1p-normalised


def generate_sections(
    n_sections: int = 4, spots: int = 1500, genes: int = 300, dim: int = 256, tissue_types: int = 6, seed: int = 0
) -> tuple[list[Section], list[str]]:
    rng = np.random.default_rng(seed)
    latent_dim = 8
    centres = rng.standard_normal((tissue_types, latent_dim)) * 1.5
    gene_loadings = rng.standard_normal((latent_dim, genes)) * 0.6
    gene_base = rng.normal(0.0, 1.0, genes)
    joint = rng.standard_normal((latent_dim, dim)) / np.sqrt(latent_dim)
    sections = []
    for s in range(n_sections):
        # Tissue types as spatial patches: each spot takes the type of its nearest of a few seeds.
        xy = rng.uniform(0, 1, (spots, 2))
        seeds = rng.uniform(0, 1, (tissue_types * 2, 2))
        kind = np.argmin(((xy[:, None, :] - seeds[None]) ** 2).sum(-1), axis=1) % tissue_types
        z = centres[kind] + 0.5 * rng.standard_normal((spots, latent_dim))
        rate = np.exp(gene_base + z @ gene_loadings)
        counts = rng.poisson(rate * rng.uniform(0.5, 1.5, (spots, 1)))
        totals = np.maximum(counts.sum(1, keepdims=True), 1)
        expr = np.log1p(counts / totals * np.median(totals)).astype(np.float32)
        view = lambda noise: (z @ joint + noise * rng.standard_normal((spots, dim))).astype(np.float32)  # noqa: E731
        sections.append(Section(f"section{s + 1}", view(0.6), view(0.3), expr))
    return sections, [f"GENE{g:04d}" for g in range(genes)]


def pearson_per_gene(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-gene Pearson r across spots; NaN where either vector is constant."""
    p = pred - pred.mean(0)
    t = truth - truth.mean(0)
    denom = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (p * t).sum(0) / denom, np.nan)


def run(out: Path, k: int = 50, seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sections, genes = generate_sections(seed=seed)
    reference_sections, held_out = sections[:-1], sections[-1]
    print(f"generated {len(sections)} sections x {len(held_out.expression)} spots, {len(genes)} genes")

    ref = Reference.build(
        np.concatenate([s.expression_embeddings for s in reference_sections]),
        np.concatenate([s.expression for s in reference_sections]),
        genes,
        sections=[s.name for s in reference_sections for _ in range(len(s.expression))],
        metadata={"source": "bleep_rs.demo", "seed": seed},
    )
    path = out / "reference.safetensors"
    ref.save(path)
    ref = Reference.load(path)
    print(f"built and saved {ref} -> {path}")

    truth = held_out.expression
    heg = np.argsort(-truth.sum(0))[:50]
    hvg = np.argsort(-truth.var(0))[:50]
    report = {"held_out": held_out.name, "k": k, "methods": {}}
    for method in METHODS:
        t = time.perf_counter()
        pred = ref.impute(held_out.image_embeddings, k=k, method=method, temperature=0.1)
        seconds = time.perf_counter() - t
        r = pearson_per_gene(pred, truth)
        report["methods"][method] = {
            "mean_r_HEG50": float(np.nanmean(r[heg])),
            "mean_r_HVG50": float(np.nanmean(r[hvg])),
            "mean_r_all": float(np.nanmean(r)),
            "genes_without_r": int(np.isnan(r).sum()),
            "impute_seconds": seconds,
        }
    report["total_seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report, indent=2))

    print(f"\nimputed {len(truth)} held-out spots ({held_out.name}) from k={k} neighbours:")
    print(f"{'method':<10}{'HEG-50 r':>10}{'HVG-50 r':>10}{'all r':>10}{'ms':>9}")
    for method, m in report["methods"].items():
        print(f"{method:<10}{m['mean_r_HEG50']:>10.3f}{m['mean_r_HVG50']:>10.3f}{m['mean_r_all']:>10.3f}"
              f"{1000 * m['impute_seconds']:>9.1f}")
    print(f"\nreport: {out / 'report.json'}   reference: {path}")
    return report
