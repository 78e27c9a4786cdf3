"""Training: the losses against their formulas, a real training step, retrieval after a few epochs,
export / load, two-process DDP on the CPU, building a reference, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bleep_rs  # noqa: E402
from bleep_rs import BleepError  # noqa: E402
from bleep_rs.expression import choose_panel, highly_variable_genes, normalize_log1p, panel_expression  # noqa: E402
from bleep_rs.inputs import InputSpec  # noqa: E402
from bleep_rs.model import BleepModel, ModelConfig, load_model, save_model  # noqa: E402
from bleep_rs.training import TrainConfig, prepare_data, train  # noqa: E402
from bleep_rs.training.loss import bleep_loss, clip_loss  # noqa: E402

from conftest import DATA  # noqa: E402

TINY = [str(DATA / "tiny" / "C2"), str(DATA / "tiny" / "C3")]


def np_log_softmax(a):
    a = a - a.max(1, keepdims=True)
    return a - np.log(np.exp(a).sum(1, keepdims=True))


def np_softmax(a):
    return np.exp(np_log_softmax(a))


def test_losses_match_their_formulas(rng):
    for b, d, tau in [(8, 16, 1.0), (33, 5, 0.5), (2, 3, 2.0)]:
        v, x = rng.standard_normal((b, d)), rng.standard_normal((b, d))
        logits = x @ v.T / tau
        t = np_softmax((v @ v.T + x @ x.T) / 2 / tau)
        spot = -(t * np_log_softmax(logits)).sum(1)
        image = -(t.T * np_log_softmax(logits.T)).sum(1)
        want = ((spot + image) / 2).mean()
        got = bleep_loss(torch.tensor(v), torch.tensor(x), tau).item()
        assert got == pytest.approx(want, rel=1e-10)
        scale = np.log(1 / 0.07)
        vn, xn = v / np.linalg.norm(v, axis=1, keepdims=True), x / np.linalg.norm(x, axis=1, keepdims=True)
        lg = np.exp(scale) * xn @ vn.T
        ce = lambda m: -np.mean(np.diag(np_log_softmax(m)))  # noqa: E731
        got = clip_loss(torch.tensor(v), torch.tensor(x), torch.tensor(scale)).item()
        assert got == pytest.approx((ce(lg) + ce(lg.T)) / 2, rel=1e-10)


def test_targets_are_not_detached():
    v = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(4, 3)
    bleep_loss(v, x).backward()
    # The gradient includes the path through the soft targets (V V^T): compare with detached targets.
    g_full = v.grad.clone()
    v2 = v.detach().clone().requires_grad_(True)
    logits = x @ v2.T
    t = torch.softmax((v2 @ v2.T + x @ x.T) / 2, -1).detach()
    loss = ((-(t * torch.log_softmax(logits, -1)).sum(1) - (t.T * torch.log_softmax(logits.T, -1)).sum(1)) / 2).mean()
    loss.backward()
    assert not torch.allclose(g_full, v2.grad)


def test_hvg_and_normalisation_match_scanpy():
    sc = pytest.importorskip("scanpy")
    a = bleep_rs.read_section(DATA / "mob" / "MOB1")
    b = a.copy()
    sc.pp.normalize_total(b, target_sum=float(np.median(np.asarray(b.X.sum(1)).ravel())))
    sc.pp.log1p(b)
    ours = normalize_log1p(a.X)
    assert bleep_rs.expression.normalise_log1p is normalize_log1p  # the older spelling, an alias
    assert np.abs(ours - b.X.toarray()).max() < 1e-5
    sc.pp.highly_variable_genes(b, n_top_genes=150, flavor="seurat")
    assert np.array_equal(highly_variable_genes(ours, 150), b.var["highly_variable"].to_numpy())


@pytest.fixture(scope="module")
def tiny():
    return [bleep_rs.read_section(p) for p in TINY]


def test_panel_union_intersection_and_missing_genes(tiny):
    u = choose_panel(tiny, n_top_genes=20)
    i = choose_panel(tiny, n_top_genes=20, mode="intersection")
    assert set(i.genes) <= set(u.genes) and len(u.genes) >= 20
    panel = bleep_rs.Panel(genes=list(u.genes[:5]) + ["NOT_A_GENE"])
    with pytest.warns(UserWarning, match="1 of the panel's 6 genes are missing"):
        x = panel_expression(tiny[0], panel)
    assert (x[:, -1] == 0).all()
    with pytest.raises(BleepError, match="none of the panel"):
        panel_expression(tiny[0], bleep_rs.Panel(genes=["ENSG0001", "ENSG0002"]))


def test_fine_tuning_inputs_are_random_views_with_colour_jitter(tiny):
    """freeze_backbone=False: a training batch is random dihedral views of the patches, with brightness /
    contrast jitter when color_jitter > 0 (the same views drawn: the generator is seeded alike); evaluation
    sees the patches as they are."""
    from bleep_rs.training.loop import _Trainer

    spec = InputSpec(patch_size=32, fields_of_view=(1.0,), tta=False)
    cfg = TrainConfig(n_top_genes=16, progress=False, freeze_backbone=False, color_jitter=0.3, input=spec)
    data = prepare_data(tiny, cfg)
    model = BleepModel(ModelConfig(panel=data.panel, input=spec))
    idx = np.arange(6)
    plain = model.prepare_images(data.images[idx])
    views = _Trainer(model, data, TrainConfig(**{**vars(cfg), "color_jitter": 0.0}), torch.device("cpu"), 0, 1).inputs(idx, True)
    jittered = _Trainer(model, data, cfg, torch.device("cpu"), 0, 1).inputs(idx, True)
    assert views.shape == jittered.shape == plain.shape and not torch.equal(views, plain) and not torch.equal(jittered, views)
    assert torch.equal(_Trainer(model, data, cfg, torch.device("cpu"), 0, 1).inputs(idx, False), plain)
    with pytest.raises(BleepError, match="color_jitter must be a finite number >= 0 and <= 1, got 2"):
        TrainConfig(color_jitter=2.0)


def _stain_jitter_oracle(patch, scale, shift):
    """Pixel by pixel, in float64: optical density, into H, E and DAB, scaled and shifted, back to RGB."""
    from bleep_rs.augment import RGB_FROM_HED

    out = np.empty_like(patch)
    for idx in np.ndindex(patch.shape[:-1]):
        od = -np.log(np.maximum(patch[idx].astype(np.float64), 1) / 255)
        hed = od @ np.linalg.inv(RGB_FROM_HED) * scale + shift
        out[idx] = np.clip(np.round(255 * np.exp(-(hed @ RGB_FROM_HED))), 0, 255)
    return out


def test_stain_jitter_matches_the_colour_deconvolution_formula(rng):
    """stain_jitter against the formula pixel by pixel (the draws replayed from the same seed: scales, then
    shifts, one per stain and patch, shared by its fields of view), its matrix against scikit-image's
    where installed; amplitude 0 is the identity; bad patches are refused."""
    from bleep_rs.augment import HED_FROM_RGB, SHIFT_PER_SCALE, stain_jitter

    patches = rng.integers(0, 256, (3, 2, 5, 5, 3), dtype=np.uint8)
    patches[0, 1] = patches[0, 0]  # two fields of one spot, the same pixels: jittered alike
    patches[1, 0, 0, 0] = (255, 255, 255)
    patches[1, 0, 0, 1] = (0, 0, 0)
    got = stain_jitter(patches, 0.3, np.random.default_rng(7))
    draws = np.random.default_rng(7)
    scale, shift = draws.uniform(0.7, 1.3, (3, 3)), draws.uniform(-0.3, 0.3, (3, 3)) * SHIFT_PER_SCALE
    for i in range(3):
        assert np.abs(got[i].astype(int) - _stain_jitter_oracle(patches[i], scale[i], shift[i])).max() <= 1
    assert np.array_equal(got[0, 0], got[0, 1]) and not np.array_equal(got, patches)
    assert np.array_equal(stain_jitter(patches, 0.3, np.random.default_rng(7)), got)
    assert np.array_equal(stain_jitter(patches, 0.0, np.random.default_rng(7)), patches)
    assert stain_jitter(patches[:0], 0.3, np.random.default_rng(7)).shape == (0, 2, 5, 5, 3)
    try:
        from skimage.color import hed_from_rgb
    except ImportError:
        pass
    else:
        assert np.allclose(HED_FROM_RGB, hed_from_rgb)
    for bad in (patches.astype(np.float32), patches[..., :2], patches[0, 0, 0]):
        with pytest.raises(ValueError, match="patches must be uint8"):
            stain_jitter(bad, 0.3, np.random.default_rng(0))


def test_frozen_training_reads_a_stain_jittered_copy(tiny, tmp_path):
    """stain_jitter > 0 with a frozen backbone: training reads each section's cached views, then as many
    of a stain-jittered copy (its own cache entry, reproducible); the plain entry is the one without
    jitter; fine-tuning draws new jitter every step."""
    from bleep_rs.augment import stain_jitter
    from bleep_rs.training.features import feature_keys, section_features, training_features
    from bleep_rs.training.loop import _Trainer

    spec = InputSpec(patch_size=32, fields_of_view=(1.0,), tta=False)
    cfg = TrainConfig(n_top_genes=16, progress=False, stain_jitter=0.3, cache_dir=str(tmp_path), input=spec)
    model = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["g"]), input=spec)).eval()
    section = tiny[0]
    both = training_features(model, section, cfg, None)
    plain = section_features(model, section, TrainConfig(**{**vars(cfg), "stain_jitter": 0.0}), None)
    assert both.shape == (16, section.n_obs, model.feature_dim)
    assert np.array_equal(both[:8], plain) and not np.allclose(both[8:], plain, atol=1e-3)
    keys = feature_keys(model, section, cfg, None)
    assert len(set(keys)) == 2 and all(len(list(tmp_path.glob(f"features/{k}-*.npy"))) == 1 for k in keys)
    assert np.array_equal(training_features(model, section, cfg, None), both)  # from the cache
    data = prepare_data(tiny, cfg, model=model)
    assert data.images.shape[0] == 16
    tuned = TrainConfig(**{**vars(cfg), "freeze_backbone": False, "augment": False})
    raw = prepare_data(tiny, tuned)
    idx = np.arange(6)
    trainer = _Trainer(model, raw, tuned, torch.device("cpu"), 0, 1)
    first, second = trainer.inputs(idx, True), trainer.inputs(idx, True)
    assert not torch.equal(first, second) and torch.equal(trainer.inputs(idx, False), model.prepare_images(raw.images[idx]))
    # the live jitter is the cached copy's, on the normalised batch (to the cached copy's uint8 rounding)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(tuned.seed)))
    want = model.prepare_images(stain_jitter(raw.images[idx], 0.3, np.random.default_rng(seed)))
    assert (first - want).abs().max() < 0.6 / 255 / min(model.spec.std)


def test_a_copy_of_the_data_elsewhere_finds_the_same_features(tiny, tmp_path):
    """The feature cache's key and the jittered copy's draw follow what the features depend on, the
    image's contents included, not where the image lies or when it was written: the same section copied
    to another folder (another checkout, a data folder provisioned anew) finds the same cache entry and
    draws the same jitter, so it trains the same heads; an image changed by one byte is another entry."""
    import os
    import shutil

    from bleep_rs.training.features import feature_cache_key, jitter_seed, section_features

    spec = InputSpec(patch_size=32, fields_of_view=(1.0,), tta=False)
    cfg = TrainConfig(n_top_genes=16, progress=False, stain_jitter=0.3, cache_dir="none", input=spec)
    model = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["g"]), input=spec)).eval()
    copy = tmp_path / "C2"
    shutil.copytree(DATA / "tiny" / "C2", copy)
    for f in copy.iterdir():
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    moved = bleep_rs.read_section(copy)
    assert feature_cache_key(model, moved, cfg, None, 8, 0.3) == feature_cache_key(model, tiny[0], cfg, None, 8, 0.3)
    assert feature_cache_key(model, moved, cfg, None, 8, 0.0) == feature_cache_key(model, tiny[0], cfg, None, 8, 0.0)
    assert jitter_seed(model, moved, cfg, None, 8, 0.3) == jitter_seed(model, tiny[0], cfg, None, 8, 0.3)
    assert jitter_seed(model, tiny[0], cfg, None, 8, 0.3) != jitter_seed(model, tiny[1], cfg, None, 8, 0.3)
    np.testing.assert_array_equal(section_features(model, moved, cfg, None, stain_jitter=0.3),
                                  section_features(model, tiny[0], cfg, None, stain_jitter=0.3))
    image = copy / "image.jpg"
    data = bytearray(image.read_bytes())
    data[-3] ^= 0xFF  # a byte of the JPEG's last scan: the same size, another image
    image.write_bytes(bytes(data))
    changed = bleep_rs.read_section(copy)
    assert feature_cache_key(model, changed, cfg, None, 8, 0.0) != feature_cache_key(model, tiny[0], cfg, None, 8, 0.0)


def test_a_training_step_lowers_the_loss(tiny):
    """The full model (backbone fine-tuned): with the backbone's stochastic depth and the heads' dropout
    off, every forward pass is deterministic, and the loss on a fixed batch falls after a few AdamW steps."""
    torch.manual_seed(0)
    cfg = TrainConfig(n_top_genes=32, progress=False, input=InputSpec(patch_size=112, fields_of_view=(1.0,)))
    data = prepare_data(tiny, cfg)
    model = BleepModel(ModelConfig(panel=data.panel, dropout=0.0, input=InputSpec(patch_size=112, fields_of_view=(1.0,), tta=False)))
    assert data.images.shape[1:] == (1, 112, 112, 3) and data.images.dtype == np.uint8
    net = model.backbone.net
    net._global_params = net._global_params._replace(drop_connect_rate=0.0)
    idx = np.arange(8)
    x = model.prepare_images(data.images[idx])
    e = torch.from_numpy(data.expression[idx])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)

    def loss(train):
        model.train(train)
        v, z = model(x, e)
        return bleep_loss(v, z)

    with torch.no_grad():
        before = loss(True).item()
    for _ in range(8):
        opt.zero_grad()
        loss(True).backward()
        opt.step()
    with torch.no_grad():
        after = loss(True).item()
    assert after < 0.95 * before


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("models") / "tiny"
    # 32 of the 64 genes of the tiny sections: the reference's "all" genes then reach beyond the panel.
    cfg = TrainConfig(epochs=40, batch_size=49, n_top_genes=32, freeze_backbone=True, val_fraction=0.0,
                      patience=100, progress=False, input=InputSpec(patch_size=160, fields_of_view=(1.0, 2.0)))
    model = train(tiny, out, cfg)
    return out, model


def test_training_raises_retrieval_far_above_chance(trained, tiny):
    out, model = trained
    from bleep_rs.sections import section_patches

    patches = np.concatenate([section_patches(s, 160, fields=model.config.input.fields_of_view) for s in tiny])
    assert patches.shape[1:] == (2, 160, 160, 3)
    v = model.embed_images(patches)
    x = np.concatenate([model.embed_expression(s) for s in tiny])
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    top1 = (np.argmax(v @ x.T, axis=1) == np.arange(len(v))).mean()
    chance = 1 / len(v)
    assert top1 > 10 * chance, top1
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_export_load_gives_identical_embeddings(trained, tiny, tmp_path):
    out, model = trained
    again = load_model(out)
    from bleep_rs.sections import section_patches

    p = section_patches(tiny[0], 160, fields=model.config.input.fields_of_view)[:8]  # 8 spots x 2 fields x 8 views
    assert np.array_equal(model.embed_images(p), again.embed_images(p))
    assert np.array_equal(model.embed_expression(tiny[0]), again.embed_expression(tiny[0]))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backbone"] == "efficientnet-lite0" and cfg["panel"]["genes"] == list(model.config.panel.genes)
    assert cfg["training"]["epochs"] == 40 and cfg["package_version"] == bleep_rs.__version__
    # Saving over an existing model replaces it whole.
    save_model(again, tmp_path / "copy")
    save_model(again, tmp_path / "copy")
    assert sorted(os.listdir(tmp_path)) == ["copy"]


def test_build_reference_and_impute(trained, tiny):
    _, model = trained
    from bleep_rs.expression import detected_genes, reference_genes
    from bleep_rs.sections import section_patches

    ref = bleep_rs.build_reference(model, tiny, name="tiny")
    # Every gene non-zero in 3 spots of a section, not only the encoder's panel.
    detected = set(detected_genes(tiny[0])) | set(detected_genes(tiny[1]))
    assert ref.n_spots == 49 and set(ref.genes) == detected and ref.metadata["model"] == "tiny"
    assert set(ref.genes) - set(model.config.panel.genes), "the reference adds genes beyond the panel"
    assert ref.genes == reference_genes(tiny, "all")
    x = panel_expression(tiny[0], ref.genes, warn=False)
    assert np.allclose(ref.expression[:25], x)
    pred = ref.impute(model.embed_images(section_patches(tiny[1], 160, fields=model.config.input.fields_of_view)), k=5)
    assert pred.shape == (24, len(ref.genes)) and np.isfinite(pred).all()
    panel_ref = bleep_rs.build_reference(model, tiny, genes="panel")
    assert panel_ref.genes == list(model.config.panel.genes)
    assert np.array_equal(panel_ref.embeddings, ref.embeddings)
    few = bleep_rs.build_reference(model, tiny, genes=["ERBB2", "NOT_MEASURED"])
    assert few.genes == ["ERBB2", "NOT_MEASURED"] and (few.expression[:, 1] == 0).all()
    # A gene non-zero in only 2 spots of one section and in none of the other is not "detected" at 3.
    rare = [s.copy() for s in tiny]
    gene = ref.genes[-1]
    for s, keep in zip(rare, (2, 0)):
        col = s.var_names.get_loc(gene)
        x = s.X.toarray() if hasattr(s.X, "toarray") else np.array(s.X)
        x[keep:, col] = 0
        s.X = x
    assert gene not in bleep_rs.build_reference(model, rare).genes
    assert gene in bleep_rs.build_reference(model, rare, min_spots=2).genes
    with pytest.raises(BleepError, match='"all", "panel"'):
        bleep_rs.build_reference(model, tiny, genes="everything")


def test_damaged_model_directories(trained, tmp_path):
    out, _ = trained
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BleepError, match="newer"):
        load_model(bad)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    from safetensors.torch import load_file, save_file

    state = load_file(str(bad / "model.safetensors"))
    del state["image_head.fc.weight"]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(BleepError, match="missing tensors"):
        load_model(bad)
    with pytest.raises(BleepError, match="not a bleep-rs model"):
        load_model(tmp_path)


def test_bad_training_input(trained, tiny):
    _, model = trained
    with pytest.raises(BleepError, match="on the model's gene panel"):
        model.embed_expression(np.zeros((3, 7), np.float32))
    with pytest.raises(BleepError, match="uint8"):
        model.embed_images(np.zeros((2, 3), np.float32))
    cfg = TrainConfig(n_top_genes=16, progress=False)
    with pytest.raises(BleepError, match="different shapes"):
        prepare_data(tiny, cfg, features=[np.zeros((25, 8)), np.zeros((24, 9))])
    with pytest.raises(BleepError, match="0 spots"):
        prepare_data([tiny[0][:0]], cfg, features=[np.zeros((0, 8))])
    with pytest.raises(BleepError, match="validation sections"):
        train(tiny, "/nonexistent/out", TrainConfig(n_top_genes=16, progress=False, val_sections=["nope"], backbone="features:4",
                                                    input=InputSpec(fields_of_view=(1.0,))),
              features=[np.zeros((25, 4)), np.zeros((24, 4))])


#: Run under torchrun: both variants (each its own batch, then the gathered one) in one launch, the second
#: run on the process group the first set up (a launch of two processes costs about 10 s of interpreters,
#: torch and the backbone on 2 cores).
DDP_RUNS = """
import sys
from bleep_rs.cli import main
for out, extra in ((sys.argv[1], []), (sys.argv[2], ["--gather"])):
    code = main(["train", *sys.argv[3:], "--out", out, *extra])
    if code:
        sys.exit(code)
"""


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    """torchrun with the gloo backend: two processes, each its own batch (and the gathered variant)."""
    script, outs = tmp_path / "ddp_runs.py", [tmp_path / "ddp0", tmp_path / "ddp1"]
    script.write_text(DDP_RUNS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
           str(script), *map(str, outs), *TINY, "--epochs", "2", "--batch-size", "8", "--freeze-backbone",
           "--device", "cpu", "--n-top-genes", "16", "--patch-size", "96", "--fields-of-view", "1", "--no-augment"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("(2 processes)") >= 2, res.stdout[-3000:]
    for out in outs:
        assert (out / "model.safetensors").exists() and (out / "config.json").exists()


def test_a_head_ensemble_compares_the_mean_of_its_heads_cosines(tmp_path):
    """heads=3: three pairs of heads from their own initialisations, each pair trained by its own loss on
    the same batches (the loss is their mean); retrieval compares the concatenation of each head's
    L2-normalised embedding / sqrt(3), so a cosine is the mean of the heads' cosines. Saved and loaded as
    it was, and a reference of it has 3 x 256-d embeddings."""
    from bleep_rs.training.loop import _Trainer

    sections = [bleep_rs.read_section(DATA / "tiny" / s) for s in ("C2", "C3")]
    cfg = TrainConfig(epochs=2, n_top_genes=64, batch_size=32, heads=3, progress=False, cache_dir="none",
                      input=InputSpec(patch_size=64, fields_of_view=(1.0,), tta=False))
    model = train(sections[:1], tmp_path / "m", cfg)
    assert model.config.heads == 3 and model.retrieval_dim == 3 * 256
    members = model.image_head.members
    assert len(members) == 3 and not torch.allclose(members[0].projection.weight, members[1].projection.weight)
    rng = np.random.default_rng(0)
    f = rng.standard_normal((5, model.feature_dim)).astype(np.float32)
    with torch.no_grad():
        per_head = [torch.nn.functional.normalize(m(torch.from_numpy(f)), dim=-1).numpy() for m in members]
    got = model.embed_features(f)
    np.testing.assert_allclose(got, np.concatenate(per_head, axis=1) / np.sqrt(3), atol=1e-6)
    np.testing.assert_allclose(got @ got.T, np.mean([h @ h.T for h in per_head], axis=0), atol=1e-5)
    # In training each pair embeds its own batch (split): head i the i-th of the batches end to end.
    x = torch.from_numpy(rng.standard_normal((3 * 4, model.feature_dim)).astype(np.float32))
    with torch.no_grad():
        split = model.image_head(x, split=True)
        assert split.shape == (4, 3, 256)
        for i, m in enumerate(members):
            np.testing.assert_allclose(split[:, i].numpy(), m(x[4 * i : 4 * i + 4]).numpy(), atol=1e-6)
    # The expression side the same way; the reference stores it; predictions go through.
    ref = bleep_rs.build_reference(model, sections[:1])
    assert ref.dim == 768
    np.testing.assert_allclose(np.linalg.norm(ref.embeddings, axis=1), 1.0, atol=1e-5)
    assert bleep_rs.predict_section(model, ref, sections[1], progress=False).shape[0] == sections[1].n_obs
    # The training loss is the mean of the three pairs' BLEEP losses.
    data = prepare_data(sections[:1], cfg, panel=model.config.panel, model=model)
    trainer = _Trainer(model, data, cfg, model.device, 0, 1)
    idx = np.arange(min(16, data.expression.shape[0]))
    model.eval()
    with torch.no_grad():
        v, z = model(trainer.inputs(idx, False), torch.from_numpy(data.expression[idx]), features=data.are_features)
        want = np.mean([bleep_loss(v[:, h], z[:, h], cfg.temperature).item() for h in range(3)])
        assert v.shape == (len(idx), 3, 256) and np.isclose(trainer.loss(idx, False).item(), want, rtol=1e-5)
    loaded = load_model(tmp_path / "m")
    assert loaded.config.heads == 3
    np.testing.assert_allclose(loaded.embed_features(f), got, atol=1e-6)
    with pytest.raises(BleepError, match="heads"):
        TrainConfig(heads=0)
