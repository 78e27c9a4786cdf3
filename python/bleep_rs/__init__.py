"""bleep-rs: predict spatially resolved gene expression from H&E histology (BLEEP).

Retrieval needs only numpy::

    import bleep_rs
    ref = bleep_rs.Reference.load("reference.safetensors")
    predicted = ref.impute(image_embeddings, k=50)      # (n_queries, n_genes) float32

A reference too large for one file or one machine is split in shards (bleep_rs.shards), searched exactly,
in this process or from a Dask cluster (bleep_rs.cluster; ``pip install bleep-rs[dask]``)::

    ref.save("atlas/", shard_spots=100_000)             # or bleep_rs.ShardWriter, spot by spot
    atlas = bleep_rs.Reference.load("atlas/", client=dask_client)

Sections, slides and patches (AnnData via ``anndata``, imported on first use)::

    section = bleep_rs.read_section("outs/", image="slide.tif")     # AnnData, pixel size resolved
    patches = bleep_rs.section_patches(section, size=224, um_per_px=0.5)
    slide = bleep_rs.Slide("slide.svs")
    for batch in slide.iter_tiles(224, um_per_px=0.5, tensor=(mean, std)): ...

Native work runs on a thread pool whose size is set by ``bleep_rs.set_num_threads(n)``, the
``BLEEP_RS_NUM_THREADS`` environment variable, or the ``threads=`` argument of each call.
"""

from bleep_rs._core import BleepError, get_num_threads, kernel_name, set_num_threads
from bleep_rs.inputs import InputSpec
from bleep_rs.normalize import MacenkoNormalizer, ReinhardNormalizer, to_tensor
from bleep_rs.reference import METHODS, Reference
from bleep_rs.sections import read_section, section_patches
from bleep_rs.shards import ShardedReference, ShardWriter
from bleep_rs.slide import Slide


def kernel_info() -> dict:
    """Which score kernel the native search runs on this CPU, and why: ``kernel``; ``reason``
    ("BLEEP_RS_KERNEL", "measured", "measured (cached)" or "the only candidate": where the CPU has more than
    one kernel of its best vector width, the fastest is measured once per CPU model and package version
    and cached); ``available``; ``rates`` (queries/s of each candidate when measured in this process);
    ``cpu`` (the model name)."""
    from bleep_rs._core import kernel_choice

    kernel, reason, available, rates, _ignored, cpu = kernel_choice()
    return {"kernel": kernel, "reason": reason, "available": available, "rates": dict(rates), "cpu": cpu}


def _check_kernel_request() -> None:
    """A BLEEP_RS_KERNEL that names no kernel this CPU runs is ignored by the core: say so."""
    import os

    from bleep_rs._core import available_kernels

    wanted = os.environ.get("BLEEP_RS_KERNEL")
    if wanted is not None and wanted not in available_kernels():
        import warnings

        warnings.warn(f"BLEEP_RS_KERNEL={wanted!r} is not a kernel this CPU runs (it runs: {', '.join(available_kernels())}; "
                      "names are lower case); it is ignored and the fastest kernel is used", stacklevel=2)


_check_kernel_request()


def _version() -> str:
    """The installed distribution's version: Cargo.toml's workspace ``version`` is its one source (maturin)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bleep-rs")
    except PackageNotFoundError:  # a source tree on sys.path without an install
        return "0+unknown"


__version__ = _version()

# Training needs torch: these names import it on first use, so that `import bleep_rs` never does.
_LAZY = {
    "TrainConfig": "bleep_rs.training",
    "train": "bleep_rs.training",
    "BleepModel": "bleep_rs.model",
    "load_model": "bleep_rs.model",
    "save_model": "bleep_rs.model",
    "build_reference": "bleep_rs.model",
    "Panel": "bleep_rs.expression",
    "choose_panel": "bleep_rs.expression",
    # Prediction and evaluation without the command line.
    "PredictConfig": "bleep_rs.predict",
    "predict_section": "bleep_rs.predict",
    "predict_features": "bleep_rs.predict",
    "read_patch_features": "bleep_rs.readers.patch_features",
    "predict_slide": "bleep_rs.predict",
    "predict_slides": "bleep_rs.predict",
    "read_prediction": "bleep_rs.predict",
    "write_prediction": "bleep_rs.predict",
    "evaluate_prediction": "bleep_rs.evaluate",
    # Formats (anndata, spatialdata, tifffile on first use).
    "write_hest_sample": "bleep_rs.readers.hest",
    "to_spatialdata": "bleep_rs.sdata",
    "write_zarr": "bleep_rs.sdata",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bleep_rs' has no attribute {name!r}")

__all__ = [
    "BleepError",
    "BleepModel",
    "InputSpec",
    "Panel",
    "PredictConfig",
    "TrainConfig",
    "build_reference",
    "choose_panel",
    "evaluate_prediction",
    "load_model",
    "predict_features",
    "predict_section",
    "predict_slide",
    "predict_slides",
    "read_patch_features",
    "read_prediction",
    "write_prediction",
    "save_model",
    "train",
    "METHODS",
    "MacenkoNormalizer",
    "Reference",
    "ReinhardNormalizer",
    "ShardWriter",
    "ShardedReference",
    "Slide",
    "get_num_threads",
    "kernel_info",
    "kernel_name",
    "read_section",
    "section_patches",
    "set_num_threads",
    "to_spatialdata",
    "to_tensor",
    "write_hest_sample",
    "write_zarr",
    "__version__",
]
