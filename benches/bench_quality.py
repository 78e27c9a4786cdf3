"""Prediction quality on held-out sections, every method in one run (../shared/docs/benchmarks.md, section 4).

    make bench-quality                       # or: .venv/bin/python benches/bench_quality.py [--sets mob her2st] [--seeds 0 1 2]

Folds: leave one section out on MOB1-4 (4 folds) and HER2ST C2-C4 (3 folds), and across patients both ways,
reported on their own: HER2ST C2-C4 -> B4, and B4 -> each of C2, C3, C4 (one training section: the probe
chooses its alpha on the two halves of B4's spots). In each fold the model, the reference and the baselines see only the training
sections; the held-out section is predicted from its image alone. Every method predicts the same genes: all
genes detected in the training sections (the reference's default), and each is scored per section (never
pooled) by the mean Pearson r over HEG-50 and HVG-50 (chosen on the held-out section's measured expression)
and over all genes.

Methods (all on the same frozen EfficientNet-Lite0 features, computed by the package's own path and cached):

  default   `bleep_rs.train` with its default recipe (TrainConfig()), reference with build_reference, predict
            as `bleep-rs predict` does (the model's fields of view, TTA, k and aggregation); one run per seed
  knn1      kNN-50 on the single-scale features (the spot patch only): the floor
  knn3      kNN-50 on the same multi-scale features as the default recipe (each field L2-normalised,
            concatenated; the query averaged over the 8 dihedral views as the default recipe does)
  probe     HEST's linear probe on the single-scale features: PCA to 256, ridge, alpha chosen by leave one
            section out among the training sections
  probe3    the same probe on the multi-scale features
  blend     (asked with --methods) the mean of the default recipe's and probe3's predictions, per seed
  blendz    (asked with --methods) the same, probe3's prediction first given the default's per-gene mean and sd
  uncentred (asked with --methods) the default recipe without per-section centring of the reference
            (`predict --no-centre-sections`): the same model and queries

Patches: HER2ST 224 px at native resolution (about 0.69 um/px); MOB 224 px at 1 um/px (upsampled from 8.75).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BLEEP_RS_DATA", ROOT.parent / "shared" / "data"))
SETS = {"mob": (["MOB1", "MOB2", "MOB3", "MOB4"], 1.0, None), "her2st": (["C2", "C3", "C4"], None, "B4")}
ALPHAS = np.logspace(-3, 4, 8)


def load_set(name: str, config):
    """Sections (the extra cross-patient one last), their cached multi-scale, 8-view features, and what
    training reads of each (``training_features``: the same, and with stain_jitter= a jittered copy's)."""
    import bleep_rs
    from bleep_rs.model import BleepModel, ModelConfig
    from bleep_rs.training import native_um_per_px
    from bleep_rs.training.features import training_features

    ids, um, extra = SETS[name]
    ids = ids + ([extra] if extra else [])
    sections = [bleep_rs.read_section(DATA / name / s) for s in ids]
    um = um or native_um_per_px(sections[: len(SETS[name][0])])
    model = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["g"]), backbone=config.backbone, input=config.input.replace(tta=False)))
    train_feats = [training_features(model, s, config, um) for s in sections]
    feats = [t[: len(t) // 2] for t in train_feats] if config.stain_jitter else train_feats  # the plain views: their first half
    return ids, sections, feats, train_feats, um, model.spec.feature_dim


def folds(name: str) -> list:
    """(training indices, held-out index, kind) of each fold of a set: each section left out in turn
    ("loso"); then across patients, the other patient's section (last) predicted from all the others
    ("forward", HER2ST C2-C4 -> B4) and each of those predicted from it alone ("reverse", B4 -> C2-C4)."""
    n_loso = len(SETS[name][0])
    out = [([j for j in range(n_loso) if j != i], i, "loso") for i in range(n_loso)]
    if SETS[name][2]:
        out.append((list(range(n_loso)), n_loso, "forward"))
        out += [([n_loso], i, "reverse") for i in range(n_loso)]
    return out


def fold_targets(train_secs, held, n_top_genes: int) -> tuple:
    """A fold's training panel, its predicted genes (all detected in the training sections) and the
    held-out section's measured expression of them."""
    from bleep_rs.expression import choose_panel, panel_expression, reference_genes

    genes = reference_genes(train_secs, "all")
    return choose_panel(train_secs, n_top_genes=n_top_genes), genes, panel_expression(held, genes, warn=False)


def _l2(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn(train_f, train_y, test_f, k=50):
    import bleep_rs

    ref = bleep_rs.Reference.build(train_f, train_y, [f"g{i}" for i in range(train_y.shape[1])])
    return ref.impute(test_f, k=k)


def _pca(x, dims=256):
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    w = vt[:dims].T
    return lambda z: (z - mean) @ w


def _ridge(x, y, z, alphas):
    """Ridge predictions (with intercept) of z for several alphas, through one SVD of the inputs."""
    xm, ym = x.mean(0), y.mean(0)
    u, s, vt = np.linalg.svd(x - xm, full_matrices=False)
    uty = u.T @ (y - ym)
    zt = (z - xm) @ vt.T
    return [((zt * (s / (s**2 + a))) @ uty + ym).astype(np.float32) for a in alphas]


def probe(train_fs, train_ys, test_f):
    """HEST's linear probe: PCA to 256 dimensions, then ridge; alpha by leave one section out (by the two
    halves of its spots when there is one training section: B4 -> C2-C4)."""
    from bleep_rs.evaluate import gene_correlations

    if len(train_fs) == 1:
        half = len(train_fs[0]) // 2
        train_fs, train_ys = [train_fs[0][:half], train_fs[0][half:]], [train_ys[0][:half], train_ys[0][half:]]
    score = np.zeros(len(ALPHAS))
    for i in range(len(train_fs)):
        x = np.concatenate([f for j, f in enumerate(train_fs) if j != i])
        y = np.concatenate([t for j, t in enumerate(train_ys) if j != i])
        pca = _pca(x)
        for a, p in enumerate(_ridge(pca(x), y, pca(train_fs[i]), ALPHAS)):
            score[a] += np.nanmean(gene_correlations(p, train_ys[i]))
    x, y = np.concatenate(train_fs), np.concatenate(train_ys)
    pca = _pca(x)
    return _ridge(pca(x), y, pca(test_f), [ALPHAS[int(np.argmax(score))]])[0]


def probe3_of(done: dict, train_fs, train_ys, test_f):
    """The probe on the 3 fields, computed once per fold (``done``: the fold's results so far)."""
    if "probe3" not in done:
        done["probe3"] = probe(train_fs, train_ys, test_f)
    return done["probe3"]


def training_data(train_secs, train_feats, panel):
    """The training inputs of a fold: the sections' cached features (views, n, features each), their panel
    expression and section labels."""
    from bleep_rs.expression import panel_expression
    from bleep_rs.training import TrainingData

    expr = np.concatenate([panel_expression(s, panel, warn=False) for s in train_secs])
    labels = np.concatenate([[str(i)] * s.n_obs for i, s in enumerate(train_secs)])
    return TrainingData(np.concatenate(train_feats, axis=1), expr, labels, panel)


def recipe(base: dict, **extra):
    """The TrainConfig of the --set options (the input recipe's options go to its InputSpec)."""
    import dataclasses

    import bleep_rs

    values = {**base, **extra}
    inputs = {f.name for f in dataclasses.fields(bleep_rs.InputSpec)}
    spec = bleep_rs.InputSpec(**{k: v for k, v in values.items() if k in inputs})
    return bleep_rs.TrainConfig(input=spec, **{k: v for k, v in values.items() if k not in inputs})


def default_recipe(train_secs, train_feats, panel, test_feats, seed, out_dir, base, um):
    """bleep_rs.train with the default recipe (its inputs: the cached features), then the reference and the
    prediction as the CLI makes them."""
    import bleep_rs
    from bleep_rs.training import train

    cfg = recipe(base, seed=seed, um_per_px=um, progress=False, overwrite=True, resume=False)
    model = train(train_secs, out_dir, cfg, data=training_data(train_secs, train_feats, panel))
    ref = bleep_rs.build_reference(model, train_secs)
    counts = model.tta_views()  # the views each field averages, as predict runs them
    emb = model.embed_features(model.view_features(test_feats, counts) if max(counts) > 1 else test_feats[0])
    centre = bleep_rs.PredictConfig().centre_sections
    return ref.impute(emb, k=model.config.k, method=model.config.method, centre_sections=centre), ref.genes, (model, ref, emb)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["default", "knn1", "knn3", "probe", "probe3"])
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="change a TrainConfig field of the default recipe, e.g. --set temperature=4 (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / ".bench" / "quality.json")
    args = ap.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    import bleep_rs
    from bleep_rs.evaluate import summarise
    from bleep_rs.expression import panel_expression

    print(f"CPU: {bleep_rs.kernel_info()['cpu']} (the scores do not depend on it; the seconds do)", flush=True)
    base = {}
    for item in args.set:
        key, value = item.split("=", 1)
        base[key] = json.loads(value) if value[:1] in "[{0123456789-.tfn" else value
    config = recipe(base)
    work = ROOT / ".bench" / "quality-models"
    results, timing = [], {}
    for name in args.sets:
        t = time.perf_counter()
        ids, sections, feats, train_feats, um, dim = load_set(name, config)
        timing[f"{name}: patches and features (cached after the first run)"] = time.perf_counter() - t
        for tr, held, kind in folds(name):
            train_secs = [sections[i] for i in tr]
            panel, genes, truth = fold_targets(train_secs, sections[held], config.n_top_genes)
            train_y = [panel_expression(s, genes, warn=False) for s in train_secs]
            single = [f[0, :, :dim] for f in feats]  # field 1, view 0
            multi = [f[0] for f in feats]
            done: dict = {}  # per fold: the 3-field probe and each seed's default recipe, which blend and blendz reuse
            for method in args.methods:
                for seed in args.seeds if method in ("default", "blend", "blendz", "uncentred") else [None]:
                    t = time.perf_counter()
                    if method == "knn1":
                        pred = knn(np.concatenate([single[i] for i in tr]), np.concatenate(train_y), single[held])
                    elif method == "knn3":
                        pred = knn(np.concatenate([multi[i] for i in tr]), np.concatenate(train_y), _l2(feats[held]).mean(0))
                    elif method == "probe":
                        pred = probe([single[i] for i in tr], train_y, single[held])
                    elif method == "probe3":
                        pred = probe3_of(done, [multi[i] for i in tr], train_y, multi[held])
                    else:  # the default recipe, alone, averaged with the 3-field probe (blend, blendz) or without centring
                        if seed not in done:
                            done[seed] = default_recipe(train_secs, [train_feats[i] for i in tr], panel, feats[held], seed,
                                                        work / f"{name}-{ids[held]}", base, um)
                        pred, ref_genes, trained = done[seed]
                        assert list(ref_genes) == list(genes)
                        if method == "uncentred":
                            model, ref, emb = trained
                            pred = ref.impute(emb, k=model.config.k, method=model.config.method)
                        if method in ("blend", "blendz"):
                            other = probe3_of(done, [multi[i] for i in tr], train_y, multi[held])
                            if method == "blendz":  # the probe's prediction given the default's per-gene mean and spread first
                                other = (other - other.mean(0)) / np.maximum(other.std(0), 1e-12) * pred.std(0) + pred.mean(0)
                            pred = 0.5 * (pred + other)
                    s = summarise(pred, truth, genes)
                    row = {"set": name, "held_out": ids[held], "fold": kind, "method": method, "seed": seed,
                           "heg50": s["heg50"], "hvg50": s["hvg50"], "all": s["all"], "genes": len(genes), "seconds": time.perf_counter() - t}
                    results.append(row)
                    print(f"{name}/{ids[held]:<5} {method:<8} seed {seed if seed is not None else '-'}  HEG-50 {s['heg50']:.3f}  "
                          f"HVG-50 {s['hvg50']:.3f}  all {s['all']:.3f}  ({len(genes)} genes, {row['seconds']:.1f} s)", flush=True)
    summary = summarise_runs(results, args)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(
        {"rows": results, "summary": summary, "timing": timing, "recipe": {**base}, "args": {k: str(v) for k, v in vars(args).items()}}, indent=1
    ))
    print(f"results: {args.out}")


def summarise_runs(rows, args) -> dict:
    """Per set and method: the mean over the leave-one-out folds of each score (the default recipe's per
    seed, then mean and spread over seeds), the ratio of HEG-50 to the kNN-50 floor, and across patients
    each direction's mean (C2-C4 -> B4; B4 -> C2-C4 over its three held-out sections), mean ± sd over seeds."""
    print("\nmean over the leave-one-section-out folds, per-section r (default: mean ± sd over seeds)")
    print(f"{'set':<7} {'method':<8} {'HEG-50':>14} {'HVG-50':>14} {'all':>14}  {'/ floor':>7}   across patients HEG-50 / HVG-50: "
          "C2-C4 -> B4 | B4 -> C2-C4")
    out = {}
    for name in args.sets:
        knn1 = [r["heg50"] for r in rows if r["set"] == name and r["method"] == "knn1" and r["fold"] == "loso"]
        floor = float(np.mean(knn1)) if knn1 else None
        for method in args.methods:
            mine = [r for r in rows if r["set"] == name and r["method"] == method]
            seeds = sorted({r["seed"] for r in mine}, key=lambda s: -1 if s is None else s)
            entry: dict = {"folds": sorted({r["held_out"] for r in mine if r["fold"] == "loso"})}
            for kind in ("loso", "forward", "reverse"):
                part = [r for r in mine if r["fold"] == kind]
                if part:
                    per_seed = {q: [np.mean([r[q] for r in part if r["seed"] == s]) for s in seeds] for q in ("heg50", "hvg50", "all")}
                    entry[kind] = {q: (float(np.mean(v)), float(np.std(v))) for q, v in per_seed.items()}
            out[f"{name}/{method}"] = entry
            several = len(seeds) > 1
            fmt = lambda m, s, several=several: f"{m:.3f} ± {s:.3f}" if several else f"{m:.3f}        "  # noqa: E731
            stats = entry["loso"]
            ratio = f"{stats['heg50'][0] / floor:.2f}x" if floor else ""
            line = f"{name:<7} {method:<8} {fmt(*stats['heg50']):>14} {fmt(*stats['hvg50']):>14} {fmt(*stats['all']):>14}  {ratio:>7}  "
            line += " | ".join(f" {fmt(*entry[k]['heg50'])} / {entry[k]['hvg50'][0]:.3f}" for k in ("forward", "reverse") if k in entry)
            print(line)
    return out


if __name__ == "__main__":
    main()
