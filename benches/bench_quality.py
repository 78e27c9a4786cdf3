"""Prediction quality, leave one section out, all methods in one run (../shared/docs/benchmarks.md, section 4).

    make bench-quality               # or: .venv/bin/python benches/bench_quality.py [--sets mob her2st]
    .venv/bin/python benches/bench_quality.py --finetune --device cuda      # GPU: backbone fine-tuned too

For each fold (MOB1-4: 4 folds; HER2ST C2-C4: 3 folds) the model and the reference are built on the other
sections and the held-out section's spots are predicted from its image alone. Methods:

  bleep   BLEEP trained by bleep-rs (its loss, method.md section 3); on a CPU the heads train on frozen
          EfficientNet-Lite0 features (--finetune: the whole image encoder, for a GPU)
  clip    the same with the CLIP loss
  knn     kNN-50 on the frozen backbone features (mean of the 50 most similar training spots, cosine)
  ridge   ridge regression from the frozen features (standardised) to the panel, alpha by generalised CV

Each prints and saves (.bench/quality.json) the mean per-gene Pearson r on the held-out section over
HEG-50, HVG-50 and the whole panel (panel = union of the training sections' top-1000 HVGs). Patches:
HER2ST 224 px at native resolution (0.69 um/px, 154 um); MOB 224 px at 1 um/px (224 um, upsampled from
8.75 um/px: a spot there is 23 px).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BLEEP_RS_DATA", ROOT.parent / "shared" / "data"))
SETS = {
    "mob": (["MOB1", "MOB2", "MOB3", "MOB4"], 1.0),
    "her2st": (["C2", "C3", "C4"], None),
}


def load_set(name, cache):
    """Sections, their patches and their frozen backbone features (cached in .bench/)."""
    import bleep_rs
    from bleep_rs.model import BleepModel, ModelConfig
    from bleep_rs.sections import section_patches

    ids, um = SETS[name]
    sections = [bleep_rs.read_section(DATA / name / s) for s in ids]
    patches = [section_patches(s, 224, um) for s in sections]
    feats = []
    for sid, p in zip(ids, patches):
        f = cache / f"features_{name}_{sid}.npy"
        if not f.exists():
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            # The frozen backbone with its own input constants, as training and prediction use it.
            model = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["g"]))).eval().to(device)
            with torch.no_grad():
                out = [model.image_features(model.prepare_images(p[i : i + 64])).float().cpu().numpy() for i in range(0, len(p), 64)]
            np.save(f, np.concatenate(out).astype(np.float32))
        feats.append(np.load(f))
    return ids, sections, patches, feats


def knn_predict(train_f, train_y, test_f, k=50):
    import bleep_rs

    ref = bleep_rs.Reference.build(train_f, train_y, [f"g{i}" for i in range(train_y.shape[1])])
    return ref.impute(test_f, k=k)


def ridge_predict(train_f, train_y, test_f):
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_f)
    model = RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(scaler.transform(train_f), train_y)
    return model.predict(scaler.transform(test_f)).astype(np.float32)


def bleep_predict(train_secs, train_inputs, train_y, test_input, panel, loss, args, out_dir):
    import bleep_rs
    from bleep_rs.train import TrainConfig, TrainingData, train

    finetune = args.finetune
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, loss=loss, device=args.device, progress=False, lr=args.lr,
        backbone="efficientnet-lite0" if finetune else f"features:{train_inputs[0].shape[1]}",
        val_fraction=0.2, patience=args.patience, seed=args.seed,
    )
    labels = np.concatenate([[str(i)] * len(x) for i, x in enumerate(train_inputs)])
    data = TrainingData(np.concatenate(train_inputs), train_y, labels, panel)
    model = train(train_secs, out_dir, cfg, data=data)
    ref = bleep_rs.build_reference(model, train_secs)
    return ref.impute(model.embed_images(test_input), k=50)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["mob", "her2st"], choices=list(SETS))
    ap.add_argument("--methods", nargs="+", default=["bleep", "clip", "knn", "ridge"])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (the paper's 1e-3 by default)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--patience", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--finetune", action="store_true", help="train the whole image encoder (a GPU job)")
    ap.add_argument("--folds", type=int, default=0, help="run only the first N folds of each set (0: all)")
    args = ap.parse_args()
    import warnings

    warnings.simplefilter("ignore", UserWarning)
    from bleep_rs.evaluate import summarise
    from bleep_rs.expression import choose_panel, panel_expression

    cache = ROOT / ".bench"
    cache.mkdir(exist_ok=True)
    results, timing = {}, {}
    for name in args.sets:
        t = time.perf_counter()
        ids, sections, patches, feats = load_set(name, cache)
        timing[f"{name}: patches + frozen features"] = time.perf_counter() - t
        for held in range(args.folds or len(ids)):
            tr = [i for i in range(len(ids)) if i != held]
            panel = choose_panel([sections[i] for i in tr], n_top_genes=1000)
            truth = panel_expression(sections[held], panel, warn=False)
            train_y = np.concatenate([panel_expression(sections[i], panel, warn=False) for i in tr])
            train_f = np.concatenate([feats[i] for i in tr])
            for method in args.methods:
                t = time.perf_counter()
                if method == "knn":
                    pred = knn_predict(train_f, train_y, feats[held])
                elif method == "ridge":
                    pred = ridge_predict(train_f, train_y, feats[held])
                else:
                    inputs = [patches[i] for i in tr] if args.finetune else [feats[i] for i in tr]
                    test = patches[held] if args.finetune else feats[held]
                    pred = bleep_predict([sections[i] for i in tr], inputs, train_y, test, panel, method, args, cache / f"model_{name}_{ids[held]}_{method}")
                s = summarise(pred, truth, panel.genes)
                key = f"{name}/{ids[held]}/{method}"
                results[key] = {"heg50": s["heg50"], "hvg50": s["hvg50"], "all": s["all"], "constant": len(s["constant"]), "seconds": time.perf_counter() - t}
                print(f"{key:<22} HEG-50 {s['heg50']:.3f}  HVG-50 {s['hvg50']:.3f}  all {s['all']:.3f}  "
                      f"({len(panel.genes)} genes, {time.perf_counter() - t:.1f} s)", flush=True)
    print("\nmean over folds (HEG-50 / HVG-50 / all genes)")
    summary = {}
    for name in args.sets:
        for method in args.methods:
            rows = [v for k, v in results.items() if k.startswith(name + "/") and k.endswith("/" + method)]
            m = {q: float(np.mean([r[q] for r in rows])) for q in ("heg50", "hvg50", "all")}
            summary[f"{name}/{method}"] = m
            print(f"  {name:<7} {method:<6} {m['heg50']:.3f} / {m['hvg50']:.3f} / {m['all']:.3f}   ({sum(r['seconds'] for r in rows):.0f} s in all)")
    out = cache / ("quality_finetune.json" if args.finetune else "quality.json")
    out.write_text(json.dumps({"folds": results, "summary": summary, "timing": timing, "args": vars(args)}, indent=1))
    print(f"results: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
