"""The ``bleep-rs`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from bleep_rs import BleepError, __version__


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the two encoders on sections",
        description="Train BLEEP on spatial transcriptomics sections (any layout read_section accepts). Under "
        "torchrun (python -m torch.distributed.run --nproc_per_node N -m bleep_rs.train ...) it trains with "
        "DistributedDataParallel.",
    )
    p.add_argument("sections", nargs="+", help="section folders or .h5ad files")
    p.add_argument("--out", type=Path, required=True, help="model directory to write (model.safetensors + config.json)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128, help="contrastive batch per device (default 128)")
    p.add_argument("--backbone", default="efficientnet-lite0", help="efficientnet-lite0 (default), timm:NAME or features:D")
    p.add_argument("--backbone-weights", help="a local weights file for the backbone")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--loss", choices=["bleep", "clip"], default="bleep")
    p.add_argument("--freeze-backbone", action="store_true", help="train the heads only, on features cached once")
    p.add_argument("--patch-size", type=int, default=224, help="patch size in pixels (default 224)")
    p.add_argument("--um-per-px", type=float, help="patch resolution (default: each section's native one)")
    p.add_argument("--n-top-genes", type=int, default=1000, help="highly variable genes per section (default 1000)")
    p.add_argument("--panel", choices=["union", "intersection"], default="union", help="how the sections' gene sets combine")
    p.add_argument("--genes", type=Path, help="a file with the gene panel, one gene per line (overrides --n-top-genes)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="random spots held out for validation")
    p.add_argument("--val-sections", nargs="*", default=[], help="hold out these sections (library ids) instead")
    p.add_argument("--patience", type=int, default=10, help="early stopping: epochs without a better validation loss")
    p.add_argument("--color-jitter", type=float, default=0.0)
    p.add_argument("--no-augment", action="store_true", help="no flips / rotations during training")
    p.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast on GPU")
    p.add_argument("--gather", action="store_true", help="several devices: contrast across every device's batch")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")


def _run_train(args) -> None:
    from bleep_rs.train import TrainConfig, train

    genes = None
    if args.genes is not None:
        genes = [g.strip() for g in args.genes.read_text().splitlines() if g.strip()]
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
        device=args.device, amp=not args.no_amp, augment=not args.no_augment, color_jitter=args.color_jitter,
        val_fraction=args.val_fraction, val_sections=list(args.val_sections), patience=args.patience,
        freeze_backbone=args.freeze_backbone, loss=args.loss, gather=args.gather, backbone=args.backbone,
        backbone_weights=args.backbone_weights, patch_size=args.patch_size, um_per_px=args.um_per_px,
        n_top_genes=args.n_top_genes, panel_mode=args.panel, genes=genes, resume=not args.fresh,
    )
    import os

    train(args.sections, args.out, cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"model written to {args.out}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bleep-rs", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bleep-rs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the pipeline end to end on a generated example")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for the outputs (default: demo-out)")
    demo.add_argument("--k", type=int, default=50, help="neighbours per prediction (default: 50)")
    demo.add_argument("--seed", type=int, default=0)
    _add_train(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from bleep_rs import demo as demo_module

            demo_module.run(args.out, k=args.k, seed=args.seed)
        elif args.command == "train":
            _run_train(args)
    except BleepError as e:
        print(f"bleep-rs: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
