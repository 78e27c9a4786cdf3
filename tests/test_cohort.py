"""A cohort of slides predicted across a real Dask cluster (a LocalCluster of worker processes): the same
outputs as the single-process path, reruns that skip what is complete, a worker killed mid-slide that
loses nothing, and a failing slide named in one BleepError. On ../shared/data/tiny with a model trained
here (one field of view, no TTA: small and fast)."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("distributed")
import anndata as ad

import bleep_rs
from bleep_rs import BleepError
from bleep_rs.cli import main
from bleep_rs.cohort import cache_features, connect, predict_cohort
from bleep_rs.inputs import InputSpec
from bleep_rs.predict import output_state, predict_slide

from conftest import DATA, local_cluster

UM = 1.3873  # the tiny images' um/px
OPTIONS = dict(um_per_px=UM, k=5, min_tissue=0.05)


#: Worker processes of a real LocalCluster (a developer need not run them on every change; `make test` does).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model directory, its reference file, and four slides (the tiny C2 and C3 images, twice each)."""
    from bleep_rs.training import TrainConfig, train

    d = tmp_path_factory.mktemp("cohort")
    sections = [bleep_rs.read_section(DATA / "tiny" / "C2")]
    cfg = TrainConfig(epochs=1, n_top_genes=64, batch_size=32, val_fraction=0.0,
                      augment=False, progress=False, input=InputSpec(patch_size=128, fields_of_view=(1.0,), tta=False))
    model = train(sections, d / "model", cfg)
    bleep_rs.build_reference(model, sections).save(d / "ref.safetensors")
    slides = []
    for name in ("C2", "C3"):
        for copy in ("a", "b"):
            slides.append(d / f"{name}{copy}.jpg")
            shutil.copyfile(DATA / "tiny" / name / "image.jpg", slides[-1])
    return d / "model", d / "ref.safetensors", slides


@pytest.fixture(scope="module")
def expected(trained):
    """Each slide's prediction by the single-process path."""
    from bleep_rs.model import load_model

    model_dir, ref_path, slides = trained
    model, ref = load_model(model_dir), bleep_rs.Reference.load(ref_path)
    return {str(s): predict_slide(model, ref, s, progress=False, **OPTIONS) for s in slides}


@pytest.fixture(scope="module")
def client():
    """Two worker processes of one thread each; they inherit PYTHONPATH and so import this bleep_rs."""
    with local_cluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                       scheduler_kwargs={"dashboard_address": ":0"}) as (_, c):
        yield c


def assert_equal(outputs: dict, expected: dict) -> None:
    for slide, out in outputs.items():
        assert output_state(out) == "complete", out
        got, want = ad.read_h5ad(out), expected[str(slide)]
        assert list(got.obs_names) == list(want.obs_names) and list(got.var_names) == list(want.var_names)
        assert np.array_equal(got.X, want.X), slide
        assert np.array_equal(got.obsm["spatial"], want.obsm["spatial"])
        assert np.array_equal(got.obs["uncertainty"], want.obs["uncertainty"])


def test_import_bleep_rs_imports_no_dask():
    code = "import sys, bleep_rs, bleep_rs.cohort; print(sorted(m for m in ('dask', 'distributed', 'torch') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_command_line_with_local_workers(trained, expected, tmp_path, capsys):
    model_dir, ref_path, slides = trained
    args = ["predict", "--model", str(model_dir), "--reference", str(ref_path), "--slide", *map(str, slides), "--um-per-px", str(UM),
            "--k", "5", "--min-tissue", "0.05", "--out", str(tmp_path / "out"), "--workers", "2"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith(f"[{i}/4] ") and "tiles predicted" in line for i, line in enumerate(lines, 1))
    assert_equal({s: tmp_path / "out" / f"{s.stem}.h5ad" for s in slides}, expected)
    # Not a section, not both ways of naming a cluster.
    assert main(["predict", str(DATA / "tiny" / "C3"), *args[1:5], "--out", str(tmp_path / "s.h5ad"), "--workers", "2"]) == 2
    assert "--slide" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--scheduler", "tcp://127.0.0.1:1"])


def test_outputs_equal_the_single_process_path_and_a_rerun_skips_them(trained, expected, client, tmp_path):
    model_dir, ref_path, slides = trained
    # The workers run this bleep_rs (spawned processes inherit the test's sys.path), not another install.
    assert set(client.run(lambda: __import__("bleep_rs").__file__).values()) == {bleep_rs.__file__}
    records = []
    outputs = predict_cohort(model_dir, ref_path, slides, tmp_path, client=client, report=records.append, **OPTIONS)
    assert set(outputs) == {str(s) for s in slides}
    assert_equal(outputs, expected)
    done = [r for r in records if r["status"] == "done"]
    assert len(done) == 4 and len({r["pid"] for r in done}) == 2  # both workers took slides
    assert all(r["loads"] == {"model": 1, "reference": 1} for r in done)  # opened once per worker, not per slide
    written = {p: p.stat().st_mtime_ns for p in outputs.values()}
    records.clear()
    assert predict_cohort(model_dir, ref_path, slides, tmp_path, client=client, report=records.append, **OPTIONS) == outputs
    assert [r["status"] for r in records] == ["skipped"] * 4
    assert {p: p.stat().st_mtime_ns for p in outputs.values()} == written
    # An output without its completion mark (an older bleep-rs's) is redone, the others kept.
    import h5py

    with h5py.File(outputs[str(slides[0])], "r+") as f:
        del f["uns/bleep/complete"]
    records.clear()
    predict_cohort(model_dir, ref_path, slides, tmp_path, client=client, report=records.append, **OPTIONS)
    assert sorted(r["status"] for r in records) == ["done", "skipped", "skipped", "skipped"]
    assert_equal(outputs, expected)
    # The command line on the running scheduler: every output complete, so all skipped.
    args = ["predict", "--model", str(model_dir), "--reference", str(ref_path), "--slide", *map(str, slides), "--um-per-px", str(UM),
            "--k", "5", "--min-tissue", "0.05", "--out", str(tmp_path), "--scheduler", client.scheduler.address]
    assert main(args) == 0


def executing(dask_worker) -> list:
    return [str(ts.key) for ts in dask_worker.state.executing]


@pytest.mark.parametrize("tiles_per_task", [None, 8])
def test_a_worker_killed_mid_slide_loses_nothing(trained, expected, client, tmp_path, tiles_per_task):
    """Killed while it runs a slide (or, in blocks, a block, holding the blocks it finished)."""
    from bleep_rs.model import load_model

    model_dir, ref_path, slides = trained
    options = OPTIONS if tiles_per_task is None else {**OPTIONS, "batch_size": 8}
    if tiles_per_task is not None:
        model, ref = load_model(model_dir), bleep_rs.Reference.load(ref_path)
        expected = {str(s): predict_slide(model, ref, s, progress=False, **options) for s in slides}
    slides = slides + [s.with_name(s.stem + "x.jpg") for s in slides]  # eight slides, so that work remains after the kill
    for s in slides[4:]:
        shutil.copyfile(s.with_name(s.name.replace("x.jpg", ".jpg")), s)
    want = {**expected, **{str(s): expected[str(s).replace("x.jpg", ".jpg")] for s in slides[4:]}}
    box: dict = {}

    def run():
        try:
            box["outputs"] = predict_cohort(model_dir, ref_path, slides, tmp_path, client=client, report=box.setdefault("records", []).append,
                                            tiles_per_task=tiles_per_task, **options)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        busy = {addr: keys for addr, keys in client.run(executing).items() if keys}
        if busy:
            victim = next(iter(busy))
            killed_task = busy[victim][0]
            time.sleep(0.3)  # well inside the slide's prediction (seconds on these workers)
            pid = client.run(os.getpid, workers=[victim])[victim]
            os.kill(pid, signal.SIGKILL)
        else:
            time.sleep(0.05)
    assert victim is not None, "no slide was seen running"
    thread.join(300)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    assert_equal(box["outputs"], want)
    done = [r for r in box["records"] if r["status"] == "done"]
    assert len(done) == 8 and pid not in {r["pid"] for r in done}
    killed_slide = next(r for r in done if r["slide"].endswith(f"{killed_task.split('-')[2]}.jpg"))
    assert killed_slide["pid"] != pid  # redone by a live worker
    # Nothing half-written is left: the rewrite of the killed slide's output removed any temporary of it.
    assert sorted(os.listdir(tmp_path)) == sorted(f"{s.stem}.h5ad" for s in slides)


def test_a_failing_slide_is_one_bleep_error_naming_it(trained, expected, client, tmp_path, capsys):
    model_dir, ref_path, slides = trained
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    with pytest.raises(BleepError, match=r"^1 of 2 slides failed \(the others are written\): .*broken\.jpg") as e:
        predict_cohort(model_dir, ref_path, [slides[0], broken], out, client=client, **OPTIONS)
    assert "\n" not in str(e.value)
    assert_equal({slides[0]: out / f"{slides[0].stem}.h5ad"}, expected)  # the other slide is written
    assert not (out / "broken.h5ad").exists()
    # Through the command line: exit 2, one error line naming the slide, no traceback.
    args = ["predict", "--model", str(model_dir), "--reference", str(ref_path), "--um-per-px", str(UM), "--out", str(tmp_path / "out2"),
            "--scheduler", client.scheduler.address, "--slide"]
    assert main([*args, str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bleep-rs: error: 1 of 1 slides failed: ") and str(broken) in err
    # What is checked before any work (and before a cluster is started): the inputs exist.
    assert main([*args, str(slides[0]), str(tmp_path / "nowhere.jpg")]) == 2
    assert "1 of 2 slides do not exist" in capsys.readouterr().err
    args[4] = str(tmp_path / "missing.safetensors")
    assert main([*args, str(slides[0])]) == 2
    assert "missing.safetensors: no such reference" in capsys.readouterr().err
    with pytest.raises(BleepError, match="unknown options"):
        predict_cohort(model_dir, ref_path, slides, out, client=client, kk=5)
    with pytest.raises(BleepError, match="either scheduler="), connect():
        pass


def test_a_slide_in_blocks_of_tiles_equals_the_single_process_path(trained, client, tmp_path, capsys):
    from bleep_rs.model import load_model

    model_dir, ref_path, slides = trained
    model, ref = load_model(model_dir), bleep_rs.Reference.load(ref_path)
    options = {**OPTIONS, "batch_size": 8, "neighbours": True}
    want = {str(s): predict_slide(model, ref, s, progress=False, **options) for s in slides[::2]}
    records = []
    outputs = predict_cohort(model_dir, ref_path, slides[::2], tmp_path, client=client, tiles_per_task=5, report=records.append, **options)
    assert sorted(r["blocks"] for r in records) == [5, 5]  # 34 and 36 tiles in blocks of 8 (5 rounded up to a whole batch)
    assert_equal(outputs, want)
    for slide, out in outputs.items():
        got = ad.read_h5ad(out)
        assert np.array_equal(got.obsm["bleep_neighbours"], want[slide].obsm["bleep_neighbours"])
        assert got.uns["spatial"].keys() == want[slide].uns["spatial"].keys()
        assert set(got.uns["bleep"]["seconds"]) == set(want[slide].uns["bleep"]["seconds"])
    # The command line; a broken slide is one error naming it.
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    args = ["predict", "--model", str(model_dir), "--reference", str(ref_path), "--um-per-px", str(UM), "--out", str(tmp_path / "cli"),
            "--k", "5", "--min-tissue", "0.05", "--batch-size", "8", "--tiles-per-task", "5", "--scheduler", client.scheduler.address, "--slide"]
    assert main([*args, str(slides[1])]) == 0
    assert capsys.readouterr().out.strip().endswith("5 blocks)")
    assert main([*args, str(broken)]) == 2
    assert "1 of 1 slides failed: " in capsys.readouterr().err


def test_the_training_backbone_pass_on_the_cluster_fills_the_same_cache(client, tmp_path, capsys):
    import dataclasses
    import functools

    from bleep_rs.training import TrainConfig, train

    sections = [bleep_rs.read_section(DATA / "tiny" / s) for s in ("C2", "C3")]
    cfg = TrainConfig(epochs=1, n_top_genes=64, batch_size=32, val_fraction=0.0,
                      augment=False, progress=True, cache_dir=str(tmp_path / "cache"), input=InputSpec(patch_size=128, fields_of_view=(1.0,), tta=False))
    records: list = []
    on_cluster = train(sections, tmp_path / "m1", cfg, feature_pass=functools.partial(cache_features, client, report=records.append))
    assert len(records) == 2 and {r["section"] for r in records} == {"C2", "C3"}
    assert all(r["loads"] == 1 for r in records)  # the backbone built once per worker process
    entries = sorted((tmp_path / "cache" / "features").glob("*.npy"))
    assert len(entries) == 4  # each section's features and its stain-jittered copy's (stain_jitter=, on by default)
    # Training alone with its own cache: the same entries, bit for bit, and so the same model.
    alone = train(sections, tmp_path / "m2", dataclasses.replace(cfg, cache_dir=str(tmp_path / "local"), progress=False))
    for entry in entries:
        assert np.array_equal(np.load(entry), np.load(tmp_path / "local" / "features" / entry.name))
    a, b = on_cluster.state_dict(), alone.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    # Everything cached: no task. The command line: on the running scheduler, and on a worker started for
    # the backbone pass (a new cache): the same entries and model.
    args = ["train", str(DATA / "tiny" / "C2"), str(DATA / "tiny" / "C3"), "--out", str(tmp_path / "m3"), "--epochs", "1",
            "--n-top-genes", "64", "--patch-size", "128", "--batch-size", "32", "--val-fraction", "0", "--fields-of-view", "1",
            "--no-tta", "--no-augment", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--scheduler", client.scheduler.address]) == 0
    assert "backbone features of" not in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "features").glob("*.npy"))) == 4
    args[4], args[-1] = str(tmp_path / "m5"), str(tmp_path / "cache2")
    assert main([*args, "--workers", "1"]) == 0
    assert capsys.readouterr().out.count("backbone features of") == 2
    for entry in entries:
        assert np.array_equal(np.load(entry), np.load(tmp_path / "cache2" / "features" / entry.name))
    with pytest.raises(BleepError, match="frozen"):
        train(sections, tmp_path / "m4", dataclasses.replace(cfg, freeze_backbone=False), feature_pass=functools.partial(cache_features, client))
