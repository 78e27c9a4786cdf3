"""One module per section layout behind :func:`bleep_rs.read_section` (see :mod:`bleep_rs.sections`):
spaceranger (Visium outs/), visium_hd (binned outputs, pooling), legacy_st, h5ad (any AnnData), hest
(HEST-1k samples, and a writer of them), spatialdata (zarr stores). What they share, the platforms, the
pixel-size rule, the checks and the one AnnData shape, lives in ``_common``; reading a file with its
checks (tables, JSON, numbers in them) in ``_files``."""
