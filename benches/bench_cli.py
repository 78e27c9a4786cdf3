"""The leave-one-section-out quality benchmark run through the command line, as a user would, with the
time each stage takes.

    make bench-cli                   # or: .venv/bin/python benches/bench_cli.py [--sets her2st] [--epochs 40]

For each fold of MOB1-4 and HER2ST C2-C4: ``bleep-rs train`` on the other sections (heads on frozen
EfficientNet-Lite0 features: the CPU recipe; ``--finetune`` for a GPU), ``bleep-rs reference``,
``bleep-rs predict`` on the held-out section, ``bleep-rs evaluate``. Each command's wall time is
measured, and predict's own split (patch extraction, encoding, imputation) is read from the prediction's
``uns["bleep"]["seconds"]``. Results: .bench/cli.json and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BLEEP_RS_DATA", ROOT.parent / "shared" / "data"))
SETS = {"mob": (["MOB1", "MOB2", "MOB3", "MOB4"], ["--patch-um-per-px", "1.0"]), "her2st": (["C2", "C3", "C4"], [])}


def cli(*args) -> float:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "bleep_rs", *map(str, args)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"bleep-rs {' '.join(map(str, args[:2]))} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--finetune", action="store_true", help="fine-tune the whole image encoder (a GPU job)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    import anndata as ad

    work = ROOT / ".bench" / "cli"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.sets:
        ids, extra = SETS[name]
        for held in ids:
            fold = work / f"{name}_{held}"
            fold.mkdir(exist_ok=True)
            train = [DATA / name / s for s in ids if s != held]
            t_train = cli("train", *train, "--out", fold / "model", "--epochs", args.epochs, "--device", args.device, "--fresh", "--overwrite",
                          *extra, *([] if args.finetune else ["--freeze-backbone"]))
            t_ref = cli("reference", "--model", fold / "model", *train, "--out", fold / "ref.safetensors", "--overwrite")
            t_pred = cli("predict", DATA / name / held, "--model", fold / "model", "--reference", fold / "ref.safetensors",
                         "--out", fold / "pred.h5ad", "--overwrite")
            t_eval = cli("evaluate", fold / "pred.h5ad", DATA / name / held, "--out", fold / "report.json", "--overwrite")
            report = json.loads((fold / "report.json").read_text())
            split = ad.read_h5ad(fold / "pred.h5ad").uns["bleep"]["seconds"]
            row = {"fold": f"{name}/{held}", "heg50": report["heg50"], "hvg50": report["hvg50"], "all": report["all"],
                   "train_s": t_train, "reference_s": t_ref, "predict_s": t_pred, "evaluate_s": t_eval,
                   "patches_s": float(split["read"]), "encoding_s": float(split["encode"]), "imputation_s": float(split["impute"])}
            rows.append(row)
            print(f"{row['fold']:<12} HEG-50 {row['heg50']:.3f} HVG-50 {row['hvg50']:.3f} all {row['all']:.3f} | train {t_train:.1f} s, "
                  f"reference {t_ref:.1f} s, predict {t_pred:.1f} s (patches {row['patches_s']:.2f}, encoding {row['encoding_s']:.2f}, "
                  f"imputation {row['imputation_s']:.3f}), evaluate {t_eval:.1f} s", flush=True)
    (ROOT / ".bench" / "cli.json").write_text(json.dumps(rows, indent=1))
    for name in args.sets:
        mine = [r for r in rows if r["fold"].startswith(name)]
        mean = {k: sum(r[k] for r in mine) / len(mine) for k in mine[0] if k != "fold"}
        print(f"{name}: mean HEG-50 {mean['heg50']:.3f}, HVG-50 {mean['hvg50']:.3f}, all {mean['all']:.3f}; per fold: train {mean['train_s']:.1f} s, "
              f"reference {mean['reference_s']:.1f} s, predict {mean['predict_s']:.1f} s (patches {mean['patches_s']:.2f} s, encoding "
              f"{mean['encoding_s']:.2f} s, imputation {mean['imputation_s']:.3f} s), evaluate {mean['evaluate_s']:.1f} s")


if __name__ == "__main__":
    main()
