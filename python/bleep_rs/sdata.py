"""Sections and predictions as SpatialData (the ``spatialdata`` extra), so that napari-spatialdata and
spatialdata-plot show them without glue: the H&E as a multiscale image, the spots as circles (tiles and
Visium HD bins as squares) and the AnnData as the table annotating them. Every element carries two
coordinate systems: ``global`` (the image's full-resolution pixels) and ``microns``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ._atomic import LIBRARY_OUTPUT, atomic_path, check_output
from ._core import BleepError

__all__ = ["to_spatialdata", "write_zarr", "read_table"]


def _import():
    try:
        import spatialdata
    except ImportError as e:
        raise BleepError("writing SpatialData needs the spatialdata extra: pip install 'bleep-rs[spatialdata]'") from e
    return spatialdata


def _name(text: str) -> str:
    """A valid element name (letters, digits, _ . -)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(text)) or "section"


def _lazy_image(slide, chunk: int = 2048):
    """The slide's level 0 as a dask array (3, h, w) read chunk by chunk: memory stays bounded."""
    import dask.array as da

    w, h = slide.dimensions
    sizes = lambda n: tuple(min(chunk, n - i) for i in range(0, n, chunk))  # noqa: E731

    def load(block_info=None):
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return np.moveaxis(slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0)), -1, 0)

    return da.map_blocks(load, chunks=((3,), sizes(h), sizes(w)), dtype=np.uint8)


def _pyramid(w: int, h: int) -> list:
    """Halvings until the longer side is under 512 px."""
    factors, side = [], max(w, h)
    while side > 1024:
        factors.append(2)
        side //= 2
    return factors


def to_spatialdata(adata):
    """A section (from :func:`~bleep_rs.read_section`) or a prediction as a SpatialData object."""
    import pandas as pd

    _import()
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    from .slide import Slide

    info = adata.uns.get("bleep", {})
    lib = _name(info.get("library_id", "section"))
    image = info.get("image_path") or info.get("source") or None
    um = info.get("image_um_per_px") or (info.get("um_per_px") if "mode" not in info else None)
    transforms = {"global": Identity()}
    if um:
        transforms["microns"] = Scale([float(um), float(um)], axes=("x", "y"))
    images = {}
    if image:
        slide = Slide(image, um_per_px=um or None)
        w, h = slide.dimensions
        images[f"{lib}_image"] = Image2DModel.parse(
            _lazy_image(slide), dims=("c", "y", "x"), c_coords=["r", "g", "b"], scale_factors=_pyramid(w, h) or None,
            transformations=dict(transforms),
        )
    spatial = adata.uns.get("spatial", {})
    entry = spatial.get(info.get("library_id")) or next(iter(spatial.values()), {})
    diameter = float((entry.get("scalefactors") or {}).get("spot_diameter_fullres", 1.0))
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    square = info.get("shape") == "square" or info.get("mode") in ("tiles", "bins") or info.get("platform") == "visium-hd"
    kind = info.get("mode") if info.get("mode") in ("tiles", "bins") else ("bins" if info.get("platform") == "visium-hd" else "spots")
    shapes_name = f"{lib}_{kind}"
    index = pd.Index(np.arange(len(xy)), name="instance_id")
    if square:
        import geopandas as gpd
        import shapely

        r = diameter / 2
        boxes = shapely.box(xy[:, 0] - r, xy[:, 1] - r, xy[:, 0] + r, xy[:, 1] + r)
        shapes = ShapesModel.parse(gpd.GeoDataFrame(geometry=boxes, index=index), transformations=dict(transforms))
    else:
        shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), diameter / 2), index=index, transformations=dict(transforms))
    table = adata.copy()
    table.uns.pop("spatial", None)  # the images live in the store
    table.obs["region"] = pd.Categorical([shapes_name] * table.n_obs)
    table.obs["instance_id"] = np.arange(table.n_obs)
    table = TableModel.parse(table, region=shapes_name, region_key="region", instance_key="instance_id")
    return SpatialData(images=images, shapes={shapes_name: shapes}, tables={"table": table})


def write_zarr(adata, path: "os.PathLike[str] | str", *, overwrite: bool = False) -> Path:
    """Writes :func:`to_spatialdata` of ``adata`` as a zarr store, atomically: written beside, then
    renamed into place (an existing store is an error unless ``overwrite``)."""
    path = check_output(path, overwrite=overwrite, **LIBRARY_OUTPUT)
    sdata = to_spatialdata(adata)
    with atomic_path(path, suffix=".zarr") as tmp:
        sdata.write(tmp)
    return path


def read_table(path: "os.PathLike[str] | str"):
    """The table of a store written by :func:`write_zarr`, as AnnData."""
    sd = _import()
    try:
        sdata = sd.read_zarr(path, selection=("tables",))
    except Exception as e:  # zarr / spatialdata raise many kinds for a damaged store
        raise BleepError(f"{path}: not a readable SpatialData store ({e})") from e
    if "table" not in sdata.tables:
        raise BleepError(f"{path}: the store has no table named 'table' (it has {list(sdata.tables)})")
    return sdata.tables["table"]
