"""Issue 20, the application classes: no command loses data (an output never replaces an input, two
writers of one output never both succeed, an interrupt leaves one line and no partial output), nothing is
silently wrong (feature cache checksums, NaN expression, a section given as a prediction, what the log
says), and every parameter has a declared range checked where the configuration is made."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
import torch

import bleep_rs
from bleep_rs import BleepError, TrainConfig, train
from bleep_rs._atomic import atomic_path, check_output, output_lock, remove_stale, temporary_name
from bleep_rs.inputs import InputSpec
from bleep_rs.model import BleepModel, ModelConfig

from conftest import DATA, cli, writable_copy

TINY = [DATA / "tiny" / "C2", DATA / "tiny" / "C3"]


@pytest.fixture(scope="module")
def tiny():
    return [bleep_rs.read_section(p) for p in TINY]


def refused(argv, message):
    """``bleep-rs ARGV`` run in this process (conftest's ``cli``): exit status 2 and ``message`` (a regex) on stderr."""
    res = cli(*argv, ok=False)
    assert res.returncode == 2 and re.search(message, res.stderr), (res.returncode, res.stderr)
    return res.stderr


def _features_config(tmp_path, **kw):
    """A seconds-long run: a features:4 backbone on random features."""
    return TrainConfig(**{"n_top_genes": 16, "progress": False, "backbone": "features:4", "input": InputSpec(fields_of_view=(1.0,)), "epochs": 2,
                          "batch_size": 8, "cache_dir": str(tmp_path / "cache"), **kw})


def _features(sections, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((s.n_obs, 4)).astype(np.float32) for s in sections]


# -- 1. data lost --------------------------------------------------------------------------------------


def test_an_output_is_never_holds_or_lies_inside_an_input(tmp_path):
    """One check for all: the same path (through a link or a hard link), a folder holding an input, a
    path inside an input folder; with or without overwrite."""
    section = tmp_path / "data" / "C2"
    section.mkdir(parents=True)
    (section / "meta.json").write_text("{}")
    (tmp_path / "link").symlink_to(section)
    (tmp_path / "sec.h5ad").write_text("")
    os.link(tmp_path / "sec.h5ad", tmp_path / "hard.h5ad")
    cases = [
        (section, section, "is an input"),
        (tmp_path / "link", section, "is an input"),
        (tmp_path / "hard.h5ad", tmp_path / "sec.h5ad", "is an input"),
        (tmp_path / "data", section, "contains .*C2, an input"),
        (tmp_path, section, "contains"),
        (section / "meta.json", section, "lies inside .*C2, an input"),
        (tmp_path / "link" / "new.json", section, "lies inside"),
        (section / "sub" / "new.png", section, "lies inside"),
    ]
    for out, source, message in cases:
        for overwrite in (False, True):
            with pytest.raises(BleepError, match=message):
                check_output(out, inputs=[source], overwrite=overwrite)
    assert check_output(tmp_path / "data" / "C3", inputs=[section, None], overwrite=True) == tmp_path / "data" / "C3"
    assert (section / "meta.json").read_text() == "{}"


def test_no_command_writes_over_its_inputs(tmp_path):
    """The commands of the issue, each with --overwrite: refused before any work, inputs untouched."""
    data = tmp_path / "data"
    data.mkdir()
    c2, c3 = writable_copy(TINY[0], data / "C2"), writable_copy(TINY[1], data / "C3")
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "sec.h5ad").write_bytes(b"section")
    (tmp_path / "pred.h5ad").write_bytes(b"prediction")
    before = {p: p.read_bytes() for p in [*data.rglob("*"), *tmp_path.glob("*.h5ad"), model / "model.safetensors"] if p.is_file()}
    runs = [
        (["train", c2, c3, "--out", c2], "is an input"),
        (["train", c2, c3, "--out", data], "contains"),
        (["reference", c2, "--model", model, "--out", model / "model.safetensors"], "lies inside"),
        (["reference", "--model", model, tmp_path / "sec.h5ad", "--out", tmp_path / "sec.h5ad"], "is an input"),
        (["evaluate", tmp_path / "pred.h5ad", c2, "--out", c2 / "meta.json"], "lies inside"),
        (["plot", tmp_path / "pred.h5ad", "--truth", c2, "--genes", "A", "--out", c2 / "image.jpg"], "lies inside"),
        (["predict", c2, "--model", model, "--reference", tmp_path / "sec.h5ad", "--out", tmp_path / "sec.h5ad"], "is an input"),
    ]
    for argv, message in runs:
        refused([*argv, "--overwrite"], message)
    assert {p: p.read_bytes() for p in before} == before


def _hold(path, seconds=60):
    """A second process holding ``path``'s output lock; returns it once it holds it."""
    code = ("import sys, time; from bleep_rs._atomic import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(float(sys.argv[2]))")
    child = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(bleep_rs.__file__).parents[1])})
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_writer_of_an_output_stops_at_once(tmp_path, tiny):
    """Two runs writing one model (or prediction) both exited 0, one silently replacing the other: the
    output is locked for the whole run, and a second writer is a clear error naming the first's pid."""
    out, pred = tmp_path / "model", tmp_path / "p.h5ad"
    children = [_hold(out), _hold(pred)]
    try:
        with pytest.raises(BleepError, match=rf"model is being written by another process \(pid {children[0].pid}\)"):
            train(tiny, out, _features_config(tmp_path), features=_features(tiny))
        refused(["train", *TINY, "--out", out], rf"is being written by another process \(pid {children[0].pid}\)")
        refused(["predict", TINY[0], "--model", tmp_path / "m", "--reference", tmp_path / "r.safetensors", "--out", pred],
                rf"p.h5ad is being written by another process \(pid {children[1].pid}\)")
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert not out.exists()
    # Once it is gone (the system releases a dead process's lock), the output is free again; the lock
    # file a killed holder left is taken over, and removed when its new holder ends; the same process
    # may hold a lock it holds.
    train(tiny, out, _features_config(tmp_path), features=_features(tiny))
    assert (tmp_path / ".p.h5ad.lock").exists()
    with output_lock(pred), output_lock(pred):
        pass
    with output_lock(tmp_path / "new" / "deeper" / "p.h5ad"):  # its folders are made, and removed if left empty
        assert (tmp_path / "new" / "deeper" / ".p.h5ad.lock").exists()
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_temporaries_are_unique_per_writer_and_cleaned_after_a_kill(tmp_path):
    names = []
    threads = [threading.Thread(target=lambda: names.extend(temporary_name("m.h5ad") for _ in range(50))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 200 and all(n.startswith(f".m.h5ad.{os.getpid()}-") and n.endswith(".tmp") for n in names)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = [tmp_path / f".m.h5ad.{dead}-7f-0a1b2c3d.tmp", tmp_path / f".m.h5ad.{dead}.tmp", tmp_path / f".m.h5ad.{dead}-7f-99.old"]
    for p in stale:
        p.write_text("")
    assert sorted(remove_stale(tmp_path / "m.h5ad")) == sorted(stale)


def test_outputs_follow_the_umask(tmp_path, tiny):
    """mkstemp and some writers make 0600: an output gets the mode a new file gets (0666 & ~umask)."""
    old = os.umask(0o002)
    try:
        with atomic_path(tmp_path / "f.json") as tmp:
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
        with atomic_path(tmp_path / "folder", suffix="") as tmp:
            os.mkdir(tmp, 0o700)
            os.close(os.open(tmp / "x", os.O_CREAT | os.O_WRONLY, 0o600))
        train(tiny, tmp_path / "model", _features_config(tmp_path), features=_features(tiny))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "f.json", tmp_path / "folder", tmp_path / "folder" / "x",
                                                         *(tmp_path / "model").iterdir(), tmp_path / "model"]}
    assert modes == {"f.json": 0o664, "folder": 0o775, "x": 0o664, "model.safetensors": 0o664, "config.json": 0o664,
                     "history.json": 0o664, "model": 0o775}


@pytest.mark.slow
def test_ctrl_c_during_train_ends_with_one_line_and_status_130(tmp_path):
    """A real ``python -m bleep_rs train`` child, interrupted during its epochs: no traceback, one line
    saying what was kept, exit status 130, and no partial output."""
    import h5py

    out, inputs = tmp_path / "model", tmp_path / "features"
    inputs.mkdir()
    files = []
    for i, path in enumerate(TINY):  # precomputed features (HEST's layout): the child starts its epochs at once
        ids = bleep_rs.read_section(path).obs_names
        with h5py.File(inputs / f"{i}.h5", "w") as f:
            f["embeddings"] = np.random.default_rng(i).standard_normal((len(ids), 8)).astype(np.float32)
            f["barcodes"] = np.array([[s.encode()] for s in ids])
        files.append(str(inputs / f"{i}.h5"))
    cmd = [sys.executable, "-m", "bleep_rs", "train", *map(str, TINY), "--features", *files, "--out", str(out), "--epochs", "100000",
           "--batch-size", "8", "--n-top-genes", "16", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--patience", "100000"]
    # Unbuffered, so that the first epoch's line arrives as it is printed; no early stop. The child's
    # SIGINT back to the default action: a suite started in the background by a shell inherits it
    # ignored, and Python then never raises KeyboardInterrupt (the run trained on, or stopped early).
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                                  "PYTHONPATH": str(Path(bleep_rs.__file__).parents[1])})
    deadline = time.time() + 300
    while time.time() < deadline:
        line = child.stdout.readline()
        if line.startswith("epoch") or not line:
            break
    assert line.startswith("epoch"), child.stderr.read()[-2000:]
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "bleep-rs: interrupted: nothing written"
    assert set(os.listdir(tmp_path)) <= {"cache", "features"}


def test_what_an_interrupt_kept_is_said(tmp_path):
    """The line names a training checkpoint kept for --resume, or the outputs already written."""
    import argparse

    from bleep_rs.cli import _interrupted, _stamp

    out = tmp_path / "model"
    args = argparse.Namespace(command="train", out=out, claimed=[(out, None)])
    assert _interrupted(args) == "interrupted: nothing written"
    (tmp_path / ".model.checkpoint").mkdir()
    assert _interrupted(args) == f"interrupted: checkpoint kept at {tmp_path / '.model.checkpoint'}, resume with the same command"
    pred = tmp_path / "a.h5ad"
    args = argparse.Namespace(command="predict", out=pred, claimed=[(pred, _stamp(pred))])
    pred.write_text("")
    assert _interrupted(args) == f"interrupted: {pred} written before the interrupt"


# -- 2. silently wrong ---------------------------------------------------------------------------------


def test_a_replaced_or_damaged_feature_cache_entry_is_recomputed(tiny, tmp_path):
    from bleep_rs.training.features import section_features

    cfg = TrainConfig(augment=False, progress=False, cache_dir=str(tmp_path), input=InputSpec(patch_size=32, fields_of_view=(1.0,)))
    model = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["ERBB2"]), input=InputSpec(fields_of_view=(1.0,), patch_size=32, tta=False))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a first computation and a hit: no warning
        want = section_features(model, tiny[0], cfg, None)
        assert np.array_equal(section_features(model, tiny[0], cfg, None), want)
    entry, = (tmp_path / "features").glob("*.npy")
    other = section_features(model, tiny[1], cfg, None)
    replacements = {
        "random features": np.random.default_rng(0).standard_normal(want.shape).astype(np.float32),
        "another section's features": np.concatenate([other, other[:, :1]], axis=1),  # same shape
        "the rows in another order": want[:, ::-1].copy(),
    }
    for what, array in replacements.items():
        np.save(entry, array, allow_pickle=False)
        with pytest.warns(UserWarning, match="do not match their checksum"):
            got = section_features(model, tiny[0], cfg, None)
        assert np.array_equal(got, want), what
        entry, = [p for p in (tmp_path / "features").glob("*.npy") if p.stem.split("-")[0] == entry.stem.split("-")[0]]
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="do not match their checksum"):
        assert np.array_equal(section_features(model, tiny[0], cfg, None), want)


def test_non_finite_expression_is_refused_naming_the_row():
    model = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["a", "b"]), backbone="features:8", input=InputSpec(fields_of_view=(1.0,), tta=False))).eval()
    x = np.ones((6, 2), np.float32)
    for row, value in ((3, np.nan), (0, np.inf), (5, -np.inf)):
        bad = x.copy()
        bad[row, 1] = value
        with pytest.raises(BleepError, match=rf"expression row {row} \(1 rows in all.*NaN or infinite"):
            model.embed_expression(bad)
    assert np.isfinite(model.embed_expression(x)).all()


def test_a_section_is_not_evaluated_or_plotted_as_a_prediction(tiny, tmp_path):
    import anndata as ad

    from bleep_rs.evaluate import evaluate_prediction
    from bleep_rs.plot import plot_genes

    section = tiny[0]
    unmarked = ad.AnnData(X=np.ones((section.n_obs, 2), np.float32), obs=section.obs[[]], uns={"bleep": {"library_id": "x"}})
    for pred in (section, unmarked, ad.AnnData(X=np.ones((2, 2), np.float32))):
        with pytest.raises(BleepError, match="not a bleep-rs prediction"):
            evaluate_prediction(pred, section)
    with pytest.raises(BleepError, match="not a bleep-rs prediction"):
        plot_genes(section, list(section.var_names[:1]), tmp_path / "f.png", truth=section)
    assert not (tmp_path / "f.png").exists()


def test_a_figure_without_the_measured_section_says_predicted_only(tiny, tmp_path):
    import anndata as ad

    from bleep_rs.plot import plot_genes

    section = tiny[0]
    pred = ad.AnnData(X=np.asarray(section.X[:, :2].todense() if hasattr(section.X, "todense") else section.X[:, :2], np.float32),
                      obs=section.obs[[]], var=section.var[[]].iloc[:2])
    pred.obsm["spatial"] = section.obsm["spatial"]
    pred.uns["bleep"] = {"library_id": "C2", "mode": "spots", "k": 5}
    import matplotlib

    matplotlib.rcParams["svg.fonttype"] = "none"  # text as text, to read the title back
    try:
        plot_genes(pred, list(pred.var_names[:1]), tmp_path / "p.svg")
        plot_genes(pred, list(pred.var_names[:1]), tmp_path / "pm.svg", truth=section)
    finally:
        matplotlib.rcParams["svg.fonttype"] = "path"
    alone, both = (tmp_path / "p.svg").read_text(), (tmp_path / "pm.svg").read_text()
    assert "C2: predicted expression" in alone and "measured" not in alone
    assert "C2: measured and predicted expression" in both


def test_the_log_says_only_what_was_measured(tiny, tmp_path, capsys):
    """Without a validation split there is no validation loss: none is printed or kept."""
    feats = _features(tiny)
    train(tiny, tmp_path / "a", _features_config(tmp_path, progress=True), features=feats)
    log = capsys.readouterr().out
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    assert "epoch   1/2  train" in log and " val " not in log and all("val_loss" not in h for h in history)
    train(tiny, tmp_path / "b", _features_config(tmp_path, progress=True, val_fraction=0.3), features=feats)
    log = capsys.readouterr().out
    history = json.loads((tmp_path / "b" / "history.json").read_text())
    assert " val " in log and all(h["val_loss"] != h["train_loss"] for h in history)


# -- 3. parameters -------------------------------------------------------------------------------------

BAD_VALUES = [
    ("lr", -0.001, "--lr", "must be a positive finite number, got -0.001"),
    ("weight_decay", -1.0, "--weight-decay", "must be a finite number >= 0, got -1"),
    ("um_per_px", 0.0, "--patch-um-per-px", "must be a positive finite number, got 0"),
    ("val_fraction", -1.0, "--val-fraction", "must be a finite number >= 0 and < 1, got -1"),
    ("val_fraction", float("nan"), "--val-fraction", "must be a finite number >= 0 and < 1, got nan"),
    ("warmup_epochs", float("nan"), "--warmup-epochs", "must be a finite number >= 0, got nan"),
    ("n_top_genes", 0, "--n-top-genes", "must be a whole number >= 1, got 0"),
    ("n_top_genes", -5, "--n-top-genes", "must be a whole number >= 1, got -5"),
    ("batch_size", 1, "--batch-size", "must be a whole number >= 2, got 1"),
    ("batch_size", -5, "--batch-size", "must be a whole number >= 2, got -5"),
    ("batch_size", 0, "--batch-size", "must be a whole number >= 2, got 0"),
    ("device", "garbage", "--device", "must be one of auto, cpu, cuda, cuda:N, mps, got 'garbage'"),
    ("temperature", float("inf"), "--temperature", "must be a positive finite number, got inf"),
    ("dropout", 1.0, "--dropout", "must be a finite number >= 0 and < 1, got 1"),
    ("epochs", 0, "--epochs", "must be a whole number >= 1, got 0"),
    ("fields_of_view", [1.0, -2.0], "--fields-of-view", "must be a finite number >= 1 and <= 64, got -2"),
    ("fields_of_view", [1.0, 1.0], "--fields-of-view", "must be distinct, got [1.0, 1.0]"),
    ("patch_size", 4, "--patch-size", "must be a whole number >= 8 and <= 4096, got 4"),
]
#: The input recipe's options: checked where the InputSpec is made (it cannot change after).
INPUT_OPTIONS = {f.name for f in dataclasses.fields(InputSpec)}


@pytest.mark.parametrize("name,value,flag,message", BAD_VALUES, ids=[f"{b[0]}={b[1]}" for b in BAD_VALUES])
def test_every_parameter_has_a_range_checked_where_the_config_is_made(name, value, flag, message, tmp_path):
    """The library names the field, the command line the flag; nothing is read or written first."""
    owner = InputSpec if name in INPUT_OPTIONS else TrainConfig
    with pytest.raises(BleepError, match=re.escape(f"{name} {message}")):
        owner(**{name: value})
    cfg = TrainConfig()
    if owner is InputSpec:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg.input, name, value)
    else:
        setattr(cfg, name, value)  # changed after construction: train checks again
        with pytest.raises(BleepError, match=re.escape(f"{name} {message}")):
            train(TINY, tmp_path / "m", cfg)
    text = " ".join(map(str, value)) if isinstance(value, list) else str(value)
    refused(["train", *TINY, "--out", tmp_path / "m", flag, *text.split()], re.escape(f"{flag} {message}"))
    assert not (tmp_path / "m").exists()


def test_types_are_checked_too():
    for kw, message in [({"epochs": 2.5}, "epochs must be a whole number, got 2.5"), ({"seed": True}, "seed must be a whole number"),
                        ({"amp": "yes"}, "amp must be true or false"), ({"input": {"tta": False}}, "input must be of type InputSpec"),
                        ({"genes": ["a", 1]}, "genes must be a string, got 1"), ({"lr": "0.1"}, "lr must be a number"),
                        ({"panel_mode": "both"}, "panel_mode must be one of union, intersection, got 'both'")]:
        with pytest.raises(BleepError, match=re.escape(message)):
            TrainConfig(**kw)
    for kw, message in [({"fields_of_view": []}, "fields_of_view must list at least one"), ({"fields_of_view": 2}, "fields_of_view must be a list"),
                        ({"tta": 1}, "tta must be true or false"), ({"stain": "reinhard"}, "stain must be one of none, macenko"),
                        ({"patch_size": 10**400}, "patch_size must be a whole number >= 8 and <= 4096, got 1000")]:  # no float overflow
        with pytest.raises(BleepError, match=re.escape(message)):
            InputSpec(**kw)
    for moved in ("fields_of_view", "patch_um_per_px", "tta"):  # the options the input recipe took over say where they went
        with pytest.raises(BleepError, match=f"{moved}: the input recipe's options are InputSpec's"):
            TrainConfig(**{moved: 1.0})
    cfg = TrainConfig(epochs=np.int64(3), lr=np.float32(0.5))
    assert type(cfg.epochs) is int and type(cfg.lr) is float  # config.json holds Python numbers


def test_devices_that_are_not_there_are_errors_listing_the_valid_ones(tmp_path):
    from bleep_rs.device import pick_device

    for name in ("garbage", "cuda:x", "meta", "cpu:0:1"):
        with pytest.raises(BleepError, match=r"auto, cpu, cuda, cuda:N, mps"):
            pick_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(BleepError, match="no CUDA device"):
            pick_device("cuda:1")
    refused(["predict", TINY[0], "--model", tmp_path / "m", "--reference", tmp_path / "r", "--out", tmp_path / "p.h5ad", "--device", "garbage"],
            "auto, cpu, cuda, cuda:N, mps")


def test_unwritable_outputs_and_caches(tmp_path, tiny):
    """Outputs: an error before any work (a probe, not os.access, which says yes to root); caches: a
    warning, and the run goes on without one."""
    from bleep_rs.encode import usable_cache
    from bleep_rs.training.features import _cache_dir

    (tmp_path / "file").write_text("")
    for out, message in [(tmp_path / "file" / "model", "is a file, not a folder"), (Path("/proc/bleep-rs-out/model"), "is not writable")]:
        with pytest.raises(BleepError, match=message):
            check_output(out)
        with pytest.raises(BleepError, match=message):
            train(tiny, out, _features_config(tmp_path), features=_features(tiny))
    for folder in (tmp_path / "file", tmp_path / "file" / "sub", Path("/proc/bleep-rs-cache")):
        with pytest.warns(UserWarning, match="cannot be used.*not cached"):
            assert usable_cache(folder, "features") is None
        with pytest.warns(UserWarning, match="cannot be used"):
            assert _cache_dir(TrainConfig(cache_dir=str(folder))) is None
    from bleep_rs.training.features import section_features

    model = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["ERBB2"]), input=InputSpec(fields_of_view=(1.0,), patch_size=32, tta=False))).eval()
    cfg = TrainConfig(augment=False, progress=False, cache_dir=str(tmp_path / "file"), input=InputSpec(patch_size=32, fields_of_view=(1.0,)))
    with pytest.warns(UserWarning, match="cannot be used"):
        assert section_features(model, tiny[0], cfg, None).shape == (1, tiny[0].n_obs, model.feature_dim)
    assert usable_cache(tmp_path / "new" / "cache", "features") == tmp_path / "new" / "cache"


def test_damaged_checkpoints_say_to_pass_fresh(tiny, tmp_path):
    from bleep_rs.training.loop import _run_identity, _save_checkpoint, _Trainer, prepare_data

    cfg = _features_config(tmp_path, epochs=3)
    feats = _features(tiny)
    model = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["ERBB2", "IGKC"]), backbone="features:4", input=InputSpec(fields_of_view=(1.0,), tta=False)))
    data = prepare_data(tiny, cfg, panel=model.config.panel, features=feats)
    ckpt = tmp_path / ".out.checkpoint"

    def saved(state_edit=None, tensors_edit=None, dim=256):
        m = BleepModel(ModelConfig(panel=model.config.panel, backbone="features:4", embedding_dim=dim, input=InputSpec(fields_of_view=(1.0,), tta=False)))
        trainer = _Trainer(m, data, cfg, torch.device("cpu"), 0, 1)
        state = {"epoch": 1, "best": 1.0, "stale": 0, "history": [], "identity": _run_identity(cfg, model.config.panel)}
        _save_checkpoint(ckpt, trainer, state)
        if state_edit:
            (ckpt / "state.json").write_text(json.dumps(state_edit(json.loads((ckpt / "state.json").read_text()))))
        if tensors_edit:
            tensors_edit(ckpt / "state.safetensors")

    cases = [
        dict(tensors_edit=lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),  # truncated
        dict(tensors_edit=lambda p: p.unlink()),
        dict(state_edit=lambda s: [s]),  # a list
        dict(state_edit=lambda s: {k: v for k, v in s.items() if k != "epoch"}),
        dict(state_edit=lambda s: {**s, "epoch": "1"}),
        dict(dim=128),  # tensors of another shape under the same identity
    ]
    for case in cases:
        saved(**case)
        with pytest.raises(BleepError, match=r"checkpoint is damaged.*pass resume=False"):
            train(tiny, tmp_path / "out", cfg, data=data)
    train(tiny, tmp_path / "out", _features_config(tmp_path, epochs=3, resume=False), data=data)
    assert not ckpt.exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_embedding_no_patches_gives_an_empty_array():
    images = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["a"]), input=InputSpec(fields_of_view=(1.0, 2.0), patch_size=32, tta=False))).eval()
    assert images.embed_images(np.zeros((0, 2, 32, 32, 3), np.uint8)).shape == (0, 256)
    feats = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["a"]), backbone="features:8", embedding_dim=16,
                                   input=InputSpec(fields_of_view=(1.0,), tta=False))).eval()
    assert feats.embed_images(np.zeros((0, 8), np.float32)).shape == (0, 16)
    with pytest.raises(BleepError, match="patches must be uint8"):
        images.embed_images(np.zeros((0, 3, 32, 32, 3), np.uint8))


@pytest.mark.parametrize("threads", [2.5, "2", [2]])
def test_a_thread_count_that_is_not_a_whole_number_is_a_bleep_error(threads):
    import numpy as np

    import bleep_rs

    ref = bleep_rs.Reference.build(np.eye(3, dtype=np.float32), np.ones((3, 2), np.float32), ["a", "b"])
    with pytest.raises(bleep_rs.BleepError, match="threads=.* must be a whole number"):
        ref.search(np.eye(3, dtype=np.float32), 2, threads=threads)
