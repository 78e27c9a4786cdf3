"""Type stubs of the compiled core (checked against the module by tests/test_stubs.py)."""

import os
from typing import Optional

import numpy as np
import numpy.typing as npt

FORMAT_VERSION: int

class BleepError(Exception): ...

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
    def embeddings(self) -> npt.NDArray[np.float32]: ...
    def expression(self) -> npt.NDArray[np.float32]: ...

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def kernel_name() -> str: ...
