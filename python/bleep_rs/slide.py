"""Slides and patches: spot-centred patches and whole-slide tissue tiles at a chosen physical resolution.

Coordinates are level-0 pixels (x, y) throughout; sizes pair with micrometres per pixel (um/px). The
built-in Rust reader opens JPEG, PNG and TIFF (tiled or stripped, BigTIFF, OME-TIFF, Aperio SVS; no,
LZW, deflate or JPEG compression), decoding only the tiles a request touches. Other formats (NDPI,
MRXS, JPEG 2000 SVS ...) go through OpenSlide with ``backend="openslide"`` once the ``openslide`` extra is
installed. A folder is read as an OME-Zarr multiscale image (a SpatialData image element, with the
``spatialdata`` extra).

Border policy: pixels outside the image read as white (255, the colour of empty glass), so a patch that
crosses the border is padded on that side, never shifted. A spot centre outside the image is an error.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

from . import _core
from ._core import BleepError

__all__ = ["Slide", "TissueMask", "TileBatch"]


def check_fields(fields: Sequence[float]) -> Tuple[float, ...]:
    """Fields of view: a non-empty sequence of distinct finite multiples >= 1 of the patch's side."""
    try:
        out = tuple(float(f) for f in fields)
    except (TypeError, ValueError) as e:
        raise BleepError(f"fields of view must be numbers (multiples of the patch's side), not {fields!r}") from e
    if not out or any(not np.isfinite(f) or f < 1 for f in out) or len(set(out)) != len(out):
        raise BleepError(f"fields of view must be distinct multiples >= 1 of the patch's side, e.g. (1, 2, 3); got {fields!r}")
    return out


def points(a, name: str) -> np.ndarray:
    """``a`` as a C-contiguous float64 (n, 2) array of (x, y), or :class:`BleepError` naming ``name``
    and the shape given: an array of another shape is refused, never reshaped into other points."""
    try:
        out = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BleepError(f"{name} must be an (n, 2) array of (x, y) numbers: {e}") from e
    if out.ndim != 2 or out.shape[1] != 2:
        raise BleepError(f"{name} must be an (n, 2) array of (x, y) level-0 px, not shape {out.shape}")
    return np.ascontiguousarray(out)


def file_um_per_px(value: Optional[Tuple[float, str]], path: str) -> Optional[Tuple[float, str]]:
    """A pixel size a file (or an OpenSlide / Zarr backend) states, held to the one rule of
    ``_core.check_um_per_px``: returned when plausible, else None with a warning naming it."""
    if value is None:
        return None
    try:
        return (_core.check_um_per_px(float(value[0]), value[1]), value[1])
    except (BleepError, TypeError, ValueError) as e:
        warnings.warn(f"{path}: {e}; the file's value is ignored", stacklevel=3)
        return None


def _open_kind(path: str) -> str:
    """"dir" or "file" for what ``path`` names, or :class:`BleepError` for anything else (a FIFO would
    block the reader forever, a device would be read without end)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise BleepError(f"{path}: no such image file ({e.strerror})") from e
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device or special file"
    raise BleepError(f"{path}: not a regular file (a {kind}): give the path of an image file")


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

    Every pixel size, given or read from the file, is held to one rule (``_core.check_um_per_px``):
    finite and within 0.01 to 100 um/px. A given value outside it raises :class:`BleepError`; a file's
    is ignored with a warning that names it.

    A Slide pickles by path and arguments (for ``multiprocessing`` with ``spawn``): unpickling opens
    the file again.
    """

    def __init__(self, path: "os.PathLike[str] | str", *, um_per_px: Optional[float] = None, backend: str = "auto"):
        self.path = os.fspath(path)
        self._args = {"um_per_px": um_per_px, "backend": backend}
        kind = _open_kind(self.path)
        if backend == "auto" and kind == "dir":
            self._core = _ZarrCore(self.path)
        elif backend in ("auto", "rust"):
            self._core = _core.SlideCore.open(self.path)
        elif backend == "openslide":
            self._core = _OpenSlideCore(self.path)
        else:
            raise BleepError(f'backend must be "auto", "rust" or "openslide", not {backend!r}')
        if um_per_px is None:  # what the file says but was not believed (a given value makes it moot)
            for message in getattr(self._core, "warnings", ()):
                warnings.warn(f"{self.path}: {message}", stacklevel=2)
        from_file = file_um_per_px(self._core.um_per_px, self.path)
        if um_per_px is not None:
            try:
                um_per_px = _core.check_um_per_px(float(um_per_px), f"um_per_px={um_per_px!r} (given)")
            except (TypeError, ValueError) as e:
                raise BleepError(f"um_per_px must be a number of micrometres per pixel, not {um_per_px!r}") from e
            if from_file is not None and abs(from_file[0] / um_per_px - 1) > 0.10:
                warnings.warn(
                    f"{self.path}: um_per_px={um_per_px} was given but the file says {from_file[0]:.4g} "
                    f"({from_file[1]}); using the given value. Drop the argument to use the file's.",
                    stacklevel=2,
                )
            self._um_per_px: Optional[Tuple[float, str]] = (float(um_per_px), "given")
        else:
            self._um_per_px = from_file

    def __reduce__(self):
        return (_reopen, (self.path, self._args))

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
        try:
            um_per_px = _core.check_um_per_px(float(um_per_px), f"the target um_per_px={um_per_px!r}")
        except (TypeError, ValueError) as e:
            raise BleepError(f"the target um_per_px must be a number, not {um_per_px!r}") from e
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
        """Patches (n, size, size, 3) uint8 whose top-left corners are ``origins`` (n, 2) level-0 px.

        ``batch_size`` patches are read together (the tiles they touch decoded once each, memory bounded
        by a batch); the built-in reader takes them in the order of the slide's tiles, whatever the
        order of ``origins``, and returns them in the order asked."""
        origins = points(origins, "origins")
        return self._read_fields(origins, size, [self._scale(um_per_px)], batch_size, progress, threads)[:, 0]

    def _read_fields(self, origins: np.ndarray, size: int, scales: Sequence[float], batch_size: int, progress: bool,
                     threads: Optional[int]) -> np.ndarray:
        """(n, len(scales), size, size, 3): field f of row i at ``origins[i, 2f:2f + 2]``, ``scales[f]``."""
        n, fields = len(origins), len(scales)
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise BleepError(f"batch_size must be a whole number >= 1, not {batch_size!r}")
        try:
            out = _core.patch_array([n, fields, int(size), int(size), 3])
        except (TypeError, OverflowError, BleepError) as e:
            raise BleepError(f"{n} patches of {size} x {size} px cannot be allocated ({e}): ask for fewer or smaller patches") from e
        native = isinstance(self._core, _core.SlideCore)
        bar = _progress(n * fields, "patches", progress)
        # Without a progress bar the built-in reader gets the whole request (and orders it by tiles).
        step = batch_size if bar is not None or not native else max(n, 1)
        for start in range(0, n, step):
            block = origins[start : start + step]
            dst = out[start : start + len(block)]
            if native:
                self._core.fields_into(block, int(size), [float(s) for s in scales], dst, threads, int(batch_size))
            else:
                for f, scale in enumerate(scales):
                    part = np.empty((len(block), size, size, 3), np.uint8)
                    self._core.patches_into(np.ascontiguousarray(block[:, 2 * f : 2 * f + 2]), int(size), scale, part, threads)
                    dst[:, f] = part
            if bar is not None:
                bar.update(len(block) * fields)
        if bar is not None:
            bar.close()
        return out

    def spot_patches(
        self,
        centres: np.ndarray,
        size: int = 224,
        um_per_px: Optional[float] = None,
        *,
        fields: Optional[Sequence[float]] = None,
        batch_size: int = 1024,
        progress: bool = False,
        threads: Optional[int] = None,
    ) -> np.ndarray:
        """One patch per spot, centred on it: ``centres`` (n, 2) = (x, y) in level-0 px; ``size`` px at
        ``um_per_px`` (default: the slide's own resolution, no resampling). Returns (n, size, size, 3).

        ``fields``: fields of view, each a multiple of the patch's side around the same centre (e.g.
        ``(1, 2, 3)``); field f is read as ``size`` px at ``f * um_per_px`` (f times the area, shrunk
        by the area filter), each from the best pyramid level for its scale, all in one pass over the
        slide's tiles. Returns (n, len(fields), size, size, 3)."""
        centres = points(centres, "centres")
        w, h = self.dimensions
        outside = ~((centres[:, 0] >= 0) & (centres[:, 0] < w) & (centres[:, 1] >= 0) & (centres[:, 1] < h))
        if outside.any():
            first = np.flatnonzero(outside)[:3].tolist()
            raise BleepError(
                f"{int(outside.sum())} spot centres lie outside the {w} x {h} px image (first rows: {first}): "
                "check that the positions are in this image's full-resolution pixels (not a hires/lowres "
                "thumbnail's) and in (x, y) order"
            )
        single = fields is None
        fields = (1.0,) if single else check_fields(fields)
        base = um_per_px if um_per_px is not None else self.um_per_px
        if base is None and fields != (1.0,):
            raise BleepError(f"{self.path}: fields of view other than 1 need the slide's pixel size: pass um_per_px=")
        scales = [self._scale(um_per_px if f == 1 else base * f) for f in fields]
        origins = np.ascontiguousarray(np.concatenate([centres - size * s / 2.0 for s in scales], axis=1))
        out = self._read_fields(origins, size, scales, batch_size, progress, threads)
        return out[:, 0] if single else out

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


def _reopen(path: str, args: dict) -> Slide:
    """A pickled :class:`Slide`, opened again."""
    return Slide(path, **args)


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


#: Names of coordinate systems in micrometres (SpatialData stores no units; these names say it).
MICRON_SYSTEMS = ("microns", "micron", "micrometers", "micrometres", "micrometer", "um", "µm")


def _as_rgb8(block: np.ndarray) -> np.ndarray:
    """(c, h, w) of any dtype -> (h, w, 3) uint8."""
    if block.shape[0] == 1:
        block = np.repeat(block, 3, axis=0)
    block = block[:3]
    if block.dtype != np.uint8:
        if np.issubdtype(block.dtype, np.floating):
            block = np.clip(np.nan_to_num(block) * (255.0 if block.max(initial=0) <= 1.0 else 1.0), 0, 255)
        elif block.dtype == np.uint16:
            block = block / 257.0
        block = np.round(block).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(block, 0, -1))


class _ZarrCore:
    """An OME-Zarr multiscale image (c, y, x), as SpatialData writes its image elements."""

    def __init__(self, path: str):
        try:
            import zarr
        except ImportError as e:
            raise BleepError(f"{path}: reading a Zarr image needs zarr: pip install 'bleep-rs[spatialdata]'") from e
        try:
            group = zarr.open_group(path, mode="r")
        except Exception as e:  # zarr raises several kinds for a folder that is no store
            raise BleepError(f"{path}: a folder that is not a Zarr image ({e}): pass an image file") from e
        attrs = dict(group.attrs)
        multiscales = (attrs.get("ome") or attrs).get("multiscales")
        if not multiscales:
            raise BleepError(f"{path}: a Zarr group without OME multiscales metadata: not an image element")
        axes = [a["name"] if isinstance(a, dict) else a for a in multiscales[0]["axes"]]
        if axes != ["c", "y", "x"]:
            raise BleepError(f"{path}: image axes {axes}: only 2-D (c, y, x) images are read")
        self._levels = [group[d["path"]] for d in multiscales[0]["datasets"]]
        self.level_dimensions = [(int(a.shape[2]), int(a.shape[1])) for a in self._levels]
        self.level_downsamples = [self.level_dimensions[0][0] / w for w, _ in self.level_dimensions]
        self.format = "ome-zarr"
        self.um_per_px = None
        for t in multiscales[0].get("coordinateTransformations", []):
            name = ((t.get("output") or {}).get("name") or "").lower()
            if name in MICRON_SYSTEMS:
                scale = _linear_scale(t)
                if scale:
                    self.um_per_px = (scale, f"the transformation to '{name}'")

    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        arr = self._levels[level]
        W, H = self.level_dimensions[level]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = _as_rgb8(np.asarray(arr[:, y0:y1, x0:x1]))
        return out

    def _best_level(self, scale: float) -> int:
        return max(i for i, d in enumerate(self.level_downsamples) if d <= scale * (1 + 1e-6) or i == 0)

    def patches_into(self, origins: np.ndarray, size: int, scale: float, out: np.ndarray, threads=None) -> None:
        level = self._best_level(scale)
        ds = self.level_downsamples[level]
        ls = scale / ds
        exact = abs(ls - 1.0) * size < 0.5  # as the Rust reader: pixels copied, the origin rounded
        extent = size if exact else int(np.ceil(size * ls)) + 1
        taps = None if exact else _taps(size, extent, ls)
        for i, (x, y) in enumerate(origins):
            # As the Rust reader: the origin rounded (half away from zero) to the level's pixels.
            region = self.read_region(int(np.floor(x / ds + 0.5)), int(np.floor(y / ds + 0.5)), level, extent, extent)
            out[i] = region if exact else np.clip(np.round(np.einsum("yi,ijc,xj->yxc", taps, region.astype(np.float32), taps)), 0, 255)

    def thumbnail(self, max_side: int) -> np.ndarray:
        from PIL import Image

        w0, h0 = self.level_dimensions[0]
        scale = max(max(w0, h0) / max(max_side, 1), 1.0)
        level = self._best_level(scale)
        w, h = self.level_dimensions[level]
        img = self.read_region(0, 0, level, w, h)
        size = (max(1, round(w0 / scale)), max(1, round(h0 / scale)))
        return img if size == (w, h) else np.asarray(Image.fromarray(img).resize(size, Image.BOX))


def _taps(out: int, src: int, scale: float) -> np.ndarray:
    """The (out, src) resampling weights of the Rust reader (resample.rs): the area filter when
    shrinking, bilinear between pixel centres when enlarging."""
    w = np.zeros((out, src), dtype=np.float32)
    for i in range(out):
        if scale >= 1.0:
            lo, hi = i * scale, (i + 1) * scale
            for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), src)):
                w[i, j] = max(min(hi, j + 1.0) - max(lo, float(j)), 0.0) / scale
        else:
            centre = max((i + 0.5) * scale - 0.5, 0.0)
            j0 = min(int(np.floor(centre)), src - 1)
            f = centre - j0
            w[i, j0] += 1.0 - f if j0 + 1 < src else 1.0
            if j0 + 1 < src:
                w[i, j0 + 1] += f
    return w


def _linear_scale(t: dict) -> Optional[float]:
    """Micrometres per pixel of an NGFF scale or affine transformation over (c, y, x) or (y, x)."""
    if t.get("type") == "scale":
        values = [float(v) for v in t["scale"]][-2:]
        return float(np.sqrt(abs(values[0] * values[1])))
    if t.get("type") == "affine":
        m = np.asarray(t["affine"], dtype=float)
        m = m[-3:-1, -3:-1] if m.shape[0] >= 3 else m
        return float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    return None
