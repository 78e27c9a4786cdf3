"""A cohort of whole slides predicted across a Dask cluster (the ``dask`` extra: ``pip install 'bleep-rs[dask]'``).

One Dask task per slide. Each worker process opens the model and the reference once (a cache in the
worker process, keyed by their resolved paths and their files' sizes and modification times) and keeps
them for every slide it is given; each prediction is written by the worker, atomically (a temporary
beside the output, then renamed: :mod:`bleep_rs._atomic`), so an output that exists is complete. A
worker killed mid-slide leaves at most a temporary that the next write of that output removes; Dask
gives the slide to another worker (``distributed.scheduler.allowed-failures`` times, 3 by default). A
rerun skips the outputs already complete, as the single-process :func:`~bleep_rs.predict.predict_slides` path of the command line does.

    from bleep_rs.cohort import connect, predict_cohort

    with connect(workers=4) as client:              # or connect(scheduler="tcp://host:8786")
        outputs = predict_cohort("model", "ref.safetensors", slides, "preds", client=client)

Dask is imported here only, when asked for: ``import bleep_rs`` imports neither dask nor torch.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ._core import BleepError
from .cluster import RemoteBleepError, _on_worker
from .predict import PredictConfig

__all__ = ["connect", "check_cohort", "predict_cohort", "cache_features"]


def _distributed():
    try:
        import distributed
    except ImportError as e:
        raise BleepError(f"a Dask cluster needs the dask extra ({e.name} is missing): pip install 'bleep-rs[dask]'") from e
    return distributed


@contextlib.contextmanager
def connect(scheduler: Optional[str] = None, workers: Optional[int] = None, *, threads_per_worker: int = 1) -> Iterator:
    """A ``distributed.Client``: of the running scheduler at ``scheduler`` (e.g. ``tcp://host:8786``), or
    of a ``LocalCluster`` of ``workers`` worker processes started here and closed on leaving the block.
    Each local worker's numerical libraries (torch, BLAS, bleep-rs's own pool) get this machine's cores
    divided among the workers (Dask's default is one thread each). The one place that makes a client for the CLI."""
    if (scheduler is None) == (workers is None):
        raise BleepError("give either scheduler=ADDRESS (a running Dask scheduler) or workers=N (worker processes started here)")
    distributed = _distributed()
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout="30s")
        except (OSError, TimeoutError, ValueError) as e:
            raise BleepError(f"scheduler={scheduler}: cannot connect ({e}): start one with dask scheduler, or use workers=N") from e
        with contextlib.closing(client):
            yield client
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise BleepError(f"workers= must be a number of worker processes, at least 1, not {workers!r}")
    cores = str(max(1, (os.cpu_count() or 1) // workers))
    env = {name: cores for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLEEP_RS_NUM_THREADS")}
    # No dashboard, and the scheduler's HTTP routes on a free port (not 8787, which another cluster may hold).
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                                       dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"}, env=env)
    with contextlib.closing(cluster), contextlib.closing(distributed.Client(cluster)) as client:
        yield client


# -- on the workers ------------------------------------------------------------------------------------

_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()
#: Models and references this process has opened (what "once per worker" is tested by).
LOADS = {"model": 0, "reference": 0, "backbone": 0}


def _fingerprint(path: Path) -> tuple:
    """The resolved path with the size and modification time of its file, or of every file in it (a
    model directory, a reference of shards): a changed file is opened anew."""
    path = path.resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return (str(path), tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if not path.exists():
        return (str(path), None)
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def _cached(kind: str, key, open_: Callable):
    """The object ``open_()`` made for ``key`` (e.g. a :func:`_fingerprint`) in this process, made again
    only when the key changes; one of each kind is kept (a worker serves one cohort at a time)."""
    with _CACHE_LOCK:  # a worker with several threads opens it once too
        if _CACHE.get(kind, (None,))[0] != key:
            _CACHE.pop(kind, None)  # the old one freed before the new one is opened
            _CACHE[kind] = (key, open_())
            LOADS[kind] += 1
        return _CACHE[kind][1]


def _load_model(model_path: str, device: str):
    from .device import pick_device
    from .model import load_model

    return load_model(model_path, device=str(pick_device(device)))


def _model_and_reference(model_path: str, reference_path: str, device: str) -> tuple:
    from .reference import Reference

    model = _cached("model", (_fingerprint(Path(model_path)), device), lambda: _load_model(model_path, device))
    ref = _cached("reference", _fingerprint(Path(reference_path)), lambda: Reference.load(reference_path))
    return model, ref


def _predict_task(slide: str, out: str, fmt: str, overwrite: bool, model_path: str, reference_path: str, device: str,
                  provenance: tuple, options: PredictConfig) -> dict:
    """One slide, on a worker: predicted and written to ``out``; returns a small record (never the
    prediction itself). An output found complete (written by an earlier try of this task, or another
    run) is kept unless ``overwrite``. A BleepError comes back as the record's ``error`` (BleepError does
    not cross processes, and an error of the input is not worth a retry elsewhere)."""
    from .predict import output_state, predict_slide, write_prediction

    record = {"slide": slide, "out": out, "pid": os.getpid(), "host": os.uname().nodename}
    started = time.perf_counter()
    try:
        state = output_state(Path(out))
        if state == "complete" and not overwrite:
            return {**record, "status": "skipped"}
        if state == "foreign" and not overwrite:
            raise BleepError(f"{out} exists and is not a bleep-rs prediction: move it, or pass overwrite=True")
        model, ref = _model_and_reference(model_path, reference_path, device)
        adata = predict_slide(model, ref, slide, options, model_path=provenance[0], reference_path=provenance[1], progress=False)
        write_prediction(adata, out, fmt=fmt, overwrite=True)  # what was there was checked above
    except BleepError as e:
        return {**record, "status": "error", "error": str(e)}
    return {**record, "status": "done", "n_obs": int(adata.n_obs), "mode": adata.uns["bleep"]["mode"],
            "seconds": time.perf_counter() - started, "loads": {k: LOADS[k] for k in ("model", "reference")}}


def _grid_task(slide: str, model_path: str, device: str, options: PredictConfig) -> dict:
    """A huge slide split into blocks, first step: its tissue and its grid of outputs (see
    :func:`bleep_rs.predict.slide_grid`), on a worker."""
    from .predict import _open_slide

    def run():
        started = time.perf_counter()
        model = _cached("model", (_fingerprint(Path(model_path)), device), lambda: _load_model(model_path, device))
        opened, n, _ = _open_slide(model, slide, options, hd_run=None)
        return {"grid": opened.grid, "thumbnail": opened.thumbnail, "target": opened.target_um_per_px, "n": n,
                "tissue": time.perf_counter() - started}

    return _on_worker(run)  # a BleepError comes back as one line: the slide's error record


def _block_task(slide: str, grid: dict, start: int, stop: int, model_path: str, device: str, options: PredictConfig) -> tuple:
    """The embeddings of outputs ``start:stop`` of a slide's grid, on a worker (the single-process
    pipeline on those rows: the same batches when ``start`` is a multiple of the batch size)."""
    from .predict import embed_batches
    from .slide import Slide

    def run():
        model = _cached("model", (_fingerprint(Path(model_path)), device), lambda: _load_model(model_path, device))
        centres = grid["grid"].centres[start:stop]
        image = Slide(slide, um_per_px=options.um_per_px)
        read = lambda sl: model.config.input.slide_patches(image, centres[sl])  # noqa: E731
        return embed_batches(model, len(centres), read, name=slide, batch_size=options.batch_size, progress=False,
                             queue_depth=options.queue_depth, precision=options.precision, tta_views=options.tta_views)

    return _on_worker(run)  # a BleepError comes back as one line: the slide's error record


def _assemble_task(slide: str, out: str, fmt: str, grid: dict, blocks: list, model_path: str, reference_path: str, device: str,
                   provenance: tuple, options: PredictConfig) -> dict:
    """A huge slide's last step, on a worker: the blocks' embeddings imputed together, the prediction
    assembled as the single-process path does and written atomically."""
    from .predict import _impute, _OpenSlide, _slide_prediction, check_compatible, write_prediction
    from .slide import Slide

    def run():
        started = time.perf_counter()
        model, ref = _model_and_reference(model_path, reference_path, device)
        check_compatible(model, ref)
        k, method = options.retrieval(model)
        emb = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros((0, model.retrieval_dim), np.float32)
        seconds = {"tissue": grid["tissue"], **{key: sum(b[1][key] for b in blocks) for key in ("engine", "read", "encode", "wait")}}
        t = time.perf_counter()
        imputed = _impute(ref, emb, k=k, method=method, centre_sections=options.centre_sections)
        seconds["impute"] = time.perf_counter() - t
        opened = _OpenSlide(slide, Slide(slide, um_per_px=options.um_per_px), grid["target"], grid["grid"], grid["thumbnail"])
        adata = _slide_prediction(model, ref, opened, imputed, seconds, options, model_path=provenance[0], reference_path=provenance[1], hd_run=None)
        adata.uns["bleep"]["seconds"]["total"] = sum(seconds.values()) + time.perf_counter() - started
        write_prediction(adata, out, fmt=fmt, overwrite=True)  # what was there was checked on the client
        return {"slide": slide, "out": out, "pid": os.getpid(), "status": "done", "n_obs": int(adata.n_obs),
                "mode": adata.uns["bleep"]["mode"], "seconds": adata.uns["bleep"]["seconds"]["total"], "blocks": len(blocks)}

    return _on_worker(run)  # a BleepError comes back as one line: the slide's error record


# -- on the client -------------------------------------------------------------------------------------


def _named(slide: str, message: str) -> str:
    return message if slide in message else f"{slide}: {message}"


def _raise_failures(failed: list, total: int, what: str, name: str) -> None:
    """One BleepError line for the failed tasks: how many, the first one's reason (naming it), the others' names."""
    if not failed:
        return
    first, rest = failed[0], [r[name] for r in failed[1:]]
    others = " (the others are written)" if len(failed) < total else ""
    also = f"; also failed: {', '.join(rest[:5])}{' ...' if len(rest) > 5 else ''}" if rest else ""
    raise BleepError(f"{len(failed)} of {total} {what} failed{others}: {_named(first[name], first['error'])}{also}")


def _collect(future, slide: str, out: str, distributed) -> dict:
    """A finished task's record; a task that raised, or whose workers kept dying, as an error record."""
    try:
        return future.result()
    except distributed.KilledWorker as e:
        return {"slide": slide, "out": out, "status": "error",
                "error": f"the workers running it died each time it was tried ({e}): is it too large for a worker's memory?"}
    except RemoteBleepError as e:
        return {"slide": slide, "out": out, "status": "error", "error": str(e)}
    except Exception as e:  # the task's own exception, as Dask hands it over
        return {"slide": slide, "out": out, "status": "error", "error": f"{type(e).__name__}: {e}"}


def check_cohort(model_path, reference_path, slides: Sequence, out_dir, *, fmt: str = "h5ad", overwrite: bool = False) -> dict:
    """The checks a cohort passes before any work (and before a cluster is started for it): the model,
    the reference and every slide exist, and the outputs (see :func:`bleep_rs.predict.slide_outputs`).
    Returns ``{slide: output path}``."""
    from .predict import prediction_format, slide_outputs

    prediction_format(f"x.{fmt}", fmt)
    if not (Path(model_path) / "config.json").is_file():
        raise BleepError(f"{model_path}: not a bleep-rs model directory (no config.json): give the folder bleep-rs train wrote")
    if not Path(reference_path).exists():
        raise BleepError(f"{reference_path}: no such reference (a file or a folder of shards from bleep-rs reference)")
    missing = [str(s) for s in slides if not Path(s).exists()]
    if missing:
        raise BleepError(f"{len(missing)} of {len(slides)} slides do not exist ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
    return slide_outputs([str(s) for s in slides], Path(out_dir), fmt, overwrite=overwrite)


def predict_cohort(model_path, reference_path, slides: Sequence, out_dir, *, client, fmt: str = "h5ad", overwrite: bool = False,
                   device: str = "auto", report: Optional[Callable[[dict], None]] = None, tiles_per_task: Optional[int] = None,
                   config: Optional[PredictConfig] = None, **predict_options) -> dict:
    """Predicts whole slides across the Dask cluster of ``client``, one task per slide, each written to
    ``out_dir/STEM.FMT`` by the worker that predicted it (see the module's notes). Outputs already
    complete are skipped unless ``overwrite``; a file there that bleep-rs did not write is an error
    before any work (unless ``overwrite``). ``config`` / ``predict_options``: a
    :class:`~bleep_rs.predict.PredictConfig` or its fields, as :func:`bleep_rs.predict.predict_slides`
    takes them; ``device`` where each worker runs the encoder. ``report(record)`` is called here for each slide as it finishes (in order
    of completion), the record's ``status`` being "done", "skipped" or "error".

    ``tiles_per_task``: a huge slide in several tasks: one finds its tissue and grid, one per block of
    about this many outputs (rounded up to whole encoder batches, so that the answer is the single
    process's) embeds them, and a last one imputes them all, assembles and writes the prediction.

    Returns ``{slide: output path}`` for every slide. Slides that failed do not stop the others; once
    all have finished, a BleepError names the failed slides and the first failure's reason. The model,
    reference, slides and ``out_dir`` must be reachable from every worker at the same paths."""
    from .predict import output_state

    predict_options = PredictConfig.of(config, **predict_options)  # a bad value is refused here, not on every worker
    distributed = _distributed()
    slides = [str(s) for s in slides]
    outputs = check_cohort(model_path, reference_path, slides, out_dir, fmt=fmt, overwrite=overwrite)
    provenance = (str(model_path), str(reference_path))
    model_abs, ref_abs = str(Path(model_path).resolve()), str(Path(reference_path).resolve())
    step = None
    if tiles_per_task is not None:
        if int(tiles_per_task) < 1:
            raise BleepError(f"tiles_per_task= must be at least 1, not {tiles_per_task!r}")
        bs = int(predict_options.batch_size or 256)  # 256: whole batches of every encoder's (4, 64, 256)
        step = -(-int(tiles_per_task) // bs) * bs  # whole batches: the same batches as one process, the same answer
    done, records, roles = distributed.as_completed(), [], {}

    def submit(kind: str, slide: str, fn: Callable, *args, follow: bool = True):
        # pure=False: a rerun is new work, not a result the scheduler may still hold from before.
        future = client.submit(fn, *args, key=f"bleep-{kind}-{Path(slide).stem}-{os.urandom(4).hex()}", pure=False)
        if follow:
            roles[future.key] = (kind, slide)
            done.add(future)
        return future

    for slide in slides:
        out = outputs[slide]
        if output_state(out) == "complete" and not overwrite:
            records.append({"slide": slide, "out": str(out), "status": "skipped"})
        elif step is None:
            submit("predict", slide, _predict_task, str(Path(slide).resolve()), str(out.resolve()), fmt, overwrite, model_abs, ref_abs,
                   device, provenance, predict_options)
        else:
            submit("grid", slide, _grid_task, str(Path(slide).resolve()), model_abs, device, predict_options)
    for record in records:
        if report is not None:
            report(record)
    for future in done:
        kind, slide = roles.pop(future.key)
        out = outputs[slide]
        record = _collect(future, slide, str(out), distributed)
        if kind == "grid" and "status" not in record:  # the grid: its blocks, then the task that assembles them
            blocks = [submit("block", slide, _block_task, str(Path(slide).resolve()), future, start, min(start + step, record["n"]), model_abs,
                             device, predict_options, follow=False) for start in range(0, record["n"], step)]
            submit("assemble", slide, _assemble_task, str(Path(slide).resolve()), str(out.resolve()), fmt, future, blocks, model_abs, ref_abs,
                   device, provenance, predict_options)
            continue
        future.release()
        record = {**record, "slide": slide, "out": str(out)}
        records.append(record)
        if report is not None:
            report(record)
    _raise_failures([r for r in records if r["status"] == "error"], len(slides), "slides", "slide")
    return {slide: outputs[slide] for slide in slides}


# -- training: the frozen backbone's features of many sections -----------------------------------------


def _slim(section):
    """What the backbone pass reads of a section: its spot names and positions and its image's record
    (not its counts, which can be large and stay on the client)."""
    import anndata as ad

    slim = ad.AnnData(obs=section.obs[[]].copy())
    slim.obsm["spatial"] = np.asarray(section.obsm["spatial"])
    slim.uns["bleep"] = dict(section.uns.get("bleep", {}))
    return slim


def _features_task(name: str, section, model_json: str, digest: str, backbone_state, config, um_per_px) -> dict:
    """One section's backbone features, on a worker, into the feature cache (training's own
    ``section_features`` of each of its entries: the same keys, the same atomic writes; each entry let go
    once written, not joined as training joins them). The backbone is rebuilt once per worker
    from the weights sent once to every worker (``digest`` names them)."""
    from .device import pick_device
    from .model import BleepModel, ModelConfig
    from .training.features import section_features, training_jitters

    def build():
        model = BleepModel(ModelConfig.from_json(model_json, "the training run"), pretrained=False)
        model.backbone.load_state_dict(backbone_state)
        return model.eval().to(pick_device(config.device))

    record = {"section": name, "pid": os.getpid()}
    started = time.perf_counter()
    try:
        model = _cached("backbone", digest, build)
        shapes = [section_features(model, section, config, um_per_px, stain_jitter=j).shape for j in training_jitters(config)]
    except BleepError as e:
        return {**record, "status": "error", "error": str(e)}
    shape = (sum(s[0] for s in shapes), *shapes[0][1:])  # what training reads: the entries' views, one after the other
    return {**record, "status": "done", "shape": shape, "seconds": time.perf_counter() - started, "loads": LOADS["backbone"]}


def cache_features(client, model, sections: Sequence, config, um_per_px: Optional[float], *,
                   report: Optional[Callable[[dict], None]] = None) -> list:
    """Fills the training feature cache with the frozen backbone features of ``sections`` across the Dask
    cluster of ``client``, one task per section not cached yet; :func:`bleep_rs.train` then reads them
    from the cache as if it had computed them: ``train(..., feature_pass=functools.partial(cache_features,
    client))`` calls it with its model (whose backbone weights go once to every worker), sections,
    config and resolution. ``report(record)``: called for each section done. The cache folder
    (``config.cache_dir``, else ``$BLEEP_RS_CACHE``) must be one the workers reach at the same path.
    Returns the task records; a BleepError names the sections that failed."""
    import dataclasses

    from .encode import weights_digest
    from .training.features import _cache_dir, cache_entries, feature_keys
    from .training.loop import _library

    distributed = _distributed()
    folder = _cache_dir(config)
    if folder is None:
        raise BleepError("a cluster's backbone pass fills the feature cache: not with cache_dir=none")
    config = dataclasses.replace(config, cache_dir=str(folder.parent.resolve()), progress=False)  # the workers' cache is this one
    todo = [(i, s) for i, s in enumerate(sections) if not all(cache_entries(folder, k) for k in feature_keys(model, s, config, um_per_px))]
    if not todo:
        return []
    state = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    [weights] = client.scatter([state], broadcast=True)
    digest, model_json = weights_digest(model.backbone), model.config.to_json()
    futures = {}
    for i, s in todo:
        name = _library(s, i)
        future = client.submit(_features_task, name, _slim(s), model_json, digest, weights, config, um_per_px,
                               key=f"bleep-features-{i}-{os.urandom(4).hex()}", pure=False)
        futures[future.key] = (future, name)
    records = []
    for future in distributed.as_completed([f for f, _ in futures.values()]):
        _, name = futures.pop(future.key)
        record = {**_collect(future, name, "", distributed), "section": name}
        future.release()
        records.append(record)
        if report is not None and record["status"] == "done":
            report(record)
    _raise_failures([r for r in records if r["status"] == "error"], len(todo), "sections' backbone features", "section")
    return records
