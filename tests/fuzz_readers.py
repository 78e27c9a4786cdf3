"""Damaged copies of real sections, each read in its own process: every one must read or raise BleepError.

    .venv/bin/python tests/fuzz_readers.py [--seed 0] [--flips 6] [--only SUBSTRING]

Copies ``../shared/data/tiny/C2`` (legacy ST) and ``../shared/data/visium_v1`` (Space Ranger) into a
temporary folder and, for each file, makes the mutations of :func:`mutations`: the file removed,
truncated, its bytes flipped, and (for text, JSON, gzip and 10x h5 files) damaged the way a careless
edit or another tool would (a cell made non-numeric or NaN, a column dropped, a row repeated, a key of
the wrong type, an inconsistent sparse matrix ...). Each case runs ``bleep_rs.read_section`` in a fresh
interpreter and is counted as "read", "BleepError", "raw" (another exception: a bug), "crash" (killed by
a signal) or "timeout". Exit status 1 when any case is raw, a crash or a timeout.
:func:`mutations` is also what ``tests/test_bad_inputs.py`` runs in process.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterator, Tuple

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SECTIONS = {"legacy-st": DATA / "tiny" / "C2", "space-ranger": DATA / "visium_v1"}

Mutation = Tuple[str, str, Callable[[Path], None]]  # (section, case name, change to the copied folder)


def _bytes(rel: str, change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        f = root / rel
        f.write_bytes(change(f.read_bytes()))

    return apply


def _text(rel: str, change: Callable[[str], str]) -> Callable[[Path], None]:
    """A change to a text file (a .gz one is decompressed and compressed again)."""

    def apply(root: Path) -> None:
        f = root / rel
        raw = f.read_bytes()
        text = (gzip.decompress(raw) if rel.endswith(".gz") else raw).decode()
        out = change(text).encode()
        f.write_bytes(gzip.compress(out) if rel.endswith(".gz") else out)

    return apply


def _cell(sep: str, row: int, col: int, value: str) -> Callable[[str], str]:
    def change(text: str) -> str:
        lines = text.splitlines()
        cells = lines[row].split(sep)
        cells[col] = value
        lines[row] = sep.join(cells)
        return "\n".join(lines) + "\n"

    return change


def _drop_column(sep: str, col: int) -> Callable[[str], str]:
    return lambda text: "\n".join(sep.join(c for i, c in enumerate(line.split(sep)) if i != col) for line in text.splitlines()) + "\n"


def _short_row(sep: str, row: int) -> Callable[[str], str]:
    def change(text: str) -> str:
        lines = text.splitlines()
        lines[row] = lines[row].rsplit(sep, 1)[0]
        return "\n".join(lines) + "\n"

    return change


def _repeat_row(row: int) -> Callable[[str], str]:
    def change(text: str) -> str:
        lines = text.splitlines()
        return "\n".join(lines + [lines[row]]) + "\n"

    return change


def _json(rel: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        f = root / rel
        f.write_text(json.dumps(change(json.loads(f.read_text()))))

    return apply


def _set(key: str, value) -> Callable[[dict], dict]:
    return lambda d: {**d, key: value}


def _h5(change: Callable[[object], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        import h5py

        with h5py.File(root / "filtered_feature_bc_matrix.h5", "r+") as f:
            change(f["matrix"])

    return apply


def _h5_replace(name: str, value: Callable[[np.ndarray], np.ndarray]) -> Callable[[object], None]:
    def change(m) -> None:
        old = m[name][()]
        del m[name]
        m[name] = value(old)

    return change


def _remove(rel: str) -> Callable[[Path], None]:
    return lambda root: os.remove(root / rel)


def _flip(seed: int) -> Callable[[bytes], bytes]:
    """Flips 1 to 8 random bytes (XOR with a random non-zero value)."""

    def change(data: bytes) -> bytes:
        rng = np.random.default_rng(seed)
        buf = bytearray(data)
        for pos in rng.integers(0, len(buf), rng.integers(1, 9)):
            buf[pos] ^= int(rng.integers(1, 256))
        return bytes(buf)

    return change


def _files(section: str) -> list:
    root = SECTIONS[section]
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def mutations(seed: int = 0, flips: int = 6) -> Iterator[Mutation]:
    """Every case: generic ones for each file, then ones that fit each file's format."""
    for section in SECTIONS:
        for rel in _files(section):
            yield section, f"{rel}: removed", _remove(rel)
            for frac in (0.0, 0.1, 0.5, 0.9):
                yield section, f"{rel}: truncated to {frac:.0%}", _bytes(rel, lambda b, f=frac: b[: int(len(b) * f)])
            for i in range(flips):
                yield section, f"{rel}: bytes flipped (seed {seed + i})", _bytes(rel, _flip(seed * 1000 + i + zlib.crc32(rel.encode())))
    # Legacy ST: counts.tsv.gz (spots x genes), spots.tsv, meta.json.
    c, s, m = "counts.tsv.gz", "spots.tsv", "meta.json"
    yield "legacy-st", f"{c}: not gzip", _bytes(c, gzip.decompress)
    for value in ("abc", "nan", "-3", "1.5", "", "inf", "1e400"):
        yield "legacy-st", f"{c}: a count is {value!r}", _text(c, _cell("\t", 3, 5, value))
    yield "legacy-st", f"{c}: a spot id repeated", _text(c, _repeat_row(2))
    yield "legacy-st", f"{c}: a gene name repeated", _text(c, _cell("\t", 0, 2, "IGKC"))
    yield "legacy-st", f"{c}: a row one cell short", _text(c, _short_row("\t", 3))
    yield "legacy-st", f"{c}: only the header", _text(c, lambda t: t.splitlines()[0] + "\n")
    yield "legacy-st", f"{c}: empty text", _text(c, lambda t: "")
    for col, name in ((5, "selected"), (3, "pixel_x"), (1, "x")):
        yield "legacy-st", f"{s}: no {name} column", _text(s, _drop_column("\t", col))
    for col, value in ((5, "yes"), (3, "abc"), (3, "nan"), (1, "1.5"), (1, "abc"), (0, "")):
        yield "legacy-st", f"{s}: cell {col} of a row is {value!r}", _text(s, _cell("\t", 2, col, value))
    yield "legacy-st", f"{s}: a spot id repeated", _text(s, _repeat_row(2))
    unselect = lambda t: "\n".join([t.splitlines()[0]] + [line.rsplit("\t", 1)[0] + "\t0" for line in t.splitlines()[1:]]) + "\n"  # noqa: E731
    yield "legacy-st", f"{s}: no spot selected", _text(s, unselect)
    yield "legacy-st", f"{s}: comma-separated", _text(s, lambda t: t.replace("\t", ","))
    for key, value in (("um_per_px", "abc"), ("um_per_px", -1), ("um_per_px", None), ("um_per_px", [1, 2]), ("um_per_px", True)):
        yield "legacy-st", f"{m}: um_per_px is {value!r}", _json(m, _set(key, value))
    yield "legacy-st", f"{m}: a list, not an object", _json(m, lambda d: [d])
    yield "legacy-st", f"{m}: not JSON", _bytes(m, lambda b: b"{um_per_px: 1.4")
    # Space Ranger: the h5 matrix, the positions, the scale factors.
    p, sf = "spatial/tissue_positions_list.csv", "spatial/scalefactors_json.json"
    for col, value in ((1, "abc"), (1, "2"), (4, "abc"), (4, "nan"), (2, "1.5"), (0, "")):
        yield "space-ranger", f"{p}: cell {col} of a row is {value!r}", _text(p, _cell(",", 3, col, value))
    yield "space-ranger", f"{p}: a column dropped", _text(p, _drop_column(",", 4))
    yield "space-ranger", f"{p}: a barcode repeated", _text(p, _repeat_row(3))
    yield "space-ranger", f"{p}: semicolon-separated", _text(p, lambda t: t.replace(",", ";"))
    for key, value in (("spot_diameter_fullres", "abc"), ("spot_diameter_fullres", 0), ("spot_diameter_fullres", -5),
                       ("spot_diameter_fullres", None), ("tissue_lowres_scalef", "abc"), ("tissue_lowres_scalef", 0),
                       ("tissue_hires_scalef", [0.1]), ("tissue_lowres_scalef", 1e9)):
        yield "space-ranger", f"{sf}: {key} is {value!r}", _json(sf, _set(key, value))
    yield "space-ranger", f"{sf}: tissue_lowres_scalef missing", _json(sf, lambda d: {k: v for k, v in d.items() if k != "tissue_lowres_scalef"})
    yield "space-ranger", f"{sf}: a list, not an object", _json(sf, lambda d: [d])
    yield "space-ranger", f"{sf}: not JSON", _bytes(sf, lambda b: b[:-3])
    h5 = [
        ("indptr one short", _h5_replace("indptr", lambda a: a[:-1])),
        ("indptr decreasing", _h5_replace("indptr", lambda a: a[::-1])),
        ("indptr past the data", _h5_replace("indptr", lambda a: a + 5)),
        ("an index past the genes", _h5_replace("indices", lambda a: np.where(np.arange(len(a)) == 3, 10**6, a))),
        ("a negative index", _h5_replace("indices", lambda a: np.where(np.arange(len(a)) == 3, -1, a).astype(np.int64))),
        ("data one short", _h5_replace("data", lambda a: a[:-1])),
        ("a negative count", _h5_replace("data", lambda a: np.where(np.arange(len(a)) == 0, -4, a).astype(np.int32))),
        ("a NaN count", _h5_replace("data", lambda a: np.where(np.arange(len(a)) == 0, np.nan, a.astype(np.float32)))),
        ("data as strings", _h5_replace("data", lambda a: a.astype("S8"))),
        ("shape swapped", _h5_replace("shape", lambda a: a[::-1])),
        ("shape of three numbers", _h5_replace("shape", lambda a: np.array([a[0], a[1], 1]))),
        ("shape larger", _h5_replace("shape", lambda a: a * 2)),
        ("a barcode fewer", _h5_replace("barcodes", lambda a: a[:-1])),
        ("a barcode repeated", _h5_replace("barcodes", lambda a: np.concatenate([a[:-1], a[:1]]))),
        ("barcodes as numbers", _h5_replace("barcodes", lambda a: np.arange(len(a)))),
        ("no data", lambda m: m.__delitem__("data")),
        ("no features", lambda m: m.__delitem__("features")),
        ("a gene name fewer", lambda m: _h5_replace("name", lambda a: a[:-1])(m["features"])),
        ("gene names as numbers", lambda m: _h5_replace("name", lambda a: np.arange(len(a)))(m["features"])),
        ("feature types fewer", lambda m: _h5_replace("feature_type", lambda a: a[:-2])(m["features"])),
    ]
    for name, change in h5:
        yield "space-ranger", f"filtered_feature_bc_matrix.h5: {name}", _h5(change)


def copy_section(section: str, dst: Path) -> Path:
    """A writable copy of a shared (read-only) section."""
    shutil.copytree(SECTIONS[section], dst)
    for root, dirs, files in os.walk(dst):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755)
    return dst


RUNNER = """
import sys, warnings
warnings.simplefilter("ignore")
import bleep_rs
try:
    a = bleep_rs.read_section(sys.argv[1])
    print("read", a.n_obs, "spots")
except bleep_rs.BleepError as e:
    print("BleepError", e)
"""


def run_case(root: Path, timeout: float) -> Tuple[str, str]:
    """(outcome, detail) of reading ``root`` in a fresh interpreter."""
    try:
        res = subprocess.run([sys.executable, "-c", RUNNER, str(root)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"more than {timeout:g} s"
    if res.returncode < 0:
        return "crash", f"signal {-res.returncode}: {res.stderr[-300:]}"
    if res.returncode != 0:
        last = [line for line in res.stderr.strip().splitlines() if line.strip()]
        return "raw", last[-1] if last else f"exit {res.returncode}"
    outcome, _, detail = res.stdout.strip().partition(" ")
    return outcome, detail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flips", type=int, default=6, help="byte-flip cases per file (default 6)")
    ap.add_argument("--only", help="run the cases whose name contains this")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case, not only the bad ones")
    args = ap.parse_args()
    counts: dict = {}
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (section, name, change) in enumerate(mutations(args.seed, args.flips)):
            if args.only and args.only not in name:
                continue
            root = copy_section(section, Path(tmp) / f"case{i}")
            change(root)
            outcome, detail = run_case(root, args.timeout)
            shutil.rmtree(root)
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome in ("raw", "crash", "timeout"):
                bad += 1
            if args.verbose or outcome in ("raw", "crash", "timeout"):
                print(f"{section:13} {name}: {outcome} {detail[:200]}", flush=True)
    total = sum(counts.values())
    print(f"{total} cases: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
