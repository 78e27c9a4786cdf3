"""What every reader shares: platforms, the pixel-size rule, the checks, and the one AnnData shape."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._core import BleepError
from ._files import check_unique

#: Centre-to-centre spot distance of each platform, micrometres (Visium HD: the bin size).
PITCH_UM = {"visium": 100.0, "legacy-st": 200.0}
#: The diameter behind `spot_diameter_fullres`, micrometres: Space Ranger states it for a "theoretical
#: 65 um spot" (the 55 um spot plus margin); legacy ST spots are 100 um; a Visium HD bin is a square
#: whose side Space Ranger gives as its diameter.
SPOT_DIAMETER_UM = {"visium": 65.0, "legacy-st": 100.0}
THUMBNAIL_SIDE = 2000
#: What `platform=` accepts.
PLATFORM_NAMES = ("visium", "legacy-st", "visium-hd")


@dataclass(frozen=True)
class Platform:
    """A spot layout: ``packing`` "hex" (Visium: array columns step by 2 along a row) or "grid" (legacy
    ST, Visium HD bins: one array step per pitch)."""

    name: str
    pitch_um: float
    diameter_um: float
    packing: str


def platform(name: str, bin_um: Optional[float] = None, where: str = "") -> Platform:
    """The :class:`Platform` called ``name``; Visium HD needs its bin size."""
    if name == "visium":
        return Platform("visium", PITCH_UM["visium"], SPOT_DIAMETER_UM["visium"], "hex")
    if name == "legacy-st":
        return Platform("legacy-st", PITCH_UM["legacy-st"], SPOT_DIAMETER_UM["legacy-st"], "grid")
    if name == "visium-hd":
        if not bin_um or not bin_um > 0:
            raise BleepError(f"{where}: a Visium HD section needs its bin size (scalefactors bin_size_um)")
        return Platform("visium-hd", float(bin_um), float(bin_um), "grid")
    raise BleepError(f"{where}: unknown platform {name!r}: use one of {', '.join(PLATFORM_NAMES)}")


def array_packing(array_rc: Optional[np.ndarray]) -> Optional[str]:
    """ "hex" when every spot's array row + column has one parity (Visium's orange-crate layout), "grid"
    when both occur, None without array coordinates."""
    if array_rc is None or len(array_rc) < 3 or not np.any(array_rc):
        return None
    parity = np.unique((array_rc[:, 0].astype(np.int64) + array_rc[:, 1].astype(np.int64)) % 2)
    return "hex" if len(parity) == 1 else "grid"


def infer_platform(
    where: str,
    stated: Sequence[Tuple[Optional[str], str]],
    array_rc: Optional[np.ndarray],
    bin_um: Optional[float] = None,
) -> Tuple[Platform, str]:
    """The platform and what said so. ``stated``: (name, source) pairs, most trusted first (an explicit
    argument, the files' metadata). Without a statement, the array coordinates tell: hexagonal packing
    is Visium, a square grid legacy ST. A statement the array coordinates contradict is an error."""
    packing = array_packing(array_rc)
    for name, source in stated:
        if not name:
            continue
        found = platform(name, bin_um, where)
        if packing is not None and packing != found.packing:
            raise BleepError(
                f"{where}: {source} says {name}, but the array coordinates are on a "
                f"{'hexagonal (Visium)' if packing == 'hex' else 'square'} grid: pass platform= "
                f"({', '.join(PLATFORM_NAMES)}) to say which it is"
            )
        return found, source
    if packing == "hex":
        return platform("visium"), "the array coordinates (hexagonal packing: Visium)"
    if packing == "grid":
        return platform("legacy-st"), "the array coordinates (a square grid: legacy ST)"
    raise BleepError(
        f"{where}: cannot tell the platform (no metadata names it and there are no array_row / array_col "
        f"to tell it by): pass platform= ({', '.join(PLATFORM_NAMES)})"
    )


def resolve_um_per_px(
    explicit: Optional[float],
    metadata: List[Tuple[float, str]],
    estimate: Optional[Tuple[float, str]],
    where: str,
) -> Tuple[float, str]:
    """The pixel size and its source: micrometres per full-resolution pixel. An explicit value wins,
    then ``metadata`` ((value, source) pairs from the files, best first), then ``estimate`` (the spot
    pitch). Every value is held to the one pixel-size rule of the slide reader (``_core.check_um_per_px``:
    finite, within 0.01-100 um/px): a given one outside it is an error, a stated or estimated one is
    dropped with a warning. Sources more than 10 % apart are warned about; nothing to go on is an error."""
    from .._core import check_um_per_px

    def plausible(value: float, source: str) -> bool:
        try:
            check_um_per_px(float(value), f"{where}: {source}")
            return True
        except BleepError as e:
            warnings.warn(f"{e}; it is ignored", stacklevel=4)
            return False

    candidates = [(float(v), s) for v, s in metadata if v is not None and np.isfinite(v) and v > 0 and plausible(v, s)]
    if estimate is not None and plausible(*estimate):
        candidates.append(estimate)
    if explicit is not None:
        explicit = check_um_per_px(positive_number(explicit, "um_per_px", where), f"{where}: um_per_px={explicit!r} (given)")
        for value, source in candidates:
            if abs(value / explicit - 1) > 0.10:
                warnings.warn(
                    f"{where}: um_per_px={explicit} was given but {source} says {value:.4g}; using the given "
                    "value. Check which is right: a wrong pixel size makes every patch the wrong size.",
                    stacklevel=3,
                )
                break
        return float(explicit), "given"
    if not candidates:
        raise BleepError(
            f"{where}: no pixel size: no metadata states one and there are too few spots to estimate it "
            "from their pitch. Pass um_per_px=X (the scanner's micrometres per pixel)."
        )
    best = candidates[0]
    for value, source in candidates[1:]:
        if abs(value / best[0] - 1) > 0.10:
            warnings.warn(
                f"{where}: {best[1]} gives {best[0]:.4g} um/px but {source} gives {value:.4g}; using the "
                f"first. If the spots are not on the stated grid or the metadata is stale, pass um_per_px=.",
                stacklevel=3,
            )
    return best


def array_affine(array_rc: np.ndarray, pixel_xy: np.ndarray) -> Optional[np.ndarray]:
    """The least-squares affine map (3, 2) from (col, row, 1) to pixel (x, y), or None when the array
    positions do not span a plane."""
    if len(array_rc) < 3:
        return None
    rows, cols = array_rc[:, 0].astype(float), array_rc[:, 1].astype(float)
    design = np.column_stack([cols, rows, np.ones_like(rows)])
    if np.linalg.matrix_rank(design) < 3:
        return None
    coef, *_ = np.linalg.lstsq(design, pixel_xy.astype(float), rcond=None)
    return coef


def spot_pitch_px(array_rc: np.ndarray, pixel_xy: np.ndarray, packing: str) -> Optional[float]:
    """Pixels per spot pitch, from the affine fit of pixel positions on array positions. Visium's array
    columns step by 2 per pitch along a row; grid layouts step by 1 in both directions."""
    if packing in PITCH_UM:  # a platform name, as older callers pass
        packing = platform(packing).packing
    coef = array_affine(array_rc, pixel_xy)
    if coef is None:
        return None
    per_col = float(np.hypot(*coef[0]))
    return per_col * 2.0 if packing == "hex" else per_col


def pitch_estimate(array_rc: Optional[np.ndarray], pixel_xy: np.ndarray, plat: Platform) -> Optional[Tuple[float, str]]:
    """The pixel size the spot pitch implies, with its source, or None."""
    if array_rc is None or not np.any(array_rc):
        return None
    px = spot_pitch_px(array_rc, pixel_xy, plat.packing)
    if px is None or px <= 0:
        return None
    return plat.pitch_um / px, f"the spot pitch ({plat.pitch_um:g} um centre to centre, {px:.1f} px)"


def positive_number(value, name: str, where: str) -> float:
    """``value`` of the argument ``name`` as a finite positive float; a str (even "1.38"), a bool or
    anything else that is not a number is an error naming the argument and the type."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise BleepError(f"{where}: {name} must be a positive number, not a {type(value).__name__} ({value!r}): pass {name}=1.38, not {name}='1.38'")
    if not (np.isfinite(value) and value > 0):
        raise BleepError(f"{where}: {name} must be a positive number, not {value!r}")
    return float(value)


def open_image(image):
    """A :class:`~bleep_rs.Slide` of ``image`` (a regular file, or a folder: a zarr image), or None."""
    from ..slide import Slide
    from ._files import checked_input

    return None if image is None else Slide(checked_input(image, "the section's image", kind="any"))


def compressed_problem(data, indices, indptr, n_major: int, n_minor: int, major: str = "row", minor: str = "column") -> Optional[str]:
    """Why (``data``, ``indices``, ``indptr``) is not a compressed sparse matrix of ``n_major`` rows (or
    columns) by ``n_minor`` (None when it is one): numbers, one index per value, ``indptr`` rising from
    0 to the number of values, every index in 0..n_minor-1. scipy checks none of this by default and
    crashes, or allocates without bound, on the first operation over a malformed matrix."""
    data, indices, indptr = (np.asarray(a) for a in (data, indices, indptr))
    if data.ndim != 1 or indices.ndim != 1 or indptr.ndim != 1:
        return "data, indices and indptr must be one-dimensional"
    if data.dtype.kind not in "iufb" or indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu":
        return f"data ({data.dtype}), indices ({indices.dtype}) and indptr ({indptr.dtype}) must be numbers"
    if len(indptr) != n_major + 1:
        return f"indptr has {len(indptr)} entries for {n_major} {major}s"
    if len(indices) != len(data):
        return f"{len(indices)} indices for {len(data)} values"
    if indptr[0] != 0 or indptr[-1] != len(data) or (np.diff(indptr.astype(np.int64)) < 0).any():
        return f"indptr must rise from 0 to {len(data)} (the number of values) and never fall"
    if len(indices) and (indices.min() < 0 or indices.max() >= n_minor):
        return f"{minor} indices must lie in 0..{n_minor - 1} (found {indices.min()}..{indices.max()})"
    return None


def matrix_problem(X, shape: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """Why ``X`` (a scipy sparse matrix or an array) is not a well-formed 2-D matrix of numbers of
    ``shape`` (None when it is one). Structure only: NaN and negative counts are the counts check's."""
    import scipy.sparse as sp

    if X is None:
        return "there is no matrix"
    if sp.issparse(X):
        got = tuple(int(n) for n in X.shape)
        if len(got) != 2 or (shape is not None and got != tuple(shape)):
            return f"it is {got}, not {tuple(shape) if shape else 'two-dimensional'}"
        if X.format in ("csr", "csc"):
            sizes, names = (got, ("row", "column")) if X.format == "csr" else ((got[1], got[0]), ("column", "row"))
            return compressed_problem(X.data, X.indices, X.indptr, sizes[0], sizes[1], *names)
        if X.format == "coo":
            data, row, col = np.asarray(X.data), np.asarray(X.row), np.asarray(X.col)
            if data.dtype.kind not in "iufb" or len(row) != len(data) or len(col) != len(data):
                return "its coordinates and values do not match"
            if len(data) and (row.min() < 0 or col.min() < 0 or row.max() >= got[0] or col.max() >= got[1]):
                return f"coordinates lie outside {got}"
            return None
        return f"a {X.format} sparse matrix (store it as CSR)"
    if not hasattr(X, "shape") or not hasattr(X, "dtype"):
        return f"a {type(X).__name__}, not a matrix"
    got = tuple(int(n) for n in X.shape)
    if len(got) != 2 or (shape is not None and got != tuple(shape)):
        return f"it is {got}, not {tuple(shape) if shape else 'two-dimensional'}"
    X = np.asarray(X)
    if X.dtype.kind not in "iufb":
        for k, v in enumerate(X.ravel()):
            try:
                float(v)
            except (TypeError, ValueError):
                row, col = np.unravel_index(k, got)
                return f"it holds {v!r}, not a number (row {row}, column {col})"
        return f"its values are text ({X.dtype}), not numbers: store them as numbers"
    return None


def check_matrix(X, where: str, what: str, shape: Optional[Tuple[int, int]] = None):
    """``X`` after :func:`matrix_problem`: a malformed matrix is an error before anything indexes it."""
    problem = matrix_problem(X, shape)
    if problem:
        raise BleepError(f"{where}: {what} is not a well-formed matrix ({problem}): the file is damaged; write it again")
    return X


def under_tissue(in_tissue, n: int, where: str, source: str) -> np.ndarray:
    """The spots to keep, by the one rule of every reader: a spot is read when it is under tissue
    (``in_tissue`` 1), dropped when it is not (0); no spot under tissue is an error, never an empty or
    an unfiltered section. ``in_tissue`` None: every spot."""
    if in_tissue is None:
        return np.ones(n, dtype=bool)
    values = np.asarray(in_tissue)
    if values.dtype.kind == "b":
        values = values.astype(np.int64)
    if values.dtype.kind not in "iuf":
        import pandas as pd

        values = pd.to_numeric(pd.Series(values.ravel()), errors="coerce").to_numpy(dtype=np.float64)
    values = values.ravel()
    bad = ~np.isin(values, (0, 1))
    if len(values) != n or bad.any():
        i = int(np.argmax(bad)) if bad.any() else 0
        value = np.asarray(in_tissue).ravel()[i]
        value = value.item() if isinstance(value, np.generic) else value
        shown = f"is {value!r} at spot {i}" if bad.any() else f"has {len(values)} values for {n} spots"
        raise BleepError(f"{where}: {source} {shown}; it must be 0 or 1 (1: under tissue): fix it")
    keep = values == 1
    if not keep.any():
        raise BleepError(f"{where}: no spot is under tissue ({source} is 0 for all {n} spots): is this the right section, or is in_tissue wrong?")
    return keep


def check_gene_names(genes: Sequence[str], where) -> None:
    """Every gene needs a name: an empty one (or all blank) is an error naming the column."""
    empty = [i for i, g in enumerate(genes) if not str(g).strip()]
    if empty:
        raise BleepError(f"{where}: {len(empty)} gene names are empty (columns {empty[:5]}): name every gene or drop those columns")


def image_metadata(slide) -> List[Tuple[float, str]]:
    """The pixel size an image file states (TIFF tags, Aperio MPP, OME-XML), if any."""
    if slide is None or slide.um_per_px is None:
        return []
    return [(slide.um_per_px, f"{os.path.basename(slide.path)} ({slide.um_per_px_source})")]


def _cell(X, spot_ids, genes, k: int) -> str:
    """The spot and gene of the ``k``-th stored value of ``X`` (of ``X.data`` when sparse, else of the
    flattened array)."""
    import scipy.sparse as sp

    if sp.issparse(X):
        X = X.tocsr() if X.format != "csr" else X
        row, col = int(np.searchsorted(X.indptr, k, side="right") - 1), int(X.indices[k])
    else:
        row, col = (int(i) for i in np.unravel_index(k, np.shape(X)))
    spot = f"spot {spot_ids[row]!r}" if spot_ids is not None else f"row {row}"
    gene = f"gene {genes[col]!r}" if genes is not None else f"column {col}"
    return f"{spot}, {gene}"


def _values(X):
    import scipy.sparse as sp

    if sp.issparse(X):
        X = X.tocsr() if X.format != "csr" else X
        return X, X.data
    X = np.asarray(X)
    return X, X.ravel()


def nonfinite_problem(X, spot_ids=None, genes=None) -> Optional[str]:
    """Where ``X`` holds NaN or infinite values (None when it holds none)."""
    X, values = _values(X)
    if values.dtype.kind in "iub":
        return None
    finite = np.isfinite(values)
    if finite.all():
        return None
    k = int(np.argmin(finite))
    return f"{int((~finite).sum())} NaN or infinite values (e.g. {values[k]} at {_cell(X, spot_ids, genes, k)})"


def check_finite(X, where: str, spot_ids=None, genes=None) -> None:
    """Raises when the expression ``X`` holds NaN or infinite values: one would silently zero its spot."""
    problem = nonfinite_problem(X, spot_ids, genes)
    if problem:
        raise BleepError(f"{where}: the expression holds {problem}: fix or drop that spot")


def counts_problem(X, spot_ids=None, genes=None) -> Optional[str]:
    """Why ``X`` is not a matrix of raw counts (None when it is): NaN, infinite, negative or non-integer
    values (within a rounding tolerance of 1e-3), each named by its spot and gene when given."""
    X, values = _values(X)
    if values.size == 0:
        return None
    problem = nonfinite_problem(X, spot_ids, genes)
    if problem:
        return f"it holds {problem}"
    values = np.asarray(values, dtype=np.float64)
    if values.min() < 0:
        k = int(np.argmin(values))
        return f"it holds negative values (e.g. {values[k]:.3g} at {_cell(X, spot_ids, genes, k)})"
    frac = np.abs(values - np.round(values))
    if frac.max() > 1e-3:
        k = int(np.argmax(frac))
        return f"it holds non-integer values (e.g. {values[k]:.4g} at {_cell(X, spot_ids, genes, k)}): it looks normalised or log-transformed"
    return None


def as_matrix(counts, spot_ids: Sequence[str], genes: Sequence[str], where: str):
    """``counts`` as CSR float32; a value that is not a number is an error naming its spot and gene."""
    import scipy.sparse as sp

    shape = np.shape(counts) if not sp.issparse(counts) else counts.shape
    if len(shape) != 2 or shape != (len(spot_ids), len(genes)):
        raise BleepError(f"{where}: the expression is {shape}, not spots x genes ({len(spot_ids)} x {len(genes)})")
    problem = matrix_problem(counts if sp.issparse(counts) else np.asarray(counts))
    if problem and not sp.issparse(counts):
        X, values = _values(counts)
        for k, v in enumerate(values):
            try:
                float(v)
            except (TypeError, ValueError):
                at = _cell(X, spot_ids, genes, k)
                raise BleepError(f"{where}: the expression holds {v!r}, not a number, at {at}: bleep-rs needs raw UMI counts") from None
    if problem:
        raise BleepError(f"{where}: the expression is not a well-formed matrix of numbers ({problem}): bleep-rs needs raw UMI counts")
    return sp.csr_matrix(counts, dtype=np.float32)


def _check_positions(pixel_xy: np.ndarray, spot_ids: Sequence[str], where: str) -> None:
    bad = ~np.all(np.isfinite(pixel_xy), axis=1)
    if bad.any():
        first = [str(spot_ids[i]) for i in np.flatnonzero(bad)[:3]]
        raise BleepError(
            f"{where}: {int(bad.sum())} of {len(pixel_xy)} spots have no position (NaN or infinite "
            f"coordinates, e.g. {first}): drop those spots or fix their coordinates"
        )


def _check_image_scale(image: np.ndarray, scalef: float, pixel_xy: np.ndarray, key: str, where: str) -> None:
    """Every spot times the image's scale factor must land inside the image."""
    h, w = image.shape[:2]
    xy = pixel_xy * scalef
    outside = (xy[:, 0] < -0.5) | (xy[:, 1] < -0.5) | (xy[:, 0] > w - 0.5) | (xy[:, 1] > h - 0.5)
    if outside.any():
        raise BleepError(
            f"{where}: the {key} image ({w} x {h} px) with scale factor {scalef:.6g} puts {int(outside.sum())} "
            f"of {len(xy)} spots outside it: the scale factor does not belong to this image (check "
            f"scalefactors_json.json / uns['spatial'])"
        )


def build(
    counts,
    genes: Sequence[str],
    spot_ids: Sequence[str],
    array_rc: Optional[np.ndarray],
    pixel_xy: np.ndarray,
    in_tissue: Optional[np.ndarray],
    *,
    where: str,
    layout: str,
    library_id: str,
    plat: Platform,
    platform_source: str,
    um_per_px: Tuple[float, str],
    slide=None,
    images: Optional[Dict[str, Tuple[np.ndarray, float]]] = None,
    scalefactors: Optional[dict] = None,
    metadata: Optional[dict] = None,
    var: Optional["object"] = None,
    duplicate_genes: str = "error",
    check_counts: bool = True,
    extra: Optional[dict] = None,
):
    """The AnnData every reader returns (see :mod:`bleep_rs.sections`), after checking spot ids, gene
    names, positions, counts and image scale factors. ``images``: name -> (RGB array, scale factor from
    full-resolution pixels), stored as ``uns["spatial"][lib]["images"][name]`` with
    ``scalefactors[f"tissue_{name}_scalef"]``; without any, the slide's thumbnail becomes "hires".
    ``duplicate_genes``: "error", or "unique" to suffix repeats (-1, -2 ...) as 10x readers do."""
    import anndata as ad
    import pandas as pd

    spot_ids = [str(s) for s in spot_ids]
    pixel_xy = np.asarray(pixel_xy, dtype=np.float64).reshape(-1, 2)
    if len(spot_ids) == 0:
        raise BleepError(f"{where}: no spots (none is both counted and under tissue)")
    check_unique(spot_ids, "spot ids", where, "each spot needs its own id (adata.obs_names_make_unique() if they are distinct spots)")
    genes = [str(g) for g in genes]
    check_gene_names(genes, where)
    if duplicate_genes == "unique" and len(set(genes)) < len(genes):
        genes = list(ad.utils.make_index_unique(pd.Index(genes)))
    check_unique(genes, "gene names", where, "make them unique (adata.var_names_make_unique()) or drop the repeats")
    X = as_matrix(counts, spot_ids, genes, where)
    keep = under_tissue(in_tissue, len(spot_ids), where, "in_tissue")
    if not keep.all():  # the one rule: spots not under tissue are dropped, as Space Ranger's are
        X, pixel_xy = X[keep], pixel_xy[keep]
        spot_ids = [s for s, k in zip(spot_ids, keep) if k]
        array_rc = None if array_rc is None else np.asarray(array_rc)[keep]
    in_tissue = None if in_tissue is None else np.ones(len(spot_ids), dtype=np.int64)
    _check_positions(pixel_xy, spot_ids, where)
    problem = counts_problem(X, spot_ids, genes) if check_counts else None
    if problem:
        raise BleepError(f"{where}: the expression is not raw counts: {problem}. bleep-rs needs raw UMI counts")
    image = None if slide is None else slide.path
    if slide is not None:
        w, h = slide.dimensions
        outside = (pixel_xy[:, 0] < 0) | (pixel_xy[:, 1] < 0) | (pixel_xy[:, 0] >= w) | (pixel_xy[:, 1] >= h)
        if outside.any():
            raise BleepError(
                f"{where}: {int(outside.sum())} of {len(pixel_xy)} spots lie outside the {w} x {h} px image "
                f"{image} (e.g. {spot_ids[int(np.flatnonzero(outside)[0])]} at {pixel_xy[outside][0].round(1).tolist()}): "
                "is this the full-resolution image the positions refer to?"
            )
    images = dict(images or {})
    if not images and slide is not None:
        thumb = slide.thumbnail(THUMBNAIL_SIDE)
        images["hires"] = (thumb, thumb.shape[1] / slide.dimensions[0])
    if array_rc is None:
        array_rc = np.zeros((len(spot_ids), 2), dtype=np.int64)
    obs = pd.DataFrame(
        {
            "in_tissue": (np.ones(len(spot_ids)) if in_tissue is None else np.asarray(in_tissue)).astype(int),
            "array_row": np.asarray(array_rc)[:, 0].astype(int),
            "array_col": np.asarray(array_rc)[:, 1].astype(int),
        },
        index=pd.Index(spot_ids, name="spot_id"),
    )
    var_df = pd.DataFrame(index=pd.Index(genes, name="gene"))
    if var is not None:
        for col in var.columns:
            var_df[col] = np.asarray(var[col])
    adata = ad.AnnData(X=X, obs=obs, var=var_df)
    adata.obsm["spatial"] = pixel_xy
    um, um_source = um_per_px
    factors = {k: float(v) for k, v in (scalefactors or {}).items() if isinstance(v, (int, float, np.number))}
    factors.setdefault("spot_diameter_fullres", plat.diameter_um / um)
    entry = {"images": {}, "scalefactors": factors, "metadata": dict(metadata or {})}
    for key, (picture, scalef) in images.items():
        _check_image_scale(picture, float(scalef), pixel_xy, key, where)
        entry["images"][key] = np.asarray(picture)
        factors[f"tissue_{key}_scalef"] = float(scalef)
    if image is not None:
        entry["metadata"]["source_image_path"] = os.path.abspath(image)
    adata.uns["spatial"] = {library_id: entry}
    adata.uns["bleep"] = {
        "um_per_px": float(um),
        "um_per_px_source": um_source,
        "image_path": None if image is None else os.path.abspath(image),
        "layout": layout,
        "library_id": library_id,
        "platform": plat.name,
        "platform_source": platform_source,
        "pitch_um": plat.pitch_um,
        "spot_diameter_um": plat.diameter_um,
        **(extra or {}),
    }
    return adata
