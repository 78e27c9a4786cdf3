import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_reference(rng, n=200, d=32, g=12):
    emb = rng.standard_normal((n, d)).astype(np.float32)
    expr = rng.gamma(2.0, 1.0, size=(n, g)).astype(np.float32)
    genes = [f"G{i}" for i in range(g)]
    return emb, expr, genes
