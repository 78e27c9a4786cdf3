"""Normalisation side by side, per core: bleep-rs against torchstain, staintools and NumPy, one run.

    make bench-normalize             # or: .venv/bin/python benches/bench_normalize.py [--patches N]

Inputs (../shared/docs/benchmarks.md, section 3): 224 x 224 tissue patches of HER2ST C3 at native
resolution (the tissue grid of its image), the target a tissue patch of C2. Every method runs on one
thread (torch.set_num_threads(1), cv2.setNumThreads(1), bleep-rs threads=1); rounds interleaved. Rates
are the best of --rounds in wall time and per CPU-second of the process (the machine is shared: the CPU
rate is the steadier of the two); ratios are the median of the per-round ratios.

  macenko    torchstain (torch backend) ``normalize(stains=False)`` per patch vs bleep-rs
             ``MacenkoNormalizer.transform`` on the batch; outputs compared (uint8, within 1 level).
  reinhard   staintools ``ReinhardColorNormalizer`` (OpenCV 8-bit LAB) and torchstain (torch) vs bleep-rs
             ``ReinhardNormalizer`` (torchstain's float LAB: compared with torchstain within 1 level;
             staintools quantises LAB to 8 bits, so its output differs by design: the difference is printed).
  tensor     uint8 HWC -> float32 CHW ``(v/255 - mean)/std``: NumPy fused per-channel affine into a
             preallocated buffer vs bleep-rs ``to_tensor`` (equal to 1e-6 relative).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load(n):
    from bleep_rs import Slide

    c3 = Slide(DATA / "her2st" / "C3" / "image.jpg")
    grid = c3.tile_grid(224, min_tissue=0.8)
    pick = np.linspace(0, len(grid) - 1, min(n, len(grid))).astype(int)
    c2 = Slide(DATA / "her2st" / "C2" / "image.jpg")
    target = c2.read_patches(c2.tile_grid(224, min_tissue=0.95)[10:11], 224)[0]
    return c3.read_patches(grid[pick], 224), target


def numpy_tensor(patches, out):
    """The fused NumPy version: one multiply-add per channel straight into the output buffer."""
    scale = (1.0 / (255.0 * np.asarray(STD, np.float32))).astype(np.float32)
    offset = (-np.asarray(MEAN, np.float32) / np.asarray(STD, np.float32)).astype(np.float32)
    for i, p in enumerate(patches):
        for c in range(3):
            np.multiply(p[:, :, c], scale[c], out=out[i, c], casting="unsafe")
            out[i, c] += offset[c]
    return out


def median_ratio(seconds, peer):
    """The median over rounds of the peer's time over bleep-rs's."""
    return float(np.median(np.array(seconds[peer]) / np.array(seconds["bleep-rs"])))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import cv2
    import staintools
    import torch
    import torchstain

    import bleep_rs

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    patches, target = load(args.patches)
    n = len(patches)
    chw = [torch.from_numpy(np.ascontiguousarray(p.transpose(2, 0, 1))) for p in patches]
    t_chw = torch.from_numpy(np.ascontiguousarray(target.transpose(2, 0, 1)))

    ts_mac = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ts_mac.fit(t_chw)
    ours_mac = bleep_rs.MacenkoNormalizer().fit(target)
    ts_rei = torchstain.normalizers.ReinhardNormalizer(backend="torch")
    ts_rei.fit(t_chw)
    st_rei = staintools.ReinhardColorNormalizer()
    st_rei.fit(target)
    ours_rei = bleep_rs.ReinhardNormalizer().fit(target)
    from bleep_rs.normalize import _aligned_empty

    # Both write into a preallocated, reused buffer (64-byte aligned, as to_tensor allocates its own).
    buf, buf2 = _aligned_empty((n, 3, 224, 224)), _aligned_empty((n, 3, 224, 224))

    runs = {
        "macenko": {
            "torchstain": lambda: np.stack([ts_mac.normalize(x, stains=False)[0].numpy().astype(np.uint8) for x in chw]),
            "bleep-rs": lambda: ours_mac.transform(patches, threads=1),
        },
        "reinhard": {
            "staintools": lambda: np.stack([st_rei.transform(p) for p in patches]),
            "torchstain": lambda: np.stack([ts_rei.normalize(x).numpy() for x in chw]),
            "bleep-rs": lambda: ours_rei.transform(patches, threads=1),
        },
        "tensor": {
            "numpy": lambda: numpy_tensor(patches, buf),
            "bleep-rs": lambda: bleep_rs.to_tensor(patches, MEAN, STD, out=buf2, threads=1),
        },
    }
    # Seconds per round, method and tool: wall, and CPU of the process (all its threads).
    wall = {m: {k: [] for k in peers} for m, peers in runs.items()}
    cpu = {m: {k: [] for k in peers} for m, peers in runs.items()}
    outputs = {m: {} for m in runs}
    for r in range(args.rounds):
        for method, peers in runs.items():
            for name, fn in peers.items():
                t, c = time.perf_counter(), time.process_time()
                outputs[method][name] = fn()
                wall[method][name].append(time.perf_counter() - t)
                cpu[method][name].append(time.process_time() - c)
        print(f"round {r + 1} done", flush=True)

    def diff(a, b):
        d = np.abs(a.astype(int) - b.astype(int))
        return int(d.max()), float((d > 0).mean())

    checks = {
        "macenko vs torchstain": diff(outputs["macenko"]["bleep-rs"], outputs["macenko"]["torchstain"]),
        "reinhard vs torchstain": diff(outputs["reinhard"]["bleep-rs"], outputs["reinhard"]["torchstain"]),
        "reinhard vs staintools (8-bit LAB, differs by design)": diff(outputs["reinhard"]["bleep-rs"], outputs["reinhard"]["staintools"]),
    }
    assert checks["macenko vs torchstain"][0] <= 1 and checks["reinhard vs torchstain"][0] <= 1, checks
    np.testing.assert_allclose(outputs["tensor"]["bleep-rs"], outputs["tensor"]["numpy"], rtol=1e-5, atol=1e-5)
    print(f"\n{n} patches of 224 x 224, one thread each; patches/s per core, best of {args.rounds} rounds in wall time "
          "(per CPU-second); ratio: median of the per-round ratios")
    rates, cpu_rates, ratios = {}, {}, {}
    for method in runs:
        rate = {k: n / min(v) for k, v in wall[method].items()}
        cpu_rate = {k: n / min(v) for k, v in cpu[method].items()}
        peers = [k for k in rate if k != "bleep-rs"]
        strongest = max(peers, key=lambda k: cpu_rate[k])
        rates[method], cpu_rates[method] = rate, cpu_rate
        ratios[method] = {"vs": strongest, "wall": median_ratio(wall[method], strongest),
                          "cpu": median_ratio(cpu[method], strongest)}
        line = ", ".join(f"{k} {rate[k]:,.0f} ({cpu_rate[k]:,.0f})" for k in peers)
        print(f"  {method:<9} bleep-rs {rate['bleep-rs']:>7,.0f} ({cpu_rate['bleep-rs']:,.0f})   {line}   ratio vs {strongest}: "
              f"{ratios[method]['wall']:.1f}x (per CPU-second {ratios[method]['cpu']:.1f}x)")
    for k, (mx, frac) in checks.items():
        print(f"  check {k}: max {mx} level(s), {frac:.2%} of values differ")
    out = ROOT / ".bench" / "normalize.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"patches": n, "patches_per_s_per_core": rates, "patches_per_cpu_s": cpu_rates,
                               "ratios": ratios, "checks": checks}, indent=1))
    print(f"results: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
