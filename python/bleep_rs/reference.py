"""The reference: reference spots' embeddings and expression, searchable by cosine similarity.

One file format (safetensors + JSON metadata, see ``rust/bleep-core/src/reference.rs``), one class. All numeric work
runs in the Rust core with the interpreter released.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from bleep_rs._core import BleepError, ReferenceCore

PathLike = Union[str, "os.PathLike[str]"]

#: Ways of combining the k neighbours' expression (method.md, section 5).
METHODS = ("mean", "weighted", "softmax", "top1")


def as_float32_matrix(x: Any, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 2-D array, or a BleepError that says what is wrong with it.

    float64, integer and non-contiguous input is converted; scipy sparse matrices are densified.
    """
    if hasattr(x, "toarray") and not isinstance(x, np.ndarray):
        x = x.toarray()
    try:
        a = np.asarray(x)
    except Exception as e:  # e.g. a CUDA tensor
        raise BleepError(f"{name} could not be read as an array ({e}); pass a NumPy array") from e
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise BleepError(f"{name} must hold numbers, got dtype {a.dtype}")
    if a.ndim != 2:
        raise BleepError(f"{name} must be 2-D (rows x columns), got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _names(values: Optional[Sequence[Any]], name: str) -> Optional[list[str]]:
    if values is None:
        return None
    if isinstance(values, (str, bytes)):
        raise BleepError(f"{name} must be a sequence of names, not a single string")
    return [str(v) for v in values]


class Reference:
    """Reference spots (embeddings + expression on a gene panel) to impute new patches from.

    Build one with :meth:`build` or read one with :meth:`load`; :meth:`impute` predicts the expression
    of query embeddings as an aggregate of their k most cosine-similar reference spots.
    """

    #: The subclass that reads and writes folders of shards (bleep_rs.shards.ShardedReference) registers
    #: itself here, so that this module does not import the module that extends it.
    _folders: Any = None

    def __init_subclass__(cls, *, reads_folders: bool = False, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if reads_folders:
            Reference._folders = cls

    def __init__(self, core: ReferenceCore, path: Optional[Path] = None):
        self._core = core
        self._path = path  # the file it was loaded from: it pickles as that path

    def __reduce__(self):
        """A reference read from a file pickles as its path (cheap to send to a Dask worker, which reads
        the file again); one built in memory does not pickle."""
        if self._path is None:
            raise BleepError("a Reference built in memory cannot be pickled (it would copy every spot): save it and send the path")
        return (Reference.load, (str(self._path),))

    # ---- construction and files -------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        embeddings: Any,
        expression: Any,
        genes: Sequence[str],
        *,
        spot_ids: Optional[Sequence[str]] = None,
        sections: Optional[Sequence[str]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        expression_dtype: str = "float32",
        threads: Optional[int] = None,
    ) -> "Reference":
        """A reference from spot embeddings (N x d) and expression (N x G) on ``genes`` (G names).

        ``expression_dtype``: "float32", or "float16" / "bfloat16" to halve memory and bandwidth.
        ``metadata``: JSON-serialisable provenance (the model that made the embeddings, ...).
        """
        emb = as_float32_matrix(embeddings, "embeddings")
        expr = as_float32_matrix(expression, "expression")
        genes_list = _names(genes, "genes")
        assert genes_list is not None
        if metadata is None:
            provenance = "{}"
        elif not isinstance(metadata, Mapping):
            raise BleepError(f"metadata must be a dict, got {type(metadata).__name__}")
        else:
            try:
                provenance = json.dumps(dict(metadata))
            except TypeError as e:
                raise BleepError(f"metadata must be JSON-serialisable: {e}") from e
        core = ReferenceCore.build(
            emb,
            expr,
            genes_list,
            spot_ids=_names(spot_ids, "spot_ids"),
            sections=_names(sections, "sections"),
            provenance=provenance,
            expression_dtype=expression_dtype,
            threads=threads,
        )
        return cls(core)

    @classmethod
    def load(cls, path: PathLike, *, threads: Optional[int] = None, client: Any = None) -> "Reference":
        """Read a reference file written by :meth:`save`, or the folder of a sharded reference written by
        ``save(folder, shard_spots=N)`` (a :class:`~bleep_rs.shards.ShardedReference`, same API). With a
        ``dask.distributed`` ``client``, each shard is held by a worker of its cluster (bleep_rs.cluster)."""
        path = Path(path).expanduser()
        if path.is_dir() or client is not None:
            return Reference._folders.load(path, threads=threads, client=client)
        if not path.exists():
            raise BleepError(f"{path}: no such reference file")
        return cls(ReferenceCore.load(path, threads=threads), path.resolve())

    def save(self, path: PathLike, *, shard_spots: Optional[int] = None) -> None:
        """Write the reference to ``path`` (a temporary file beside it, then renamed: never half-written;
        what a killed earlier save left behind is removed first). With ``shard_spots``, ``path`` is a
        folder of shards of that many spots and their manifest (bleep_rs.shards; memory bounded by a shard)."""
        from ._atomic import remove_stale

        if shard_spots is not None:
            Reference._folders.write(self, path, shard_spots=shard_spots)
            return
        path = Path(path).expanduser()
        if not path.parent.is_dir():
            raise BleepError(f"{path}: the folder {path.parent} does not exist")
        remove_stale(path)  # the core names its temporary .NAME.PID.tmp, as _atomic does
        self._core.save(path)

    # ---- what it holds ----------------------------------------------------------------------------

    @property
    def n_spots(self) -> int:
        return self._core.n_spots

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self._core.dim

    @property
    def genes(self) -> list[str]:
        return self._core.genes

    @property
    def n_genes(self) -> int:
        return len(self._core.genes)

    @property
    def spot_ids(self) -> list[str]:
        return self._core.spot_ids

    @property
    def sections(self) -> Optional[list[str]]:
        return self._core.sections

    @property
    def metadata(self) -> dict[str, Any]:
        """The provenance given to :meth:`build`."""
        return json.loads(self._core.provenance)

    @property
    def expression_dtype(self) -> str:
        return self._core.expression_dtype

    @property
    def embeddings(self) -> np.ndarray:
        """The reference embeddings as given (N x d float32, a copy)."""
        return self._core.embeddings()

    @property
    def expression(self) -> np.ndarray:
        """The reference expression (N x G float32, a copy)."""
        return self._core.expression()

    # ---- retrieval --------------------------------------------------------------------------------

    def search(self, queries: Any, k: int = 50, *, threads: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``min(k, n_spots)`` most cosine-similar reference spots of each query, best first.

        Returns ``(indices, similarities)``: int64 and float32 arrays of shape (Q, min(k, n_spots)).
        Ties are broken towards the lower reference index.
        """
        q = as_float32_matrix(queries, "queries")
        return self._core.search(q, _check_k(k), threads=threads)

    def impute(
        self,
        queries: Any,
        k: int = 50,
        method: str = "mean",
        *,
        temperature: float = 0.1,
        return_neighbors: bool = False,
        threads: Optional[int] = None,
    ):
        """Predicted expression (Q x G float32) of each query embedding from its k nearest spots.

        ``method``: "mean" (BLEEP's default), "weighted" (BLEEP's exp(-squared Euclidean distance)
        weights on the un-normalised embeddings), "softmax" (softmax of cosine / ``temperature``) or
        "top1". With ``return_neighbors=True`` returns ``(prediction, indices, similarities)``.
        """
        if method not in METHODS:
            raise BleepError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        q = as_float32_matrix(queries, "queries")
        pred, idx, sims = self._core.impute(q, _check_k(k), method=method, temperature=float(temperature), threads=threads)
        return (pred, idx, sims) if return_neighbors else pred

    def aggregate(self, indices: Any, weights: Any, *, threads: Optional[int] = None) -> np.ndarray:
        """Weighted sums of reference expression rows: ``out[q] = sum_j weights[q, j] * expression[indices[q, j]]``.

        The aggregation step of :meth:`impute` alone, for neighbours or weights chosen elsewhere.
        ``indices``: (Q, k) integers in [0, n_spots); ``weights``: (Q, k). Returns (Q, G) float32.
        """
        idx = np.asarray(indices)
        if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
            raise BleepError(f"indices must be a 2-D integer array, got {idx.dtype} with shape {idx.shape}")
        w = as_float32_matrix(weights, "weights")
        if idx.shape[1] == 0:
            raise BleepError("indices must have at least one column (k >= 1)")
        return self._core.aggregate(np.ascontiguousarray(idx, dtype=np.int64), w, threads=threads)

    def neighbour_spread(self, indices: Any, *, threads: Optional[int] = None) -> np.ndarray:
        """Per query, the mean over genes of the standard deviation of its neighbours' expression: how
        much the spots a prediction averages disagree (``predict`` reports it as ``obs["uncertainty"]``).
        ``indices``: (Q, k) integers in [0, n_spots), as :meth:`impute` returns them. Returns (Q,) float32.
        """
        idx = np.asarray(indices)
        if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
            raise BleepError(f"indices must be a 2-D integer array, got {idx.dtype} with shape {idx.shape}")
        return self._core.neighbour_spread(np.ascontiguousarray(idx, dtype=np.int64), threads=threads)

    def __len__(self) -> int:
        return self.n_spots

    def __repr__(self) -> str:
        return (
            f"Reference({self.n_spots} spots, {self.dim}-d embeddings, {self.n_genes} genes, "
            f"expression {self.expression_dtype})"
        )


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise BleepError(f"k must be a whole number, got {k!r}")
    if k < 1:
        raise BleepError(f"k must be at least 1, got {k}")
    return int(k)
