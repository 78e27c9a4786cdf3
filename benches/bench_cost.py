"""The default model's cost per tile: prediction quality against backbone passes per tile, in one run.

    .venv/bin/python benches/bench_cost.py [--sets mob her2st] [--seeds 0 1 2] [--fields 1 1+2 1+2+3] [--wide-fields-px PX]
    .venv/bin/python benches/bench_cost.py --backbones efficientnet-lite0 efficientnet-lite1 efficientnet-lite2
                                             # only the encoder's seconds per 1,000 patches of each backbone

The folds of benches/bench_quality.py (leave one section out on MOB1-4 and HER2ST C2-C4, and HER2ST C2-C4 ->
B4 across patients), the default recipe (bleep_rs.train on cached frozen EfficientNet-Lite0 features, 8
dihedral views for augmentation), with the model's fields of view 1 / 1+2 / 1+2+3 and, at prediction, the
mean embedding of 1, 2, 4 or 8 dihedral views of each tile (test-time augmentation), as many for every field
or fewer of field 1 than of the wider fields (``tta_views`` N1/NW; a field's other views take the mean of its
own, bleep_rs.model.fill_views):

  views 1: (0,) identity; 2: (0, 4) and its mirror; 4: (0, 2, 4, 6) the two mirrors and the half turn; 8: all

A tile costs the sum of its fields' views in backbone passes (today's default, 2/4: 2 + 4 + 4 = 10), the wider fields' at their own
input side (--wide-fields-px: default the backbone's, 112 px for Lite0; 0: its input size). The features of every field and
view come from one cache, so every point is scored on the same patches; each field set is trained once per
fold and seed and predicted with each view set. Scores: mean per-gene Pearson r over HEG-50 and HVG-50 per
held-out section; per set, the mean over LOSO folds per seed, then mean and sd over seeds; the cross-patient
fold apart. Seconds per 1,000 tiles: field 1's views x its measured seconds per 1,000 patches + each wider
field's views x its own (in this run: ONNX Runtime, one view of one field at its size, the encoder predict uses), the rest of `predict --slide` aside
(benches/bench_predict.py measures it: 0.90x the encoder's rate on a whole slide). Results: .bench/cost.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
from bench_quality import DATA, SETS, fold_targets, folds, load_set, training_data  # noqa: E402

FIELDS = {"1": [0], "1+2": [0, 1], "1+2+3": [0, 1, 2]}
#: tta_views points per field set: views of every field, and (field 1's, the wider fields') pairs.
POINTS = {"1": [(1,), (2,), (4,), (8,)],
          "1+2": [(1,), (2,), (4,), (8,), (2, 4)],
          "1+2+3": [(1,), (2,), (4,), (8,), (1, 4), (2, 4), (1, 8), (2, 8), (4, 8)]}
SLIDE_TILES = 30_000


def fields_of(feats: np.ndarray, idx: list, dim: int) -> np.ndarray:
    """The fused features of a subset of the fields of view (each field's block, already L2-normalised)."""
    return np.concatenate([feats[..., i * dim : (i + 1) * dim] for i in idx], axis=-1)


def backbone_seconds_per_1000(section, um, backbone: str = "efficientnet-lite0", size: int = 0) -> float:
    """The encoder's seconds per 1,000 patches (one field, one view), as predict runs it; ``size``: at this
    input side instead of the backbone's (the wider fields' ``wide_fields_px``)."""
    import dataclasses

    import bleep_rs
    from bleep_rs.encode import backbone_features
    from bleep_rs.model import BleepModel, ModelConfig

    model = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["g"]), backbone=backbone, input=bleep_rs.InputSpec(fields_of_view=(1.0,), tta=False))).eval()
    spec = dataclasses.replace(model.spec, input_size=size) if size else model.spec
    patches = bleep_rs.section_patches(section, 224, um)
    patches = np.concatenate([patches] * max(1, -(-512 // len(patches))))[:512]
    backbone_features(model.backbone, spec, patches[:64])  # the engine built
    t = time.perf_counter()
    backbone_features(model.backbone, spec, patches)
    return (time.perf_counter() - t) / len(patches) * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--fields", nargs="+", default=list(FIELDS), choices=list(FIELDS), help="the field sets to train (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / ".bench" / "cost.json")
    ap.add_argument("--wide-fields-px", type=int, default=None, metavar="PX", help="the wider fields' input side (default: the backbone's)")
    ap.add_argument("--backbones", nargs="+", metavar="NAME", help="only time the encoder of each backbone on HER2ST C2 patches")
    args = ap.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    import bleep_rs

    print(f"CPU: {bleep_rs.kernel_info()['cpu']}", flush=True)
    if args.backbones:
        section = bleep_rs.read_section(DATA / "her2st" / "C2")
        for name in args.backbones:
            backbone_seconds_per_1000(section, None, name)  # the export cached: its seconds are not the encoder's
            print(f"{name:<22} {backbone_seconds_per_1000(section, None, name):6.2f} s per 1,000 patches (ONNX Runtime, one field, one view)", flush=True)
        return
    from bleep_rs.evaluate import summarise
    from bleep_rs.model import BleepModel, ModelConfig
    from bleep_rs.training import train

    config = bleep_rs.TrainConfig(input=bleep_rs.InputSpec(wide_fields_px=args.wide_fields_px))
    work = ROOT / ".bench" / "cost-models"
    rows, per_pass = [], None
    for name in args.sets:
        ids, sections, feats, train_feats, um, dim = load_set(name, config)
        if per_pass is None:
            wide = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["g"]), input=config.input)).wide_fields_px  # 0: field 1's size
            full = backbone_seconds_per_1000(sections[0], um)
            per_pass = {"1": full, "wide": backbone_seconds_per_1000(sections[0], um, size=wide) if wide else full}
            print(f"backbone: {full:.2f} s per 1,000 patches of field 1, {per_pass['wide']:.2f} of a wider field"
                  + (f" ({wide} px)" if wide else " (the same size)"), flush=True)
        for tr, held, kind in folds(name):
            if kind == "reverse":  # measured by bench_quality.py; this frontier keeps the folds it was run on
                continue
            train_secs = [sections[i] for i in tr]
            panel, genes, truth = fold_targets(train_secs, sections[held], config.n_top_genes)
            for fname, fidx in ((f, FIELDS[f]) for f in args.fields):
                data = training_data(train_secs, [fields_of(train_feats[i], fidx, dim) for i in tr], panel)
                test_f = fields_of(feats[held], fidx, dim)
                for seed in args.seeds:
                    cfg = bleep_rs.TrainConfig(seed=seed,
                                               progress=False, overwrite=True, resume=False,
      input=config.input.replace(fields_of_view=tuple(float(i + 1) for i in fidx), um_per_px=um))
                    model = train(train_secs, work / f"{name}-{ids[held]}", cfg, data=data)
                    ref = bleep_rs.build_reference(model, train_secs)
                    for point in POINTS[fname]:
                        counts = model.tta_views(point)
                        emb = model.embed_features(model.view_features(test_f, counts) if max(counts) > 1 else test_f[0])
                        pred = ref.impute(emb, k=model.config.k, method=model.config.method, centre_sections=bleep_rs.PredictConfig().centre_sections)
                        s = summarise(pred, truth, genes)
                        rows.append({"set": name, "held_out": ids[held], "cross_patient": kind != "loso", "fields": fname, "views": label(point),
                                     "passes": sum(counts), "seed": seed, "heg50": s["heg50"], "hvg50": s["hvg50"]})
                    last = rows[-len(POINTS[fname]):]
                    print(f"{name}/{ids[held]:<5} fields {fname:<6} seed {seed}: HEG-50 by views " + " ".join(f"{r['views']} {r['heg50']:.3f}" for r in last),
                          flush=True)
    summary = summarise_points(rows, args.sets, per_pass, args.fields)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "summary": summary, "backbone_s_per_1000": per_pass}, indent=1))
    print(f"results: {args.out}")


def label(point: tuple) -> str:
    """A tta_views point as printed: "8" (every field), "2/4" (field 1's / the wider fields')."""
    return "/".join(map(str, point))


def summarise_points(rows: list, sets: list, per_pass: float, fields: list) -> list:
    """Per point (fields, views) and set: LOSO mean per seed, then mean and sd over seeds; cross-patient."""
    out = []
    print(f"\n{'fields':<7}{'views':>6}{'passes':>7}{'s / 1,000 tiles':>16}{'30k-tile slide':>15}  per set: LOSO HEG-50 (mean ± sd over seeds) / "
          "HVG-50; cross-patient HEG-50 / HVG-50")
    for fname in fields:
        for views in POINTS[fname]:
            nv = label(views)
            mine = [r for r in rows if r["fields"] == fname and r["views"] == nv]
            passes = mine[0]["passes"]
            cost = views[0] * per_pass["1"] + views[-1] * (len(FIELDS[fname]) - 1) * per_pass["wide"]  # seconds per 1,000 tiles
            point = {"fields": fname, "views": nv, "passes": passes, "s_per_1000_tiles": cost, "slide_minutes": cost * SLIDE_TILES / 1000 / 60}
            cells = []
            for name in sets:
                loso = [r for r in mine if r["set"] == name and not r["cross_patient"]]
                seeds = sorted({r["seed"] for r in loso})
                stat = {q: [float(np.mean([r[q] for r in loso if r["seed"] == s])) for s in seeds] for q in ("heg50", "hvg50")}
                cross = [r for r in mine if r["set"] == name and r["cross_patient"]]
                point[name] = {"loso": {q: (float(np.mean(v)), float(np.std(v))) for q, v in stat.items()},
                               "cross": {q: float(np.mean([r[q] for r in cross])) for q in ("heg50", "hvg50")} if cross else None}
                cell = f"{name} {np.mean(stat['heg50']):.3f} ± {np.std(stat['heg50']):.3f} / {np.mean(stat['hvg50']):.3f}"
                if cross:
                    cell += f"; cross {point[name]['cross']['heg50']:.3f} / {point[name]['cross']['hvg50']:.3f}"
                cells.append(cell)
            out.append(point)
            print(f"{fname:<7}{nv:>6}{passes:>7}{point['s_per_1000_tiles']:>16.1f}{point['slide_minutes']:>12.1f} min  " + " | ".join(cells))
    return out


if __name__ == "__main__":
    main()
