"""AnnData input: an ``.h5ad`` (or an AnnData another reader found, such as a HEST sample's or a
SpatialData table) with ``obsm["spatial"]`` in full-resolution pixels of its H&E image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .._core import BleepError
from ._common import build, check_matrix, counts_problem, image_metadata, infer_platform, open_image, pitch_estimate, resolve_um_per_px
from ._files import checked_input, metadata_number, numbers


def _matrix(src, layer: Optional[str], where: str):
    """(matrix, gene names, layer) for ``layer``: None is the "counts" layer when there is one, else X;
    "raw" is ``.raw`` with its own var_names."""
    if layer is None:
        layer = "counts" if "counts" in src.layers else "X"
    if layer == "X":
        return src.X, list(src.var_names), layer
    if layer == "raw":
        if src.raw is None:
            raise BleepError(f"{where}: layer='raw' but the file has no .raw")
        return src.raw.X, list(src.raw.var_names), layer
    if layer not in src.layers:
        raise BleepError(f"{where}: no layer {layer!r} (layers: {list(src.layers) or 'none'}; also 'X' and 'raw')")
    return src.layers[layer], list(src.var_names), layer


def _counts_fix(src, tried: str) -> str:
    """The error's fix: the matrices of the file that do hold counts."""
    options = [("X", src.X)] + [(name, m) for name, m in src.layers.items()]
    if src.raw is not None:
        options.append(("raw", src.raw.X))
    good = [name for name, m in options if name != tried and m is not None and counts_problem(_sparse(m)) is None]
    if good:
        return f": {' and '.join(repr(g) for g in good)} {'holds' if len(good) == 1 else 'hold'} counts: pass layer={good[0]!r}"
    return ": none of X, .raw and the layers holds counts; store the raw counts in a layer (adata.layers['counts']) and pass layer='counts'"


def _sparse(m):
    import scipy.sparse as sp

    return m if sp.issparse(m) else np.asarray(m)


def _mapping(value, key: str, where: str) -> dict:
    """``uns`` entry ``key`` as a dict ({} when absent); another type is an error naming the key."""
    from collections.abc import Mapping

    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BleepError(f"{where}: {key} must be a dict (a group of named entries), not a {type(value).__name__}: fix or delete it")
    return dict(value)


def _text(value, key: str, where: str) -> Optional[str]:
    """``uns`` entry ``key`` as a str (None when absent); another type is an error naming the key."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if value is None or isinstance(value, str):
        return value
    raise BleepError(f"{where}: {key} must be a string, not a {type(value).__name__} ({value!r:.60}): fix or delete it")


def uns_entries(src, where: str) -> Tuple[dict, dict]:
    """(uns["bleep"], uns["spatial"]), each checked to be a dict."""
    return _mapping(src.uns.get("bleep"), "uns['bleep']", where), _mapping(src.uns.get("spatial"), "uns['spatial']", where)


def _spatial_entry(spatial: dict, lib: str, where: str) -> dict:
    """``uns["spatial"][lib]`` with its scalefactors, metadata and images each checked to be a dict."""
    entry = _mapping(spatial.get(lib), f"uns['spatial'][{lib!r}]", where)
    for key in ("scalefactors", "metadata", "images"):
        entry[key] = _mapping(entry.get(key), f"uns['spatial'][{lib!r}][{key!r}]", where)
    return entry


def _stated_platforms(src, platform_arg, entry: dict, extra: Sequence[Tuple[Optional[str], str]], where: str):
    """What the file says its platform is, most trusted first."""
    bleep, _ = uns_entries(src, where)
    named = _text(bleep.get("platform"), "uns['bleep']['platform']", where)
    stated: List[Tuple[Optional[str], str]] = [(platform_arg, "platform="), (named, 'uns["bleep"]["platform"]')]
    stated += list(extra)
    scalef = entry.get("scalefactors") or {}
    meta = entry.get("metadata") or {}
    if "bin_size_um" in scalef:
        stated.append(("visium-hd", "scalefactors (bin_size_um: Visium HD)"))
    if "fiducial_diameter_fullres" in scalef or str(meta.get("software_version", "")).startswith("spaceranger"):
        stated.append(("visium", "Space Ranger scale factors / metadata"))
    return stated


def read_anndata(
    src,
    where: str,
    *,
    image=None,
    um_per_px: Optional[float] = None,
    platform: Optional[str] = None,
    library_id: Optional[str] = None,
    layer: Optional[str] = None,
    pixel_xy: Optional[np.ndarray] = None,
    stated: Sequence[Tuple[Optional[str], str]] = (),
    metadata: Sequence[Tuple[float, str]] = (),
    layout: str = "h5ad",
    extra: Optional[dict] = None,
    check_counts: bool = True,
    base: Optional[Path] = None,
):
    """The section of an AnnData already in memory. ``pixel_xy`` overrides ``obsm["spatial"]``;
    ``stated`` and ``metadata``: what other files say of the platform and the pixel size; ``base``: the
    folder of the file it was read from, against which a relative image path it stores is resolved."""
    bleep, spatial = uns_entries(src, where)
    only = next(iter(spatial)) if len(spatial) == 1 else None
    lib = library_id or _text(bleep.get("library_id"), "uns['bleep']['library_id']", where) or only or Path(where).stem
    entry = _spatial_entry(spatial, lib if lib in spatial else only, where)
    _check_matrices(src, where)
    if pixel_xy is None:
        pixel_xy = _positions(src, where)
    X, genes, layer = _matrix(src, layer, where)
    if X is None:
        raise BleepError(f"{where}: {layer} holds no matrix: store the counts in X or a layer and pass layer=")
    problem = counts_problem(_sparse(X), src.obs_names, genes) if check_counts else None
    if problem:
        what = layer if layer in ("X", "raw") else f"layer {layer!r}"
        raise BleepError(f"{where}: {what} is not raw counts: {problem}{_counts_fix(src, layer)}")
    meta = entry["metadata"]
    if image is None:
        image = _stored_image(bleep, meta, base, where)
    has_array = {"array_row", "array_col"} <= set(src.obs)
    array_rc = numbers(src.obs, ["array_row", "array_col"], f"{where} (obs)", whole=True).astype(np.int64) if has_array else None
    scalef = dict(entry["scalefactors"])
    where_sf = f"{where} (uns['spatial'][{lib!r}]['scalefactors'])"
    bin_um = metadata_number(scalef, "bin_size_um", where_sf) or metadata_number(bleep, "bin_um", f"{where} (uns['bleep'])")
    plat, plat_source = infer_platform(where, _stated_platforms(src, platform, entry, stated, where), array_rc, bin_um)
    sizes = list(metadata)
    if (stated_um := metadata_number(bleep, "um_per_px", f"{where} (uns['bleep'])")) is not None:
        sizes.insert(0, (stated_um, 'uns["bleep"]["um_per_px"]'))
    if (stated_um := metadata_number(scalef, "microns_per_pixel", where_sf)) is not None:
        sizes.append((stated_um, "scalefactors (microns_per_pixel)"))
    slide = open_image(image)
    um = resolve_um_per_px(um_per_px, sizes + image_metadata(slide), pitch_estimate(array_rc, pixel_xy, plat), where)
    images = {}
    for key, picture in entry["images"].items():
        if (factor := metadata_number(scalef, f"tissue_{key}_scalef", where_sf)) is not None:
            images[key] = (_picture(picture, f"uns['spatial'][{lib!r}]['images'][{key!r}]", where), factor)
    scalef.pop("spot_diameter_fullres", None)  # other tools state it for other diameters: ours follows the platform
    in_tissue = src.obs["in_tissue"].to_numpy() if "in_tissue" in src.obs else None
    kept = {k: str(v) for k, v in meta.items() if k != "source_image_path" and isinstance(v, (str, bytes, np.ndarray))}
    var = src.var[[c for c in ("gene_ids", "feature_types") if c in src.var]] if layer != "raw" else None
    return build(
        X, genes, src.obs_names, array_rc, pixel_xy, in_tissue,
        where=where, layout=layout, library_id=lib, plat=plat, platform_source=plat_source, um_per_px=um,
        slide=slide, images=images, scalefactors=scalef, metadata=kept, var=var,
        check_counts=check_counts, extra={**({"bin_um": float(bin_um)} if bin_um else {}), **(extra or {})},
    )


def _check_matrices(src, where: str) -> None:
    """X, every layer and .raw checked (indices in range, indptr monotone ...) before anything indexes
    them: anndata hands scipy a malformed sparse matrix unchecked, and scipy then crashes."""
    shape = (src.n_obs, src.n_vars)
    if src.X is not None:
        check_matrix(src.X, where, "X", shape)
    for name in src.layers:
        check_matrix(src.layers[name], where, f"layer {name!r}", shape)
    if src.raw is not None:
        check_matrix(src.raw.X, where, ".raw.X", (src.n_obs, src.raw.n_vars))


def _positions(src, where: str) -> np.ndarray:
    """``obsm["spatial"]`` as (n, 2) float64 (x, y); anything but numbers is an error."""
    if "spatial" not in src.obsm:
        raise BleepError(f'{where}: no obsm["spatial"]: the spot positions (x, y in full-resolution pixels) are needed')
    raw = src.obsm["spatial"]
    try:
        pixel_xy = np.asarray(raw.to_numpy() if hasattr(raw, "to_numpy") else raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BleepError(f'{where}: obsm["spatial"] must hold numbers (x, y in full-resolution pixels), not {np.asarray(raw).dtype} ({e})') from None
    if pixel_xy.ndim != 2 or pixel_xy.shape[1] < 2:
        raise BleepError(f'{where}: obsm["spatial"] must be (n_spots, 2) = (x, y), not {pixel_xy.shape}')
    return pixel_xy[:, :2]


def _picture(value, key: str, where: str) -> np.ndarray:
    """A thumbnail stored in ``uns``: an (h, w, 3 or 4) array of numbers."""
    picture = np.asarray(value)
    if picture.ndim != 3 or picture.shape[2] not in (3, 4) or picture.dtype.kind not in "uif":
        raise BleepError(f"{where}: {key} must be an image (height, width, 3) of numbers, not {picture.shape} {picture.dtype}: fix or delete it")
    return picture


def _stored_image(bleep: dict, meta: dict, base: Optional[Path], where: str) -> Optional[str]:
    """The image path the file itself stores (uns['bleep']['image_path'], else the Space Ranger
    metadata's source_image_path); a relative one is relative to the file's own folder, not the working
    folder (else another section's image beside the working folder would be read)."""
    image = _text(bleep.get("image_path"), "uns['bleep']['image_path']", where) or _text(meta.get("source_image_path"), "source_image_path", where)
    if image and base is not None and not os.path.isabs(image):
        image = str(base / image)
    return image


def read_h5ad(path, **kwargs):
    """An ``.h5ad`` file (see :func:`read_anndata` for the arguments)."""
    import anndata as ad

    path = checked_input(path, "an .h5ad file")
    try:
        src = ad.read_h5ad(path)
    except UnicodeDecodeError as e:  # h5py decoding a name (gene, spot, key) stored as bytes that are not UTF-8
        raise BleepError(f"{path}: holds text that is not UTF-8 ({e.object[max(0, e.start - 20):e.end + 20]!r}): "
                         "gene names and spot ids must be UTF-8 text; write the file again") from None
    except Exception as e:  # anndata raises many kinds for a damaged file
        raise BleepError(f"{path}: not a readable .h5ad ({type(e).__name__}: {str(e)[:300]})") from e
    return read_anndata(src, str(path), base=Path(path).resolve().parent, **kwargs)
