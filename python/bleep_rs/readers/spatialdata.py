"""SpatialData zarr stores (the ``spatialdata`` extra): a table annotating shapes (circles or polygons),
and an H&E image element. Spot positions are carried from the shapes' coordinate system into the image's
pixels through both elements' transformations; the pixel size comes from the image's transformation to a
coordinate system in micrometres (named ``microns``, ``um`` ...) when there is one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .._core import BleepError
from ..slide import MICRON_SYSTEMS
from .h5ad import uns_entries


def is_spatialdata_store(path: Path) -> bool:
    """A zarr group with a ``tables/`` group: a SpatialData store."""
    return path.is_dir() and ((path / "zarr.json").exists() or (path / ".zgroup").exists()) and (path / "tables").is_dir()


def _import():
    try:
        import spatialdata
    except ImportError as e:
        raise BleepError("reading or writing SpatialData needs the spatialdata extra: pip install 'bleep-rs[spatialdata]'") from e
    return spatialdata


def _affine(element, system: str) -> np.ndarray:
    """The 3 x 3 map of (x, y, 1) from ``element``'s own coordinates to ``system``."""
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=system)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def _systems(element) -> set:
    from spatialdata.transformations import get_transformation

    return set(get_transformation(element, get_all=True))


def _pick(names, wanted: Optional[str], what: str, where: str) -> str:
    names = list(names)
    if wanted is not None:
        if wanted not in names:
            raise BleepError(f"{where}: no {what} {wanted!r} (the store has {names})")
        return wanted
    if len(names) != 1:
        raise BleepError(f"{where}: {len(names)} {what}s ({names}): name the one to read ({what}=...)")
    return names[0]


def _image_size(element) -> int:
    data = element["scale0"].ds["image"] if hasattr(element, "children") else element
    return int(data.shape[-1]) * int(data.shape[-2])


def _spot_geometry(shapes, where: str) -> Tuple[np.ndarray, np.ndarray]:
    """Centres (n, 2) and diameters (n,) of circles (points with a radius) or polygons (centroid, the
    side of the square of equal area)."""
    geom = shapes.geometry
    kinds = set(geom.geom_type)
    if kinds == {"Point"}:
        if "radius" not in shapes:
            raise BleepError(f"{where}: point shapes without a radius column are not spots")
        return np.column_stack([geom.x, geom.y]), 2.0 * shapes["radius"].to_numpy(dtype=np.float64)
    if kinds <= {"Polygon", "MultiPolygon"}:
        c = geom.centroid
        return np.column_stack([c.x, c.y]), np.sqrt(geom.area.to_numpy(dtype=np.float64))
    raise BleepError(f"{where}: shapes of kind {sorted(kinds)}: spots must be circles or polygons")


def _without_frame(tab):
    """The table without what refers to another pixel frame than the image's (pixel sizes, scale factors,
    thumbnails): only the bin size, a length in micrometres, is kept."""
    tab = tab.copy()
    if "bleep" in tab.uns:
        tab.uns["bleep"] = {k: v for k, v in tab.uns["bleep"].items() if k not in ("um_per_px", "image_path")}
    for entry in (tab.uns.get("spatial") or {}).values():
        if not isinstance(entry, dict):
            continue  # read_anndata names it
        entry.pop("images", None)
        entry["scalefactors"] = {k: v for k, v in (entry.get("scalefactors") or {}).items() if k == "bin_size_um"}
    return tab


def read_spatialdata(path, *, image: Optional[str] = None, table: Optional[str] = None, um_per_px: Optional[float] = None,
                     platform: Optional[str] = None, library_id: Optional[str] = None, layer: Optional[str] = None,
                     check_counts: bool = True):
    """A SpatialData store: the ``table`` (default: the only one) and the shapes it annotates, placed on
    the ``image`` element (default: the largest one that shares a coordinate system with the shapes)."""
    from .h5ad import read_anndata

    sd = _import()
    path = Path(path)
    where = str(path)
    try:
        sdata = sd.read_zarr(path)
    except Exception as e:  # zarr / spatialdata raise many kinds for a damaged store
        raise BleepError(f"{path}: not a readable SpatialData store ({e})") from e
    tname = _pick(sdata.tables, table, "table", where)
    tab = sdata.tables[tname]
    bleep, _ = uns_entries(tab, f"{where} (table {tname!r})")  # uns["bleep"] and uns["spatial"] must be dicts
    try:
        region, region_key, instance_key = sd.models.get_table_keys(tab)
    except ValueError as e:
        raise BleepError(f"{where}: table {tname!r} annotates no element (no spatialdata_attrs)") from e
    regions = [region] if isinstance(region, str) else list(region)
    if len(regions) != 1 or regions[0] not in sdata.shapes:
        raise BleepError(f"{where}: table {tname!r} annotates {regions}: bleep-rs reads a table annotating one shapes element")
    shapes = sdata.shapes[regions[0]]
    missing = ~tab.obs[instance_key].isin(shapes.index)
    if missing.any():
        raise BleepError(f"{where}: {int(missing.sum())} rows of table {tname!r} name no shape of {regions[0]!r}: the store is inconsistent")
    centres, diameters = _spot_geometry(shapes.loc[tab.obs[instance_key].to_numpy()], where)
    shared = {n: _systems(el) & _systems(shapes) for n, el in sdata.images.items()}
    candidates = [n for n, s in shared.items() if s]
    if image is None and not candidates:
        raise BleepError(f"{where}: no image element shares a coordinate system with the shapes {regions[0]!r}")
    if image is not None or len(candidates) == 1:
        iname = _pick(candidates, image, "image", where)
    else:
        iname = max(candidates, key=lambda n: _image_size(sdata.images[n]))
    element = sdata.images[iname]
    system = "global" if "global" in shared[iname] else sorted(shared[iname])[0]
    to_image = np.linalg.inv(_affine(element, system)) @ _affine(shapes, system)
    pixel_xy = (np.column_stack([centres, np.ones(len(centres))]) @ to_image.T)[:, :2]
    if not np.allclose(to_image, np.eye(3)):
        tab = _without_frame(tab)
    sizes = []
    for name in sorted(_systems(element)):
        if name.lower() in MICRON_SYSTEMS:
            scale = float(np.sqrt(abs(np.linalg.det(_affine(element, name)[:2, :2]))))
            sizes.append((scale, f"the transformation of {iname!r} to {name!r}"))
    adata = read_anndata(
        tab, where, image=str(path / "images" / iname), um_per_px=um_per_px, platform=platform,
        library_id=library_id or bleep.get("library_id") or regions[0], layer=layer, pixel_xy=pixel_xy, metadata=sizes,
        layout=f"spatialdata ({tname} on {regions[0]}, image {iname})", check_counts=check_counts,
        extra={"spatialdata_table": tname, "spatialdata_shapes": regions[0], "spatialdata_image": iname},
    )
    scale = float(np.sqrt(abs(np.linalg.det(to_image[:2, :2]))))
    adata.uns["bleep"]["shape_diameter_px"] = float(np.median(diameters) * scale)
    return adata
