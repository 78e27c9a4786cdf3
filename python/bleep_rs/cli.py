"""The ``bleep-rs`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from bleep_rs import BleepError, __version__


def _section_options(p, *, pooling: bool = True) -> None:
    """What every command that reads sections accepts besides the paths."""
    p.add_argument("--ids", nargs="+", help="HEST folder given as a section: the sample ids to read (default: all)")
    p.add_argument("--layer", help=".h5ad / SpatialData: the matrix of raw counts (default: the 'counts' layer, else X; 'raw' for .raw)")
    p.add_argument("--image", help="the full-resolution H&E of a Space Ranger / Visium HD section (one section only)")
    if pooling:
        p.add_argument("--bin-um", type=float, help="Visium HD: pool the bins into square pseudo-spots of about this many um (e.g. 55)")


def _read_sections(paths, args, **kwargs) -> list:
    """The sections named on the command line (a HEST folder stands for its --ids)."""
    from bleep_rs.sections import expand_sections, read_section

    for key in ("layer", "bin_um", "image"):
        if getattr(args, key, None) is not None:
            kwargs.setdefault(key, getattr(args, key))
    named = expand_sections(paths, args.ids)
    if "image" in kwargs and len(named) > 1:
        raise BleepError("--image is the image of one section; with several, give each its own (a HEST folder, an .h5ad with "
                         "uns['bleep']['image_path'], a SpatialData store)")
    return [read_section(path, sample=sample, **kwargs) for path, sample in named]


def _read_one(path, args, **kwargs):
    sections = _read_sections([path], args, **kwargs)
    if len(sections) != 1:
        raise BleepError(f"{path}: {len(sections)} samples: name one with --ids ID")
    return sections[0]


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the two encoders on sections",
        description="Train BLEEP on spatial transcriptomics sections (any layout read_section accepts). Under "
        "torchrun (python -m torch.distributed.run --nproc_per_node N -m bleep_rs train ...) it trains with "
        "DistributedDataParallel.",
    )
    p.add_argument("sections", nargs="+", help="sections: folders, .h5ad files, HEST folders (with --ids), .zarr stores")
    _section_options(p)
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

    train(_read_sections(args.sections, args), args.out, cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"model written to {args.out}")


def _add_others(sub) -> None:
    ref = sub.add_parser("reference", help="embed reference sections' expression with a trained model")
    ref.add_argument("sections", nargs="+", help="sections: folders, .h5ad files, HEST folders (with --ids), .zarr stores")
    _section_options(ref)
    ref.add_argument("--model", type=Path, required=True, help="model directory from bleep-rs train")
    ref.add_argument("--out", type=Path, required=True, help="reference file to write (.safetensors)")
    ref.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="expression storage")
    ref.add_argument("--overwrite", action="store_true")

    pr = sub.add_parser("predict", help="predict expression at a section's spots or over a whole slide's tissue")
    pr.add_argument("section", nargs="?", help="a section (its image is used; its counts are never read)")
    _section_options(pr, pooling=False)
    pr.add_argument("--model", type=Path, required=True)
    pr.add_argument("--reference", type=Path, required=True)
    pr.add_argument("--slide", nargs="+", help="whole-slide image(s) to tile instead of a section")
    pr.add_argument("--um-per-px", type=float, help="the slide's micrometres per pixel (when the file does not say)")
    pr.add_argument("--out", type=Path, required=True, help="PRED.h5ad or PRED.zarr, or a folder for several slides (one STEM.h5ad each)")
    pr.add_argument("--format", choices=["h5ad", "zarr"],
                    help="h5ad or zarr (a SpatialData store: image, spots or tiles, table): for several slides (default h5ad) and an --out without suffix")
    pr.add_argument("--bin-um", type=float,
                    help="slides: one prediction per square bin of this many um instead of per tile; a Visium HD section: its bins pooled to this size")
    pr.add_argument("--hd-run", help="slides: a Visium HD run of this slide (square_*um/ folder): bins on its grid, named by its barcodes")
    pr.add_argument("--k", type=int, default=50, help="neighbours per prediction (default 50)")
    pr.add_argument("--method", choices=["mean", "weighted", "softmax", "top1"], default="mean")
    pr.add_argument("--min-tissue", type=float, default=0.5, help="slides: least tissue fraction of a kept tile")
    pr.add_argument("--neighbours", action="store_true", help="store the neighbours' indices and similarities")
    pr.add_argument("--shard", help="slides: do shard I/N of the sorted list (outputs already complete are skipped)")
    pr.add_argument("--overwrite", action="store_true")

    ev = sub.add_parser("evaluate", help="per-gene Pearson r of a prediction against the measured section")
    ev.add_argument("prediction", type=Path)
    ev.add_argument("section")
    _section_options(ev)
    ev.add_argument("--out", type=Path, required=True, help="REPORT.json or REPORT.csv: both are written (set means + per-gene r; one row per gene)")
    ev.add_argument("--markers", nargs="*", default=[], help="marker genes to average over as well")
    ev.add_argument("--overwrite", action="store_true")

    pl = sub.add_parser("plot", help="measured and predicted expression over the H&E, and per-gene r")
    pl.add_argument("prediction", type=Path)
    pl.add_argument("--truth", help="the measured section, to draw beside the prediction")
    _section_options(pl)
    pl.add_argument("--genes", nargs="+", required=True)
    pl.add_argument("--out", type=Path, required=True, help="FIGURE.png (or .pdf, .svg ...)")
    pl.add_argument("--overwrite", action="store_true")


def _run_reference(args) -> None:
    from bleep_rs.model import build_reference, load_model

    if args.out.exists() and not args.overwrite:
        raise BleepError(f"{args.out} exists: choose another --out or pass --overwrite")
    model = load_model(args.model)
    ref = build_reference(model, _read_sections(args.sections, args), name=str(args.model), expression_dtype=args.dtype)
    ref.save(args.out)
    print(f"reference of {ref.n_spots} spots x {len(ref.genes)} genes written to {args.out}")


def _run_predict(args) -> None:
    from bleep_rs._atomic import check_output
    from bleep_rs.model import load_model
    from bleep_rs.predict import output_state, predict_section, predict_slide, prediction_format, shard, slide_outputs, write_prediction
    from bleep_rs.reference import Reference

    if (args.section is None) == (args.slide is None):
        raise BleepError("give either a SECTION or --slide IMAGE [IMAGE ...]")
    if args.section is not None and args.hd_run:
        raise BleepError("--hd-run aligns the bins of a --slide; a SECTION is predicted at its own spots")
    several = args.slide is not None and len(args.slide) > 1
    if several:
        fmt = args.format or "h5ad"
        outputs = slide_outputs(args.slide, args.out, fmt, overwrite=args.overwrite)
    else:
        fmt = prediction_format(args.out, args.format)
        inputs = [args.model, args.reference, args.section, args.image, args.hd_run, *(args.slide or [])]
        check_output(args.out, inputs=[i for i in inputs if i], overwrite=args.overwrite)
    model, ref = load_model(args.model), Reference.load(args.reference)
    common = dict(k=args.k, method=args.method, neighbours=args.neighbours, model_path=str(args.model), reference_path=str(args.reference))
    if args.section is not None:
        section = _read_one(args.section, args, check_counts=False, bin_um=args.bin_um)
        write_prediction(predict_section(model, ref, section, **common), args.out, fmt=fmt, overwrite=args.overwrite)
        print(f"predictions written to {args.out}")
        return
    hd_run = None
    if args.hd_run:
        from bleep_rs.sections import read_section

        hd_run = read_section(args.hd_run, check_counts=False)
    for slide in shard(args.slide, args.shard):
        out = outputs[slide] if several else args.out
        state = output_state(out)
        if several and state == "complete" and not args.overwrite:
            print(f"{out}: complete, skipped")
            continue
        adata = predict_slide(model, ref, slide, um_per_px=args.um_per_px, min_tissue=args.min_tissue, bin_um=args.bin_um, hd_run=hd_run, **common)
        # Several slides: bleep-rs's own incomplete output is redone; a foreign one only with --overwrite.
        write_prediction(adata, out, fmt=fmt, overwrite=args.overwrite or state == "incomplete")
        print(f"{adata.n_obs} {adata.uns['bleep']['mode']} predicted: {out}")


def _run_evaluate(args) -> None:
    from bleep_rs._atomic import check_output
    from bleep_rs.evaluate import evaluate_prediction, report_paths, write_report
    from bleep_rs.predict import read_prediction

    for path in report_paths(args.out):
        check_output(path, inputs=[args.prediction, args.section], overwrite=args.overwrite)
    report = evaluate_prediction(read_prediction(args.prediction), _read_one(args.section, args), markers=args.markers or None)
    path, csv_path = write_report(report, args.out, overwrite=args.overwrite)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731  (None: every gene of the set constant)
    print(f"mean per-gene r: HEG-50 {fmt(report['heg50'])}, HVG-50 {fmt(report['hvg50'])}, all {fmt(report['all'])}"
          f" ({len(report['constant'])} constant genes); {path}, {csv_path}")


def _run_plot(args) -> None:
    from bleep_rs._atomic import check_output
    from bleep_rs.plot import FIGURE_SUFFIXES, plot_genes
    from bleep_rs.predict import read_prediction

    check_output(args.out, suffixes=FIGURE_SUFFIXES, inputs=[args.prediction, args.truth], overwrite=args.overwrite)
    truth = _read_one(args.truth, args) if args.truth else None
    print(f"figure written to {plot_genes(read_prediction(args.prediction), args.genes, args.out, truth=truth, overwrite=args.overwrite)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bleep-rs", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bleep-rs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train, build a reference, predict, evaluate and plot on a generated example")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for the outputs (default: demo-out)")
    demo.add_argument("--k", type=int, default=50, help="neighbours per prediction (default: 50)")
    demo.add_argument("--epochs", type=int, default=40)
    demo.add_argument("--seed", type=int, default=0)
    _add_train(sub)
    _add_others(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from bleep_rs import demo as demo_module

            demo_module.run(args.out, k=args.k, seed=args.seed, epochs=args.epochs)
        else:
            {"train": _run_train, "reference": _run_reference, "predict": _run_predict, "evaluate": _run_evaluate, "plot": _run_plot}[args.command](args)
    except BleepError as e:
        print(f"bleep-rs: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if e.name and e.name.split(".")[0] in ("torch", "safetensors", "efficientnet_lite_pytorch"):
            print(f"bleep-rs: error: {args.command} needs the training extra ({e.name} is missing): pip install 'bleep-rs[train]'", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
