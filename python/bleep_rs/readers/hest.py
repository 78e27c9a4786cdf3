"""HEST-1k samples (mahmoodlab/HEST): ``st/ID.h5ad`` (counts, ``obsm["spatial"]`` in WSI pixels),
``wsis/ID.tif`` (pyramidal generic TIFF), ``metadata/ID.json`` (``st_technology``,
``pixel_size_um_estimated``, ``pixel_size_um_embedded``, ``inter_spot_dist`` ...) and, when downloaded,
``patches/ID.h5`` (spot-centred patches: ``img`` (n, P, P, 3), ``coords`` top-left level-0 px,
``barcode``; ``patch_size_target``, ``pixel_size`` and ``downsample`` as attributes).

:func:`write_hest_sample` writes a section in the same layout, as HEST does (pyramidal tiled LZW TIFF
with its resolution in pixels per cm, HEST's h5ad fields, the metadata JSON, the patch file)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .._atomic import atomic_path
from .._core import BleepError
from ._files import checked_input, is_input_file, metadata_number, read_json

#: HEST's ``st_technology`` -> bleep-rs platform.
TECHNOLOGIES = {"Visium": "visium", "Spatial Transcriptomics": "legacy-st", "Visium HD": "visium-hd"}
#: bleep-rs platform -> HEST's name, its centre-to-centre distance and spot diameter (um).
HEST_NAMES = {"visium": ("Visium", 100.0, 55.0), "legacy-st": ("Spatial Transcriptomics", 200.0, 100.0)}


def sample_file(root, sample, sub: str, suffix: str) -> Path:
    """``root/sub/ID.suffix``, the one way a sample id becomes a path (to read and to write): the id must
    be a name (no separator, not ``..``, not absolute, not empty), so that the path stays inside ``root``
    whatever the id says (``ids=["../../outside/X"]`` would read or write outside the HEST folder)."""
    if not isinstance(sample, str):
        raise BleepError(f"{root}: a HEST sample id must be a string, not a {type(sample).__name__} ({sample!r:.60})")
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not sample.strip() or sample in (".", "..") or any(c in sample for c in seps) or "\0" in sample or os.path.isabs(sample):
        raise BleepError(f"{root}: {sample!r} is not a HEST sample id: an id is a file name without its extension "
                         f"(as in st/ID.h5ad), with no folder, no '..' and no '/'")
    folder = os.path.normpath(Path(root, sub))
    path = Path(root, sub, f"{sample}{suffix}")
    if os.path.dirname(os.path.normpath(path)) != folder:  # belt and braces: the id check makes it so
        raise BleepError(f"{root}: the sample id {sample!r} leads outside {sub}/")
    return path


def hest_root_of(path: Path) -> Optional[Tuple[Path, str]]:
    """(collection root, sample id) when ``path`` is ``ROOT/st/ID.h5ad`` beside ``ROOT/metadata/ID.json``
    or ``ROOT/wsis/ID.tif``."""
    if path.suffix != ".h5ad" or path.parent.name != "st":
        return None
    root, sample = path.parent.parent, path.stem
    if (root / "metadata" / f"{sample}.json").exists() or (root / "wsis" / f"{sample}.tif").exists():
        return root, sample
    return None


def is_hest_root(path: Path) -> bool:
    """A HEST collection folder: ``st/`` with .h5ad files and ``metadata/`` or ``wsis/`` beside it."""
    return path.is_dir() and (path / "st").is_dir() and ((path / "metadata").is_dir() or (path / "wsis").is_dir())


def hest_samples(root) -> List[str]:
    """The sample ids of a HEST folder (its ``st/*.h5ad``), sorted."""
    return sorted(p.stem for p in Path(root, "st").glob("*.h5ad"))


def read_hest(root, sample: str, *, image=None, um_per_px: Optional[float] = None, library_id: Optional[str] = None,
              platform: Optional[str] = None, layer: Optional[str] = None, check_counts: bool = True):
    """One HEST sample: counts and spots from ``st/ID.h5ad``, the image from ``wsis/ID.tif``, the pixel
    size from ``metadata/ID.json`` (estimated, then embedded, cross-checked with the TIFF's tags and the
    spot pitch), the platform from its ``st_technology``; ``patches/ID.h5`` is used by
    :func:`~bleep_rs.section_patches` when it is at the asked size and resolution."""
    from .h5ad import read_h5ad

    root = Path(root)
    st = sample_file(root, sample, "st", ".h5ad")
    if not is_input_file(st):
        known = hest_samples(root)
        raise BleepError(f"{root}: no sample {sample!r} (no st/{sample}.h5ad; the folder has {known[:8]}{' ...' if len(known) > 8 else ''})")
    meta_file = sample_file(root, sample, "metadata", ".json")
    meta = read_json(meta_file, f"HEST's metadata of {sample}: download it again", required=False)
    wsi = sample_file(root, sample, "wsis", ".tif")
    if image is None:
        if not is_input_file(wsi):
            raise BleepError(f"{st}: HEST sample without its image: {wsi} is missing (download the wsis/ of {sample}, or pass image=)")
        image = checked_input(wsi, f"the image of HEST sample {sample}")
    tech = meta.get("st_technology")
    if tech is not None and (not isinstance(tech, str) or tech not in TECHNOLOGIES):
        raise BleepError(f"{meta_file}: st_technology {tech!r} is not a spot platform bleep-rs reads ({', '.join(TECHNOLOGIES)})")
    sizes = [(metadata_number(meta, k, meta_file), f"{meta_file.name} ({k})") for k in ("pixel_size_um_estimated", "pixel_size_um_embedded")]
    sizes = [(v, s) for v, s in sizes if v is not None]
    patches = sample_file(root, sample, "patches", ".h5")
    extra = {"hest_sample": sample, "hest_root": str(root.resolve())}
    if is_input_file(patches):
        extra["patches_h5"] = str(checked_input(patches, f"HEST's patches of {sample}").resolve())
    bin_um = metadata_number(meta, "inter_spot_dist", meta_file) if TECHNOLOGIES.get(tech) == "visium-hd" else None
    adata = read_h5ad(
        st, image=image, um_per_px=um_per_px, platform=platform, library_id=library_id or sample, layer=layer,
        stated=[(TECHNOLOGIES.get(tech), f"{meta_file.name} (st_technology {tech!r})")], metadata=sizes,
        layout="hest", extra=extra, check_counts=check_counts,
    )
    if bin_um and adata.uns["bleep"]["platform"] == "visium-hd":
        adata.uns["bleep"].update(bin_um=float(bin_um), pitch_um=float(bin_um), spot_diameter_um=float(bin_um))
    return adata


def hest_patches(h5_path, spot_ids, size: int, um_per_px: float, centres: Optional[np.ndarray] = None) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(patches (n, size, size, 3), found (n,) bool) from a HEST patch file, in ``spot_ids`` order, or
    None when its patches are not ``size`` px at ``um_per_px`` (1 % tolerance), or (with a warning) when
    its coordinates no longer match the spots' ``centres`` (full-resolution px): the patches would be of
    other places. A file that cannot be read is an error naming it."""
    import h5py

    h5_path = checked_input(h5_path, "HEST's patch file")
    try:
        with h5py.File(h5_path, "r") as f:
            return _stored_patches(f, h5_path, spot_ids, size, um_per_px, centres)
    except (OSError, KeyError, ValueError, TypeError) as e:  # h5py: a truncated or damaged file
        raise BleepError(f"{h5_path}: not a readable HEST patch file ({type(e).__name__}: {str(e)[:200]}): delete it or download it again") from None


def _stored_patches(f, h5_path, spot_ids, size: int, um_per_px: float, centres: Optional[np.ndarray]):
    if "img" not in f or "barcode" not in f:
        return None
    img = f["img"]
    attrs = dict(img.attrs) or (dict(f["coords"].attrs) if "coords" in f else {})
    target = attrs.get("patch_size_target", img.shape[1])
    px = float(attrs.get("pixel_size", 0)) * float(attrs.get("downsample", 1))
    if int(target) != size or img.ndim != 4 or img.shape[1:] != (size, size, 3) or not px or abs(px / um_per_px - 1) > 0.01:
        return None
    barcodes = [b.decode() if isinstance(b, bytes) else str(b) for b in np.asarray(f["barcode"][()]).ravel()]
    if len(barcodes) != img.shape[0]:
        raise ValueError(f"{len(barcodes)} barcodes for {img.shape[0]} patches")
    row_of = {b: i for i, b in enumerate(barcodes)}
    rows = np.array([row_of.get(str(s), -1) for s in spot_ids], dtype=np.int64)
    found = rows >= 0
    if centres is not None and found.any() and not _coords_match(f, attrs, size, rows[found], np.asarray(centres)[found], h5_path):
        return None
    out = np.full((len(rows), size, size, 3), 255, dtype=np.uint8)
    if found.any():
        order = np.argsort(rows[found])
        picked = rows[found][order]
        unique, inverse = np.unique(picked, return_inverse=True)
        block = img[unique]  # h5py reads increasing indices only
        dst = np.flatnonzero(found)[order]
        out[dst] = block[inverse]
    return out, found


def _coords_match(f, attrs: dict, size: int, rows: np.ndarray, centres: np.ndarray, h5_path) -> bool:
    """Whether each patch's top-left ``coords`` (level-0 px) plus half its side in level-0 px lands on its
    spot (within a tenth of the side, at least 2 px); warns naming the file when not."""
    coords = np.asarray(f["coords"][()], dtype=np.float64) if "coords" in f else None
    if coords is None or coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != f["img"].shape[0]:
        problem = "it has no coords (n, 2) for its patches"
    else:
        side = float(attrs.get("patch_size_src") or size * float(attrs.get("downsample", 1)))
        off = np.hypot(*(coords[rows] + side / 2 - centres).T)
        bad = ~(off <= max(2.0, 0.1 * side))  # NaN coordinates are off too
        if not bad.any():
            return True
        problem = f"the patches of {int(bad.sum())} of {len(rows)} spots are not centred on them (up to {np.nanmax(off):.0f} px off)"
    warnings.warn(f"{h5_path}: {problem}: the file belongs to other spot positions; cutting the patches from the image instead "
                  "(delete the file or download it again)", stacklevel=4)
    return False


def _write_pyramid(path: Path, slide, um_per_px: float) -> None:
    """A pyramidal tiled TIFF as pyvips writes HEST's WSIs: one IFD per level (each half the last),
    256 px tiles, LZW, the resolution in pixels per centimetre."""
    try:
        import tifffile
    except ImportError as e:
        raise BleepError("writing a HEST sample needs tifffile and imagecodecs: pip install tifffile imagecodecs") from e
    w, h = slide.dimensions
    full = slide.read_region((0, 0), 0, (w, h))
    res = 1.0 / (um_per_px * 1e-4)
    try:
        import imagecodecs  # noqa: F401  (tifffile's LZW encoder)

        compression = "lzw"
    except ImportError:
        compression = "zlib"
    with tifffile.TiffWriter(path, bigtiff=full.nbytes > 2**31) as tif:
        level, side = full, max(w, h)
        while True:
            tif.write(level, tile=(256, 256), compression=compression, photometric="rgb",
                      resolution=(res * level.shape[1] / w, res * level.shape[1] / w), resolutionunit="CENTIMETER")
            side //= 2
            if side < 256:
                break
            level = slide.thumbnail(side)


def write_hest_sample(section, root, sample_id: str, *, patch_size: int = 224, patch_um_per_px: float = 0.5,
                      patches: bool = True) -> Path:
    """Writes a section read by :func:`~bleep_rs.read_section` as a HEST-1k sample under ``root``
    (``st/``, ``wsis/``, ``metadata/`` and, with ``patches``, ``patches/``), in HEST's own form."""
    import anndata as ad
    import h5py
    import pandas as pd

    from ..slide import Slide

    info = section.uns["bleep"]
    if not info.get("image_path"):
        raise BleepError("write_hest_sample needs a section with its full-resolution image (read it with image=)")
    if info["platform"] not in HEST_NAMES:
        raise BleepError(f"write_hest_sample writes Visium and legacy ST sections, not {info['platform']}")
    tech, pitch, diameter = HEST_NAMES[info["platform"]]
    um = float(info["um_per_px"])
    root = Path(root)
    files = {sub: sample_file(root, sample_id, sub, suffix) for sub, suffix in (("st", ".h5ad"), ("wsis", ".tif"), ("metadata", ".json"), ("patches", ".h5"))}
    for sub in ("st", "wsis", "metadata", "patches"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    slide = Slide(checked_input(info["image_path"], "the section's image", kind="any"), um_per_px=um)
    with atomic_path(files["wsis"]) as tmp:
        _write_pyramid(tmp, slide, um)
    xy = np.asarray(section.obsm["spatial"], dtype=np.float64)
    obs = pd.DataFrame(
        {"in_tissue": section.obs["in_tissue"].to_numpy(), "array_row": section.obs["array_row"].to_numpy(),
         "array_col": section.obs["array_col"].to_numpy(), "pxl_col_in_fullres": xy[:, 0], "pxl_row_in_fullres": xy[:, 1]},
        index=pd.Index(section.obs_names, name=None),
    )
    st = ad.AnnData(X=section.X.copy(), obs=obs, var=pd.DataFrame(index=pd.Index(section.var_names, name=None)))
    st.obsm["spatial"] = xy
    w, h = slide.dimensions
    thumb = slide.thumbnail(1000)
    st.uns["spatial"] = {"ST": {
        "images": {"downscaled_fullres": thumb},
        "scalefactors": {"spot_diameter_fullres": diameter / um, "tissue_downscaled_fullres_scalef": thumb.shape[1] / w},
    }}
    with atomic_path(files["st"]) as tmp:
        st.write_h5ad(tmp)
    meta = {
        "id": sample_id, "st_technology": tech, "pixel_size_um_estimated": um,
        "pixel_size_um_embedded": slide.um_per_px, "inter_spot_dist": pitch, "spot_diameter": diameter,
        "fullres_px_width": w, "fullres_px_height": h, "spots_under_tissue": int(section.n_obs),
        "adata_nb_col": int(section.n_vars),
    }
    with atomic_path(files["metadata"]) as tmp:
        tmp.write_text(json.dumps(meta))
    if patches:
        src_size = round(patch_size * patch_um_per_px / um)
        topleft = np.round(xy - src_size // 2).astype(np.int64)
        img = slide.read_patches(topleft.astype(np.float64), patch_size, patch_um_per_px)
        with atomic_path(files["patches"]) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("img", data=img, chunks=(1, patch_size, patch_size, 3))
            f.create_dataset("coords", data=topleft)
            f.create_dataset("barcode", data=np.array([[s] for s in section.obs_names], dtype=object), dtype=h5py.string_dtype("utf-8"))
            attrs = {"patch_size_src": src_size, "patch_size_target": patch_size, "downsample": patch_um_per_px / um, "pixel_size": um}
            for key in ("img", "coords"):
                f[key].attrs.update(attrs)
    return files["st"]
