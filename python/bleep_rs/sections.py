"""Section readers: the files users have, as one AnnData per section, with a pixel size they can trust.

:func:`read_section` recognises the layout of a path (one module per layout in :mod:`bleep_rs.readers`):

* a 10x Space Ranger ``outs/`` folder (``filtered_feature_bc_matrix.h5``, ``spatial/`` with
  ``tissue_positions_list.csv`` (1.x), ``tissue_positions.csv`` (2.x) or ``tissue_positions.parquet``,
  told apart by their content, ``scalefactors_json.json`` and the hires / lowres PNGs); the
  full-resolution image is passed as ``image=`` (the PNGs are thumbnails and are refused as such);
* a Visium HD run (Space Ranger 3.x ``binned_outputs/square_*um``, or its ``outs/``: the 8 um bins):
  bins as spots, or pooled into pseudo-spots with ``bin_um=``;
* the legacy Spatial Transcriptomics layout of ``../shared/data`` (``counts.tsv.gz``, ``spots.tsv``,
  ``image.jpg``, ``meta.json``);
* a HEST-1k sample: ``hest/st/ID.h5ad`` (recognised by its siblings), or ``hest/`` with ``sample="ID"``;
* an ``.h5ad`` with ``obsm["spatial"]`` in full-resolution pixels (``layer=``, ``platform=``, ``image=``);
* a SpatialData ``.zarr`` store (``table=``, ``image=`` an image element's name).

Every section comes back in one shape: ``X`` raw counts (CSR, float32), ``var_names`` genes, ``obs`` spot
ids with ``in_tissue`` / ``array_row`` / ``array_col``, ``obsm["spatial"]`` (x, y) full-resolution
pixels, ``uns["spatial"][library_id]`` as scanpy's ``read_visium`` keeps it (``images`` each with its own
``tissue_{key}_scalef``, ``spot_diameter_fullres``, ``metadata``), and ``uns["bleep"]``: ``um_per_px``,
``um_per_px_source``, ``image_path``, ``layout``, ``library_id``, ``platform`` (visium, legacy-st,
visium-hd) and what said so, ``pitch_um``, ``spot_diameter_um``.

One rule for ``in_tissue`` in every layout: a spot under tissue (1) is read, one that is not (0) is
dropped, and a section with no spot under tissue is an error. Every file a reader opens is checked to be
a regular file first (a named pipe would block it forever), every matrix is checked (indices in range,
``indptr`` rising from 0 to the number of values) before anything indexes it, and a HEST sample id is a
name, never a path.

The pixel size (micrometres per full-resolution pixel) is resolved in one place,
:func:`resolve_um_per_px`: an explicit argument wins, then the files' metadata, then an estimate from the
spot pitch; a disagreement of more than 10 % between sources is warned about, naming both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ._core import BleepError
from .readers._common import PITCH_UM, SPOT_DIAMETER_UM, resolve_um_per_px, spot_pitch_px

__all__ = ["read_section", "section_patches", "expand_sections", "resolve_um_per_px", "spot_pitch_px", "PITCH_UM", "SPOT_DIAMETER_UM"]


def _read(p: Path, image, um_per_px, library_id, sample, kwargs):
    from .readers import hest, spatialdata, visium_hd
    from .readers.h5ad import read_h5ad
    from .readers.legacy_st import read_legacy_st
    from .readers.spaceranger import read_space_ranger

    def only(*names):
        extra = sorted(set(kwargs) - set(names))
        if extra:
            raise BleepError(f"{p}: {extra} do not apply to this layout (they apply to {', '.join(names) or 'none'})")
        return {k: v for k, v in kwargs.items() if k in names}

    if hest.is_hest_root(p) and sample is not None:
        return hest.read_hest(p, sample, image=image, um_per_px=um_per_px, library_id=library_id, **only("platform", "layer", "check_counts"))
    if sample is not None:
        raise BleepError(f"{p}: sample= names a sample of a HEST folder (st/, wsis/, metadata/); this is not one")
    if p.is_file() and p.suffix == ".h5ad":
        found = hest.hest_root_of(p)
        if found is not None:
            return hest.read_hest(found[0], found[1], image=image, um_per_px=um_per_px, library_id=library_id, **only("platform", "layer", "check_counts"))
        return read_h5ad(p, image=image, um_per_px=um_per_px, library_id=library_id, **only("platform", "layer", "check_counts"))
    if spatialdata.is_spatialdata_store(p):
        return spatialdata.read_spatialdata(p, image=image, um_per_px=um_per_px, library_id=library_id, **only("table", "platform", "layer", "check_counts"))
    if p.is_dir() and (p / "counts.tsv.gz").exists() and (p / "spots.tsv").exists():
        only("check_counts")
        return read_legacy_st(p, um_per_px=um_per_px, image=image, library_id=library_id)
    hd = visium_hd.hd_bin_folder(p) if p.is_dir() else None
    if hd is not None:
        only("check_counts")
        return visium_hd.read_visium_hd(hd, image=image, um_per_px=um_per_px, library_id=library_id)
    for outs in (p, p / "outs"):
        if (outs / "filtered_feature_bc_matrix.h5").exists():
            only("check_counts")
            return read_space_ranger(outs, image=image, um_per_px=um_per_px, library_id=library_id)
    if hest.is_hest_root(p):
        raise BleepError(f"{p}: a HEST folder holds many samples: pass sample=ID; it has {hest.hest_samples(p)[:8]}")
    raise BleepError(
        f"{p}: not a section bleep-rs can read: expected a Space Ranger outs/ folder "
        "(filtered_feature_bc_matrix.h5 + spatial/), a Visium HD binned output (square_*um/), a legacy ST "
        "folder (counts.tsv.gz + spots.tsv + image), a HEST folder or st/ID.h5ad, an .h5ad with "
        "obsm['spatial'], or a SpatialData .zarr store"
    )


def read_section(
    path: "os.PathLike[str] | str",
    *,
    image: "Optional[os.PathLike[str] | str]" = None,
    um_per_px: Optional[float] = None,
    library_id: Optional[str] = None,
    sample: Optional[str] = None,
    bin_um: Optional[float] = None,
    **kwargs,
):
    """Reads one section from any layout bleep-rs knows (see the module's docstring).

    Args:
        path: the section's folder, file or store.
        image: the full-resolution H&E the positions refer to, where the layout does not carry it (an
            image element's name for a SpatialData store).
        um_per_px: micrometres per full-resolution pixel; wins over what the files say.
        library_id: the name of the section (default: what the files say).
        sample: a HEST folder's sample id.
        bin_um: Visium HD: pool the bins into square pseudo-spots of about this many micrometres.
        **kwargs: ``layer`` and ``platform`` (.h5ad, HEST, SpatialData), ``table`` (SpatialData),
            ``check_counts=False`` to read positions and images of a section whose expression is not
            raw counts (for prediction).
    """
    from .readers._common import positive_number
    from .readers._files import as_path, checked_input
    from .readers.visium_hd import pool_bins

    p = as_path(path, "read_section's path")
    if not os.path.lexists(p):
        raise BleepError(f"{p}: no such file or folder")
    checked_input(p, "a section", kind="any")
    if um_per_px is not None:
        um_per_px = positive_number(um_per_px, "um_per_px", str(p))
    if bin_um is not None:
        bin_um = positive_number(bin_um, "bin_um", str(p))
    if sample is not None and not isinstance(sample, str):
        raise BleepError(f"{p}: sample must be a HEST sample id (a str), not a {type(sample).__name__}")
    adata = _read(p, image, um_per_px, library_id, sample, kwargs)
    return adata if bin_um is None else pool_bins(adata, bin_um)


def expand_sections(paths: Sequence["os.PathLike[str] | str"], ids: Optional[Sequence[str]] = None) -> List[Tuple[Path, Optional[str]]]:
    """(path, HEST sample or None) for each section named on a command line: a HEST folder stands for
    the samples ``ids`` (all of its samples without ids); ``ids`` with no HEST folder is an error."""
    from .readers._files import as_path
    from .readers.hest import hest_samples, is_hest_root, sample_file

    out: List[Tuple[Path, Optional[str]]] = []
    used = False
    for path in (as_path(p, "a section") for p in paths):
        if is_hest_root(path):
            used = True
            samples = list(ids) if ids else hest_samples(path)
            for s in samples:
                sample_file(path, s, "st", ".h5ad")  # an id is a name: refused before anything is read
            if not samples:
                raise BleepError(f"{path}: a HEST folder without samples (st/*.h5ad)")
            out += [(path, s) for s in samples]
        else:
            out.append((path, None))
    if ids and not used:
        raise BleepError("ids= names samples of a HEST folder: give the folder (hest/) as a section")
    return out


def section_patches(adata, size: int = 224, um_per_px: Optional[float] = None, *, fields: Optional[Sequence[float]] = None, slide=None, **kwargs) -> np.ndarray:
    """Spot-centred patches (n, size, size, 3) of a section read by :func:`read_section`, at ``um_per_px``
    (default: the image's own resolution); with ``fields`` (multiples of the patch's side, see
    :meth:`Slide.spot_patches`), (n, len(fields), size, size, 3). A HEST sample's patch file is used for
    the spots it holds when its patches are ``size`` px at that resolution; the rest are cut from the image.
    ``slide``: the section's image already opened (a :class:`Slide` of its ``image_path``), for reading a
    section in batches without opening (and, for a plain JPEG, decoding) the image for each."""
    from .readers._files import checked_input
    from .readers.hest import hest_patches
    from .slide import Slide

    info = adata.uns.get("bleep", {})
    if not info.get("image_path"):
        raise BleepError("this section has no full-resolution image: read it with image=PATH to extract patches")
    if "spatial" not in adata.obsm:
        raise BleepError("this section has no spot positions (obsm['spatial']): read it with bleep_rs.read_section")
    if slide is None:
        slide = Slide(checked_input(info["image_path"], "the section's image", kind="any"), um_per_px=info["um_per_px"])
    centres = np.asarray(adata.obsm["spatial"])
    h5 = info.get("patches_h5")
    single = fields is None or tuple(fields) == (1,)
    use_h5 = single and h5 and os.path.lexists(h5)
    stored = hest_patches(h5, adata.obs_names, size, um_per_px or info["um_per_px"], centres) if use_h5 else None
    if stored is None:
        return slide.spot_patches(centres, size, um_per_px, fields=fields, **kwargs)
    patches, found = stored
    if not found.all():
        patches[~found] = slide.spot_patches(centres[~found], size, um_per_px, **kwargs)
    return patches if fields is None else patches[:, None]


class SectionList(Sequence):
    """Sections named by path (and HEST sample id), read when they are used: iterating reads one section at
    a time and lets it go, so a cohort's reference is built without every section in memory at once
    (:func:`~bleep_rs.write_reference`). ``read_kwargs`` go to :func:`read_section` for each."""

    def __init__(self, paths: Sequence["os.PathLike[str] | str"], ids: Optional[Sequence[str]] = None, **read_kwargs):
        self.named = expand_sections(paths, ids)
        self.read_kwargs = read_kwargs

    def __len__(self) -> int:
        return len(self.named)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        path, sample = self.named[i]
        return read_section(path, sample=sample, **self.read_kwargs)

    def __repr__(self) -> str:
        return f"SectionList({len(self)} sections)"
