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


# -- colour normalisation (torchstain's torch backend, transcribed in float32 NumPy) ----------------------


def neighbour_spread(expression: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Per query: the mean over genes of the standard deviation (ddof 0) of its neighbours' expression."""
    return expression[indices].std(axis=1).mean(axis=1).astype(np.float32)


def _kth_percentile(values: np.ndarray, q: float) -> np.float32:
    """torchstain's percentile: the value of rank 1 + round(q/100 (n-1)), no interpolation."""
    k = 1 + round(0.01 * float(q) * (values.size - 1))
    return np.sort(values.ravel())[k - 1]


def macenko_matrices(pixels: np.ndarray, io=240.0, alpha=1.0, beta=0.15):
    """(HE (3, 2), concentrations (2, n), max concentrations (2,)) of an (h, w, 3) uint8 image."""
    od = -np.log((pixels.reshape(-1, 3).astype(np.float32) + 1) / np.float32(io))
    odhat = od[~np.any(od < beta, axis=1)]
    _, eigvecs = np.linalg.eigh(np.cov(odhat.T.astype(np.float64)))
    eig = eigvecs[:, [1, 2]].astype(np.float32)
    that = odhat @ eig
    phi = np.arctan2(that[:, 1], that[:, 0])
    lo, hi = _kth_percentile(phi, alpha), _kth_percentile(phi, 100 - alpha)
    v_min = eig @ np.array([np.cos(lo), np.sin(lo)], dtype=np.float32)
    v_max = eig @ np.array([np.cos(hi), np.sin(hi)], dtype=np.float32)
    he = np.stack([v_min, v_max], 1) if v_min[0] > v_max[0] else np.stack([v_max, v_min], 1)
    c = np.linalg.lstsq(he.astype(np.float64), od.T.astype(np.float64), rcond=None)[0].astype(np.float32)
    max_c = np.array([_kth_percentile(c[0], 99), _kth_percentile(c[1], 99)], dtype=np.float32)
    return he, c, max_c


def macenko_normalize(pixels: np.ndarray, he_ref: np.ndarray, max_c_ref: np.ndarray, io=240.0, alpha=1.0, beta=0.15):
    """One (h, w, 3) uint8 patch normalised to (he_ref, max_c_ref), as torchstain's ``normalize``."""
    _, c, max_c = macenko_matrices(pixels, io, alpha, beta)
    c = c * (max_c_ref / max_c)[:, None]
    out = np.float32(io) * np.exp(-(he_ref.astype(np.float32) @ c))
    return np.minimum(out, 255).T.reshape(pixels.shape).astype(np.uint8)


_RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]], np.float32)
_WHITE = np.array([0.95047, 1.0, 1.08883], np.float32)


def rgb_to_lab(pixels: np.ndarray) -> np.ndarray:
    """(n, 3) uint8 RGB to (n, 3) LAB: L in 0..100, a and b centred on 0 (torchstain's rgb2lab)."""
    x = pixels.reshape(-1, 3).astype(np.float32) / 255
    x = np.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = x @ _RGB2XYZ.T / _WHITE
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """(n, 3) LAB to (n, 3) RGB in [0, 1] (torchstain's lab2rgb)."""
    y = (lab[:, 0] + 16) / 116
    xyz = np.stack([lab[:, 1] / 500 + y, y, y - lab[:, 2] / 200], 1)
    xyz = np.where(xyz > 0.2068966, xyz**3, (xyz - 16 / 116) / 7.787) * _WHITE
    rgb = xyz @ np.linalg.inv(_RGB2XYZ.astype(np.float64)).T.astype(np.float32)
    rgb = np.where(rgb > 0.0031308, 1.055 * np.abs(rgb) ** (1 / 2.4) - 0.055, rgb * 12.92)
    return np.clip(rgb, 0, 1)


def reinhard_stats(pixels: np.ndarray) -> np.ndarray:
    """(3, 2): mean and unbiased std of L, a, b."""
    lab = rgb_to_lab(pixels).astype(np.float64)
    return np.stack([lab.mean(0), lab.std(0, ddof=1)], 1).astype(np.float32)


def reinhard_normalize(pixels: np.ndarray, target: np.ndarray) -> np.ndarray:
    """One (h, w, 3) uint8 patch given the target's LAB statistics."""
    lab = rgb_to_lab(pixels)
    s = reinhard_stats(pixels)
    lab = (lab - s[:, 0]) / s[:, 1] * target[:, 1] + target[:, 0]
    return (lab_to_rgb(lab.astype(np.float32)) * 255).astype(np.uint8).reshape(pixels.shape)


def to_tensor(patches: np.ndarray, mean, std) -> np.ndarray:
    """(n, h, w, 3) uint8 to (n, 3, h, w) float32, ``(v / 255 - mean) / std``."""
    x = patches.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each ``factor x factor`` block (the area filter at an integer factor), rounded."""
    h, w, _ = image.shape
    blocks = image[: h - h % factor, : w - w % factor].astype(np.float64)
    blocks = blocks.reshape(h // factor, factor, w // factor, factor, 3).mean((1, 3))
    return np.round(blocks).astype(np.uint8)


# -- the sparse reference (the dense functions above are the spec; these only lay the rows out) ---------


def csr_to_dense(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, n_genes: int) -> np.ndarray:
    """Compressed sparse rows as a dense float64 table (entries at the same place add up)."""
    n = len(indptr) - 1
    rows = np.repeat(np.arange(n), np.diff(indptr))
    dense = np.zeros((n, n_genes))
    np.add.at(dense, (rows, np.asarray(indices, np.int64)), np.asarray(values, np.float64))
    return dense


def aggregate(expression: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``out[q] = sum_j weights[q, j] * expression[indices[q, j]]`` in float64."""
    return np.einsum("qk,qkg->qg", np.asarray(weights, np.float64), np.asarray(expression, np.float64)[indices])
