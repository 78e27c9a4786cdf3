"""Tiling side by side: bleep-rs against pyvips and OpenSlide on the same slide and coordinates, one run.

    make bench-tiling                # or: .venv/bin/python benches/bench_tiling.py [--quick]

The slide (../shared/docs/benchmarks.md, section 2): a JPEG-compressed (Q 90), 256-px-tiled pyramidal
TIFF built once by pyvips from a 3 x 3 mosaic of the HER2ST sections of ../shared/data (about 27,800 x
29,700 px; --quick: 2 x 2, 18,500 x 19,800), cached in .bench/. The coordinates: every 224-px tile of
the grid the bleep-rs tissue mask keeps (at least half tissue), at native resolution, read in two orders:
``grid`` (row by row, as a tiling pipeline reads them) and ``random`` (the same patches shuffled, as a
data loader samples them: little reuse of decoded tiles between neighbouring requests).

Peers, each with 2 threads (two Python threads, each with its own handle, over halves of the list; both
libraries release the GIL while decoding):
  pyvips     ``Region.fetch`` per patch into a numpy array (its operation cache emptied before each run)
  openslide  ``read_region`` per patch, RGBA -> RGB numpy array
  bleep-rs   ``Slide.read_patches`` in batches of 256 (tiles of a batch decoded once each, in parallel)
Rounds are interleaved (each round runs every tool on every order); each tool's rate is the median
over rounds and each ratio the median of the per-round ratios, in wall time and per CPU-second of the
process (the machine is shared: the CPU rate is the steadier of the two). Patches are compared with bleep-rs's on a sample: JPEG
decoders differ by a few levels (zune-jpeg here, libjpeg-turbo in the peers); the tolerance is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SIZE, THREADS, BATCH = 224, 2, 256


def build_slide(n: int) -> Path:
    """An n x n mosaic of the HER2ST sections as a pyramidal JPEG TIFF (built once, cached)."""
    import pyvips

    out = ROOT / ".bench" / f"her2st_mosaic_{n}x{n}.tif"
    if out.exists():
        return out
    out.parent.mkdir(exist_ok=True)
    sections = [pyvips.Image.new_from_file(str(DATA / "her2st" / s / "image.jpg")) for s in ("C2", "C3", "C4", "B4")]
    w = min(s.width for s in sections)
    h = min(s.height for s in sections)
    tiles = [sections[i % 4].crop(0, 0, w, h) for i in range(n * n)]
    mosaic = pyvips.Image.arrayjoin(tiles, across=n)
    tmp = out.with_suffix(".tmp.tif")
    mosaic.tiffsave(str(tmp), tile=True, tile_width=256, tile_height=256, pyramid=True, compression="jpeg", Q=90,
                    bigtiff=True, xres=1000 / 0.688, yres=1000 / 0.688, resunit="cm")
    tmp.rename(out)
    return out


def halves(coords):
    mid = len(coords) // 2
    return [coords[:mid], coords[mid:]]


def run_bleep(path, coords):
    from bleep_rs import Slide

    slide = Slide(path)
    return slide.read_patches(coords, SIZE, batch_size=BATCH, threads=THREADS)


def run_pyvips(path, coords):
    import pyvips

    # Each run starts cold, as the other tools' do: libvips's operation cache would otherwise hand this
    # run the previous run's loader, decoded tiles included (measured: 1.3-1.7x the cold rate).
    max_ops = pyvips.cache_get_max()
    pyvips.cache_set_max(0)
    pyvips.cache_set_max(max_ops)

    def work(part):
        image = pyvips.Image.new_from_file(str(path), access="random")
        region = pyvips.Region.new(image)
        out = np.empty((len(part), SIZE, SIZE, 3), np.uint8)
        for i, (x, y) in enumerate(part):
            buf = region.fetch(int(x), int(y), SIZE, SIZE)
            out[i] = np.frombuffer(buf, np.uint8).reshape(SIZE, SIZE, 3)
        return out

    with ThreadPoolExecutor(THREADS) as pool:
        return np.concatenate(list(pool.map(work, halves(coords))))


def run_openslide(path, coords):
    import openslide

    def work(part):
        slide = openslide.OpenSlide(str(path))
        out = np.empty((len(part), SIZE, SIZE, 3), np.uint8)
        for i, (x, y) in enumerate(part):
            out[i] = np.asarray(slide.read_region((int(x), int(y)), 0, (SIZE, SIZE)))[..., :3]
        return out

    with ThreadPoolExecutor(THREADS) as pool:
        return np.concatenate(list(pool.map(work, halves(coords))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 2 x 2 mosaic (18.5k x 19.8k px) and 2 rounds")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import pyvips

    from bleep_rs import Slide

    n = 2 if args.quick else 3
    rounds = 2 if args.quick else args.rounds
    t = time.perf_counter()
    path = build_slide(n)
    slide = Slide(path)
    print(f"slide: {path.name}, {slide.dimensions[0]} x {slide.dimensions[1]} px, {slide.level_count} levels "
          f"(built/opened in {time.perf_counter() - t:.1f} s)")
    t = time.perf_counter()
    mask = slide.tissue_mask()
    t_mask = time.perf_counter() - t
    coords = slide.tile_grid(SIZE, min_tissue=0.5, mask=mask).astype(np.int64).astype(np.float64)
    print(f"tissue mask {mask.mask.shape[1]} x {mask.mask.shape[0]} in {t_mask * 1e3:.0f} ms; {len(coords)} tiles of "
          f"{SIZE} px kept ({mask.fraction:.0%} tissue); pyvips {pyvips.version(0)}.{pyvips.version(1)}, {THREADS} threads")
    peers = {"bleep-rs": run_bleep, "pyvips": run_pyvips, "openslide": run_openslide}
    orders = {"grid": coords, "random": coords[np.random.default_rng(1).permutation(len(coords))]}
    # Per round, order and tool: patches per second of wall time and per second of CPU time (all threads
    # of the process; the machine is shared, so the CPU rate is the steadier measure of the work).
    wall = {o: {name: [] for name in peers} for o in orders}
    cpu = {o: {name: [] for name in peers} for o in orders}
    results = {o: {} for o in orders}
    for r in range(rounds):
        for order, xy in orders.items():
            for name, fn in peers.items():
                results[order][name] = None  # the previous round's patches are released first, for every tool
                t, c = time.perf_counter(), time.process_time()
                results[order][name] = fn(path, xy)
                wall[order][name].append(len(xy) / (time.perf_counter() - t))
                cpu[order][name].append(len(xy) / (time.process_time() - c))
        print(f"round {r + 1}: " + "; ".join(f"{o} " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in w.items())
                                         for o, w in wall.items()), flush=True)
    rng = np.random.default_rng(0)
    sample = rng.choice(len(coords), min(200, len(coords)), replace=False)
    checks = {}
    for order in orders:
        ours = results[order]["bleep-rs"]
        for name in ("pyvips", "openslide"):
            d = np.abs(ours[sample].astype(int) - results[order][name][sample].astype(int))
            checks[f"{order}/{name}"] = {"max": int(d.max()), "frac_over_2": float((d > 2).mean())}
            assert d.max() <= 8 and (d > 2).mean() < 0.005, f"{name} patches differ from bleep-rs's: {checks[f'{order}/{name}']}"
    def median_ratio(rates, order, name):
        return float(np.median(np.array(rates[order]["bleep-rs"]) / np.array(rates[order][name])))

    rate = {o: {k: float(np.median(v)) for k, v in w.items()} for o, w in wall.items()}
    cpu_rate = {o: {k: float(np.median(v)) for k, v in w.items()} for o, w in cpu.items()}
    ratios = {f"{o}/{name}": {"wall": median_ratio(wall, o, name), "cpu": median_ratio(cpu, o, name)}
              for o in orders for name in ("pyvips", "openslide")}
    print(f"\npatches/s, median of {rounds} rounds (wall; per CPU-second); ratio = bleep-rs / peer, the median of the "
          "per-round ratios")
    for order in orders:
        print(f"  {order:<7} bleep-rs   {rate[order]['bleep-rs']:>7,.0f} ({cpu_rate[order]['bleep-rs']:,.0f})")
        for name in ("pyvips", "openslide"):
            c, q = checks[f"{order}/{name}"], ratios[f"{order}/{name}"]
            print(f"  {order:<7} {name:<10} {rate[order][name]:>7,.0f} ({cpu_rate[order][name]:,.0f})   ratio {q['wall']:.2f}x "
                  f"(per CPU-second {q['cpu']:.2f}x)   pixels: max diff {c['max']}, {c['frac_over_2']:.3%} > 2")
    out = ROOT / ".bench" / "tiling.json"
    out.write_text(json.dumps({"slide": path.name, "dimensions": slide.dimensions, "patches": len(coords),
                               "patches_per_s": rate, "patches_per_cpu_s": cpu_rate,
                               "ratios": ratios, "rounds": {"wall": wall, "cpu": cpu}, "mask_ms": t_mask * 1e3, "pixel_checks": checks}, indent=1))
    print(f"results: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
