"""The interpreter is released during native work, and the pool survives fork."""

import multiprocessing as mp
import sys
import threading

import numpy as np
import pytest

from bleep_rs import Reference


def big_reference():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((40_000, 128)).astype(np.float32)
    return Reference.build(emb, np.ones((40_000, 1), np.float32), ["g"]), rng.standard_normal((1_500, 128))


def test_search_releases_the_interpreter():
    """While one thread is inside a long search, another thread keeps running Python code.

    A counting thread's rate is measured alone, then during one search. Were the interpreter held, the
    counter could advance during the call only for at most one switch interval (5 ms).
    """
    import time

    ref, q = big_reference()
    counter = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=count)
    t.start()
    try:
        c0, t0 = counter[0], time.perf_counter()
        time.sleep(0.1)
        rate = (counter[0] - c0) / (time.perf_counter() - t0)
        long = np.concatenate([q, q, q])  # one call of a few tenths of a second on a fast core
        c0, t0 = counter[0], time.perf_counter()
        ref.search(long, k=50, threads=1)
        c1, t1 = counter[0], time.perf_counter()
    finally:
        stop.set()
        t.join()
    duration = t1 - t0
    assert duration > 0.1, "the search was too short to tell"
    assert c1 - c0 > 0.25 * rate * duration, (c1 - c0, rate, duration)

def test_two_threads_search_at_once_and_agree():
    ref, q = big_reference()
    want = ref.search(q[:200], k=10)[0]
    results = [None, None]

    def work(i):
        results[i] = ref.search(q[:200], k=10, threads=1)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_array_equal(r, want)


def _child(conn, ref, q):
    conn.send(ref.search(q, k=5)[0])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_usable_after_fork():
    ref, q = big_reference()
    q = q[:64]
    want = ref.search(q, k=5)[0]  # the parent's pool now has worker threads
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(child, ref, q))
    p.start()
    assert parent.poll(60), "the forked child hung"
    np.testing.assert_array_equal(parent.recv(), want)
    p.join(10)
    assert p.exitcode == 0


def test_thread_count_from_the_environment():
    import os
    import subprocess

    code = "import bleep_rs; print(bleep_rs.get_num_threads())"
    run = lambda value: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], env={**os.environ, "BLEEP_RS_NUM_THREADS": value}, capture_output=True, text=True
    )
    assert run("3").stdout.strip() == "3"
    bad = run("lots")
    assert bad.returncode != 0 and "BLEEP_RS_NUM_THREADS" in bad.stderr and "positive whole number" in bad.stderr


# ------------------------------------------------------------------------ one Slide, many threads

#: A child script: a three-level tiled pyramid (LZW, 64 px tiles) read by many threads at once, each at
#: many levels, regions and scales, compared with the same reads made one after another. Run in its own
#: process under a timeout, so that a deadlock fails the test instead of hanging it.
SLIDE_THREADS = """
import sys, threading
import numpy as np, tifffile
from bleep_rs import Slide, _oracle

path, image = sys.argv[1], np.asarray(np.load(sys.argv[2]))
levels = [image, _oracle.area_downsample(image, 2), _oracle.area_downsample(image, 4)]
with tifffile.TiffWriter(path) as tif:
    for i, lv in enumerate(levels):
        tif.write(lv, tile=(64, 64), compression="lzw", subfiletype=int(i > 0), metadata=None)
slide = Slide(path, um_per_px=0.5)
assert slide.level_count == 3
rng = np.random.default_rng(0)

def jobs(seed):
    r = np.random.default_rng(seed)
    for k in range(12):
        level = k % 3
        x, y = (int(v) for v in r.integers(-40, 700, 2))
        yield ("region", (x, y), level, (int(r.integers(1, 150)), int(r.integers(1, 150))))
        centres = r.uniform(0, 740, (int(r.integers(1, 40)), 2))
        yield ("patches", centres, [0.5, 0.9, 1.3, 2.1][k % 4], 32)

def run(job):
    if job[0] == "region":
        return slide.read_region(job[1], job[2], job[3])
    return slide.spot_patches(job[1], job[3], job[2], fields=(1, 2), threads=2, batch_size=7)

want = {s: [run(j) for j in jobs(s)] for s in range(16)}
got = {}
def work(s):
    got[s] = [run(j) for j in jobs(s)]
threads = [threading.Thread(target=work, args=(s,)) for s in range(16)]
for t in threads: t.start()
for t in threads: t.join()
for s in range(16):
    assert len(got[s]) == len(want[s])
    for a, b in zip(got[s], want[s]):
        np.testing.assert_array_equal(a, b)
print("ok", sum(len(v) for v in got.values()))
"""


def test_many_threads_read_one_slide_at_many_levels_as_one_does(tmp_path, tiny_image):
    """Sixteen threads read one Slide at once (regions at each level, patches at four scales and two
    fields): each gets what the same reads give one after another, and none waits forever (the tile
    cache's lock was held across the parallel decoding: a pool thread waiting on it deadlocked)."""
    import subprocess

    np.save(tmp_path / "image.npy", tiny_image)
    out = subprocess.run([sys.executable, "-c", SLIDE_THREADS, str(tmp_path / "p.tif"), str(tmp_path / "image.npy")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok 384"), out.stdout


#: A child script: one thread reads a Slide without pause while the main thread forks 12 children, each
#: of which reads at once (a region and patches) and exits 0 when its pixels are right. A child that
#: hangs is killed after 30 s and counted.
FORK_WHILE_READING = """
import os, signal, sys, threading, time, warnings
import numpy as np
from bleep_rs import Slide

warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running: the point of the test
slide = Slide(sys.argv[1], um_per_px=0.5)
centres = np.array([[100.0, 120.0], [400.0, 333.0], [650.0, 20.0]])
want_region = slide.read_region((30, 40), 1, (90, 70))
want_patches = slide.spot_patches(centres, 48, 0.9)
stop = False
def reader():
    r = np.random.default_rng(1)
    while not stop:
        slide.read_region(tuple(int(v) for v in r.integers(0, 600, 2)), int(r.integers(0, 3)), (100, 100))
        slide.spot_patches(r.uniform(0, 700, (20, 2)), 32, float(r.uniform(0.4, 2.2)))
t = threading.Thread(target=reader, daemon=True)
t.start()
pids = []
for i in range(12):
    time.sleep(0.01 * (i % 4))
    pid = os.fork()
    if pid == 0:
        ok = np.array_equal(slide.read_region((30, 40), 1, (90, 70)), want_region) and np.array_equal(
            slide.spot_patches(centres, 48, 0.9), want_patches)
        os._exit(0 if ok else 3)
    pids.append(pid)
stop = True
deadline, status = time.time() + 30, {}
while len(status) < len(pids) and time.time() < deadline:
    for pid in pids:
        if pid not in status:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status[pid] = os.waitstatus_to_exitcode(code)
    time.sleep(0.05)
hung = [p for p in pids if p not in status]
for p in hung:
    os.kill(p, signal.SIGKILL)
    os.waitpid(p, 0)
print("hung", len(hung), "bad", sum(c != 0 for c in status.values()))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_children_forked_while_a_thread_reads_a_slide_read_fine(tmp_path, tiny_image):
    import subprocess

    import tifffile

    from bleep_rs import _oracle

    path = tmp_path / "p.tif"
    with tifffile.TiffWriter(path) as tif:
        for i, lv in enumerate([tiny_image, _oracle.area_downsample(tiny_image, 2), _oracle.area_downsample(tiny_image, 4)]):
            tif.write(lv, tile=(64, 64), compression="zlib", subfiletype=int(i > 0), metadata=None)
    out = subprocess.run([sys.executable, "-c", FORK_WHILE_READING, str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hung 0 bad 0", out.stdout
