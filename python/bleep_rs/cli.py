"""The ``bleep-rs`` command line."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from bleep_rs import BleepError, __version__

#: The library's errors name its arguments (``um_per_px=X``); the command line says its flags instead.
#: Each argument here is a flag of the commands that pass it on.
FLAGS = {
    "um_per_px": "--um-per-px", "min_tissue": "--min-tissue", "bin_um": "--bin-um", "tta_views": "--tta-views",
    "tiles_per_task": "--tiles-per-task", "precision": "--precision", "batch_size": "--batch-size", "queue_depth": "--queue-depth",
    "scheduler": "--scheduler", "workers": "--workers", "fmt": "--format",
    "out": "--out", "out_dir": "--out", "ids": "--ids", "sample": "--ids", "layer": "--layer", "device": "--device",
    "backbone": "--backbone", "backbone_weights": "--backbone-weights", "cache_dir": "--cache-dir", "epochs": "--epochs",
    "lr": "--lr", "val_fraction": "--val-fraction", "n_top_genes": "--n-top-genes", "features": "--features",
    "stain": "--stain", "image": "--image", "genes": "--genes",
}
#: Arguments whose value is a switch of its own.
SWITCHES = {"overwrite=True": "--overwrite", "resume=False": "--fresh", "freeze_backbone=False": "--no-freeze-backbone",
            "random_init=True": "--random-init", "tta=False": "--no-tta"}
# An argument starts the message or follows a space or an opening bracket: never inside a path (/runs/lr=0.1/).
_BEFORE = r"(?<![^\s(\[])"
_ARGUMENT = re.compile(_BEFORE + "(" + "|".join(sorted(FLAGS, key=len, reverse=True)) + r")=(\S?)")


def as_flags(message: str) -> str:
    """A library message with its arguments as this command line's flags: ``um_per_px=X`` -> ``--um-per-px
    X``, ``overwrite=True`` -> ``--overwrite`` (the one translation between the library and the app)."""
    for text, flag in SWITCHES.items():
        message = re.sub(_BEFORE + re.escape(text), flag, message)

    def flag(m: "re.Match") -> str:
        after = m.group(2)
        return FLAGS[m.group(1)] + (" " + after if after and after not in "),;:" else after)

    return _ARGUMENT.sub(flag, message)


def shard(items: Sequence, spec: Optional[str]) -> list:
    """The items of shard ``I/N`` (1-based, ``--shard``): every N-th item from the I-th, in sorted order."""
    items = sorted(items)
    if not spec:
        return list(items)
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError as e:
        raise BleepError(f"--shard must look like I/N (e.g. 2/8), not {spec!r}") from e
    if not 1 <= i <= n:
        raise BleepError(f"--shard {spec}: I must be between 1 and N")
    if i > len(items):
        raise BleepError(f"--shard {spec} selects none of the {len(items)} slide(s): use at most {len(items)} shards")
    return list(items[i - 1 :: n])


def _section_options(p, *, pooling: bool = True) -> None:
    """What every command that reads sections accepts besides the paths."""
    p.add_argument("--ids", nargs="+", help="HEST folder given as a section: the sample ids to read (default: all)")
    p.add_argument("--layer", help=".h5ad / SpatialData: the matrix of raw counts (default: the 'counts' layer, else X; 'raw' for .raw)")
    p.add_argument("--image", help="the full-resolution H&E of a Space Ranger / Visium HD section (one section only)")
    if pooling:
        p.add_argument("--bin-um", type=float, help="Visium HD: pool the bins into square pseudo-spots of about this many um (e.g. 55)")


def _read_sections(paths, args, *, lazy: bool = False, **kwargs):
    """The sections named on the command line (a HEST folder stands for its --ids): read now, or with
    ``lazy=True`` a SectionList that reads each when it is used (a cohort never all in memory)."""
    from bleep_rs.sections import SectionList

    for key in ("layer", "bin_um", "image"):
        if getattr(args, key, None) is not None:
            kwargs.setdefault(key, getattr(args, key))
    sections = SectionList(paths, args.ids, **kwargs)
    if "image" in kwargs and len(sections) > 1:
        raise BleepError("--image is the image of one section; with several, give each its own (a HEST folder, an .h5ad with "
                         "uns['bleep']['image_path'], a SpatialData store)")
    return sections if lazy else list(sections)


def _read_one(path, args, **kwargs):
    sections = _read_sections([path], args, **kwargs)
    if len(sections) != 1:
        raise BleepError(f"{path}: {len(sections)} samples: name one with --ids ID")
    return sections[0]


def _add_train(sub) -> None:
    from bleep_rs.training import TrainConfig

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
    p.add_argument("--features", nargs="+", metavar="FILE",
                   help="precomputed patch features (TRIDENT / HEST .h5), one file per section in the same order: trains a features:D model")
    _add_config_options(p, TrainConfig)
    # One meaning per flag across commands: --um-per-px is an image's pixel size (predict's slides); the
    # patches' resolution of training is --patch-um-per-px. Taken here only to say so.
    p.add_argument("--um-per-px", dest="image_um_per_px", type=float, help=argparse.SUPPRESS)
    _cluster_options(p, "the frozen backbone's features of the sections, one task per section, into the feature cache")


def _add_config_options(p, cls) -> None:
    """One flag per option of a config dataclass (nested configs' options too), with the field's default
    and help: the dataclass is the one source of the options and their defaults (bleep_rs.options)."""
    import dataclasses
    import typing

    from bleep_rs.options import flag, flat_fields

    for f, kind in flat_fields(cls):
        meta = f.metadata
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help = as_flags(meta.get("help", ""))
        if kind is bool:
            action = "store_false" if meta.get("invert") else argparse.BooleanOptionalAction
            p.add_argument(flag(f), dest=f.name, action=action, default=default, help=help)
            continue
        inner = kind
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            inner = next(a for a in typing.get_args(kind) if a is not type(None))
        many = typing.get_origin(inner) in (list, tuple)
        base = typing.get_args(inner)[0] if many else inner
        if meta.get("file"):
            p.add_argument(flag(f), dest=f.name, type=Path, default=None, help=help)
        else:
            p.add_argument(flag(f), dest=f.name, type=base, default=default, nargs="*" if many else None, choices=meta.get("choices"), help=help,
                           metavar=meta.get("metavar"))


def _config_from_args(cls, args):
    """The config dataclass from parsed arguments (files of names read as lists), checked with the errors
    naming the flags."""
    from bleep_rs.options import flat_fields, from_flags

    values = {}
    for f, _ in flat_fields(cls):
        value = getattr(args, f.name)
        if f.metadata.get("file") and value is not None:
            value = _read_gene_file(value)
        values[f.name] = value
    return from_flags(cls, values)


def _run_train(args) -> None:
    import os

    from bleep_rs.training import TrainConfig, train

    if args.image_um_per_px is not None:
        raise BleepError("train: the patches' resolution is --patch-um-per-px (--um-per-px is an image's pixel size, on predict; "
                         "the training sections' own comes from their files)")
    cfg = _config_from_args(TrainConfig, args)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 writes
        _claim(args, args.out, [*args.sections, args.image, args.genes, *(args.features or [])], overwrite=cfg.overwrite)
    sections = _read_sections(args.sections, args)
    if args.features is not None:
        from bleep_rs.readers.patch_features import features_for_sections

        if args.scheduler is not None or args.workers is not None:
            raise BleepError("--scheduler / --workers spread the backbone's pass over a cluster: precomputed --features need none")
        sections, feats, encoder = features_for_sections(sections, args.features)
        train(sections, args.out, cfg.for_features(feats[0].shape[1]), features=feats, features_encoder=encoder)
    elif args.scheduler is not None or args.workers is not None:
        from bleep_rs.cohort import cache_features, connect

        def report(r: dict) -> None:
            print(f"backbone features of {r['section']}: {r['shape'][1]} spots ({r['seconds']:.1f} s)", flush=True)

        def feature_pass(model, secs, config, um) -> None:  # the cluster lives for the backbone pass only, not the training
            with connect(args.scheduler, args.workers) as client:
                cache_features(client, model, secs, config, um, report=report)

        train(sections, args.out, cfg, feature_pass=feature_pass)
    else:
        train(sections, args.out, cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"model written to {args.out}")


def _add_others(sub) -> None:
    from bleep_rs.expression import MIN_SPOTS
    from bleep_rs.predict import PredictConfig

    ref = sub.add_parser("reference", help="embed reference sections' expression with a trained model")
    ref.add_argument("sections", nargs="+", help="sections: folders, .h5ad files, HEST folders (with --ids), .zarr stores")
    _section_options(ref)
    ref.add_argument("--model", type=Path, required=True, help="model directory from bleep-rs train")
    ref.add_argument("--out", type=Path, required=True,
                     help="reference file to write (.safetensors), or with --shard-spots a folder of shard files and a manifest.json")
    ref.add_argument(
        "--genes", default="all",
        help="the genes the reference stores and predict outputs: all (default: every gene with a non-zero count in "
        "at least --min-spots spots of at least one reference section; a section whose file does not list a gene "
        "counts as zeros for it), panel (the model's input panel only), or a file with one gene per line",
    )
    ref.add_argument("--min-spots", type=_at_least(1), default=MIN_SPOTS, help=f"with --genes all: spots a gene must be non-zero in (default {MIN_SPOTS})")
    ref.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                     help="expression storage; bfloat16 halves the size of an all-gene reference (default float32)")
    ref.add_argument("--expression-format", choices=["auto", "sparse", "dense"], default="auto",
                     help="expression as compressed sparse rows or dense (default auto: whichever is smaller)")
    ref.add_argument("--shard-spots", type=int, metavar="N",
                     help="write a sharded reference folder (shards of N spots + manifest.json), section by section: peak memory "
                     "about one shard and one section, whatever the number of sections (for cohorts and atlases)")
    ref.add_argument("--overwrite", action="store_true")

    pr = sub.add_parser("predict", help="predict expression at a section's spots or over a whole slide's tissue")
    pr.add_argument("section", nargs="?", help="a section (its image is used; its counts are never read)")
    _section_options(pr, pooling=False)
    pr.add_argument("--model", type=Path, required=True)
    pr.add_argument("--reference", type=Path, required=True)
    pr.add_argument("--slide", nargs="+", help="whole-slide image(s) to tile instead of a section")
    pr.add_argument("--features", nargs="+", metavar="FILE",
                    help="precomputed patch features (TRIDENT / HEST .h5) for a model trained on them: each patch predicted "
                         "(one STEM.h5ad each in --out for several), or with a SECTION the section's spots")
    pr.add_argument("--out", type=Path, required=True, help="PRED.h5ad or PRED.zarr, or a folder for several slides (one STEM.h5ad each)")
    pr.add_argument("--format", choices=["h5ad", "zarr"],
                    help="h5ad or zarr (a SpatialData store: image, spots or tiles, table): for several slides (default h5ad) and an --out without suffix")
    _add_config_options(pr, PredictConfig)  # --k, --method, --tta-views, --um-per-px, --min-tissue, --bin-um ...
    pr.add_argument("--hd-run", help="slides: a Visium HD run of this slide (square_*um/ folder): bins on its grid, named by its barcodes")
    pr.add_argument("--shard", help="slides: do shard I/N of the sorted list (outputs already complete are skipped)")
    pr.add_argument("--device", default="auto", help="where the image encoder runs: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1 ...")
    pr.add_argument("--overwrite", action="store_true")
    _cluster_options(pr, "one task per slide; --out is then a folder (one STEM.h5ad per slide)")
    pr.add_argument("--tiles-per-task", type=int, metavar="N",
                    help="with --scheduler / --workers: each slide in blocks of about N tiles or bins, one task each (for huge slides)")

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


def _cluster_options(p, what: str) -> None:
    """--scheduler / --workers: the work spread over a Dask cluster (the dask extra)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--scheduler", metavar="ADDRESS", help=f"a running Dask scheduler (tcp://host:8786) to spread the work over: {what}")
    group.add_argument("--workers", type=int, metavar="N", help=f"start N Dask worker processes here for this command (closed after): {what}")


def _claim(args, path, inputs, **kwargs) -> Path:
    """An output of the command: held against other writers until the command ends (a second command
    writing it stops at once), then checked by the one output check, with every input of the command
    (bleep_rs._atomic). What was there before is recorded, to say what an interrupt left."""
    from bleep_rs._atomic import check_output, output_lock

    inputs = [i for i in inputs if i is not None]
    check_output(path, inputs=inputs, **kwargs)  # before the lock makes its folder; again under it, where it counts
    args.locks.enter_context(output_lock(path))
    path = check_output(path, inputs=inputs, **kwargs)
    args.claimed.append((path, _stamp(path)))
    return path


def _stamp(path: Path):
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns
    except OSError:
        return None


def _interrupted(args) -> str:
    """What a Ctrl-C left: the outputs written before it, a training checkpoint, or nothing (the writers
    remove their temporaries)."""
    written = [str(p) for p, before in getattr(args, "claimed", []) if _stamp(p) not in (None, before)]
    if args.command == "train":
        ckpt = args.out.with_name(f".{args.out.name}.checkpoint")
        if not written and ckpt.exists():
            return f"interrupted: checkpoint kept at {ckpt}, resume with the same command"
    return f"interrupted: {', '.join(written)} written before the interrupt" if written else "interrupted: nothing written"


def _read_gene_file(path: Path) -> list:
    """One gene per line (blank lines ignored): :func:`bleep_rs.expression.read_gene_list`."""
    from bleep_rs.expression import read_gene_list

    return read_gene_list(path)


def _run_reference(args) -> None:
    from bleep_rs.model import build_reference, load_model

    genes_file = None if args.genes in ("all", "panel") else args.genes
    _claim(args, args.out, [*args.sections, args.model, args.image, genes_file], overwrite=args.overwrite)
    genes = args.genes
    if genes not in ("all", "panel"):
        genes = _read_gene_file(Path(genes))
    model = load_model(args.model)
    sections = _read_sections(args.sections, args, lazy=True)
    options = dict(genes=genes, min_spots=args.min_spots, name=str(args.model), expression_dtype=args.dtype,
                   expression_format=args.expression_format, progress=sys.stderr.isatty())
    if args.shard_spots is not None:
        from bleep_rs.model import write_reference
        from bleep_rs.reference import Reference

        write_reference(model, sections, args.out, shard_spots=args.shard_spots, overwrite=args.overwrite, **options)
        ref = Reference.load(args.out)
    else:
        ref = build_reference(model, sections, **options)
        ref.save(args.out)
    print(f"reference of {ref.n_spots} spots x {len(ref.genes)} genes ({ref.expression_format} expression) written to {args.out}")


def _run_predict(args) -> None:
    import contextlib
    import dataclasses

    from bleep_rs.device import pick_device
    from bleep_rs.model import load_model
    from bleep_rs.predict import PredictConfig, output_state, predict_section, predict_slides, prediction_format, slide_outputs, write_prediction
    from bleep_rs.reference import Reference

    cfg = _config_from_args(PredictConfig, args)
    if args.features is not None:
        _run_predict_features(args, cfg)
        return
    if (args.section is None) == (args.slide is None):
        raise BleepError("give either a SECTION or --slide IMAGE [IMAGE ...] (or --features FILE ...)")
    if args.scheduler is not None or args.workers is not None:
        _run_predict_cohort(args, cfg)
        return
    if args.tiles_per_task is not None:
        raise BleepError("--tiles-per-task splits slides into tasks of a Dask cluster: give --scheduler ADDRESS or --workers N")
    if args.section is not None and args.hd_run:
        raise BleepError("--hd-run aligns the bins of a --slide; a SECTION is predicted at its own spots")
    if args.section is not None and args.shard:
        raise BleepError("--shard splits a list of --slide images between runs; a SECTION is one prediction")
    if args.section is not None:  # --bin-um pools a Visium HD section's bins as it is read; the rest must be the section's
        section_cfg = dataclasses.replace(cfg, bin_um=None).for_sections()
    several = args.slide is not None and len(args.slide) > 1
    inputs = [args.model, args.reference, args.section, args.image, args.hd_run, *(args.slide or [])]
    if several:
        fmt = args.format or "h5ad"
        outputs = slide_outputs(args.slide, args.out, fmt, overwrite=args.overwrite)
        for target in outputs.values():  # existing outputs: slide_outputs decided
            _claim(args, target, inputs, overwrite=True)
    else:
        fmt = prediction_format(args.out, args.format)
        _claim(args, args.out, inputs, overwrite=args.overwrite)
    model, ref = load_model(args.model, device=str(pick_device(args.device))), Reference.load(args.reference)
    paths = dict(model_path=str(args.model), reference_path=str(args.reference))
    if args.section is not None:
        section = _read_one(args.section, args, check_counts=False, bin_um=cfg.bin_um)
        write_prediction(predict_section(model, ref, section, section_cfg, **paths), args.out, fmt=fmt, overwrite=args.overwrite)
        print(f"predictions written to {args.out}")
        return
    hd_run = None
    if args.hd_run:
        from bleep_rs.sections import read_section

        hd_run = read_section(args.hd_run, check_counts=False)
    todo = []
    for slide in shard(args.slide, args.shard):
        out = outputs[slide] if several else args.out
        state = output_state(out)
        if several and state == "complete" and not args.overwrite:
            print(f"{out}: complete, skipped")
        else:
            todo.append((slide, out, state))
    # One pipeline over the slides (one model, reference and engine): the next one is opened and read
    # while this one is written.
    steps = predict_slides(model, ref, [slide for slide, _, _ in todo], cfg, hd_run=hd_run, **paths)
    with contextlib.closing(steps):
        for (_, out, state), adata in zip(todo, steps):
            # Several slides: bleep-rs's own incomplete output is redone; a foreign one only with --overwrite.
            write_prediction(adata, out, fmt=fmt, overwrite=args.overwrite or state == "incomplete")
            print(f"{adata.n_obs} {adata.uns['bleep']['mode']} predicted: {out}")


def _run_predict_features(args, cfg) -> None:
    """predict --features FILE ...: precomputed patch features, each file's patches (or a SECTION's spots)."""
    from bleep_rs.model import load_model
    from bleep_rs.predict import output_state, predict_features, prediction_format, slide_outputs, write_prediction
    from bleep_rs.readers.patch_features import read_patch_features
    from bleep_rs.reference import Reference

    image_only = {"--slide": args.slide, "--hd-run": args.hd_run, "--shard": args.shard, "--scheduler": args.scheduler, "--workers": args.workers,
                  "--tiles-per-task": args.tiles_per_task}
    given = [flag for flag, value in image_only.items() if value is not None]
    if given:
        raise BleepError(f"{', '.join(given)}: not with --features (the patches' features are computed already)")
    cfg = cfg.for_features()
    if args.section is not None and len(args.features) > 1:
        raise BleepError("a SECTION is predicted from its own features file: give one --features FILE with it")
    inputs = [args.model, args.reference, args.section, args.image, *args.features]
    several = len(args.features) > 1
    if several:
        fmt = args.format or "h5ad"
        outputs = slide_outputs(args.features, args.out, fmt, overwrite=args.overwrite)
    else:
        fmt, outputs = prediction_format(args.out, args.format), {args.features[0]: args.out}
    for target in outputs.values():
        _claim(args, target, inputs, overwrite=args.overwrite or several)
    from bleep_rs.device import pick_device

    model, ref = load_model(args.model, device=str(pick_device(args.device))), Reference.load(args.reference)
    section = _read_one(args.section, args, check_counts=False, bin_um=args.bin_um) if args.section is not None else None
    paths = dict(model_path=str(args.model), reference_path=str(args.reference))
    for path, out in outputs.items():
        state = output_state(out) if several else "absent"
        if state == "complete" and not args.overwrite:
            print(f"{out}: complete, skipped")
            continue
        adata = predict_features(model, ref, read_patch_features(path), cfg, section=section, **paths)
        write_prediction(adata, out, fmt=fmt, overwrite=args.overwrite or state == "incomplete")
        print(f"{adata.n_obs} {adata.uns['bleep']['mode']} predicted: {out}")


def _run_predict_cohort(args, cfg) -> None:
    """predict --slide ... across a Dask cluster: one line per slide as it finishes."""
    from bleep_rs.cohort import check_cohort, connect, predict_cohort

    if args.slide is None:
        raise BleepError("--scheduler / --workers spread whole slides (--slide IMAGE ...) over a cluster; predict a SECTION without them")
    if args.hd_run:
        raise BleepError("--hd-run aligns the bins of one slide: predict it without --scheduler / --workers")
    slides = shard(args.slide, args.shard)
    fmt = args.format or "h5ad"
    check_cohort(args.model, args.reference, slides, args.out, fmt=fmt, overwrite=args.overwrite)  # before a cluster starts
    done = [0]

    def report(record: dict) -> None:
        done[0] += 1
        count = f"[{done[0]}/{len(slides)}]"
        if record["status"] == "done":
            blocks = f", {record['blocks']} blocks" if "blocks" in record else ""
            print(f"{count} {record['n_obs']} {record['mode']} predicted: {record['out']} ({record['seconds']:.1f} s{blocks})", flush=True)
        elif record["status"] == "skipped":
            print(f"{count} {record['out']}: complete, skipped", flush=True)
        else:
            print(f"{count} {record['slide']}: failed: {as_flags(record['error'])}", flush=True)

    with connect(args.scheduler, args.workers) as client:
        predict_cohort(args.model, args.reference, slides, args.out, client=client, fmt=fmt, overwrite=args.overwrite,
                       device=args.device, report=report, tiles_per_task=args.tiles_per_task, config=cfg)


def _run_evaluate(args) -> None:
    from bleep_rs.evaluate import evaluate_prediction, report_paths, write_report
    from bleep_rs.predict import read_prediction

    for path in report_paths(args.out):
        _claim(args, path, [args.prediction, args.section, args.image], overwrite=args.overwrite)
    report = evaluate_prediction(read_prediction(args.prediction), _read_one(args.section, args), markers=args.markers or None)
    path, csv_path = write_report(report, args.out, overwrite=args.overwrite)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731  (None: every gene of the set constant)
    print(f"mean per-gene r: HEG-50 {fmt(report['heg50'])}, HVG-50 {fmt(report['hvg50'])}, all {fmt(report['all'])}"
          f" ({len(report['constant'])} constant genes); {path}, {csv_path}")


def _run_plot(args) -> None:
    from bleep_rs.plot import FIGURE_SUFFIXES, plot_genes
    from bleep_rs.predict import read_prediction

    _claim(args, args.out, [args.prediction, args.truth, args.image], suffixes=FIGURE_SUFFIXES, overwrite=args.overwrite)
    truth = _read_one(args.truth, args) if args.truth else None
    print(f"figure written to {plot_genes(read_prediction(args.prediction), args.genes, args.out, truth=truth, overwrite=args.overwrite)}")


def _at_least(low: int):
    """An argparse type: a whole number of at least ``low`` (refused before any work starts)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value
    return parse


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bleep-rs", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bleep-rs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train, build a reference, predict, evaluate and plot on a generated example")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for the outputs (default: demo-out)")
    demo.add_argument("--k", type=_at_least(1), default=None, help="neighbours per prediction (default: the model's, the default recipe's 100)")
    demo.add_argument("--epochs", type=_at_least(1), default=40)
    demo.add_argument("--seed", type=int, default=0)
    _add_train(sub)
    _add_others(sub)
    args = parser.parse_args(argv)
    args.locks, args.claimed = contextlib.ExitStack(), []
    try:
        if args.command == "demo":
            from bleep_rs import demo as demo_module

            demo_module.run(args.out, k=args.k, seed=args.seed, epochs=args.epochs)
        else:
            {"train": _run_train, "reference": _run_reference, "predict": _run_predict, "evaluate": _run_evaluate, "plot": _run_plot}[args.command](args)
    except BleepError as e:
        print(f"bleep-rs: error: {as_flags(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line saying what is kept, not a traceback
        print(f"bleep-rs: {_interrupted(args)}", file=sys.stderr)
        return 130
    except ImportError as e:
        if e.name and e.name.split(".")[0] in ("torch", "safetensors", "efficientnet_lite_pytorch"):
            print(f"bleep-rs: error: {args.command} needs the training extra ({e.name} is missing): pip install 'bleep-rs[train]'", file=sys.stderr)
            return 2
        raise
    except Exception as e:
        if not _out_of_space(e):
            raise
        print(f"bleep-rs: error: the disk is full ({e}): free space or write --out elsewhere; "
              "no output was half-written (each is written to a temporary file, then renamed)", file=sys.stderr)
        return 2
    finally:
        args.locks.close()
    return 0


def _out_of_space(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a full disk or quota: h5py, safetensors and the OS each
    report it in their own exception type, all with the OS's message."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
