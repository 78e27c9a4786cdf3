"""Precomputed patch features: the ``.h5`` files that TRIDENT and HEST write for a slide or a section.

* TRIDENT (``extract_patch_features``): ``features`` (n, D), its attribute ``encoder`` (the extractor's
  name); ``coords`` (n, 2), the patches' top-left corners in level-0 pixels, with the attributes
  ``patch_size_level0`` (or ``patch_size``, ``level0_magnification`` and ``target_magnification``).
* HEST (the benchmark's ``embed_tiles``): ``embeddings`` (n, D), ``barcodes`` (n, 1) and ``coords``.

A features file is matched to a section's spots by barcode where the file has them, else by position: each
spot takes the patch whose square holds it (the nearest centre in the maximum norm, within half a patch side). A spot no patch covers is
left out of training and of the reference (with a warning); fewer than half the spots matched is an error
(the file is likely another section's).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .._core import BleepError
from ._files import checked_input

__all__ = ["PatchFeatures", "read_patch_features", "features_for_sections"]

#: Names of the features dataset: TRIDENT's, then HEST's.
FEATURE_KEYS = ("features", "embeddings")
BARCODE_KEYS = ("barcodes", "barcode")
#: Least fraction of a section's spots a features file must cover to be taken as that section's.
MIN_MATCHED = 0.5


@dataclass
class PatchFeatures:
    """The patches of one features file: ``features`` float32 (n, D); ``centres`` (n, 2) level-0 pixels,
    or None where the file has no coordinates or no patch size; ``barcodes`` (n,) or None; ``encoder``:
    the extractor's name where the file records it."""

    path: Path
    features: np.ndarray
    centres: Optional[np.ndarray]
    barcodes: Optional[np.ndarray]
    encoder: Optional[str]
    patch_size_level0: Optional[float]

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def tile_ids(self) -> List[str]:
        """Names of the patches: their barcodes, else their centres (``x_y``), else their row numbers."""
        if self.barcodes is not None:
            return [str(b) for b in self.barcodes]
        if self.centres is not None:
            return [f"{x:.0f}_{y:.0f}" for x, y in self.centres]
        return [str(i) for i in range(len(self))]

    def rows_for(self, section, where: str = "") -> Tuple[np.ndarray, np.ndarray]:
        """(spots, rows): the section's spots that a patch covers (indices into ``section.obs``) and each
        one's row of the file. Barcodes first; positions where the file has no barcode of the section."""
        where = where or f"{self.path}"
        n = section.n_obs
        spots, rows = np.arange(0), np.arange(0)
        if self.barcodes is not None:
            row_of = {str(b): i for i, b in enumerate(self.barcodes)}
            pairs = [(i, row_of[s]) for i, s in enumerate(section.obs_names) if s in row_of]
            if pairs:
                spots, rows = (np.array(a, dtype=np.int64) for a in zip(*pairs))
        if len(spots) == 0 and self.centres is not None:
            spots, rows = self._nearest(np.asarray(section.obsm["spatial"], dtype=np.float64))
            if self.barcodes is not None and len(spots):  # another naming of the same spots, or another section's file
                warnings.warn(f"{where}: none of the file's {len(self)} barcodes (e.g. {list(self.barcodes[:2])}) is a spot id of the section "
                              f"(e.g. {list(section.obs_names[:2])}): its patches were placed by their coordinates; if it is another "
                              "section's features file, its predictions are not of this section", stacklevel=3)
        if len(spots) == 0 and self.centres is None:
            raise BleepError(
                f"{where}: cannot place the patches on the section's spots: "
                + ("no barcode of the file is a spot of the section, and " if self.barcodes is not None else "")
                + "the file has no coords with a patch size (coords attribute patch_size_level0)"
            )
        if len(spots) < MIN_MATCHED * n:
            raise BleepError(f"{where}: covers {len(spots)} of the section's {n} spots: is it this section's features file "
                             "(the same slide, coordinates in its full-resolution pixels)?")
        if len(spots) < n:
            warnings.warn(f"{where}: {n - len(spots)} of the section's {n} spots have no patch in the file: left out", stacklevel=3)
        return spots, rows

    def _nearest(self, spot_xy: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        from scipy.spatial import cKDTree

        if len(self) == 0 or len(spot_xy) == 0:
            return np.arange(0), np.arange(0)
        # The Chebyshev distance: a spot is covered when it lies inside the patch's square, corners included.
        dist, rows = cKDTree(self.centres).query(spot_xy, p=np.inf)
        inside = dist <= self.patch_size_level0 / 2
        return np.flatnonzero(inside), rows[inside]


def _text(value) -> Optional[str]:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        return _text(value.ravel()[0])
    return value if isinstance(value, str) and value not in ("", "None") else None


def _patch_size(attrs, path) -> Optional[float]:
    """The patches' side in level-0 pixels from the coords' attributes (TRIDENT's), if they say it."""
    try:
        if "patch_size_level0" in attrs:
            size = float(np.asarray(attrs["patch_size_level0"]).ravel()[0])
        elif all(k in attrs for k in ("patch_size", "level0_magnification", "target_magnification")):
            size = float(attrs["patch_size"]) * float(attrs["level0_magnification"]) / float(attrs["target_magnification"])
        else:
            return None
    except (TypeError, ValueError, IndexError, ZeroDivisionError) as e:
        raise BleepError(f"{path}: the coords' patch size attributes are not numbers ({e})") from e
    if not np.isfinite(size) or size <= 0:
        raise BleepError(f"{path}: the coords' patch size is {size}: it must be a positive number of pixels")
    return size


def read_patch_features(path) -> PatchFeatures:
    """Reads a TRIDENT or HEST patch-features ``.h5`` file (see the module's docstring), with every check
    a damaged or foreign file needs: a clear error naming the problem, never a wrong answer."""
    import h5py

    path = checked_input(path, "patch features file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise BleepError(f"{path}: not an HDF5 file ({e}): give a TRIDENT or HEST patch features .h5") from e
    with f:
        key = next((k for k in FEATURE_KEYS if isinstance(f.get(k), h5py.Dataset)), None)
        if key is None:
            raise BleepError(f"{path}: no 'features' (TRIDENT) or 'embeddings' (HEST) dataset; it holds {sorted(f.keys())[:10]}")
        try:
            feats = np.asarray(f[key][()])
        except (OSError, ValueError, TypeError) as e:
            raise BleepError(f"{path}: {key} cannot be read ({e})") from e
        if feats.ndim == 3 and feats.shape[0] == 1:  # saved with a batch axis
            feats = feats[0]
        if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.number):
            raise BleepError(f"{path}: {key} must be a numeric matrix (patches x dimensions), not {feats.dtype} of shape {feats.shape}")
        if feats.shape[0] == 0 or feats.shape[1] == 0:
            raise BleepError(f"{path}: {key} holds no patches (shape {feats.shape}): the slide had no tissue patch")
        feats = feats.astype(np.float32)
        bad = ~np.isfinite(feats).all(axis=1)
        if bad.any():
            raise BleepError(f"{path}: {key} has NaN or infinite values in {int(bad.sum())} of {len(feats)} patches (first: row {int(np.argmax(bad))})")
        n = len(feats)
        encoder = _text(f[key].attrs.get("encoder"))
        centres, size = None, None
        if isinstance(f.get("coords"), h5py.Dataset):
            coords = np.asarray(f["coords"][()])
            if coords.ndim != 2 or coords.shape[0] != n or coords.shape[1] < 2 or not np.issubdtype(coords.dtype, np.number):
                raise BleepError(f"{path}: coords must be {n} x 2 numbers (one row per patch), not {coords.dtype} of shape {coords.shape}")
            if not np.isfinite(coords[:, :2]).all():
                raise BleepError(f"{path}: coords has NaN or infinite values")
            size = _patch_size(f["coords"].attrs, path)
            if size is not None:
                centres = coords[:, :2].astype(np.float64) + size / 2  # top-left corners to centres
        barcodes = None
        bkey = next((k for k in BARCODE_KEYS if isinstance(f.get(k), h5py.Dataset)), None)
        if bkey is not None:
            raw = np.asarray(f[bkey][()]).ravel()
            if len(raw) != n:
                raise BleepError(f"{path}: {len(raw)} {bkey} for {n} patches")
            try:
                barcodes = np.array([b.decode() if isinstance(b, bytes) else str(b) for b in raw], dtype=object)
            except UnicodeDecodeError as e:
                raise BleepError(f"{path}: {bkey} are not UTF-8 text ({e}): is the file damaged?") from e
            if len(set(barcodes)) != len(barcodes):
                twice = sorted({b for b in barcodes if list(barcodes).count(b) > 1})[:3] if n < 100_000 else []
                raise BleepError(f"{path}: {bkey} repeats barcodes {twice}: each patch must have its own")
    return PatchFeatures(path, feats, centres, barcodes, encoder, size)


def features_for_sections(sections: Sequence, paths: Sequence) -> Tuple[list, List[np.ndarray], Optional[str]]:
    """(sections, features, encoder) for training or a reference from features files, one per section in
    order: each section keeps the spots its file covers, each feature matrix is aligned to them, and
    ``encoder`` is the extractor the files name (they must agree; None where none names one)."""
    if len(paths) != len(sections):
        raise BleepError(f"{len(paths)} features files for {len(sections)} sections: give one per section, in the same order")
    kept, arrays, encoders, dims = [], [], set(), set()
    for section, path in zip(sections, paths):
        pf = read_patch_features(path)
        spots, rows = pf.rows_for(section)
        kept.append(section if len(spots) == section.n_obs and np.array_equal(spots, np.arange(section.n_obs)) else section[spots].copy())
        arrays.append(pf.features[rows])
        dims.add(pf.dim)
        if pf.encoder:
            encoders.add(pf.encoder)
    if len(dims) > 1:
        raise BleepError(f"the features files have different dimensions {sorted(dims)}: they come from different extractors")
    if len(encoders) > 1:
        raise BleepError(f"the features files come from different extractors {sorted(encoders)}: use one extractor for all")
    return kept, arrays, next(iter(encoders), None)
