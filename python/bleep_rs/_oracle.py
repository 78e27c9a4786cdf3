"""Plain NumPy versions of every native kernel: readable, slow, and the oracle the tests compare with.

Nothing here is used by the package at run time (cf. tiktoken's ``_educational.py``).
"""

from __future__ import annotations

import numpy as np


def search(reference: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k in float64, best first, ties to the lower index."""
    r = reference.astype(np.float64)
    q = queries.astype(np.float64)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = q @ r.T
    k = min(k, r.shape[0])
    # lexsort: last key is primary -> sort by -score, then by index.
    order = np.stack([np.lexsort((np.arange(r.shape[0]), -s))[:k] for s in scores]) if len(q) else np.zeros((0, k), int)
    return order, np.take_along_axis(scores, order, axis=1) if len(q) else np.zeros((0, k))


def weights(method: str, sims: np.ndarray, query_norms: np.ndarray, neighbour_norms: np.ndarray,
            temperature: float = 0.1) -> np.ndarray:
    """Per-neighbour weights (rows sum to 1) for each aggregation method."""
    k = sims.shape[1]
    if method == "mean":
        return np.full(sims.shape, 1.0 / k)
    if method == "top1":
        w = np.zeros(sims.shape)
        w[:, 0] = 1.0
        return w
    if method == "softmax":
        logits = sims / temperature
    elif method == "weighted":
        a = query_norms[:, None]
        b = neighbour_norms
        logits = -(a * a + b * b - 2 * a * b * sims)  # minus squared Euclidean distance
    else:
        raise ValueError(method)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def impute(reference: np.ndarray, expression: np.ndarray, queries: np.ndarray, k: int,
           method: str = "mean", temperature: float = 0.1) -> np.ndarray:
    """The BLEEP prediction: aggregate of the k nearest reference spots' expression."""
    idx, sims = search(reference, queries, k)
    rn = np.linalg.norm(reference.astype(np.float64), axis=1)
    qn = np.linalg.norm(queries.astype(np.float64), axis=1)
    w = weights(method, sims, qn, rn[idx], temperature)
    return np.einsum("qk,qkg->qg", w, expression.astype(np.float64)[idx])
