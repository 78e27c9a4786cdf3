"""The search kernel is chosen by measured speed, once per CPU model and package version, and cached; an
environment request still wins. Each case is a child process: the choice is made once per process."""

import json
import os
import subprocess
import sys

import pytest

import bleep_rs

REPORT = "import bleep_rs, json; print(json.dumps(bleep_rs.kernel_info()))"


def child(cache, kernel=None, code=REPORT):
    env = {**os.environ, "BLEEP_RS_CACHE": str(cache)}
    env.pop("BLEEP_RS_KERNEL", None)
    if kernel is not None:
        env["BLEEP_RS_KERNEL"] = kernel
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def candidates():
    """The kernels the core times against each other: those of the best vector width."""
    available = bleep_rs.kernel_info()["available"]
    wide = [k for k in available if k.startswith("avx512")]
    return wide if wide else available[:1]


def test_the_fastest_candidate_is_measured_once_then_read_from_the_cache(tmp_path):
    first, _ = child(tmp_path)
    if len(candidates()) == 1:
        assert first["reason"] == "the only candidate" and first["kernel"] == candidates()[0]
        pytest.skip("this CPU has one kernel of its best width: nothing to measure")
    assert first["reason"] == "measured"
    assert set(first["rates"]) == set(candidates())
    assert first["kernel"] == max(first["rates"], key=first["rates"].get)
    cached = json.loads((tmp_path / "search-kernel.json").read_text())
    assert cached["kernel"] == first["kernel"] and first["cpu"] in cached["key"] and bleep_rs.__version__ in cached["key"]
    again, _ = child(tmp_path)
    assert (again["reason"], again["kernel"], again["rates"]) == ("measured (cached)", first["kernel"], {})


@pytest.mark.parametrize("cache", ["not json", '{"key": "another CPU | bleep-rs 0.0.1", "kernel": "avx512"}',
                                   '{"kernel": "no-such-kernel"}', "[1, 2]"])
def test_a_cache_that_does_not_apply_is_measured_again(tmp_path, cache):
    if len(candidates()) == 1:
        pytest.skip("this CPU has one kernel of its best width: nothing is measured or cached")
    (tmp_path / "search-kernel.json").write_text(cache)
    info, _ = child(tmp_path)
    assert info["reason"] == "measured" and info["kernel"] in candidates()


def test_bleep_rs_kernel_forces_a_kernel_and_a_wrong_name_is_a_warning(tmp_path):
    info, _ = child(tmp_path, "portable")
    assert (info["kernel"], info["reason"]) == ("portable", "BLEEP_RS_KERNEL")
    info, err = child(tmp_path, "PORTABLE")
    assert info["reason"] != "BLEEP_RS_KERNEL" and info["kernel"] in candidates()
    assert "BLEEP_RS_KERNEL='PORTABLE' is not a kernel this CPU runs" in err


def test_an_unwritable_cache_only_means_measuring_each_time(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    info, _ = child(blocker / "cache")
    assert info["kernel"] in candidates()
