"""bleep-rs: predict spatially resolved gene expression from H&E histology (BLEEP).

Retrieval needs only numpy::

    import bleep_rs
    ref = bleep_rs.Reference.load("reference.safetensors")
    predicted = ref.impute(image_embeddings, k=50)      # (n_queries, n_genes) float32

Native work runs on a thread pool whose size is set by ``bleep_rs.set_num_threads(n)``, the
``BLEEP_RS_NUM_THREADS`` environment variable, or the ``threads=`` argument of each call.
"""

from bleep_rs._core import BleepError, get_num_threads, kernel_name, set_num_threads
from bleep_rs.reference import METHODS, Reference

__version__ = "0.1.0"

__all__ = [
    "BleepError",
    "METHODS",
    "Reference",
    "get_num_threads",
    "kernel_name",
    "set_num_threads",
    "__version__",
]
