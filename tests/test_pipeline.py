"""The prediction pipeline (reading in a background thread ahead of the encoder, several slides through
one pipeline): the same answer as a plain sequential loop, errors surfacing as they were raised, and no
thread left behind. On ../shared/data/tiny with a model trained here (two fields of view)."""

import shutil
import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch")

import bleep_rs
from bleep_rs import BleepError
from bleep_rs.encode import get_encoder
from bleep_rs.inputs import InputSpec
from bleep_rs.predict import embed_batches, predict_section, predict_slide, predict_slides, read_prediction, slide_grid
from bleep_rs.sections import section_patches

from conftest import DATA

UM = 1.3873  # the tiny images' um/px
STAGES_SLIDE = {"tissue", "engine", "read", "encode", "wait", "impute", "total"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from bleep_rs.training import TrainConfig, train

    sections = [bleep_rs.read_section(DATA / "tiny" / s) for s in ("C2", "C3")]
    cfg = TrainConfig(epochs=2, n_top_genes=64, batch_size=32, val_fraction=0.0,
                      augment=False, progress=False, input=InputSpec(patch_size=128, fields_of_view=(1.0, 2.0), tta=False))
    model = train(sections[:1], tmp_path_factory.mktemp("pipeline") / "model", cfg)
    return model, bleep_rs.build_reference(model, sections[:1]), sections[1]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    out = []
    for name in ("C2", "C3"):
        out.append(d / f"{name}.jpg")
        shutil.copyfile(DATA / "tiny" / name / "image.jpg", out[-1])
    return out


def readers_left() -> list:
    """The pipeline's threads still running."""
    return [t for t in threading.enumerate() if t.name.startswith("bleep-rs-")]


def finishes(fn, timeout: float = 300.0):
    """Runs fn in a thread; fails if it has not returned or raised within ``timeout`` s (a hang), else
    returns its result or raises its exception."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the pipeline hung"
    if "error" in box:
        raise box["error"]
    return box["value"]


def sequential(model, n, read, batch_size):
    """The plain loop the pipeline must equal: read a batch, encode it, next."""
    out = [model.embed_images(read(slice(s, min(s + batch_size, n)))) for s in range(0, n, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.config.embedding_dim), np.float32)


def section_reader(model, section):
    cfg = model.config.input
    return lambda sl: section_patches(section[sl], cfg.patch_size, cfg.um_per_px, fields=cfg.fields_of_view)


def sequential_slide(model, ref, path, batch_size, k):
    slide = bleep_rs.Slide(path, um_per_px=UM)
    cfg = model.config.input
    grid = slide_grid(slide, cfg.patch_size, cfg.um_per_px, min_tissue=0.05, mask=slide.tissue_mask())
    read = lambda sl: slide.spot_patches(grid.centres[sl], cfg.patch_size, cfg.um_per_px, fields=cfg.fields_of_view)  # noqa: E731
    emb = sequential(model, len(grid.centres), read, batch_size)
    return grid, ref.impute(emb, k=k, method=model.config.method, return_neighbours=True)


@pytest.mark.parametrize("batch_size, depth", [(1, 1), (7, 2), (24, 1), (64, 2)])
def test_pipelined_embeddings_equal_a_sequential_loop(trained, batch_size, depth):
    model, _, section = trained
    read = section_reader(model, section)
    assert section.n_obs == 24  # batches of 7 end on a partial one; 24 is one whole batch; 64 more than all
    emb, seconds = embed_batches(model, section.n_obs, read, batch_size=batch_size, queue_depth=depth, progress=False)
    assert np.array_equal(emb, sequential(model, section.n_obs, read, batch_size))
    assert set(seconds) == {"open", "engine", "read", "encode", "wait"} and min(seconds.values()) >= 0
    assert readers_left() == []


def test_predict_section_equals_a_sequential_loop(trained):
    model, ref, section = trained
    pred = predict_section(model, ref, section, k=5, neighbours=True, batch_size=5, progress=False)
    emb = sequential(model, section.n_obs, section_reader(model, section), 5)
    want, idx, sims = ref.impute(emb, k=5, method=model.config.method, return_neighbours=True)
    assert np.array_equal(pred.X, want) and np.array_equal(pred.obsm["bleep_neighbours"], idx)
    assert np.array_equal(pred.obsm["bleep_similarities"], sims)
    assert np.allclose(pred.obs["uncertainty"], ref.expression[idx].std(axis=1).mean(axis=1), rtol=1e-6, atol=0)
    seconds = pred.uns["bleep"]["seconds"]
    assert set(seconds) == {"open", "engine", "read", "encode", "wait", "impute", "total"} and seconds["total"] >= seconds["encode"] > 0
    assert readers_left() == []


def test_several_slides_through_one_pipeline_equal_a_sequential_loop(trained, slides):
    from bleep_rs.encode import get_encoder

    model, ref, _ = trained
    engine = get_encoder(model.backbone, model.spec)
    preds = list(predict_slides(model, ref, slides, um_per_px=UM, k=5, min_tissue=0.05, batch_size=4, queue_depth=1, neighbours=True, progress=False))
    assert [p.uns["bleep"]["library_id"] for p in preds] == ["C2", "C3"]
    for path, pred in zip(slides, preds):
        grid, (want, idx, sims) = sequential_slide(model, ref, path, 4, 5)
        assert pred.n_obs == len(grid.centres) > 4 and list(pred.obs_names) == grid.ids
        assert np.array_equal(pred.X, want) and np.array_equal(pred.obsm["bleep_neighbours"], idx)
        assert np.array_equal(pred.obsm["bleep_similarities"], sims)
        assert set(pred.uns["bleep"]["seconds"]) == STAGES_SLIDE
        # One slide on its own (its own pipeline, another batch size) predicts the same tiles alike.
        alone = predict_slide(model, ref, path, um_per_px=UM, k=5, min_tissue=0.05, progress=False)
        assert list(alone.obs_names) == grid.ids and np.allclose(alone.X, want, atol=1e-5)
    # One encoder engine for all of them: the one built before is the one kept.
    assert get_encoder(model.backbone, model.spec) is engine
    assert readers_left() == []


def test_empty_inputs(trained, tmp_path):
    model, ref, section = trained
    calls = []
    emb, seconds = embed_batches(model, 0, lambda sl: calls.append(sl), progress=False)
    assert emb.shape == (0, model.config.embedding_dim) and calls == [] and seconds["read"] == 0
    pred = predict_section(model, ref, section[:0], k=5, progress=False)
    assert pred.n_obs == 0 and pred.n_vars == len(ref.genes)
    blank = tmp_path / "blank.png"
    from PIL import Image

    Image.fromarray(np.full((600, 600, 3), 245, np.uint8)).save(blank)
    with pytest.raises(BleepError, match="no tissue tile found"):
        finishes(lambda: predict_slide(model, ref, blank, um_per_px=UM, progress=False))
    assert readers_left() == []


def test_a_read_error_in_the_reader_thread_is_a_bleep_error_naming_the_input(trained, slides, tmp_path):
    model, ref, section = trained
    bad = section.copy()
    bad.obsm["spatial"] = bad.obsm["spatial"].copy()
    bad.obsm["spatial"][-1] = (1e6, 1e6)  # the last spot, in the last batch, lies outside the image
    with pytest.raises(BleepError) as direct:
        section_reader(model, bad)(slice(20, 24))
    with pytest.raises(BleepError) as piped:
        finishes(lambda: predict_section(model, ref, bad, k=5, batch_size=4, progress=False))
    image = section.uns["bleep"]["image_path"]
    assert str(direct.value) in str(piped.value) and "outside" in str(piped.value) and str(image) in str(piped.value)
    assert readers_left() == []

    # Any other exception of a reader: a BleepError naming the input, the original as its cause.
    def broken(sl):
        if sl.start >= 8:
            raise OSError("disk gone")
        return section_reader(model, section)(sl)

    with pytest.raises(BleepError, match=r"^scan_7\.tif: reading failed \(OSError: disk gone\)") as err:
        finishes(lambda: embed_batches(model, section.n_obs, broken, name="scan_7.tif", batch_size=4, progress=False))
    assert isinstance(err.value.__cause__, OSError)
    assert readers_left() == []

    # A slide that cannot be opened, or whose image is cut short, after one that can: the first
    # prediction comes, then the error, naming the slide that failed.
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(slides[1].read_bytes()[:5000])
    for failing in (slides[0].with_name("missing.jpg"), cut):
        steps = predict_slides(model, ref, [slides[0], failing], um_per_px=UM, k=5, min_tissue=0.05, progress=False)
        first = finishes(lambda steps=steps: next(steps))
        assert first.n_obs > 0
        with pytest.raises(BleepError) as err:
            finishes(lambda steps=steps: next(steps))
        assert str(failing) in str(err.value)
        steps.close()
        assert readers_left() == []


class Encoder:
    """The trained model with a hook before each batch it encodes (everything else is the model's)."""

    def __init__(self, model, before):
        self.model, self.before, self.calls = model, before, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def embed_images(self, x, **kwargs):
        self.calls += 1
        self.before(self.calls)
        return self.model.embed_images(x, **kwargs)


def test_an_encoder_error_stops_the_reader(trained):
    model, _, section = trained
    reads = []
    read = section_reader(model, section)

    def counted(sl):
        reads.append(sl)
        return read(sl)

    def fail_third(call):
        if call == 3:
            raise RuntimeError("the encoder failed")

    with pytest.raises(RuntimeError, match="the encoder failed"):
        finishes(lambda: embed_batches(Encoder(model, fail_third), section.n_obs, counted, batch_size=1, queue_depth=1, progress=False))
    assert readers_left() == []
    # It stopped reading: at most the queue (1) and one batch in hand beyond the three taken.
    assert 3 <= len(reads) <= 5 < section.n_obs


def test_the_reader_runs_ahead_by_the_queue_depth_and_no_further(trained):
    model, _, section = trained
    reads = []
    read = section_reader(model, section)
    seen = {}

    def counted(sl):
        reads.append(sl)
        return read(sl)

    def hold_first(call):
        if call != 1:
            return
        # Batch 1 is in hand: the reader fills the queue (2) and reads one more, which waits to go in.
        deadline = time.monotonic() + 120
        while len(reads) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        seen["reads"] = len(reads)

    emb, _ = embed_batches(Encoder(model, hold_first), section.n_obs, counted, batch_size=2, queue_depth=2, progress=False)
    assert seen["reads"] == 4 and len(reads) == 12
    assert np.array_equal(emb, sequential(model, section.n_obs, read, 2))
    assert readers_left() == []


def test_command_line_pipeline_options(trained, tmp_path):
    from bleep_rs.cli import main
    from bleep_rs.model import save_model

    model, ref, _ = trained
    save_model(model, tmp_path / "model")
    ref.save(tmp_path / "ref.safetensors")
    args = ["predict", "--model", str(tmp_path / "model"), "--reference", str(tmp_path / "ref.safetensors"), "--slide",
            str(DATA / "tiny" / "C3" / "image.jpg"), "--um-per-px", str(UM), "--min-tissue", "0.05", "--k", "5"]
    assert main([*args, "--out", str(tmp_path / "x.h5ad"), "--queue-depth", "0"]) == 2
    assert main([*args, "--out", str(tmp_path / "x.h5ad"), "--batch-size", "0"]) == 2
    (tmp_path / "file").write_text("")
    assert main([*args, str(DATA / "tiny" / "C2" / "image.jpg"), "--out", str(tmp_path / "file")]) == 2  # several slides: a folder
    assert main([*args, "--out", str(tmp_path / "p.h5ad"), "--batch-size", "3", "--queue-depth", "1", "--device", "cpu"]) == 0
    got = read_prediction(tmp_path / "p.h5ad")
    want = predict_slide(model, ref, DATA / "tiny" / "C3" / "image.jpg", um_per_px=UM, k=5, min_tissue=0.05, batch_size=3, progress=False)
    assert np.array_equal(got.X, want.X) and set(got.uns["bleep"]["seconds"]) == STAGES_SLIDE
    assert readers_left() == []


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device (the GPU path is untested without one)")
def test_the_gpu_pipeline_agrees_with_the_cpu(trained, slides):
    model, ref, _ = trained
    import copy

    on_gpu = copy.deepcopy(model).to("cuda")
    a = predict_slide(model, ref, slides[0], um_per_px=UM, k=5, min_tissue=0.05, neighbours=True, progress=False)
    b = predict_slide(on_gpu, ref, slides[0], um_per_px=UM, k=5, min_tissue=0.05, neighbours=True, progress=False)
    shared = [len(set(x) & set(y)) / 5 for x, y in zip(a.obsm["bleep_neighbours"], b.obsm["bleep_neighbours"])]
    assert np.mean(shared) >= 0.9


def test_predictions_centre_the_reference_sections_by_default(trained):
    """predict_section averages the neighbours' expression with each reference section centred on the mean
    of all spots (Reference.centre), records it, and --no-centre-sections gives the plain average."""
    from bleep_rs.model import build_reference

    model, _, held = trained
    sections = [bleep_rs.read_section(DATA / "tiny" / s) for s in ("C2", "C3")]
    ref = build_reference(model, sections)
    assert len(set(ref.sections)) == 2
    emb = model.embed_images(model.config.input.section_patches(held))
    pred = predict_section(model, ref, held, k=5, progress=False)
    assert pred.uns["bleep"]["centre_sections"] is True or pred.uns["bleep"]["centre_sections"] == 1
    np.testing.assert_allclose(pred.X, ref.impute(emb, k=5, method=model.config.method, centre_sections=True), atol=1e-5)
    plain = predict_section(model, ref, held, k=5, centre_sections=False, progress=False)
    np.testing.assert_allclose(plain.X, ref.impute(emb, k=5, method=model.config.method), atol=1e-5)
    assert not plain.uns["bleep"]["centre_sections"] and not np.allclose(plain.X, pred.X, atol=1e-3)
    # One section as the reference: nothing to centre, the same answer either way.
    one = build_reference(model, sections[:1])
    np.testing.assert_array_equal(predict_section(model, one, held, k=5, progress=False).X,
                                  predict_section(model, one, held, k=5, centre_sections=False, progress=False).X)


def test_predictions_average_the_recipes_100_neighbours_by_default(trained):
    """The default recipe records k = 100 (RECIPE_K, not the retrieval API's BLEEP default of 50), and
    predict_section uses the model's k unless told otherwise."""
    from bleep_rs.model import build_reference
    from bleep_rs.reference import DEFAULT_K
    from bleep_rs.training import RECIPE_K

    model, _, held = trained
    assert (model.config.k, RECIPE_K, DEFAULT_K) == (100, 100, 50)
    ref = build_reference(model, [bleep_rs.read_section(DATA / "tiny" / s) for s in ("C2", "C3")] * 3)  # > 100 spots
    assert ref.n_spots > 100
    emb = model.embed_images(model.config.input.section_patches(held))
    pred = predict_section(model, ref, held, progress=False)
    assert pred.uns["bleep"]["k"] == 100
    np.testing.assert_allclose(pred.X, ref.impute(emb, k=100, method=model.config.method, centre_sections=True), atol=1e-5)
    fifty = ref.impute(emb, k=50, method=model.config.method, centre_sections=True)
    assert not np.allclose(pred.X, fifty, atol=1e-4)
    np.testing.assert_allclose(predict_section(model, ref, held, k=50, progress=False).X, fifty, atol=1e-5)


def test_views_per_field_go_through_sections_and_slides(trained, slides, monkeypatch, capsys):
    """A model of 3 fields with its default TTA views (2 of field 1, 4 of the wider ones) predicts a section
    and a slide with the embeddings of embed_images, records the views per field, and counts 10 backbone
    passes a tile in its estimate; --tta-views overrides it per run."""
    import bleep_rs.predict as predict
    from bleep_rs.model import BleepModel, ModelConfig, build_reference

    _, _, section = trained
    model = BleepModel(ModelConfig(panel=trained[0].config.panel, input=InputSpec(patch_size=64, um_per_px=2 * UM))).eval()
    assert model.tta_views() == (2, 4, 4)
    ref = build_reference(model, [section[:40]])
    part = section[:16]
    pred = predict_section(model, ref, part, k=5, progress=False)
    want = ref.impute(model.embed_images(model.config.input.section_patches(part)), k=5, method=model.config.method)
    np.testing.assert_allclose(pred.X, want, atol=1e-5)
    assert list(pred.uns["bleep"]["tta_views"]) == [2, 4, 4]
    assert list(predict_section(model, ref, part, k=5, tta_views=(1, 2), progress=False).uns["bleep"]["tta_views"]) == [1, 2, 2]
    monkeypatch.setattr(predict, "ESTIMATE_AFTER_S", 0.0)
    tiles = predict_slide(model, ref, slides[0], um_per_px=UM, k=5, min_tissue=0.5, batch_size=1)
    assert list(tiles.uns["bleep"]["tta_views"]) == [2, 4, 4] and tiles.n_obs > 1
    line = next(x for x in capsys.readouterr().err.splitlines() if "backbone passes" in x)
    assert "10 backbone passes each (3 fields x 2/4/4 views, the wider fields at 112 px)" in line


def test_a_long_input_is_announced_with_its_estimate(trained, monkeypatch, capsys):
    """With progress on, an input whose encoding will take longer than ESTIMATE_AFTER_S gets one line after
    its first batch: the backbone passes per spot or tile, the estimated minutes and the cheaper choice."""
    import bleep_rs.predict as predict

    model, ref, section = trained
    predict_section(model, ref, section, batch_size=8)  # short: no line
    assert "backbone passes" not in capsys.readouterr().err
    monkeypatch.setattr(predict, "ESTIMATE_AFTER_S", 0.0)
    predict_section(model, ref, section, batch_size=8, tta_views=4)
    lines = [line for line in capsys.readouterr().err.splitlines() if "backbone passes" in line]
    assert len(lines) == 1 and f"({section.n_obs:,} spots): 8 backbone passes each (2 fields x 4 views, the wider fields at 112 px)" in lines[0]
    assert "tta_views=1 would take" in lines[0]
    assert f"of encoding here ({get_encoder(model.backbone, model.spec).name})" in lines[0]  # the engine
    predict_section(model, ref, section, batch_size=8, progress=False)  # no progress bars: no line either
    assert "backbone passes" not in capsys.readouterr().err
