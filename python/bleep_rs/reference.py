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

from bleep_rs._core import BleepError, ReferenceCore, neighbour_weights

PathLike = Union[str, "os.PathLike[str]"]

#: Ways of combining the k neighbours' expression (method.md, section 5).
METHODS = ("mean", "weighted", "softmax", "top1")
#: The neighbours per prediction and their aggregation unless told otherwise (BLEEP's k = 50, the mean).
DEFAULT_K, DEFAULT_METHOD = 50, "mean"
#: How the reference stores its expression: "auto" picks whichever of the other two takes fewer bytes.
EXPRESSION_FORMATS = ("auto", "dense", "sparse")


def weights_of(queries: np.ndarray, sims: np.ndarray, neighbour_norms: Optional[np.ndarray], method: str, temperature: float) -> np.ndarray:
    """The neighbours' weights (Q x k float32, rows summing to 1) of ``method``, by the Rust weighting
    the core's impute uses (``neighbour_weights``); ``neighbour_norms``: the neighbours' embedding norms
    (Q x k), which only "weighted" reads (None: not needed)."""
    qnorms = np.sqrt(np.square(queries, dtype=np.float64).sum(axis=1))
    norms = np.zeros(sims.shape) if neighbour_norms is None else neighbour_norms
    return neighbour_weights(np.ascontiguousarray(sims), qnorms, np.ascontiguousarray(norms, np.float64), method, float(temperature))


def is_sparse_matrix(x: Any) -> bool:
    """Whether ``x`` is a scipy.sparse matrix or array (checked without importing scipy)."""
    return hasattr(x, "tocsr") and hasattr(x, "nnz") and not isinstance(x, np.ndarray)


def csr_parts(x: Any, name: str) -> tuple[tuple[int, int], np.ndarray, np.ndarray, np.ndarray]:
    """A scipy.sparse matrix (csr, csc, coo, any sparray) as canonical compressed sparse rows, never
    densified: ``(shape, indptr int64, indices uint32, values float32)``, columns sorted within each row
    and duplicates summed. The caller's matrix is not modified (a copy is canonicalised)."""
    _check_sparse_structure(x, name)
    try:
        csr = x.tocsr(copy=True)
        csr.sum_duplicates()  # sorts each row's columns and adds up repeated entries
    except Exception as e:
        raise BleepError(f"{name} could not be read as a sparse matrix ({e})") from e
    shape = tuple(int(s) for s in csr.shape)
    if len(shape) != 2:
        raise BleepError(f"{name} must be 2-D (rows x columns), got shape {shape}")
    data = np.asarray(csr.data)
    if data.dtype == object or not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer) or data.dtype == bool):
        raise BleepError(f"{name} must hold numbers, got dtype {data.dtype}")
    indices = np.asarray(csr.indices)
    if indices.size and int(indices.min()) < 0:
        raise BleepError(f"{name} has a negative column index: it is not a valid sparse matrix")
    return (
        (shape[0], shape[1]),
        np.ascontiguousarray(csr.indptr, dtype=np.int64),
        np.ascontiguousarray(indices, dtype=np.uint32),
        np.ascontiguousarray(data, dtype=np.float32),
    )


def _check_sparse_structure(x: Any, name: str) -> None:
    """Refuse a compressed (csr, csc, bsr) or coordinate (coo) matrix whose index arrays are out of range or
    inconsistent, before scipy's conversions read them: they trust them, and read out of bounds (a
    segmentation fault) on a damaged ``indptr``."""
    try:
        if getattr(x, "format", None) in ("csr", "csc", "bsr"):
            x.check_format(full_check=True)
        elif getattr(x, "format", None) == "coo":
            shape, coords = tuple(x.shape), getattr(x, "coords", None) or (x.row, x.col)
            if any(len(c) != len(x.data) for c in coords) or any(
                len(c) and (int(np.min(c)) < 0 or int(np.max(c)) >= n) for c, n in zip(coords, shape)
            ):
                raise ValueError("coordinates out of range or of other lengths than its values")
    except (ValueError, TypeError, AttributeError) as e:
        raise BleepError(f"{name} is not a valid sparse matrix ({e})") from e


def as_float32_matrix(x: Any, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 2-D array, or a BleepError that says what is wrong with it.

    float64, integer, non-contiguous and unaligned input is converted; scipy sparse matrices are densified (the
    expression of :meth:`Reference.build` is not: it stays sparse).
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
    # Aligned too: arrays that arrive over a network (Dask) or from a byte buffer may not be.
    return np.require(a, dtype=np.float32, requirements=["C_CONTIGUOUS", "ALIGNED"])


def _names(values: Optional[Sequence[Any]], name: str) -> Optional[list[str]]:
    if values is None:
        return None
    if isinstance(values, (str, bytes)):
        raise BleepError(f"{name} must be a sequence of names, not a single string")
    return [str(v) for v in values]


def _neighbours_asked(return_neighbours: bool, return_neighbors: Optional[bool]) -> bool:
    """``impute``'s ``return_neighbours``, or its older spelling ``return_neighbors`` (kept as an alias)."""
    return bool(return_neighbours if return_neighbors is None else return_neighbors)


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
        expression_format: str = "auto",
    ) -> "Reference":
        """A reference from spot embeddings (N x d) and expression (N x G) on ``genes`` (G names).

        ``expression``: a dense array, or a scipy.sparse matrix (csr, csc, coo or sparray), which is
        converted to compressed sparse rows and never densified (unless dense storage is asked for or
        found smaller).
        ``expression_dtype``: "float32", or "float16" / "bfloat16" to halve memory and bandwidth.
        ``expression_format``: "auto" (the default: sparse rows when they take fewer bytes than the dense
        table, as for a table of mostly zeros), "dense" or "sparse".
        ``metadata``: JSON-serialisable provenance (the model that made the embeddings, ...).
        """
        if expression_format not in EXPRESSION_FORMATS:
            raise BleepError(f"unknown expression_format {expression_format!r}: use one of {', '.join(EXPRESSION_FORMATS)}")
        emb = as_float32_matrix(embeddings, "embeddings")
        genes_list = _names(genes, "genes")
        if genes_list is None:
            raise BleepError("genes must be given: one name per expression column")
        if not isinstance(expression_dtype, str):
            raise BleepError(f"expression_dtype must be a name (\"float32\", \"float16\" or \"bfloat16\"), got {expression_dtype!r}")
        if metadata is None:
            provenance = "{}"
        elif not isinstance(metadata, Mapping):
            raise BleepError(f"metadata must be a dict, got {type(metadata).__name__}")
        else:
            try:
                provenance = json.dumps(dict(metadata))
            except TypeError as e:
                raise BleepError(f"metadata must be JSON-serialisable: {e}") from e
        labels = dict(
            spot_ids=_names(spot_ids, "spot_ids"),
            sections=_names(sections, "sections"),
            provenance=provenance,
            expression_dtype=expression_dtype,
            expression_format=expression_format,
            threads=threads,
        )
        if is_sparse_matrix(expression):
            (rows, cols), indptr, indices, values = csr_parts(expression, "expression")
            if cols != len(genes_list):
                raise BleepError(f"expression has {cols} columns but {len(genes_list)} gene names were given: one name per column")
            if rows != emb.shape[0]:
                raise BleepError(f"embeddings have {emb.shape[0]} rows but expression has {rows}: give one row per reference spot in both")
            return cls(ReferenceCore.build_csr(emb, indptr, indices, values, genes_list, **labels))
        expr = as_float32_matrix(expression, "expression")
        return cls(ReferenceCore.build(emb, expr, genes_list, **labels))

    @classmethod
    def load(cls, path: PathLike, *, threads: Optional[int] = None, client: Any = None) -> "Reference":
        """Open a reference file written by :meth:`save`, or the folder of a sharded reference written by
        ``save(folder, shard_spots=N)`` (a :class:`~bleep_rs.shards.ShardedReference`, same API). With a
        ``dask.distributed`` ``client``, each shard is held by a worker of its cluster (bleep_rs.cluster).

        A file is memory-mapped, not read: the expression, the embeddings, their norms and their search
        panels are read from it where they lie, as searches and aggregations need them, so loading takes
        the time of the header whatever the number of spots, and memory holds little beyond the batch
        being imputed (the pages read from the file are the operating system's cache, which it can drop).
        What is read is checked when first used: the embeddings, norms and panels in full by the first
        search (one parallel pass, a few seconds per million spots), each sparse expression row as it is
        read; a damaged file is a BleepError then. Files of format version 1 are read into memory. Do not
        overwrite a loaded file in place (:meth:`save` never does: it writes a new file and renames it).
        """
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
    def expression_format(self) -> str:
        """How the expression is stored: "dense" or "sparse" (compressed sparse rows)."""
        return self._core.expression_format

    @property
    def expression_nbytes(self) -> int:
        """Bytes of the stored expression (values, plus row offsets and gene columns when sparse)."""
        return self._core.expression_nbytes

    @property
    def mapped(self) -> bool:
        """Whether the expression and embeddings are read from the mapped file rather than held in memory."""
        return self._core.mapped

    def expression_sparse(self) -> Any:
        """The reference expression as a ``scipy.sparse.csr_matrix`` (N x G float32, a copy; needs scipy)."""
        try:
            import scipy.sparse
        except ImportError as e:  # pragma: no cover - scipy ships with anndata
            raise BleepError("expression_sparse() needs scipy: pip install scipy") from e
        indptr, indices, values = self._core.expression_csr()
        return scipy.sparse.csr_matrix((values, indices, indptr), shape=(self.n_spots, self.n_genes))

    @property
    def embeddings(self) -> np.ndarray:
        """The reference embeddings as given (N x d float32, a copy)."""
        return self._core.embeddings()

    @property
    def expression(self) -> np.ndarray:
        """The reference expression (N x G float32): a dense copy, whether it is stored dense or sparse
        (see :meth:`expression_sparse` for a sparse one)."""
        return self._core.expression()

    # ---- retrieval --------------------------------------------------------------------------------

    def search(self, queries: Any, k: int = DEFAULT_K, *, threads: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``min(k, n_spots)`` most cosine-similar reference spots of each query, best first.

        Returns ``(indices, similarities)``: int64 and float32 arrays of shape (Q, min(k, n_spots)).
        Ties are broken towards the lower reference index.
        """
        q = as_float32_matrix(queries, "queries")
        return self._core.search(q, _check_k(k), threads=threads)

    def impute(
        self,
        queries: Any,
        k: int = DEFAULT_K,
        method: str = DEFAULT_METHOD,
        *,
        temperature: float = 0.1,
        return_neighbours: bool = False,
        threads: Optional[int] = None,
        return_neighbors: Optional[bool] = None,
        centre_sections: bool = False,
    ):
        """Predicted expression (Q x G float32) of each query embedding from its k nearest spots.

        ``method``: "mean" (BLEEP's default), "weighted" (BLEEP's exp(-squared Euclidean distance)
        weights on the un-normalised embeddings), "softmax" (softmax of cosine / ``temperature``) or
        "top1". ``centre_sections``: each neighbour's expression minus its section's mean, plus the mean
        of all spots (:meth:`centre`). With ``return_neighbours=True`` returns ``(prediction, indices,
        similarities)`` (``return_neighbors``: the same, the older spelling).
        """
        if method not in METHODS:
            raise BleepError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        q = as_float32_matrix(queries, "queries")
        pred, idx, sims = self._core.impute(q, _check_k(k), method=method, temperature=_check_temperature(temperature), threads=threads)
        if centre_sections:
            norms = self._core.norms_of(np.ascontiguousarray(idx, dtype=np.int64)) if method == "weighted" else None  # the neighbours' only
            pred = self.centre(pred, idx, weights_of(q, sims, norms, method, temperature), threads=threads)
        return (pred, idx, sims) if _neighbours_asked(return_neighbours, return_neighbors) else pred

    # ---- per-section centring -------------------------------------------------------------------------

    def section_means(self, *, threads: Optional[int] = None) -> tuple:
        """``(codes, means, overall)``: each spot's section (N int64 codes, in the order of the sorted
        section labels), the mean expression of every section (S x G float32, as a :class:`Reference` of S
        rows, whose :meth:`aggregate` weighs them) and of all spots (G float32). Computed once, in one pass
        over the expression through :meth:`aggregate` (so a sharded reference computes it where its
        shards are). A reference without section labels is one section."""
        cached = getattr(self, "_section_means", None)
        if cached is not None:
            return cached
        labels = self.sections
        codes = np.unique(np.asarray(labels, dtype=object), return_inverse=True)[1].astype(np.int64) if labels else np.zeros(self.n_spots, np.int64)
        sizes = np.bincount(codes)
        # Each section's spots in rows of at most CHUNK (padding weighs 0), their sums added per section.
        chunk = 1024
        order = np.argsort(codes, kind="stable")
        rows, owners, weights = [], [], []
        for sec, (a, n) in enumerate(zip(np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)):
            for b in range(0, n, chunk):
                part = order[a + b : a + min(n, b + chunk)]
                rows.append(np.pad(part, (0, chunk - len(part))))
                weights.append(np.pad(np.full(len(part), 1.0 / n, np.float32), (0, chunk - len(part))))
                owners.append(sec)
        sums = self.aggregate(np.stack(rows), np.stack(weights), threads=threads) if rows else np.zeros((0, self.n_genes), np.float32)
        means = np.zeros((len(sizes), self.n_genes), np.float64)
        np.add.at(means, np.asarray(owners, np.int64), sums)
        overall = (sizes[:, None] * means).sum(axis=0) / max(1, sizes.sum())
        table = Reference.build(np.ones((len(sizes), 1), np.float32), means.astype(np.float32), self.genes, expression_format="dense")
        self._section_means = (codes, table, overall.astype(np.float32))
        return self._section_means

    def centre(self, prediction: Any, indices: Any, weights: Any, *, threads: Optional[int] = None) -> np.ndarray:
        """A prediction (Q x G, the weighted sum of the rows ``indices`` with ``weights``) as if every
        reference spot's expression were centred on its section: minus the same weighted sum of the
        neighbours' section means, plus the mean of all spots. It takes out what differs between the
        reference sections as a whole (depth, batch), so that neighbours from several sections no longer
        mix their offsets; a prediction from one section is unchanged. Measured in docs/benchmarks.md
        ("Per-section centring")."""
        codes, table, overall = self.section_means(threads=threads)
        pred = as_float32_matrix(prediction, "prediction")
        idx = np.asarray(indices)
        if pred.shape[1] != self.n_genes:
            raise BleepError(f"prediction has {pred.shape[1]} genes but the reference {self.n_genes}: centre a prediction of this reference")
        if idx.ndim != 2 or idx.shape[0] != pred.shape[0] or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise BleepError(f"indices must be a 2-D integer array with one row per prediction row ({pred.shape[0]}), got {idx.dtype} {idx.shape}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.n_spots):
            raise BleepError(f"indices must lie in [0, {self.n_spots}), the reference's spots; got {int(idx.min())}..{int(idx.max())}")
        if table.n_spots < 2:
            return pred
        idx = idx.astype(np.int64)
        return (pred - table.aggregate(codes[idx], weights, threads=threads) + overall).astype(np.float32)

    def aggregate(self, indices: Any, weights: Any, *, threads: Optional[int] = None) -> np.ndarray:
        """Weighted sums of reference expression rows: ``out[q] = sum_j weights[q, j] * expression[indices[q, j]]``.

        The aggregation step of :meth:`impute` alone, for neighbours or weights chosen elsewhere.
        ``indices``: (Q, k) integers in [0, n_spots); ``weights``: (Q, k). Returns (Q, G) float32.
        """
        idx = np.asarray(indices)
        if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
            raise BleepError(f"indices must be a 2-D integer array, got {idx.dtype} with shape {idx.shape}")
        if idx.dtype == np.uint64 and idx.size and int(idx.max()) >= self.n_spots:  # as int64 it would read negative
            raise BleepError(f"index {int(idx.max())} is out of range for a reference of {self.n_spots} spots")
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
            f"expression {self.expression_format} {self.expression_dtype})"
        )


def _check_temperature(t: Any) -> float:
    """The softmax temperature as a float (the core checks that it is positive and finite)."""
    if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)):
        raise BleepError(f"temperature must be a number, got {t!r}")
    return float(t)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise BleepError(f"k must be a whole number, got {k!r}")
    if k < 1:
        raise BleepError(f"k must be at least 1, got {k}")
    return int(k)
