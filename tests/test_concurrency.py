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
