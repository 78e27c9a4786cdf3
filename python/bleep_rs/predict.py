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

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ._core import BleepError

__all__ = [
    "model_id", "check_compatible", "predict_section", "predict_slide", "slide_grid", "write_h5ad", "write_prediction", "read_prediction",
    "shard", "output_state", "slide_outputs",
]


def model_id(model) -> str:
    """A fingerprint of a model's weights (sha256 of the expression and image heads), so that a
    reference remembers which model embedded it."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(("expression_head.", "image_head.")):
            h.update(name.encode())
            h.update(t.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def check_compatible(model, reference) -> None:
    """Raises when the reference was not built with this model (other weights or dimension). The
    reference's genes are its own (all it measured, by default), not the model's input panel."""
    if reference.dim != model.config.embedding_dim:
        raise BleepError(f"the reference's embeddings have {reference.dim} dimensions, the model's {model.config.embedding_dim}: "
                         "build the reference with this model (bleep-rs reference --model ...)")
    built_with = reference.metadata.get("model_id")
    if not built_with:
        raise BleepError("the reference does not say which model embedded it (no model_id in its metadata): rebuild it with bleep-rs reference --model MODEL")
    if built_with != model_id(model):
        raise BleepError(
            f"the reference was built with another model (weights {built_with}, this model's {model_id(model)}): "
            "rebuild it with bleep-rs reference --model MODEL"
        )


def _neighbour_spread(reference, idx: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Per query: the mean over genes of the standard deviation of its neighbours' expression."""
    expr = reference.expression
    out = np.empty(len(idx), np.float32)
    for s in range(0, len(idx), chunk):
        out[s : s + chunk] = expr[idx[s : s + chunk]].std(axis=1).mean(axis=1)
    return out


def _assemble(pred, idx, sims, reference, ids, xy, spatial: dict, info: dict, neighbours: bool):
    import anndata as ad
    import pandas as pd

    from . import __version__

    adata = ad.AnnData(
        X=pred.astype(np.float32),
        obs=pd.DataFrame({"uncertainty": _neighbour_spread(reference, idx)}, index=pd.Index([str(i) for i in ids], name="spot_id")),
        var=pd.DataFrame(index=pd.Index(list(reference.genes), name="gene")),
    )
    adata.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
    if neighbours:
        adata.obsm["bleep_neighbours"] = idx.astype(np.int64)
        adata.obsm["bleep_similarities"] = sims.astype(np.float32)
    adata.uns["spatial"] = spatial
    adata.uns["bleep"] = {**info, "package_version": __version__, "complete": True}
    return adata


def embed_batches(model, n: int, read, *, batch_size: int = 256, precision: str = "auto", progress: bool = True, desc: str = "spots") -> tuple:
    """Image embeddings (n, d) of inputs that ``read(slice)`` returns batch by batch, the next batch read
    in a background thread (the Rust readers release the interpreter) while the current one is encoded:
    memory stays bounded by two batches and neither stage waits for the other. Returns the embeddings and
    the seconds spent reading (overlapped) and encoding."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from .slide import _progress

    read_s = [0.0]

    def timed(sl):
        t = time.perf_counter()
        out = read(sl)
        read_s[0] += time.perf_counter() - t
        return out

    slices = [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    out = np.zeros((n, model.config.embedding_dim), np.float32)
    encode_s = 0.0
    bar = _progress(n, desc, progress)
    with ThreadPoolExecutor(1, thread_name_prefix="bleep-rs-read") as pool:
        pending = pool.submit(timed, slices[0]) if slices else None
        for i, sl in enumerate(slices):
            patches = pending.result()
            pending = pool.submit(timed, slices[i + 1]) if i + 1 < len(slices) else None
            t = time.perf_counter()
            out[sl] = model.embed_images(patches, precision=precision)
            encode_s += time.perf_counter() - t
            if bar is not None:
                bar.update(sl.stop - sl.start)
    if bar is not None:
        bar.close()
    return out, {"patches": read_s[0], "encoding": encode_s}


def _retrieval(model, k: Optional[int], method: Optional[str]) -> tuple:
    """k and the aggregation: as given, else the model's recorded defaults."""
    return int(k if k is not None else model.config.k), method or model.config.method


def predict_section(model, reference, section, *, k: Optional[int] = None, method: Optional[str] = None, neighbours: bool = False,
                    model_path: str = "", reference_path: str = "", progress: bool = True, precision: str = "auto", batch_size: int = 256):
    """Predicts the spots of a section from its image alone (its counts are never read), from the model's
    fields of view at its resolution. ``k``, ``method``: default the model's. ``precision``: the image
    encoder's (see :mod:`bleep_rs.encode`)."""
    import time

    from .sections import section_patches

    check_compatible(model, reference)
    k, method = _retrieval(model, k, method)
    info = section.uns.get("bleep", {})
    cfg = model.config
    t0 = time.perf_counter()
    read = lambda sl: section_patches(section[sl], cfg.patch_size, cfg.um_per_px, fields=cfg.fields_of_view)  # noqa: E731
    emb, seconds = embed_batches(model, section.n_obs, read, batch_size=batch_size, precision=precision, progress=progress)
    t2 = time.perf_counter()
    pred, idx, sims = reference.impute(emb, k=k, method=method, return_neighbors=True)
    seconds.update(imputation=time.perf_counter() - t2, total=time.perf_counter() - t0)
    lib = info.get("library_id", "section")
    meta = {
        "model": str(model_path), "reference": str(reference_path), "k": k, "method": method,
        "um_per_px": float(cfg.um_per_px or info.get("um_per_px", 0.0)), "library_id": lib,
        "fields_of_view": list(cfg.fields_of_view), "tta": bool(cfg.tta),
        "source": str(info.get("image_path", "")), "mode": "spots", "seconds": seconds,
        "image_um_per_px": float(info.get("um_per_px", 0.0)), "shape": "square" if info.get("platform") == "visium-hd" else "circle",
    }
    return _assemble(pred, idx, sims, reference, section.obs_names, section.obsm["spatial"], dict(section.uns.get("spatial", {})), meta, neighbours)


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
            raise BleepError(f"--bin-um must be a positive number of micrometres, not {bin_um!r}")
        side = bin_um / slide.um_per_px
        w, h = slide.dimensions
        corners = tissue_grid(np.ascontiguousarray(mask.mask), mask.scale, w, h, side, float(min_tissue))
        rc = np.round(corners[:, ::-1] / side).astype(np.int64)
        return TileGrid(corners + side / 2, [f"bin_{r}_{c}" for r, c in rc], side, rc, "bins")
    coords = slide.tile_grid(size, um_per_px, min_tissue=min_tissue, mask=mask)
    return TileGrid(coords + footprint / 2, [f"tile_{int(x)}_{int(y)}" for x, y in coords], footprint, None, "tiles")


def predict_slide(model, reference, path, *, um_per_px: Optional[float] = None, k: Optional[int] = None, method: Optional[str] = None, min_tissue: float = 0.5,
                  batch_size: int = 256, neighbours: bool = False, model_path: str = "", reference_path: str = "", progress: bool = True,
                  bin_um: Optional[float] = None, hd_run=None, precision: str = "auto"):
    """Predicts a whole slide's tissue (no spatial transcriptomics needed): tiles of the model's patch
    size at its resolution, kept where the tissue mask covers ``min_tissue``, or bins of ``bin_um``
    (aligned with ``hd_run``'s grid when given: see :func:`slide_grid`); each from the model's fields of
    view around its centre."""
    import time

    from .slide import Slide

    check_compatible(model, reference)
    k, method = _retrieval(model, k, method)
    cfg = model.config
    t0 = time.perf_counter()
    slide = Slide(path, um_per_px=um_per_px)
    if slide.um_per_px is None:
        raise BleepError(f"{path}: the slide does not state its pixel size: pass --um-per-px X (the scanner's micrometres per pixel)")
    target = cfg.um_per_px or slide.um_per_px
    mask = slide.tissue_mask()
    grid = slide_grid(slide, cfg.patch_size, target, min_tissue=min_tissue, mask=mask, bin_um=bin_um, hd_run=hd_run)
    if len(grid.centres) == 0:
        raise BleepError(f"{path}: no tissue tile found (the tissue mask covers {mask.fraction:.1%} of the slide): check the image, or lower --min-tissue")
    t1 = time.perf_counter()
    read = lambda sl: slide.spot_patches(grid.centres[sl], cfg.patch_size, target, fields=cfg.fields_of_view)  # noqa: E731
    emb, seconds = embed_batches(model, len(grid.centres), read, batch_size=batch_size, precision=precision, progress=progress, desc=grid.kind)
    t2 = time.perf_counter()
    pred, idx, sims = reference.impute(emb, k=k, method=method, return_neighbors=True)
    seconds.update(tissue=t1 - t0, imputation=time.perf_counter() - t2, total=time.perf_counter() - t0)
    lib = Path(path).stem
    thumb = slide.thumbnail(2000)
    factors = {"tissue_hires_scalef": thumb.shape[1] / slide.dimensions[0], "spot_diameter_fullres": float(grid.side_px)}
    spatial = {lib: {"images": {"hires": thumb}, "scalefactors": factors, "metadata": {"layout": "slide"}}}
    meta = {
        "model": str(model_path), "reference": str(reference_path), "k": k, "method": method,
        "um_per_px": float(target), "slide_um_per_px": float(slide.um_per_px), "image_um_per_px": float(slide.um_per_px),
        "fields_of_view": list(cfg.fields_of_view), "tta": bool(cfg.tta),
        "library_id": lib, "source": str(path), "mode": grid.kind, "tile_px": int(cfg.patch_size),
        "min_tissue": float(min_tissue), "shape": "square", "seconds": seconds,
        **({"bin_um": float(grid.side_px * slide.um_per_px), "grid": "hd-run" if hd_run is not None else "slide"} if grid.kind == "bins" else {}),
    }
    adata = _assemble(pred, idx, sims, reference, grid.ids, grid.centres, spatial, meta, neighbours)
    if grid.array_rc is not None:
        adata.obs["array_row"], adata.obs["array_col"] = grid.array_rc[:, 0], grid.array_rc[:, 1]
    return adata


def write_h5ad(adata, path: "os.PathLike[str] | str", *, overwrite: bool = False) -> Path:
    """Writes an .h5ad atomically (temporary file beside it, then rename); an existing file is an error
    unless ``overwrite``."""
    from ._atomic import atomic_path

    path = Path(path)
    if path.exists() and not overwrite:
        raise BleepError(f"{path} exists: choose another --out or pass --overwrite")
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path


def shard(items: Sequence, spec: Optional[str]) -> list:
    """The items of shard ``I/N`` (1-based): every N-th item starting at the I-th, in sorted order."""
    items = sorted(items)
    if not spec:
        return list(items)
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError as e:
        raise BleepError(f"--shard must look like I/N (e.g. 2/8), not {spec!r}") from e
    if not 1 <= i <= n:
        raise BleepError(f"--shard {spec}: I must be between 1 and N")
    return list(items[i - 1 :: n])


FORMATS = ("h5ad", "zarr")


def prediction_format(path: "os.PathLike[str] | str", fmt: Optional[str] = None) -> str:
    """The format of a prediction file: its suffix, "h5ad" (PRED.h5ad) or "zarr" (PRED.zarr, a
    SpatialData store), which ``fmt`` must agree with when given; ``fmt`` names the format of a name
    without a suffix. Any other suffix is an error."""
    if fmt is not None and fmt not in FORMATS:
        raise BleepError(f"--format must be one of {FORMATS}, not {fmt!r}")
    suffix = Path(str(path).rstrip("/")).suffix.lower().lstrip(".")
    if suffix in FORMATS:
        if fmt is not None and fmt != suffix:
            raise BleepError(f"--format {fmt} but --out {path} ends in .{suffix}: drop --format or rename --out")
        return suffix
    if fmt is not None and not suffix:
        return fmt
    raise BleepError(f"--out {path}: name the prediction PRED.h5ad or PRED.zarr (a SpatialData store), or give --format with a name without suffix")


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
    or one it cannot read), which only ``--overwrite`` may replace."""
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
        raise BleepError(f"--out {out}: with several slides --out is a folder (one STEM.{fmt} per slide in it)")
    outputs: dict = {}
    for slide in slides:
        target = out / f"{Path(slide).stem}.{fmt}"
        if target in outputs.values():
            first = next(s for s, t in outputs.items() if t == target)
            raise BleepError(f"slides {first} and {slide} would both be written to {target}: outputs are named by the slide's file name; rename or link one")
        outputs[slide] = target
    foreign = [str(t) for t in outputs.values() if output_state(t) == "foreign"]
    if foreign and not overwrite:
        raise BleepError(f"{len(foreign)} outputs exist and are not bleep-rs predictions ({foreign[:3]}): move them, choose another --out, or pass --overwrite")
    return outputs
