"""Stain and tensor normalisation against the NumPy transcriptions in bleep_rs._oracle, on real patches."""

import numpy as np
import pytest

from bleep_rs import BleepError, MacenkoNormalizer, ReinhardNormalizer, Slide, _oracle, to_tensor

from conftest import DATA, run_with_kernel


@pytest.fixture(scope="module")
def patches():
    """Twelve 96-px spot patches of HER2ST C3 and a 160-px target patch of C2."""

    def centres(section):
        rows = np.loadtxt(DATA / "tiny" / section / "spots.tsv", skiprows=1, usecols=(3, 4))
        return rows[:12]

    c3 = Slide(DATA / "tiny" / "C3" / "image.jpg").spot_patches(centres("C3"), 96)
    target = Slide(DATA / "tiny" / "C2" / "image.jpg").spot_patches(centres("C2")[6:7], 160)[0]
    return c3, target


def close_uint8(a, b, frac=0.01):
    """Equal but for float32 rounding: within 1 level, and off by one on at most ``frac`` of values."""
    d = np.abs(a.astype(int) - b.astype(int))
    return d.max() <= 1 and (d > 0).mean() <= frac


def test_macenko_matches_oracle(patches):
    p, target = patches
    norm = MacenkoNormalizer().fit(target)
    he, _, max_c = _oracle.macenko_matrices(target)
    assert np.allclose(norm.stain_matrix, he, atol=1e-4) and np.allclose(norm.max_concentrations, max_c, rtol=1e-4)
    out = norm.transform(p)
    assert out.shape == p.shape and not norm.last_skipped.any()
    want = np.stack([_oracle.macenko_normalize(x, he, max_c) for x in p])
    assert close_uint8(out, want)
    # Before fit: torchstain's reference basis.
    base = MacenkoNormalizer().transform(p[0])
    assert close_uint8(base, _oracle.macenko_normalize(p[0], MacenkoNormalizer().stain_matrix, MacenkoNormalizer().max_concentrations))


def test_macenko_blank_patch_is_returned_unchanged(patches):
    p, target = patches
    batch = np.concatenate([p[:2], np.full((1, 96, 96, 3), 245, np.uint8), np.zeros((1, 96, 96, 3), np.uint8) + 250])
    norm = MacenkoNormalizer().fit(target)
    out = norm.transform(batch)
    assert norm.last_skipped.tolist() == [False, False, True, True]
    assert np.array_equal(out[2:], batch[2:])
    with pytest.raises(BleepError, match="too few stained"):
        MacenkoNormalizer().fit(np.full((32, 32, 3), 250, np.uint8))


@pytest.mark.parametrize("kernel", ["portable", "avx2"])
def test_macenko_gives_the_same_bytes_on_every_kernel(patches, tmp_path, kernel):
    """The fallbacks (run in a child process: BLEEP_RS_KERNEL is read once) against this CPU's best
    kernel, on patches whose pixel count leaves a tail after whole vector steps (90 x 90 = 126 x 64 + 36)."""
    p, target = patches
    batch = np.ascontiguousarray(p[:, :90, :90])
    np.save(tmp_path / "batch.npy", batch)
    np.save(tmp_path / "target.npy", target)
    code = (
        "import numpy as np, bleep_rs, sys; d = sys.argv[1];"
        "m = bleep_rs.MacenkoNormalizer().fit(np.load(d + '/target.npy'));"
        "np.save(d + '/out.npy', m.transform(np.load(d + '/batch.npy')))"
    )
    if run_with_kernel(kernel, code, tmp_path) != kernel:
        pytest.skip(f"this CPU has no {kernel} kernel")
    assert np.array_equal(np.load(tmp_path / "out.npy"), MacenkoNormalizer().fit(target).transform(batch))


def test_reinhard_matches_oracle(patches):
    p, target = patches
    norm = ReinhardNormalizer().fit(target)
    assert np.allclose(norm.target_stats, _oracle.reinhard_stats(target), rtol=1e-4, atol=1e-4)
    out = norm.transform(p)
    want = np.stack([_oracle.reinhard_normalize(x, norm.target_stats) for x in p])
    assert close_uint8(out, want)
    # A uniform patch has no spread: it takes the target's mean colour, not NaN.
    flat = norm.transform(np.full((8, 8, 3), 180, np.uint8))
    assert (flat == flat[0, 0]).all()
    with pytest.raises(BleepError, match="fit"):
        ReinhardNormalizer().transform(p)


def test_reinhard_portable_path_gives_the_same_bytes(patches, rng, tmp_path):
    """The vector kernels against the portable ones (BLEEP_RS_KERNEL=portable, in a child process),
    on real patches and on random ones whose pixel count is not a multiple of 16."""
    p, target = patches
    odd = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", p=p, odd=odd, target=target)
    code = (
        "import numpy as np, bleep_rs, sys; d=sys.argv[1]; z=np.load(d+'/in.npz');"
        "n=bleep_rs.ReinhardNormalizer().fit(z['target']);"
        "np.savez(d+'/out.npz', p=n.transform(z['p']), odd=n.transform(z['odd']))"
    )
    assert run_with_kernel("portable", code, tmp_path) == "portable"
    norm, portable = ReinhardNormalizer().fit(target), np.load(tmp_path / "out.npz")
    assert np.array_equal(norm.transform(p), portable["p"])
    assert np.array_equal(norm.transform(odd), portable["odd"])


def test_to_tensor_is_bit_identical(patches, rng):
    p, _ = patches
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert np.array_equal(to_tensor(p, mean, std), _oracle.to_tensor(p, mean, std))
    odd = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    assert np.array_equal(to_tensor(odd, mean, std, threads=1), _oracle.to_tensor(odd, mean, std))
    assert to_tensor(np.zeros((0, 4, 4, 3), np.uint8)).shape == (0, 3, 4, 4)


def test_bad_input():
    with pytest.raises(BleepError, match="uint8"):
        to_tensor(np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(BleepError, match="shape"):
        to_tensor(np.zeros((1, 4, 4, 4), np.uint8))
    with pytest.raises(BleepError, match="std"):
        to_tensor(np.zeros((1, 4, 4, 3), np.uint8), std=(1, 0, 1))
