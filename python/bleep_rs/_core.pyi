"""Type stubs of the compiled core (checked against the module by tests/test_stubs.py and by
``python -m mypy.stubtest bleep_rs._core``, which ``make test`` runs)."""

import os
from typing import Optional, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "BleepError",
    "ReferenceCore",
    "SlideCore",
    "tissue_mask",
    "tissue_grid",
    "macenko_fit",
    "macenko_transform",
    "reinhard_fit",
    "reinhard_transform",
    "to_tensor_into",
    "check_um_per_px",
    "patch_array",
    "set_num_threads",
    "get_num_threads",
    "kernel_name",
    "kernel_choice",
    "available_kernels",
    "neighbour_weights",
    "FORMAT_VERSION",
]

FORMAT_VERSION: int

class BleepError(Exception): ...

@final
class ReferenceCore:
    @staticmethod
    def build(
        embeddings: npt.NDArray[np.float32],
        expression: npt.NDArray[np.float32],
        genes: list[str],
        spot_ids: Optional[list[str]] = None,
        sections: Optional[list[str]] = None,
        provenance: Optional[str] = None,
        expression_dtype: str = "float32",
        threads: Optional[int] = None,
        expression_format: str = "auto",
    ) -> ReferenceCore: ...
    @staticmethod
    def build_csr(
        embeddings: npt.NDArray[np.float32],
        indptr: npt.NDArray[np.int64],
        indices: npt.NDArray[np.uint32],
        values: npt.NDArray[np.float32],
        genes: list[str],
        spot_ids: Optional[list[str]] = None,
        sections: Optional[list[str]] = None,
        provenance: Optional[str] = None,
        expression_dtype: str = "float32",
        expression_format: str = "auto",
        threads: Optional[int] = None,
    ) -> ReferenceCore: ...
    @staticmethod
    def load(path: os.PathLike[str] | str, threads: Optional[int] = None) -> ReferenceCore: ...
    def save(self, path: os.PathLike[str] | str) -> None: ...
    def search(
        self, queries: npt.NDArray[np.float32], k: int, threads: Optional[int] = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
    def impute(
        self,
        queries: npt.NDArray[np.float32],
        k: int,
        method: str = "mean",
        temperature: float = 0.1,
        threads: Optional[int] = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
    def aggregate(
        self,
        indices: npt.NDArray[np.int64],
        weights: npt.NDArray[np.float32],
        threads: Optional[int] = None,
    ) -> npt.NDArray[np.float32]: ...
    def aggregate_add(
        self,
        indices: npt.NDArray[np.int64],
        weights: npt.NDArray[np.float32],
        out: npt.NDArray[np.float32],
        threads: Optional[int] = None,
    ) -> None: ...
    def neighbour_spread(self, indices: npt.NDArray[np.int64], threads: Optional[int] = None) -> npt.NDArray[np.float32]: ...
    def norms_of(self, indices: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]: ...
    def release_pages(self) -> bool: ...
    @property
    def n_spots(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def genes(self) -> list[str]: ...
    @property
    def spot_ids(self) -> list[str]: ...
    @property
    def sections(self) -> Optional[list[str]]: ...
    @property
    def provenance(self) -> str: ...
    @property
    def expression_dtype(self) -> str: ...
    @property
    def expression_format(self) -> str: ...
    @property
    def expression_nbytes(self) -> int: ...
    @property
    def mapped(self) -> bool: ...
    def expression_csr(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.float32]]: ...
    def embeddings(self) -> npt.NDArray[np.float32]: ...
    def expression(self) -> npt.NDArray[np.float32]: ...

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def kernel_name() -> str: ...
def available_kernels() -> list[str]: ...
def kernel_choice() -> tuple[str, str, list[str], list[tuple[str, float]], Optional[str], str]: ...
def neighbour_weights(
    scores: npt.NDArray[np.float32],
    query_norms: npt.NDArray[np.float64],
    neighbour_norms: npt.NDArray[np.float64],
    method: str = "mean",
    temperature: float = 0.1,
) -> npt.NDArray[np.float32]: ...

_U8 = npt.NDArray[np.uint8]
_F32 = npt.NDArray[np.float32]

@final
class SlideCore:
    @staticmethod
    def open(path: os.PathLike[str] | str) -> SlideCore: ...
    @property
    def level_dimensions(self) -> list[tuple[int, int]]: ...
    @property
    def level_downsamples(self) -> list[float]: ...
    @property
    def um_per_px(self) -> Optional[tuple[float, str]]: ...
    @property
    def warnings(self) -> list[str]: ...
    @property
    def format(self) -> str: ...
    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> _U8: ...
    def patches_into(
        self,
        origins: npt.NDArray[np.float64],
        size: int,
        scale: float,
        out: _U8,
        threads: Optional[int] = None,
        batch: int = 256,
    ) -> None: ...
    def fields_into(
        self,
        origins: npt.NDArray[np.float64],
        size: int,
        scales: list[float],
        out: _U8,
        threads: Optional[int] = None,
        batch: int = 256,
    ) -> None: ...
    def thumbnail(self, max_side: int) -> _U8: ...

def patch_array(shape: list[int]) -> _U8: ...
def tissue_mask(rgb: _U8, median: int, close: int) -> tuple[_U8, int]: ...
def tissue_grid(
    mask: _U8, mask_scale: float, width: int, height: int, tile: float, min_tissue: float
) -> npt.NDArray[np.float64]: ...
def macenko_fit(pixels: _U8, io: float, alpha: float, beta: float) -> tuple[_F32, list[float]]: ...
def macenko_transform(
    patches: _U8,
    he: _F32,
    max_c: list[float],
    io: float,
    alpha: float,
    beta: float,
    out: _U8,
    threads: Optional[int] = None,
) -> list[bool]: ...
def reinhard_fit(pixels: _U8) -> _F32: ...
def reinhard_transform(patches: _U8, stats: _F32, out: _U8, threads: Optional[int] = None) -> None: ...
def to_tensor_into(
    patches: _U8, mean: list[float], std: list[float], out: _F32, threads: Optional[int] = None
) -> None: ...
def check_um_per_px(value: float, source: str) -> float: ...
