"""Slides and patches: spot-centred patches and whole-slide tissue tiles at a chosen physical resolution.

Coordinates are level-0 pixels (x, y) throughout; sizes pair with micrometres per pixel (um/px). The
built-in Rust reader opens JPEG, PNG and TIFF (tiled or stripped, BigTIFF, OME-TIFF, Aperio SVS; no,
LZW, deflate or JPEG compression), decoding only the tiles a request touches. Other formats (NDPI,
MRXS, JPEG 2000 SVS ...) go through OpenSlide with ``backend="openslide"`` once the ``openslide`` extra is
installed.

Border policy: pixels outside the image read as white (255, the colour of empty glass), so a patch that
crosses the border is padded on that side, never shifted. A spot centre outside the image is an error.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

from . import _core
from ._core import BleepError

__all__ = ["Slide", "TissueMask", "TileBatch"]


@dataclass(frozen=True)
class TissueMask:
    """A binary tissue mask over a thumbnail: ``mask`` (h, w) uint8 0/1, ``scale`` level-0 px per mask px."""

    mask: np.ndarray
    scale: float
    threshold: int
    thumbnail: np.ndarray

    @property
    def fraction(self) -> float:
        """The fraction of the thumbnail that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


@dataclass(frozen=True)
class TileBatch:
    """One batch of tiles: ``patches`` uint8 (n, h, w, 3), or float32 (n, 3, h, w) when a tensor
    normalisation was asked, and ``coords`` float64 (n, 2): top-left corners in level-0 px."""

    patches: np.ndarray
    coords: np.ndarray


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a nicety, never a requirement
        return None
    return tqdm(total=total, desc=desc, unit="patch")


class Slide:
    """A whole-slide image or plain image.

    Args:
        path: the image file.
        um_per_px: micrometres per level-0 pixel. Wins over what the file says; a disagreement of more
            than 10 % with the file is warned about. Without it, the file's value is used (Aperio MPP,
            OME-XML PhysicalSizeX, TIFF resolution tags in cm or inch); with neither, anything that
            needs a physical size raises :class:`BleepError`.
        backend: ``"auto"`` / ``"rust"`` (the built-in reader) or ``"openslide"``.
    """

    def __init__(self, path: "os.PathLike[str] | str", *, um_per_px: Optional[float] = None, backend: str = "auto"):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise BleepError(f"{self.path}: no such image file")
        if backend in ("auto", "rust"):
            self._core = _core.SlideCore.open(self.path)
        elif backend == "openslide":
            self._core = _OpenSlideCore(self.path)
        else:
            raise BleepError(f'backend must be "auto", "rust" or "openslide", not {backend!r}')
        from_file = self._core.um_per_px
        if um_per_px is not None:
            if not (np.isfinite(um_per_px) and um_per_px > 0):
                raise BleepError(f"um_per_px must be a positive number, not {um_per_px!r}")
            if from_file is not None and abs(from_file[0] / um_per_px - 1) > 0.10:
                warnings.warn(
                    f"{self.path}: um_per_px={um_per_px} was given but the file says {from_file[0]:.4g} "
                    f"({from_file[1]}); using the given value. Drop the argument to use the file's.",
                    stacklevel=2,
                )
            self._um_per_px: Optional[Tuple[float, str]] = (float(um_per_px), "given")
        else:
            self._um_per_px = from_file

    # -- geometry -------------------------------------------------------------------------------------

    @property
    def dimensions(self) -> Tuple[int, int]:
        """(width, height) of level 0."""
        return tuple(self._core.level_dimensions[0])  # type: ignore[return-value]

    @property
    def level_dimensions(self) -> list:
        return [tuple(d) for d in self._core.level_dimensions]

    @property
    def level_downsamples(self) -> list:
        return list(self._core.level_downsamples)

    @property
    def level_count(self) -> int:
        return len(self._core.level_dimensions)

    @property
    def format(self) -> str:
        return self._core.format

    @property
    def um_per_px(self) -> Optional[float]:
        """Micrometres per level-0 pixel, or None when neither the caller nor the file said."""
        return None if self._um_per_px is None else self._um_per_px[0]

    @property
    def um_per_px_source(self) -> Optional[str]:
        """Where :attr:`um_per_px` came from ("given", "TIFF resolution tags", ...)."""
        return None if self._um_per_px is None else self._um_per_px[1]

    def _scale(self, um_per_px: Optional[float]) -> float:
        """Level-0 px per output px for a target um/px (None: the slide's own resolution)."""
        if um_per_px is None:
            return 1.0
        if self.um_per_px is None:
            raise BleepError(
                f"{self.path}: the image has no pixel size, so a target of {um_per_px} um/px cannot be "
                "converted to pixels: pass Slide(..., um_per_px=X) (the scanner's microns per pixel)"
            )
        if not (np.isfinite(um_per_px) and um_per_px > 0):
            raise BleepError(f"the target um_per_px must be a positive number, not {um_per_px!r}")
        scale = um_per_px / self.um_per_px
        if scale < 0.5:
            warnings.warn(
                f"the target {um_per_px} um/px is {1 / scale:.1f}x finer than the slide's {self.um_per_px:.4g}: "
                "patches are interpolated (bilinear) and hold no more detail than the slide",
                stacklevel=3,
            )
        return scale

    def __repr__(self) -> str:
        w, h = self.dimensions
        um = "unknown" if self.um_per_px is None else f"{self.um_per_px:.4g} ({self.um_per_px_source})"
        return f"Slide({self.path!r}, {w} x {h} px, {self.level_count} levels, um/px {um})"

    # -- reading --------------------------------------------------------------------------------------

    def read_region(self, location: Tuple[int, int], level: int, size: Tuple[int, int]) -> np.ndarray:
        """OpenSlide's ``read_region``: top-left ``location`` in level-0 px, ``size`` (w, h) in the
        level's px. Returns RGB uint8 (h, w, 3); outside the image is white."""
        (x, y), (w, h) = location, size
        return self._core.read_region(int(x), int(y), int(level), int(w), int(h))

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole slide, its longer side at most ``max_side`` px (area filter), RGB uint8 (h, w, 3)."""
        return self._core.thumbnail(int(max_side))

    def read_patches(
        self,
        origins: np.ndarray,
        size: int = 224,
        um_per_px: Optional[float] = None,
        *,
        batch_size: int = 1024,
        progress: bool = False,
        threads: Optional[int] = None,
    ) -> np.ndarray:
        """Patches (n, size, size, 3) uint8 whose top-left corners are ``origins`` (n, 2) level-0 px."""
        origins = np.ascontiguousarray(np.asarray(origins, dtype=np.float64).reshape(-1, 2))
        scale = self._scale(um_per_px)
        try:
            out = np.empty((len(origins), size, size, 3), dtype=np.uint8)
        except (ValueError, MemoryError, OverflowError) as e:
            raise BleepError(f"{len(origins)} patches of {size} x {size} px cannot be allocated ({e}): ask for fewer or smaller patches") from e
        bar = _progress(len(origins), "patches", progress)
        for start in range(0, len(origins), batch_size):
            block = origins[start : start + batch_size]
            self._core.patches_into(block, int(size), scale, out[start : start + len(block)], threads)
            if bar is not None:
                bar.update(len(block))
        if bar is not None:
            bar.close()
        return out

    def spot_patches(
        self,
        centres: np.ndarray,
        size: int = 224,
        um_per_px: Optional[float] = None,
        **kwargs,
    ) -> np.ndarray:
        """One patch per spot, centred on it: ``centres`` (n, 2) = (x, y) in level-0 px; ``size`` px at
        ``um_per_px`` (default: the slide's own resolution, no resampling). Returns (n, size, size, 3)."""
        centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
        w, h = self.dimensions
        outside = ~((centres[:, 0] >= 0) & (centres[:, 0] < w) & (centres[:, 1] >= 0) & (centres[:, 1] < h))
        if outside.any():
            first = np.flatnonzero(outside)[:3].tolist()
            raise BleepError(
                f"{int(outside.sum())} spot centres lie outside the {w} x {h} px image (first rows: {first}): "
                "check that the positions are in this image's full-resolution pixels (not a hires/lowres "
                "thumbnail's) and in (x, y) order"
            )
        footprint = size * self._scale(um_per_px)
        return self.read_patches(centres - footprint / 2.0, size, um_per_px, **kwargs)

    # -- whole-slide tiling ---------------------------------------------------------------------------

    def tissue_mask(self, max_side: int = 2048, *, median: int = 7, close: int = 4) -> TissueMask:
        """CLAM's tissue detection on a thumbnail: HSV saturation, ``median`` px median blur, Otsu's
        threshold, ``close`` px morphological closing."""
        thumb = self.thumbnail(max_side)
        mask, threshold = _core.tissue_mask(thumb, int(median), int(close))
        scale = self.dimensions[0] / thumb.shape[1]
        return TissueMask(mask=mask, scale=scale, threshold=int(threshold), thumbnail=thumb)

    def tile_grid(
        self,
        size: int = 224,
        um_per_px: Optional[float] = None,
        *,
        min_tissue: float = 0.5,
        mask: Optional[TissueMask] = None,
    ) -> np.ndarray:
        """Top-left corners (n, 2), level-0 px, of the non-overlapping tiles of ``size`` px at
        ``um_per_px`` that hold at least ``min_tissue`` tissue, row by row. An empty result (no tissue
        found) is returned as a (0, 2) array with a warning."""
        mask = mask if mask is not None else self.tissue_mask()
        footprint = size * self._scale(um_per_px)
        w, h = self.dimensions
        coords = _core.tissue_grid(np.ascontiguousarray(mask.mask), mask.scale, w, h, footprint, float(min_tissue))
        if len(coords) == 0:
            warnings.warn(f"{self.path}: no tile holds {min_tissue:.0%} tissue (mask covers {mask.fraction:.1%})", stacklevel=2)
        return coords

    def iter_tiles(
        self,
        size: int = 224,
        um_per_px: Optional[float] = None,
        *,
        batch_size: int = 256,
        min_tissue: float = 0.5,
        mask: Optional[TissueMask] = None,
        stain: Optional[object] = None,
        tensor: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
        progress: bool = True,
        threads: Optional[int] = None,
    ) -> Iterator[TileBatch]:
        """Streams the tissue tiles in batches (memory bounded by a batch, whatever the slide's size).

        ``stain``: a fitted :class:`~bleep_rs.MacenkoNormalizer` or :class:`~bleep_rs.ReinhardNormalizer`
        applied to each batch; ``tensor=(mean, std)``: return float32 (n, 3, h, w) batches normalised
        per channel, ready for an encoder."""
        from .normalize import to_tensor

        coords = self.tile_grid(size, um_per_px, min_tissue=min_tissue, mask=mask)
        bar = _progress(len(coords), "tiles", progress)
        for start in range(0, len(coords), batch_size):
            block = coords[start : start + batch_size]
            patches = self.read_patches(block, size, um_per_px, batch_size=batch_size, threads=threads)
            if stain is not None:
                patches = stain.transform(patches)
            if tensor is not None:
                patches = to_tensor(patches, tensor[0], tensor[1], threads=threads)
            if bar is not None:
                bar.update(len(block))
            yield TileBatch(patches=patches, coords=block)
        if bar is not None:
            bar.close()


class _OpenSlideCore:
    """The OpenSlide backend behind the same interface as the Rust reader (for NDPI, MRXS, ...)."""

    def __init__(self, path: str):
        try:
            import openslide
        except ImportError as e:
            raise BleepError(
                f"{path}: reading this slide needs OpenSlide: pip install 'bleep-rs[openslide]' "
                "(openslide-python and openslide-bin)"
            ) from e
        try:
            self._slide = openslide.OpenSlide(path)
        except openslide.OpenSlideError as e:
            raise BleepError(f"{path}: OpenSlide cannot read it ({e})") from e
        props = self._slide.properties
        mpp = props.get("openslide.mpp-x")
        self.um_per_px = (float(mpp), "OpenSlide properties (openslide.mpp-x)") if mpp else None
        self.level_dimensions = list(self._slide.level_dimensions)
        self.level_downsamples = list(self._slide.level_downsamples)
        self.format = f"openslide:{props.get('openslide.vendor', 'unknown')}"

    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        rgba = np.asarray(self._slide.read_region((x, y), level, (w, h)))
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255  # outside the slide: white, as the Rust reader
        return rgb

    def patches_into(self, origins: np.ndarray, size: int, scale: float, out: np.ndarray, threads=None) -> None:
        from PIL import Image

        level = self._slide.get_best_level_for_downsample(scale * (1 + 1e-6))
        ds = self.level_downsamples[level]
        extent = max(1, int(np.ceil(size * scale / ds - 1e-9)))
        for i, (x, y) in enumerate(origins):
            region = self.read_region(int(round(x)), int(round(y)), level, extent, extent)
            if extent != size:
                flt = Image.BOX if extent > size else Image.BILINEAR
                region = np.asarray(Image.fromarray(region).resize((size, size), flt))
            out[i] = region

    def thumbnail(self, max_side: int) -> np.ndarray:
        return np.asarray(self._slide.get_thumbnail((max_side, max_side)).convert("RGB"))
