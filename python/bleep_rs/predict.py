"""Prediction: a section's spots or a whole slide's tissue tiles, imputed from a reference, as AnnData that
scanpy and squidpy open as is.

The AnnData: ``X`` predicted expression (normalised log) on the reference's panel; ``obs`` spot or tile
ids (and ``uncertainty``, the mean over genes of the neighbours' standard deviation); ``obsm["spatial"]``
(x, y) in the slide's full-resolution pixels; ``uns["spatial"][library_id]`` with a thumbnail and scale
factors; ``uns["bleep"]`` the provenance (model, reference, k, method, um/px, package version); with
``neighbours=True`` also ``obsm["bleep_neighbours"]`` and ``obsm["bleep_similarities"]``.
Files are written to a temporary name and renamed: a file that exists is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np

from ._core import BleepError
from .augment import TTA_VIEWS, as_counts, counts_problem
from .options import check, option
from .reference import METHODS

__all__ = [
    "PredictConfig", "check_compatible", "check_features", "predict_features", "predict_section", "predict_slide", "predict_slides",
    "embed_jobs", "embed_batches", "Prefetch",
    "slide_grid", "write_h5ad", "write_prediction", "read_prediction", "output_state", "slide_outputs",
]


def check_compatible(model, reference) -> None:
    """Raises when the reference was not built with this model (other weights or dimension). The
    reference's genes are its own (all it measured, by default), not the model's input panel."""
    from .model import model_id  # (torch: imported when a model is in hand)
    from .reference import Reference

    if not hasattr(model, "retrieval_dim"):
        raise BleepError(f"model must be a loaded model (bleep_rs.load_model(path)), got {type(model).__name__}")
    if not isinstance(reference, Reference):
        raise BleepError(f"reference must be a Reference (bleep_rs.Reference.load(path)), got {type(reference).__name__}")
    if reference.dim != model.retrieval_dim:
        raise BleepError(f"the reference's embeddings have {reference.dim} dimensions, the model's {model.retrieval_dim}: "
                         "build the reference with this model (build_reference; bleep-rs reference)")
    built_with = reference.metadata.get("model_id")
    if not built_with:
        raise BleepError("the reference does not say which model embedded it (no model_id in its metadata): "
                         "rebuild it with this model (build_reference; bleep-rs reference)")
    if built_with != model_id(model):
        raise BleepError(
            f"the reference was built with another model (weights {built_with}, this model's {model_id(model)}): "
            "rebuild it with this model (build_reference; bleep-rs reference)"
        )


def _impute(reference, emb: np.ndarray, *, k: int, method: str, centre_sections: bool = False) -> tuple:
    """The prediction (``centre_sections``: see :meth:`~bleep_rs.Reference.centre`), its neighbours, their
    similarities and the uncertainty of each output (the spread of the neighbours' own expression). (Imputing
    each batch in a second thread while the encoder went on was slower on 2 cores: the gather of the
    neighbours' expression competes with the encoder for memory bandwidth.)"""
    pred, idx, sims = reference.impute(emb, k=k, method=method, return_neighbours=True, centre_sections=centre_sections)
    return pred, idx, sims, reference.neighbour_spread(idx)


def _assemble(imputed: tuple, reference, ids, xy, spatial: dict, info: dict, neighbours: bool):
    import anndata as ad
    import pandas as pd

    from . import __version__

    pred, idx, sims, uncertainty = imputed
    adata = ad.AnnData(
        X=pred.astype(np.float32, copy=False),  # float32 already: a copy of a slide's Q x G was 0.4 s
        obs=pd.DataFrame({"uncertainty": uncertainty}, index=pd.Index([str(i) for i in ids], name="spot_id")),
        var=pd.DataFrame(index=pd.Index(list(reference.genes), name="gene")),
    )
    adata.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
    if neighbours:
        adata.obsm["bleep_neighbours"] = idx.astype(np.int64)
        adata.obsm["bleep_similarities"] = sims.astype(np.float32)
    adata.uns["spatial"] = spatial
    adata.uns["bleep"] = {**info, "package_version": __version__, "complete": True}
    return adata


# -- the pipeline: reading ahead of the encoder ---------------------------------------------------------

#: Batches read ahead of the encoder (the bounded queue between the reader thread and the encoder).
QUEUE_DEPTH = 2
_END = object()


@dataclass(frozen=True)
class PredictConfig:
    """The options of prediction, checked where they are made; each is also a ``bleep-rs predict`` flag.
    The prediction functions take one (``config=``) or its fields as keywords. None: the model's own."""

    k: Optional[int] = option(None, "neighbours per prediction (default: the model's; the default recipe records 100)", low=1)
    method: Optional[str] = option(None, "aggregation of the neighbours (default: the model's, which train records)",
                                   choices=METHODS)
    neighbours: bool = option(False, "store the neighbours' indices and similarities")
    centre_sections: bool = option(True, "centre each reference section's expression on its own mean before the neighbours are "
                                         "averaged (the mean of all reference spots added back): takes out depth and batch "
                                         "offsets between reference sections; docs/benchmarks.md, 'Per-section centring'")
    tta_views: Optional[Tuple[int, ...]] = option(None, "dihedral views averaged per spot or tile, one backbone pass per field each: "
                                                        "one count (1, 2, 4 or 8) for every field of view, or two: field 1's and the "
                                                        "wider fields' (default: the model's; 2 4 for models trained since 2026-12-06, 8 "
                                                        "before): fewer is faster and a little less accurate (docs/benchmarks.md, 'The "
                                                        "default model's cost per tile')", choices=tuple(TTA_VIEWS), low=1, check=counts_problem)
    precision: str = option("auto", "image encoder: auto (the fastest that keeps the float32 answer) or float32 (eager torch)",
                            choices=("auto", "float32"))
    batch_size: Optional[int] = option(None, "spots or tiles per batch read ahead of the encoder (default: 64 on a CPU, 256 on a "
                                             "GPU: whole batches of the encoder's)", low=1)
    queue_depth: int = option(QUEUE_DEPTH, f"batches read ahead of the encoder (default {QUEUE_DEPTH})", low=1)
    # Whole slides only.
    um_per_px: Optional[float] = option(None, "slides: the scan's micrometres per pixel (when the file does not say)", low=0, low_open=True)
    min_tissue: float = option(0.5, "slides: least tissue fraction of a kept tile (default 0.5)", low=0, high=1)
    bin_um: Optional[float] = option(None, "slides: one prediction per square bin of this many um instead of per tile (the command "
                                           "line's Visium HD SECTION: its bins pooled to this size when read)", low=0, low_open=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tta_views", as_counts(self.tta_views))  # one count: for every field
        check(self)

    @classmethod
    def of(cls, config: Optional["PredictConfig"] = None, **options) -> "PredictConfig":
        """``config`` (default: the defaults) with ``options`` (its fields as keywords) applied and checked."""
        base = cls() if config is None else config
        if not isinstance(base, cls):
            raise BleepError(f"config must be a PredictConfig, not {type(base).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise BleepError(f"unknown options {unknown} (known: {', '.join(names)})")
        return dataclasses.replace(base, **options) if options else base

    def _refuse(self, names: Sequence[str], why: str) -> "PredictConfig":
        defaults = type(self)()
        given = [f"{n}={getattr(self, n)}" for n in names if getattr(self, n) != getattr(defaults, n)]
        if given:
            raise BleepError(f"{', '.join(given)}: {why}")
        return self

    def for_sections(self) -> "PredictConfig":
        """This config, for a section's spots: the options of whole slides are refused."""
        return self._refuse(SLIDE_ONLY, "options of whole slides: a section's pixel size and bins are read_section's")

    def for_features(self) -> "PredictConfig":
        """This config, for precomputed patch features: the options of images are refused."""
        return self._refuse(IMAGE_ONLY, "options of images: the patches' features are computed already")

    def retrieval(self, model) -> tuple:
        """k and the aggregation: as given, else the model's recorded defaults."""
        return int(self.k if self.k is not None else model.config.k), self.method or model.config.method


#: The options of whole slides alone, and of images (sections and slides, not precomputed features).
SLIDE_ONLY = ("um_per_px", "min_tissue", "bin_um")
IMAGE_ONLY = ("tta_views", "precision", "batch_size", "queue_depth", *SLIDE_ONLY)


class Prefetch:
    """The items of ``produce`` (an iterator, run in a background thread) in order, read at most ``depth``
    items ahead of the consumer: ``get()`` returns the next one (``None`` after the last). An exception
    in the thread is raised by ``get()``, as it is, where its item would have come. ``close()`` (also on
    leaving a ``with`` block, whatever the reason) stops the thread once its current item is done and
    waits for it: no thread outlives the pipeline. ``waited``: seconds ``get()`` spent waiting."""

    def __init__(self, produce: Iterator, depth: int = QUEUE_DEPTH, name: str = "bleep-rs-read"):
        if int(depth) < 1:
            raise BleepError(f"the queue depth must be at least 1 batch, not {depth!r}")
        self._queue: "queue.Queue" = queue.Queue(maxsize=int(depth))
        self._stop = threading.Event()
        self._done = False
        self.waited = 0.0
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        self._thread.start()

    def _run(self, produce: Iterator) -> None:
        try:
            for item in produce:
                self._queue.put((item, None))
                if self._stop.is_set():
                    return
            self._queue.put((_END, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._queue.put((_END, e))
        finally:
            close = getattr(produce, "close", None)
            if close is not None:
                close()

    def get(self):
        if self._done:
            return None
        t = time.perf_counter()
        item, error = self._queue.get()
        self.waited += time.perf_counter() - t
        if item is _END:
            self._done = True
            if error is not None:
                raise error
            return None
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # empty the queue so that a blocked put returns and sees the stop
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _encoder_batch(model) -> int:
    """Inputs per batch: 64 on a CPU, 256 on a GPU (ONNX Runtime's batch on a CPU; torch's, 4, divides
    it), so that every batch is whole encoder batches and the first one, which nothing hides, is read
    quickly."""
    from .encode import CPU_BATCH, CUDA_BATCH

    return CUDA_BATCH if model.device.type == "cuda" else CPU_BATCH


@contextlib.contextmanager
def _naming(name: str):
    """Errors inside as a BleepError that names the input (the slide or image), so that the one of
    several slides that failed is known; one that names it already goes through as it is."""
    try:
        yield
    except BleepError as e:
        if name in str(e):
            raise
        raise BleepError(f"{name}: {e}") from e
    except Exception as e:
        raise BleepError(f"{name}: reading failed ({type(e).__name__}: {e})") from e


def embed_jobs(model, jobs: Sequence[tuple], *, batch_size: Optional[int] = None, queue_depth: int = QUEUE_DEPTH,
               precision: str = "auto", tta_views: "int | Sequence[int] | None" = None, progress: bool = True, desc: str = "spots") -> Iterator[tuple]:
    """Image embeddings of several inputs through one pipeline. Each job is ``(name, open)``: ``open()``,
    called in a background thread, opens the input and returns ``(context, n, read)``; ``read(slice)``
    returns the model's input for those rows (the Rust readers release the interpreter). The thread
    opens the inputs and reads their batches in order, up to ``queue_depth`` batches ahead of the
    encoder, across inputs: the next input opens while the last batches of this one are encoded and
    while the caller works on its result. An error in the thread is raised here as a BleepError naming
    the input (see :func:`_naming`); the thread stops at the first error.

    Yields, per job: ``(context, embeddings (n, d), seconds, started)``; ``seconds`` has ``open``,
    ``read`` (both in the reader thread), ``engine`` (building the encoder's engine, while the first
    input opens; 0 when it was built before and for the later inputs), ``encode`` and ``wait`` (the
    encoder waiting for this input); ``started`` is the ``time.perf_counter()`` at which the job began.
    ``precision``, ``tta_views``: see :meth:`~bleep_rs.model.BleepModel.embed_images`."""
    model.tta_views(tta_views)  # checked before the reader starts
    bs = _encoder_batch(model) if batch_size is None else int(batch_size)
    if bs < 1:
        raise BleepError(f"batch_size must be at least 1, not {batch_size!r}")
    from .slide import _progress

    def produce():
        for name, job in jobs:
            started = time.perf_counter()
            with _naming(name):
                context, n, read = job()
            yield name, context, int(n), started, time.perf_counter() - started
            for s in range(0, n, bs):
                t = time.perf_counter()
                with _naming(name):
                    x = read(slice(s, min(s + bs, n)))
                yield x, time.perf_counter() - t

    with Prefetch(produce(), queue_depth) as ahead:
        t = time.perf_counter()
        if model.spec.takes_images:  # built (or found built) while the reader opens the first input
            from .encode import get_encoder

            get_encoder(model.backbone, model.spec, precision)
        engine_s = time.perf_counter() - t
        while True:
            waited = ahead.waited
            head = ahead.get()
            if head is None:
                return
            name, context, n, started, open_s = head
            seconds = {"open": open_s, "engine": engine_s, "read": 0.0, "encode": 0.0}
            engine_s = 0.0
            bar = _progress(n, desc, progress and n > 0)
            try:
                out = _encode_batches(model, ahead, n, bs, dict(precision=precision, tta_views=tta_views), seconds, bar, f"{name} ({n:,} {desc})")
            finally:
                if bar is not None:
                    bar.close()
            seconds["wait"] = ahead.waited - waited
            yield context, out, seconds, started


#: Inputs whose encoding is estimated to take longer than this many seconds get a line saying so (with
#: progress bars on), after their first batch.
ESTIMATE_AFTER_S = 120.0


def _encode_batches(model, ahead: Prefetch, n: int, bs: int, encoding: dict, seconds: dict, bar, what: str = "") -> np.ndarray:
    """The embeddings of one input's n rows, from its batches of ``bs`` as they come out of ``ahead``. A
    long input (see :data:`ESTIMATE_AFTER_S`) is announced with its estimated time and backbone passes."""
    out = np.zeros((n, model.retrieval_dim), np.float32)
    for s in range(0, n, bs):
        x, read_s = ahead.get()
        t = time.perf_counter()
        out[s : s + len(x)] = model.embed_images(x, **encoding)
        seconds["encode"] += time.perf_counter() - t
        seconds["read"] += read_s
        if bar is not None:
            if s == 0 and len(x) < n and (estimate := seconds["encode"] / len(x) * n) > ESTIMATE_AFTER_S:
                bar.write(_estimate_line(model, what, estimate, encoding), file=sys.stderr)  # beside the bar
            bar.update(len(x))
    return out


def _estimate_line(model, what: str, seconds: float, encoding: dict) -> str:
    """What a long input will cost, on which engine, and the cheaper choice (docs/benchmarks.md: the cost
    per tile)."""
    from .encode import get_encoder

    views = list(model.tta_views(encoding["tta_views"]))  # per field of view
    passes = sum(views) if model.spec.takes_images else 0
    wide = f", the wider fields at {model.wide_fields_px} px" if model.spec.takes_images and model.wide_fields_px else ""
    per = f"{views[0]} views" if len(set(views)) == 1 else "/".join(map(str, views)) + " views"
    line = f"{what}: {passes} backbone passes each ({model.n_fields} fields x {per}{wide}), about {seconds / 60:.0f} min of encoding here"
    if model.spec.takes_images:
        line += f" ({get_encoder(model.backbone, model.spec, encoding['precision']).name})"
    if passes > len(views):
        line += f"; tta_views=1 would take about {seconds * len(views) / passes / 60:.0f} min, a little less accurate"
    return line


def embed_batches(model, n: int, read: Callable[[slice], np.ndarray], *, name: str = "input", **kwargs) -> tuple:
    """Image embeddings (n, d) of one input, ``name``, that ``read(slice)`` returns batch by batch (see
    :func:`embed_jobs`, which takes the same keywords). Returns the embeddings and the stage seconds."""
    jobs = [(name, lambda: (None, n, read))]
    with contextlib.closing(embed_jobs(model, jobs, **kwargs)) as steps:
        _, emb, seconds, _ = next(steps)
    return emb, seconds


def _spot_shape(info: dict) -> str:
    """How a section's spots are drawn: Visium HD's bins are squares, every other spot a circle."""
    return "square" if info.get("platform") == "visium-hd" else "circle"


def predict_section(model, reference, section, config: Optional[PredictConfig] = None, *, model_path: str = "", reference_path: str = "",
                    progress: bool = True, **options):
    """Predicts the spots of a section from its image alone (its counts are never read), read by the
    model's input recipe (``model.config.input``: its patch size, resolution and fields of view).
    ``config`` / ``options``: a :class:`PredictConfig` or its fields (``k``, ``method``: default the
    model's; ``precision``: the image encoder's, see :mod:`bleep_rs.encode`; ``tta_views``: dihedral views
    averaged per spot, 1, 2, 4 or 8, default the model's: 8 with TTA, else 1; the patches are read in a
    background thread ahead of the encoder, ``batch_size`` spots a batch, ``queue_depth`` batches ahead:
    see :func:`embed_jobs`); the slides' options are refused. ``uns["bleep"]["seconds"]`` has the stages:
    ``open`` (the image), ``engine``, ``read``, ``encode``, ``wait`` (the encoder waiting for patches),
    ``impute`` and ``total``."""
    from .slide import Slide

    cfg = PredictConfig.of(config, **options).for_sections()
    check_compatible(model, reference)
    k, method = cfg.retrieval(model)
    tta_views = model.tta_views(cfg.tta_views)
    info = section.uns.get("bleep", {})
    spec = model.config.input

    def open_section():
        slide = Slide(info["image_path"], um_per_px=info["um_per_px"]) if info.get("image_path") else None
        read = lambda sl: spec.section_patches(section[sl], slide=slide)  # noqa: E731
        return None, section.n_obs, read

    name = str(info.get("image_path") or info.get("library_id", "section"))
    steps = embed_jobs(model, [(name, open_section)], batch_size=cfg.batch_size, queue_depth=cfg.queue_depth, precision=cfg.precision,
                       tta_views=cfg.tta_views, progress=progress)
    with contextlib.closing(steps):
        _, emb, seconds, started = next(steps)
    t = time.perf_counter()
    imputed = _impute(reference, emb, k=k, method=method, centre_sections=cfg.centre_sections)
    seconds.update(impute=time.perf_counter() - t, total=time.perf_counter() - started)
    lib = info.get("library_id", "section")
    meta = {
        "model": str(model_path), "reference": str(reference_path), "k": k, "method": method, "centre_sections": bool(cfg.centre_sections),
        "um_per_px": float(spec.um_per_px or info.get("um_per_px", 0.0)), "library_id": lib,
        "fields_of_view": list(spec.fields_of_view), "tta": bool(spec.tta), "tta_views": list(tta_views),
        "source": str(info.get("image_path", "")), "mode": "spots", "seconds": seconds,
        "image_um_per_px": float(info.get("um_per_px", 0.0)), "shape": _spot_shape(info),
    }
    return _assemble(imputed, reference, section.obs_names, section.obsm["spatial"], dict(section.uns.get("spatial", {})), meta, cfg.neighbours)


def check_features(model, features) -> None:
    """Refuses precomputed features the model was not trained on: an image model, another dimension, or
    another extractor (where both the model and the file name theirs)."""
    if model.spec.takes_images:
        raise BleepError(f"this model reads images (backbone {model.config.backbone}): precomputed features need a model "
                         "trained on them (train with features=)")
    if features.dim != model.spec.feature_dim:
        raise BleepError(f"{features.path}: features of dimension {features.dim}, but the model takes {model.spec.feature_dim} "
                         f"({model.config.features_encoder or 'its extractor'}'s): extract them with the model's extractor")
    trained_on = model.config.features_encoder
    if trained_on and features.encoder and features.encoder != trained_on:
        raise BleepError(f"{features.path}: features from {features.encoder}, but the model was trained on {trained_on}'s")


def predict_features(model, reference, features, config: Optional[PredictConfig] = None, *, section=None, model_path: str = "",
                     reference_path: str = "", **options):
    """Predicts from precomputed patch features (a :class:`~bleep_rs.readers.patch_features.PatchFeatures`,
    or the path of a TRIDENT / HEST ``.h5``) with a model trained on them (a ``features:D`` backbone). Given
    ``section``, at the section's spots that a patch covers (matched by barcode or position); else one
    observation per patch, at its centre (``obsm["spatial"]``, level-0 pixels). ``config`` / ``options``:
    ``k``, ``method``, ``neighbours`` of :class:`PredictConfig` (its image options are refused)."""
    from .readers.patch_features import PatchFeatures, read_patch_features

    cfg = PredictConfig.of(config, **options).for_features()
    neighbours = cfg.neighbours
    pf = features if isinstance(features, PatchFeatures) else read_patch_features(features)
    check_compatible(model, reference)
    check_features(model, pf)
    k, method = cfg.retrieval(model)
    t = time.perf_counter()
    info = {"model": str(model_path), "reference": str(reference_path), "k": k, "method": method,
            "centre_sections": bool(cfg.centre_sections), "features": str(pf.path),
            "features_encoder": pf.encoder or "", "fields_of_view": [1.0], "tta": False, "tta_views": [1]}
    if section is not None:
        spots, rows = pf.rows_for(section)
        imputed = _impute(reference, model.embed_images(pf.features[rows]), k=k, method=method, centre_sections=cfg.centre_sections)
        sec = section.uns.get("bleep", {})
        info.update(mode="spots", library_id=sec.get("library_id", "section"), source=str(sec.get("image_path", "")),
                    image_um_per_px=float(sec.get("um_per_px", 0.0)), shape=_spot_shape(sec),
                    seconds={"total": time.perf_counter() - t})
        return _assemble(imputed, reference, section.obs_names[spots], section.obsm["spatial"][spots],
                         dict(section.uns.get("spatial", {})), info, neighbours)
    if pf.centres is None:
        raise BleepError(f"{pf.path}: the patches have no positions (coords with a patch size, TRIDENT's patch_size_level0): "
                         "predict them at a section's spots (section=, matched by barcode), or give a file with coords and patch size")
    imputed = _impute(reference, model.embed_images(pf.features), k=k, method=method, centre_sections=cfg.centre_sections)
    lib = pf.path.stem
    spatial = {lib: {"images": {}, "scalefactors": {"spot_diameter_fullres": float(pf.patch_size_level0)}, "metadata": {"layout": "features"}}}
    info.update(mode="tiles", library_id=lib, source="", shape="square", seconds={"total": time.perf_counter() - t})
    return _assemble(imputed, reference, pf.tile_ids(), pf.centres, spatial, info, neighbours)


@dataclass(frozen=True)
class TileGrid:
    """Where a slide is predicted: ``centres`` (n, 2) level-0 px, ``ids``, ``side_px`` the square each
    output stands for, ``array_rc`` (n, 2) its row and column on a bin grid (None for tiles), ``kind``
    "tiles" or "bins"."""

    centres: np.ndarray
    ids: list
    side_px: float
    array_rc: Optional[np.ndarray]
    kind: str


def slide_grid(slide, size: int, um_per_px: float, *, min_tissue: float, mask, bin_um: Optional[float] = None, hd_run=None) -> TileGrid:
    """The outputs of a slide's prediction. By default the non-overlapping tissue tiles of ``size`` px at
    ``um_per_px``. With ``bin_um``: one output per square bin of that many micrometres (a tissue
    fraction of ``min_tissue``), each predicted from the model's patch centred on it; with ``hd_run``
    (a Visium HD section of this slide) the bins are that run's own grid at ``bin_um`` (default its bin
    size), named with Space Ranger's barcodes, so that the output lines up bin for bin."""
    from ._core import tissue_grid

    footprint = size * um_per_px / slide.um_per_px
    if hd_run is not None:
        from .readers.visium_hd import block_grid

        centres, ids, rc, side = block_grid(hd_run, bin_um or hd_run.uns["bleep"]["bin_um"])
        w, h = slide.dimensions
        outside = (centres[:, 0] < 0) | (centres[:, 1] < 0) | (centres[:, 0] >= w) | (centres[:, 1] >= h)
        if outside.mean() > 0.01:
            raise BleepError(
                f"{slide.path}: {int(outside.sum())} of {len(centres)} bins of the HD run lie outside this {w} x {h} px "
                "image: give the full-resolution image the run was made with"
            )
        keep = ~outside
        return TileGrid(centres[keep], [i for i, k in zip(ids, keep) if k], side, rc[keep], "bins")
    if bin_um is not None:
        if not (np.isfinite(bin_um) and bin_um > 0):
            raise BleepError(f"bin_um= must be a positive number of micrometres, not {bin_um!r}")
        side = bin_um / slide.um_per_px
        w, h = slide.dimensions
        corners = tissue_grid(np.ascontiguousarray(mask.mask), mask.scale, w, h, side, float(min_tissue))
        rc = np.round(corners[:, ::-1] / side).astype(np.int64)
        return TileGrid(corners + side / 2, [f"bin_{r}_{c}" for r, c in rc], side, rc, "bins")
    coords = slide.tile_grid(size, um_per_px, min_tissue=min_tissue, mask=mask)
    return TileGrid(coords + footprint / 2, [f"tile_{int(x)}_{int(y)}" for x, y in coords], footprint, None, "tiles")


@dataclass(frozen=True)
class _OpenSlide:
    """A slide ready to read: what its prediction records besides the embeddings."""

    path: str
    slide: object
    target_um_per_px: float
    grid: TileGrid
    thumbnail: np.ndarray


def _open_slide(model, path, cfg: PredictConfig, hd_run) -> tuple:
    """A job of :func:`embed_jobs` (run in the reader thread): the slide opened, its tissue mask and grid;
    returns the :class:`_OpenSlide`, the number of outputs and the reader of their patches."""
    from .slide import Slide

    spec = model.config.input
    slide = Slide(path, um_per_px=cfg.um_per_px)
    if slide.um_per_px is None:
        raise BleepError(f"{path}: the slide does not state its pixel size: pass um_per_px=X (the scanner's micrometres per pixel)")
    target = spec.resolution(slide.um_per_px)
    mask = slide.tissue_mask()
    grid = slide_grid(slide, spec.patch_size, target, min_tissue=cfg.min_tissue, mask=mask, bin_um=cfg.bin_um, hd_run=hd_run)
    if len(grid.centres) == 0:
        raise BleepError(f"{path}: no tissue tile found (the tissue mask covers {mask.fraction:.1%} of the slide): check the image, or lower min_tissue=")
    read = lambda sl: spec.slide_patches(slide, grid.centres[sl])  # noqa: E731
    return _OpenSlide(str(path), slide, target, grid, mask.thumbnail), len(grid.centres), read


def predict_slides(model, reference, paths: Sequence, config: Optional[PredictConfig] = None, *, model_path: str = "", reference_path: str = "",
                   progress: bool = True, hd_run=None, **options) -> Iterator:
    """The predictions of several whole slides, in order (see :func:`predict_slide` for one), through one
    pipeline with the same model, reference and encoder engine. ``config`` / ``options``: a
    :class:`PredictConfig` or its fields (``um_per_px`` the slides' pixel size where a file does not say
    it, ``min_tissue``, ``bin_um``, ``k``, ``method``, ``batch_size``, ``queue_depth``, ``neighbours``,
    ``precision``, ``tta_views``); ``hd_run``: a Visium HD run whose bins to predict (see
    :func:`slide_grid`). A background thread opens each slide,
    finds its tissue and reads its patches ahead of the encoder (``queue_depth`` batches of
    ``batch_size`` outputs), so that the next slide opens while this one's last batches are encoded and
    its prediction is imputed and handed over. Close the iterator (or exhaust it) to stop the thread.
    ``uns["bleep"]["seconds"]`` has each slide's stages: ``tissue`` (opening, tissue mask, grid),
    ``engine`` (see :func:`embed_jobs`), ``read``, ``encode``, ``wait`` (the encoder waiting for this
    slide), ``impute``, and ``total``, from the slide's opening to its prediction (consecutive slides'
    totals overlap)."""
    cfg = PredictConfig.of(config, **options)
    check_compatible(model, reference)
    k, method = cfg.retrieval(model)
    jobs = [(str(p), functools.partial(_open_slide, model, p, cfg, hd_run)) for p in paths]
    steps = embed_jobs(model, jobs, batch_size=cfg.batch_size, queue_depth=cfg.queue_depth, precision=cfg.precision,
                       tta_views=cfg.tta_views, progress=progress, desc="tiles" if cfg.bin_um is None and hd_run is None else "bins")
    with contextlib.closing(steps):
        for opened, emb, seconds, started in steps:
            t = time.perf_counter()
            imputed = _impute(reference, emb, k=k, method=method, centre_sections=cfg.centre_sections)
            seconds = {"tissue": seconds.pop("open"), **seconds, "impute": time.perf_counter() - t}
            adata = _slide_prediction(model, reference, opened, imputed, seconds, cfg, model_path=model_path, reference_path=reference_path,
                                      hd_run=hd_run)
            adata.uns["bleep"]["seconds"]["total"] = time.perf_counter() - started
            yield adata


def _slide_prediction(model, reference, opened: _OpenSlide, imputed: tuple, seconds: dict, cfg: PredictConfig, *, model_path: str,
                      reference_path: str, hd_run):
    """A slide's prediction as AnnData, with its provenance."""
    spec, slide, grid, thumb = model.config.input, opened.slide, opened.grid, opened.thumbnail
    (k, method), tta_views = cfg.retrieval(model), model.tta_views(cfg.tta_views)
    lib = Path(opened.path).stem
    factors = {"tissue_hires_scalef": thumb.shape[1] / slide.dimensions[0], "spot_diameter_fullres": float(grid.side_px)}
    spatial = {lib: {"images": {"hires": thumb}, "scalefactors": factors, "metadata": {"layout": "slide"}}}
    meta = {
        "model": str(model_path), "reference": str(reference_path), "k": k, "method": method, "centre_sections": bool(cfg.centre_sections),
        "um_per_px": opened.target_um_per_px, "image_um_per_px": float(slide.um_per_px),
        "fields_of_view": list(spec.fields_of_view), "tta": bool(spec.tta), "tta_views": list(tta_views),
        "library_id": lib, "source": opened.path, "mode": grid.kind, "tile_px": int(spec.patch_size),
        "min_tissue": float(cfg.min_tissue), "shape": "square", "seconds": seconds,
        **({"bin_um": float(grid.side_px * slide.um_per_px), "grid": "hd-run" if hd_run is not None else "slide"} if grid.kind == "bins" else {}),
    }
    adata = _assemble(imputed, reference, grid.ids, grid.centres, spatial, meta, cfg.neighbours)
    if grid.array_rc is not None:
        adata.obs["array_row"], adata.obs["array_col"] = grid.array_rc[:, 0], grid.array_rc[:, 1]
    return adata


def predict_slide(model, reference, path, config: Optional[PredictConfig] = None, **kwargs):
    """Predicts a whole slide's tissue (no spatial transcriptomics needed): tiles of the model's patch
    size at its resolution, kept where the tissue mask covers ``min_tissue``, or bins of ``bin_um``
    (aligned with ``hd_run``'s grid when given: see :func:`slide_grid`); each from the model's fields of
    view around its centre. ``config`` and keywords: those of :func:`predict_slides`."""
    with contextlib.closing(predict_slides(model, reference, [path], config, **kwargs)) as steps:
        return next(steps)


def write_h5ad(adata, path: "os.PathLike[str] | str", *, overwrite: bool = False) -> Path:
    """Writes an .h5ad atomically (temporary file beside it, then rename); an existing file is an error
    unless ``overwrite``."""
    from ._atomic import LIBRARY_OUTPUT, atomic_path, check_output

    path = check_output(path, overwrite=overwrite, **LIBRARY_OUTPUT)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path


FORMATS = ("h5ad", "zarr")


def prediction_format(path: "os.PathLike[str] | str", fmt: Optional[str] = None) -> str:
    """The format of a prediction file: its suffix, "h5ad" (PRED.h5ad) or "zarr" (PRED.zarr, a
    SpatialData store), which ``fmt`` must agree with when given; ``fmt`` names the format of a name
    without a suffix. Any other suffix is an error."""
    if fmt is not None and fmt not in FORMATS:
        raise BleepError(f"fmt= must be one of {FORMATS}, not {fmt!r}")
    suffix = Path(str(path).rstrip("/")).suffix.lower().lstrip(".")
    if suffix in FORMATS:
        if fmt is not None and fmt != suffix:
            raise BleepError(f"fmt={fmt} but out={path} ends in .{suffix}: drop fmt= or rename out=")
        return suffix
    if fmt is not None and not suffix:
        return fmt
    raise BleepError(f"out={path}: name the prediction PRED.h5ad or PRED.zarr (a SpatialData store), or give fmt= with a name without suffix")


def write_prediction(adata, path: "os.PathLike[str] | str", *, fmt: Optional[str] = None, overwrite: bool = False) -> Path:
    """Writes a prediction as .h5ad or as a SpatialData zarr store (:func:`bleep_rs.sdata.write_zarr`)."""
    if prediction_format(path, fmt) == "zarr":
        from .sdata import write_zarr

        return write_zarr(adata, path, overwrite=overwrite)
    return write_h5ad(adata, path, overwrite=overwrite)


def read_prediction(path: "os.PathLike[str] | str"):
    """A prediction written by :func:`write_prediction`, as AnnData (a store's table)."""
    path = Path(path)
    if not path.exists():
        raise BleepError(f"{path}: no such prediction")
    if path.is_dir():
        from .sdata import read_table

        return read_table(path)
    import anndata as ad

    try:
        return ad.read_h5ad(path)
    except Exception as e:  # anndata raises many kinds for a damaged file
        raise BleepError(f"{path}: not a readable .h5ad ({e})") from e


def output_state(path: Path) -> str:
    """What is at an output path: "absent"; "complete" or "incomplete" for a prediction bleep-rs wrote
    (with or without its completion mark); "foreign" for anything else (a file bleep-rs did not write,
    or one it cannot read), which only ``overwrite=True`` may replace."""
    if not path.exists():
        return "absent"
    if path.is_dir():  # a zarr store, renamed into place once written
        bleep = path / "tables" / "table" / "uns" / "bleep"
        if not (bleep / "mode").exists():
            return "foreign"
        return "complete" if (bleep / "complete").exists() else "incomplete"
    try:
        import h5py

        with h5py.File(path, "r") as f:
            bleep = f.get("uns/bleep")
            if bleep is None or "mode" not in bleep:
                return "foreign"
            return "complete" if "complete" in bleep else "incomplete"
    except (OSError, KeyError, TypeError):
        return "foreign"


def slide_outputs(slides: Sequence, out: Path, fmt: str, *, overwrite: bool) -> dict:
    """The output of each of several slides, ``out/STEM.FMT``, checked before any work: two slides of one
    file name are an error naming both, and so is an existing file that bleep-rs did not write (unless
    ``overwrite``)."""
    if out.suffix.lower() in (".h5ad", ".zarr") or (out.exists() and not out.is_dir()):
        raise BleepError(f"out={out}: with several slides out= is a folder (one STEM.{fmt} per slide in it)")
    outputs: dict = {}
    for slide in slides:
        target = out / f"{Path(slide).stem}.{fmt}"
        if target in outputs.values():
            first = next(s for s, t in outputs.items() if t == target)
            raise BleepError(f"slides {first} and {slide} would both be written to {target}: outputs are named by the slide's file name; rename or link one")
        outputs[slide] = target
    foreign = [str(t) for t in outputs.values() if output_state(t) == "foreign"]
    if foreign and not overwrite:
        raise BleepError(f"{len(foreign)} outputs exist and are not bleep-rs predictions ({foreign[:3]}): move them, "
                         "choose another out=, or pass overwrite=True")
    return outputs
