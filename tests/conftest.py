import contextlib
import io
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def backbone_cache(tmp_path_factory):
    """Backbones exported by bleep_rs.encode (and by the commands the tests run) go to a folder of this
    test session, not the user's cache."""
    old = os.environ.get("BLEEP_RS_CACHE")
    os.environ["BLEEP_RS_CACHE"] = str(tmp_path_factory.mktemp("backbone-cache"))
    yield os.environ["BLEEP_RS_CACHE"]
    if old is None:
        del os.environ["BLEEP_RS_CACHE"]
    else:
        os.environ["BLEEP_RS_CACHE"] = old


@contextlib.contextmanager
def local_cluster(**kwargs):
    """A real ``distributed.LocalCluster`` (``kwargs``) and its client, closed afterwards. The nanny gives a
    worker process a fixed 5 s to exit before it kills it; on a loaded 2-core machine the kill's join can
    outlast that and raise a TimeoutError at teardown. The worker has been killed by then, so that is said
    as a warning, not as the test's failure."""
    import asyncio
    import warnings

    import distributed

    cluster = distributed.LocalCluster(**kwargs)
    try:
        with distributed.Client(cluster) as client:
            yield cluster, client
    finally:
        try:
            cluster.close()
        except (TimeoutError, asyncio.TimeoutError):
            warnings.warn("a LocalCluster worker was killed at teardown after outlasting the nanny's 5 s", stacklevel=1)


def run_with_kernel(kernel: str, code: str, folder) -> str:
    """Runs ``code`` (which imports bleep_rs; ``sys.argv[1]`` is ``folder``) in a child process with
    ``BLEEP_RS_KERNEL=kernel`` (read once per process, hence the child) and returns the kernel the child
    ran: the requested one, or another where this CPU lacks it."""
    import subprocess
    import sys

    env = {**os.environ, "BLEEP_RS_KERNEL": kernel}
    child = subprocess.run([sys.executable, "-c", f"{code}; print(bleep_rs.kernel_name())", str(folder)], env=env,
                           capture_output=True, text=True, check=True)
    return child.stdout.strip().splitlines()[-1]


class CliRun(NamedTuple):
    """What a command line run left: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def cli(*args, ok: bool = True) -> CliRun:
    """``bleep-rs ARGS`` run in this process, through the entry point's own ``main`` (the installed
    script and ``python -m bleep_rs`` call it and nothing else; test_package runs the real process once).
    In process it costs no interpreter and torch start-up (2-3 s a run). ``ok``: the run must succeed."""
    from bleep_rs.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors, as the process would exit
            code = e.code if isinstance(e.code, int) else 2
    res = CliRun(code, out.getvalue(), err.getvalue())
    if ok:
        assert code == 0, res.stderr[-2000:]
    return res


def refused(res: CliRun, *words: str) -> None:
    """A command line refused with exit status 2, one line of error naming each of ``words``."""
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("bleep-rs: error: ") and "Traceback" not in res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_reference(rng, n=200, d=32, g=12):
    emb = rng.standard_normal((n, d)).astype(np.float32)
    expr = rng.gamma(2.0, 1.0, size=(n, g)).astype(np.float32)
    genes = [f"G{i}" for i in range(g)]
    return emb, expr, genes


#: The real data beside the repository (../shared/data); never copied into it.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_image():
    """The tiny C2 H&E (about 750 x 750 px) as uint8 RGB, decoded by the built-in reader."""
    from bleep_rs import Slide

    s = Slide(DATA / "tiny" / "C2" / "image.jpg")
    return s.read_region((0, 0), 0, s.dimensions)


def writable_copy(src, dst):
    """A copy of a (read-only) shared folder that the test may change."""
    import os
    import shutil

    shutil.copytree(src, dst)
    for root, dirs, files in os.walk(dst):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755)
    os.chmod(dst, 0o755)
    return dst


def tiny_slides(folder):
    """The tiny sections' images as whole slides to tile: ``folder/C2.jpg`` and ``folder/C3.jpg``."""
    import shutil

    slides = [folder / f"{name}.jpg" for name in ("C2", "C3")]
    for slide in slides:
        shutil.copyfile(DATA / "tiny" / slide.stem / "image.jpg", slide)
    return slides
