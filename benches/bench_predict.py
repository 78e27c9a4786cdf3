"""Whole-slide prediction end to end against the image encoder alone, on the same tiles, one run.

    make bench-predict       # or: .venv/bin/python benches/bench_predict.py [--rounds 2] [--copies 3] [--mosaic] [--quick]

Slides: HER2ST B4 (../shared/data/her2st/B4/image.jpg, 9,272 x 9,923 px at 0.6876 um/px) as the plain JPEG
it is, and as a JPEG-compressed (Q 90), 256-px-tiled pyramidal TIFF built from it by pyvips (cached in
.bench/); with --mosaic also the 3 x 3 HER2ST mosaic TIFF of bench_tiling.py (27,810 x 29,733 px, about
2,900 tissue tiles), where the per-slide costs weigh as little as on a real whole slide. Models, trained
here once with bleep_rs.train on HER2ST C2-C4 (heads on frozen features, 3 epochs, no augmentation: the
speed does not depend on the quality) and cached in .bench/predict/, each with its all-gene reference of
C2-C4:

  default   the training defaults: fields of view 1, 2, 3 (the wider two at 112 px) and the mean of 4
            dihedral views (TTA), field 1 through the backbone at 2 of them, as the model records them: 10
            backbone passes per tile
  default-8 the same with all 8 views of every field (the default before): 24 passes per tile
  single    one field of view, no TTA: one backbone pass per tile (the case that leaves the encoder the
            least time to hide the rest behind)
  default-224  (asked with --models) the default until 2026-12-06: every field at 224 px

The single-field model runs on every slide; the default one, about a minute a pass over B4 on 2 cores,
on the TIFF and the mosaic. Per model and slide, in rounds whose order rotates:

  encoder        model.embed_images over the slide's tissue tiles, already read into memory: the
                 encoder's own rate, the target's yardstick
  predict_slide  bleep_rs.predict_slide in this process (the encoder engine already built): opening,
                 tissue mask, reading in the background, encoding, imputation (all-gene reference);
                 "its encoder": the tiles over its encode stage alone (is the reading hidden?)
  command        `bleep-rs predict --slide` in a new process over --copies copies of the slide (one
                 command: interpreter and torch start-up, model and reference loading, the engine, then
                 the slides through one pipeline, each written to an .h5ad)

Rates are tiles per second; each ratio is the median over rounds of that round's rate divided by the
same round's encoder rate, so that load from other processes on a shared machine moves both alike. The
stage seconds of the last predict_slide (uns["bleep"]["seconds"]) are printed. The target (issue 10):
end to end within 10 % of the encoder's own rate on the CPU. --quick: the TIFF only, one round, one
copy, and the single-field model only. Results: .bench/predict.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BLEEP_RS_DATA", ROOT.parent / "shared" / "data"))
WORK = ROOT / ".bench" / "predict"
B4, UM_PER_PX = DATA / "her2st" / "B4" / "image.jpg", 0.6876
# The input recipe of each; "default-224": the default until 2026-12-06, every field at 224 px, 8 views; "default-8": today's
# with 8 views on every field (the default before the views went per field: 2 of field 1, 4 of the wider ones).
MODELS = {"default": {}, "single": {"fields_of_view": (1.0,), "tta": False}, "default-224": {"wide_fields_px": 0, "tta_views": (8,)},
          "default-8": {"tta_views": (8,)}}


def pyramid_tiff() -> Path:
    """B4 as a JPEG-tiled pyramidal TIFF with its pixel size in the resolution tags (built once)."""
    import pyvips

    out = ROOT / ".bench" / "her2st_B4_pyramid.tif"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.tif")
        pyvips.Image.new_from_file(str(B4)).tiffsave(str(tmp), tile=True, tile_width=256, tile_height=256, pyramid=True,
                                                     compression="jpeg", Q=90, xres=1000 / UM_PER_PX, yres=1000 / UM_PER_PX, resunit="cm")
        tmp.rename(out)
    return out


def mosaic_tiff() -> Path:
    """The 3 x 3 mosaic of HER2ST sections that benches/bench_tiling.py builds (27,810 x 29,733 px, about
    2,900 tissue tiles): a slide large enough that the per-slide costs (tissue mask, first batch,
    imputation) are small beside the encoder, as on a real whole slide."""
    sys.path.insert(0, str(ROOT / "benches"))
    from bench_tiling import build_slide

    return build_slide(3)


def model_and_reference(name: str) -> tuple:
    """The bench's model ``name`` and its reference, trained and built on C2-C4 once, then loaded."""
    import bleep_rs
    from bleep_rs.training import TrainConfig, train

    model_dir, ref_path = WORK / f"model_{name}", WORK / f"reference_{name}.safetensors"
    sections = [DATA / "her2st" / s for s in ("C2", "C3", "C4")]
    if (model_dir / "config.json").exists() and not _current(model_dir, name):
        print(f"model {name}: trained with another input recipe than today's; training it again", flush=True)
        (model_dir / "config.json").unlink()
        ref_path.unlink(missing_ok=True)
    if not (model_dir / "config.json").exists():
        t = time.perf_counter()
        cfg = TrainConfig(epochs=3, augment=False, val_fraction=0.0, progress=False, cache_dir=str(WORK / "features"), overwrite=True,
                          input=bleep_rs.InputSpec(**MODELS[name]))
        train(sections, model_dir, cfg)
        print(f"model {name}: trained in {time.perf_counter() - t:.0f} s", flush=True)
    model = bleep_rs.load_model(model_dir)
    if not ref_path.exists():
        bleep_rs.build_reference(model, [bleep_rs.read_section(s) for s in sections], name=str(model_dir)).save(ref_path)
    return model_dir, model, ref_path, bleep_rs.Reference.load(ref_path)


def _current(model_dir: Path, name: str) -> bool:
    """Whether the cached model has the input recipe a model of ``name`` gets today (resolution aside)."""
    import bleep_rs
    from bleep_rs.model import BleepModel, ModelConfig

    today = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["g"]), input=bleep_rs.InputSpec(**MODELS[name]))).config.input
    return bleep_rs.load_model(model_dir).config.input.replace(um_per_px=None) == today.replace(um_per_px=None)


def tissue_tiles(model, path: Path) -> np.ndarray:
    """The model's input for every tissue tile of the slide, read as predict_slide reads it."""
    from bleep_rs.predict import PredictConfig, _open_slide

    _, n, read = _open_slide(model, path, PredictConfig(um_per_px=UM_PER_PX, min_tissue=0.5), hd_run=None)
    return read(slice(0, n))


def command(model_dir: Path, ref_path: Path, slides: list, out: Path) -> float:
    """Wall seconds of one `bleep-rs predict --slide ...` process over ``slides``."""
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "bleep_rs", "predict", "--model", model_dir, "--reference", ref_path, "--slide", *slides,
                          "--um-per-px", str(UM_PER_PX), "--out", out, "--overwrite"], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"bleep-rs predict failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t


def copies(path: Path, n: int) -> list:
    """n links to the slide under distinct names (one output each)."""
    folder = WORK / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        link = folder / f"{path.stem}_{i}{path.suffix}"
        if not link.exists():
            link.symlink_to(path.resolve())
        out.append(link)
    return out


def bench(name: str, slide: Path, rounds: int, n_copies: int) -> dict:
    from bleep_rs.predict import predict_slide

    model_dir, model, ref_path, ref = model_and_reference(name)
    tiles = tissue_tiles(model, slide)
    n = len(tiles)
    model.embed_images(tiles[:8])  # the engine built (export cached) before anything is timed
    slides = copies(slide, n_copies)
    rates = {"encoder": [], "predict_slide": [], "inside": [], "command": []}
    seconds = {}

    def run_encoder():
        t = time.perf_counter()
        model.embed_images(tiles)
        rates["encoder"].append(n / (time.perf_counter() - t))

    def run_predict():
        nonlocal seconds
        t = time.perf_counter()
        pred = predict_slide(model, ref, slide, um_per_px=UM_PER_PX, progress=False)
        rates["predict_slide"].append(pred.n_obs / (time.perf_counter() - t))
        seconds = dict(pred.uns["bleep"]["seconds"])
        rates["inside"].append(pred.n_obs / seconds["encode"])

    def run_command():
        out = WORK / ("out" if len(slides) > 1 else "out.h5ad")  # a folder for several slides
        rates["command"].append(n * len(slides) / command(model_dir, ref_path, slides, out))

    steps = [run_encoder, run_predict, run_command]
    for r in range(rounds):
        for step in steps[r % 3 :] + steps[: r % 3]:
            step()
    ratio = {k: statistics.median(v / e for v, e in zip(rates[k], rates["encoder"])) for k in ("predict_slide", "inside", "command")}
    row = {"model": name, "fields_of_view": list(model.config.input.fields_of_view), "tta_views": list(model.tta_views()), "slide": slide.name,
           "tiles": n, "copies": len(slides), "rates": rates, "ratio": ratio, "seconds": seconds}
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{name:<7} {slide.name:<22} {n} tiles: encoder {med['encoder']:6.2f} tiles/s | predict_slide {med['predict_slide']:6.2f} "
          f"({ratio['predict_slide']:.2f}x the encoder; its encoder {ratio['inside']:.2f}x) | command, {len(slides)} slide(s) "
          f"{med['command']:6.2f} ({ratio['command']:.2f}x)", flush=True)
    print("        last predict_slide's stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--copies", type=int, default=3, help="slides per command (copies of the one slide)")
    ap.add_argument("--models", nargs="+", default=["default", "single"], choices=list(MODELS))
    ap.add_argument("--quick", action="store_true", help="the TIFF and the single-field model only, one round, one copy")
    ap.add_argument("--mosaic", action="store_true", help="also the 3 x 3 HER2ST mosaic TIFF of bench_tiling (2,900 tiles)")
    args = ap.parse_args()
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*genes are missing from this section")  # C2-C4's panels differ a little

    WORK.mkdir(parents=True, exist_ok=True)
    slides = [pyramid_tiff()] if args.quick else [B4, pyramid_tiff()] + ([mosaic_tiff()] if args.mosaic else [])
    models = ["single"] if args.quick else sorted(args.models, key=lambda m: m != "single")
    rounds, n_copies = (1, 1) if args.quick else (args.rounds, args.copies)
    import bleep_rs

    print(f"CPU: {bleep_rs.kernel_info()['cpu']}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; {rounds} rounds", flush=True)
    rows = []
    for name in models:
        # The default model passes each tile 10 times through the backbone (default-8: 24; the wider fields at
        # 112 px): the TIFF (and the mosaic, asked for), one copy per command.
        for slide in slides if name == "single" else slides[1:]:
            rows.append(bench(name, slide, rounds, n_copies if name == "single" else 1))
    (ROOT / ".bench" / "predict.json").write_text(json.dumps(rows, indent=1))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
