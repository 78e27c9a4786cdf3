"""The GPU check: training and the predict path's throughput on a CUDA device, in one short run.

    .venv/bin/python benches/bench_gpu.py [--seeds 0 1 2] [--finetune-epochs 30] [--copies 8] [--out gpu.json]

For a lent GPU machine (docs/benchmarks.md, "GPU"). Data: HER2ST C2-C4 (training) and B4 (another patient:
held out, and the slide), read from $BLEEP_RS_DATA or ../shared/data.

1. Training on the GPU, per seed: the default recipe (heads on frozen EfficientNet-Lite0 features; the
   3 fields x 8 views of features extracted on the GPU, once) and the GPU recipe (--no-freeze-backbone:
   the whole encoder fine-tuned, bfloat16 autocast). Seconds, and HEG-50 / HVG-50 on B4 predicted from
   its image (reference: C2-C4, all genes), as `bleep-rs predict` + `evaluate` would give.
2. The predict path on B4's whole image (the plain JPEG) for the default model (3 fields x 8 views: 24
   backbone passes per tile) and a single-field model (1 pass): tiles/s of the encoder alone on tiles
   already in memory, of predict_slide (one slide: opening, tissue, reading, encoding, imputation), and of
   predict_slides over --copies copies in one pipeline; the GPU's utilisation (nvidia-smi, sampled every
   100 ms) and peak memory during each. The CPU's encoder rate for the single-field model, same machine,
   as the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BLEEP_RS_DATA", ROOT.parent / "shared" / "data"))
TRAIN, HELD = ("C2", "C3", "C4"), "B4"
MODELS = {"default": {}, "single": {"fields_of_view": (1.0,), "tta": False}}  # the input recipe of the predict path's models
UM_PER_PX = json.loads((DATA / "her2st" / HELD / "meta.json").read_text())["um_per_px"]  # the JPEG does not say it


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


@contextmanager
def gpu_use(samples: dict):
    """Samples nvidia-smi's GPU utilisation (% of time a kernel ran) and memory every 100 ms while inside."""
    cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "100"]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    except FileNotFoundError:  # no NVIDIA driver (a CPU smoke run of this script)
        samples.update(util_mean=None, util_median=None, mem_mib_max=None, n_samples=0)
        yield
        return
    try:
        yield
    finally:
        proc.terminate()
        out = proc.communicate()[0]
        rows = [tuple(float(v) for v in line.split(",")) for line in out.splitlines() if line.count(",") == 1]
        busy = [u for u, _ in rows]
        samples.update(util_mean=statistics.mean(busy) if busy else None, util_median=statistics.median(busy) if busy else None,
                       mem_mib_max=max((m for _, m in rows), default=None), n_samples=len(rows))


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def quality(model, sections, held) -> dict:
    import bleep_rs

    ref = bleep_rs.build_reference(model, sections)
    pred = bleep_rs.predict_section(model, ref, held, progress=False)
    rep = bleep_rs.evaluate_prediction(pred, held)
    return {"heg50": rep["heg50"], "hvg50": rep["hvg50"], "all": rep["all"]}


def train_and_score(work: Path, sections, held, seeds, finetune_epochs: int, device: str) -> list:
    import bleep_rs

    recipes = {"default": {}, "finetune": {"freeze_backbone": False, "epochs": finetune_epochs}}
    rows = []
    for seed in seeds:
        for name, extra in recipes.items():
            cfg = bleep_rs.TrainConfig(device=device, seed=seed, progress=False, overwrite=True, resume=False, cache_dir=str(work / "features"), **extra)
            use: dict = {}
            with gpu_use(use):
                model, secs = timed(bleep_rs.train, sections, work / f"{name}_{seed}", cfg)
            row = {"recipe": name, "seed": seed, "epochs": cfg.epochs, "train_s": secs, "gpu": use, **quality(model, sections, held)}
            rows.append(row)
            print(f"train {name:<8} seed {seed}: {cfg.epochs} epochs in {secs:6.1f} s (GPU busy {use['util_mean'] or 0:.0f} %), "
                  f"B4 HEG-50 {row['heg50']:.3f} HVG-50 {row['hvg50']:.3f} all {row['all']:.3f}", flush=True)
    return rows


def slide_tiles(model, path: Path):
    from bleep_rs.predict import PredictConfig, _open_slide

    _, n, read = _open_slide(model, path, PredictConfig(um_per_px=UM_PER_PX, min_tissue=0.5), hd_run=None)
    return read(slice(0, n))


def throughput(name: str, model, ref, slide: Path, copies: list, batch_sizes: list) -> dict:
    """Tiles/s and GPU use of the encoder alone (as predict runs it), the backbone alone at batches of
    ``batch_sizes`` images (one view of the first field), predict_slide and predict_slides."""
    import torch

    import bleep_rs
    from bleep_rs.encode import backbone_features

    tiles = slide_tiles(model, slide)
    n = len(tiles)
    model.embed_images(tiles[:256])  # the engine built and the GPU warm before anything is timed
    use: dict = {}
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with gpu_use(use):
        _, enc = timed(model.embed_images, tiles)
    row = {"model": name, "tiles": n, "backbone_passes_per_tile": sum(model.tta_views()),
           "encoder_tiles_s": n / enc, "encoder_gpu": use, "torch_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
    print(f"{name:<7} {n} tiles, {row['backbone_passes_per_tile']} backbone passes each: encoder alone {n / enc:7.0f} tiles/s "
          f"(GPU busy {use['util_mean'] or 0:.0f} %)", flush=True)
    flat = tiles[:, 0]
    for bs in batch_sizes:
        backbone: dict = {}
        with gpu_use(backbone):
            _, t_bb = timed(backbone_features, model.backbone, model.spec, flat, batch_size=bs)
        row[f"backbone_images_s_batch{bs}"], row[f"backbone_gpu_batch{bs}"] = n / t_bb, backbone
        print(f"        backbone alone, batches of {bs:5d} images: {n / t_bb:7.0f} images/s (GPU busy {backbone['util_mean'] or 0:.0f} %)", flush=True)
    one: dict = {}
    with gpu_use(one):
        pred, t_one = timed(bleep_rs.predict_slide, model, ref, slide, um_per_px=UM_PER_PX, progress=False)
    many: dict = {}
    with gpu_use(many):
        preds, t_many = timed(lambda: list(bleep_rs.predict_slides(model, ref, copies, um_per_px=UM_PER_PX, progress=False)))
    row.update(predict_slide_tiles_s=pred.n_obs / t_one, predict_slide_gpu=one, stages_s=dict(pred.uns["bleep"]["seconds"]),
               predict_slides_tiles_s=sum(p.n_obs for p in preds) / t_many, predict_slides_gpu=many, copies=len(copies))
    print(f"        predict_slide {row['predict_slide_tiles_s']:7.0f} tiles/s (GPU busy {one['util_mean'] or 0:.0f} %) | predict_slides x{len(copies)} "
          f"{row['predict_slides_tiles_s']:7.0f} tiles/s ({many['util_mean'] or 0:.0f} %)", flush=True)
    print("        predict_slide's stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in row["stages_s"].items()), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--finetune-epochs", type=int, default=30)
    ap.add_argument("--copies", type=int, default=4, help="slides in the predict_slides pipeline (links to B4)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024], help="the backbone alone's batches")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS), help="none: training only")
    ap.add_argument("--device", default="cuda", help="cuda (the check); cpu only to try the script itself")
    ap.add_argument("--out", type=Path, default=ROOT / ".bench" / "gpu.json")
    args = ap.parse_args()
    import torch

    import bleep_rs

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    warnings.filterwarnings("ignore", message=".*genes are missing from this section")
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    env = {"cpu": cpu_model(), "cpus": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
           "cuda": torch.version.cuda, "bleep_rs": bleep_rs.__version__, "python": platform.python_version()}
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    sections = [bleep_rs.read_section(DATA / "her2st" / s) for s in TRAIN]
    held = bleep_rs.read_section(DATA / "her2st" / HELD)
    slide = DATA / "her2st" / HELD / "image.jpg"
    result: dict = {"env": env}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_training:
            result["training"] = train_and_score(work, sections, held, args.seeds, args.finetune_epochs, args.device)
        copies = []
        for i in range(args.copies):
            (work / f"B4_{i}.jpg").symlink_to(slide.resolve())
            copies.append(work / f"B4_{i}.jpg")
        result["predict"] = []
        for name in args.models:
            spec = bleep_rs.InputSpec(**MODELS[name])
            cfg = bleep_rs.TrainConfig(device=args.device, epochs=3, augment=False, progress=False, overwrite=True,
                                       cache_dir=str(work / "features"), input=spec)
            bleep_rs.train(sections, work / f"speed_{name}", cfg)
            model = bleep_rs.load_model(work / f"speed_{name}", device=args.device)
            ref = bleep_rs.build_reference(model, sections)
            result["predict"].append(throughput(name, model, ref, slide, copies, args.batch_sizes))
            if name == "single":
                cpu = bleep_rs.load_model(work / f"speed_{name}", device="cpu")
                tiles = slide_tiles(cpu, slide)
                cpu.embed_images(tiles[:64])
                _, secs = timed(cpu.embed_images, tiles)
                result["cpu_encoder_tiles_s"] = len(tiles) / secs
                print(f"single  on the CPU ({torch.get_num_threads()} threads): encoder {len(tiles) / secs:7.0f} tiles/s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    sys.exit(main())
