"""The image encoder (bleep_rs.encode): each engine that precision="auto" may choose against float32 eager
torch on real HER2ST spots (the issue's rule, on 64 of them: benches/bench_encode.py checks all 834 spots
with k = 50), and the encoder's contract: batches, resizing, the kept engine, bad input."""

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bleep_rs  # noqa: E402
from bleep_rs import BleepError  # noqa: E402
from bleep_rs.backbones import create_backbone  # noqa: E402
from bleep_rs.encode import agreement, backbone_features, get_encoder, native_bf16, to_input  # noqa: E402
from bleep_rs.inputs import InputSpec  # noqa: E402
from bleep_rs.model import BleepModel, ModelConfig  # noqa: E402

from conftest import DATA  # noqa: E402

SECTIONS = ["C2", "C3", "C4", "B4"]
PER_SECTION = 16  # spread over each section: 64 spots, k = 10 neighbours among the other 48

try:
    import onnxruntime  # noqa: F401

    HAVE_ORT = True
except ImportError:
    HAVE_ORT = False
ENGINES = ["torch", pytest.param("onnxruntime", marks=pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed"))]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # the image head is untrained: a fixed random projection of the features
    # feature_norm "none": the head sees the backbone's features as they come, so that head(features) is
    # the embedding and each engine's features are compared through it.
    return BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=[f"g{i}" for i in range(32)]), feature_norm="none",
                                  input=InputSpec(fields_of_view=(1.0,), tta=False))).eval()


@pytest.fixture(scope="module")
def her2st():
    patches, labels = [], []
    for s in SECTIONS:
        p = bleep_rs.section_patches(bleep_rs.read_section(DATA / "her2st" / s), 224)
        patches.append(p[np.linspace(0, len(p) - 1, PER_SECTION).astype(int)])
        labels += [s] * PER_SECTION
    return np.concatenate(patches), np.array(labels)


def head(model, features):
    with torch.no_grad():
        return model.image_head(torch.from_numpy(features)).numpy()


@pytest.fixture(scope="module")
def float32(model, her2st):
    f = backbone_features(model.backbone, model.spec, her2st[0], precision="float32")
    return f, head(model, f)


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_keeps_the_float32_answer(engine, model, her2st, float32):
    patches, sections = her2st
    feats = backbone_features(model.backbone, model.spec, patches, engine=engine)
    assert feats.shape == float32[0].shape and feats.dtype == np.float32
    for ours, ref in [(feats, float32[0]), (head(model, feats), float32[1])]:
        a = agreement(ref, ours, sections, k=10)
        assert a["cosine_median"] >= 0.999 and a["overlap_mean"] >= 0.95, (engine, a)


def test_embed_images_runs_the_chosen_engine(model, her2st, float32):
    patches = her2st[0][:20]
    auto = model.embed_images(patches)
    assert np.allclose(auto, head(model, backbone_features(model.backbone, model.spec, patches)), atol=1e-5)
    assert np.allclose(model.embed_images(patches, precision="float32"), float32[1][:20], atol=1e-6)
    enc = get_encoder(model.backbone, model.spec)
    if HAVE_ORT:  # the engine measured fastest for this network on this CPU, as recorded
        assert (enc.name == "onnxruntime float32") == (recorded(model.spec)["engine"] == "onnxruntime"), enc
        assert enc.reason.startswith("measured")
    else:
        assert enc.name.startswith("torch") and enc.reason.startswith("the only engine")


def recorded(spec) -> dict:
    """The engine choice recorded for ``spec``'s network on this CPU."""
    import onnxruntime

    from bleep_rs import encode

    return json.loads((encode.cache_dir() / encode.ENGINE_CHOICES).read_text())[encode._engine_key(spec, onnxruntime.__version__)]


@pytest.fixture
def choices():
    """The session's recorded engine choices, put back as they were after the test (other tests' default
    engine follows them)."""
    from bleep_rs import encode

    path = encode.cache_dir() / encode.ENGINE_CHOICES
    before = path.read_bytes() if path.exists() else None
    yield path
    if before is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(before)


def record(spec, engine: str) -> None:
    import onnxruntime

    from bleep_rs import encode

    encode._record_choice(encode._engine_key(spec, onnxruntime.__version__), engine, {})


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed")
def test_the_default_engine_is_the_one_measured_fastest_here(model, choices, monkeypatch):
    """Measured once per network and CPU, both engines in float32, recorded, read back; a network
    recorded for torch is never exported; a close race keeps ONNX Runtime; torch failing is ONNX
    Runtime's win; an unreadable record (not JSON, not a regular file) is measured again."""
    import os

    from bleep_rs import encode

    choices.unlink(missing_ok=True)
    enc = get_encoder(copy.deepcopy(model.backbone), model.spec)
    rates = recorded(model.spec)["patches_per_s"]
    assert set(rates) == {"onnxruntime", "torch"} and min(rates.values()) > 0
    fastest = "torch" if rates["torch"] > encode.TORCH_MARGIN * rates["onnxruntime"] else "onnxruntime"
    assert recorded(model.spec)["engine"] == fastest
    assert enc.name == {"onnxruntime": "onnxruntime float32", "torch": "torch float32, channels-last"}[fastest]
    assert enc.reason.startswith("measured: ") and "patches/s" in enc.reason
    # Read back in the next build (here: another module with the same weights), not measured again.
    monkeypatch.setattr(encode, "_rates", lambda *a, **k: pytest.fail("measured again"))
    again = get_encoder(copy.deepcopy(model.backbone), model.spec)
    assert (again.name, again.reason) == (enc.name, "measured (cached)")
    # Recorded for torch: new weights of the network get no ONNX export.
    record(model.spec, "torch")
    other = copy.deepcopy(model.backbone)
    with torch.no_grad():
        other.net._conv_head.weight.mul_(1.5)
    assert get_encoder(other, model.spec).name == "torch float32, channels-last"
    assert not encode._onnx_path(other, model.spec).exists()
    # The rule, on given rates: torch must be faster by the margin. Records that cannot be read: measured again.
    for torch_rate, want in ((105.0, "onnxruntime float32"), (120.0, "torch float32, channels-last")):
        choices.write_text("{not json")
        monkeypatch.setattr(encode, "_rates", lambda encoders, spec, t=torch_rate: {"onnxruntime": 100.0, "torch": t})
        assert get_encoder(copy.deepcopy(model.backbone), model.spec).name == want
        assert recorded(model.spec)["engine"] == want.split()[0]
    choices.unlink()
    os.mkfifo(choices)  # would block a reader that opened it
    assert get_encoder(copy.deepcopy(model.backbone), model.spec).name == "torch float32, channels-last"  # measured (120 > 110)
    choices.unlink()

    def broken(encoders, spec):
        raise RuntimeError("an operator torch lacks here")

    monkeypatch.setattr(encode, "_rates", broken)
    enc = get_encoder(copy.deepcopy(model.backbone), model.spec)
    assert enc.name == "onnxruntime float32" and "torch failed when measured" in enc.reason
    assert recorded(model.spec)["engine"] == "onnxruntime"


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed")
def test_concurrent_first_uses_measure_once_and_agree(model, choices, monkeypatch):
    """Two threads (as two Dask workers sharing a cache folder would) building the engine for the first
    time: one measures while the other waits for its record, so both run the same engine."""
    import threading
    import time

    from bleep_rs import encode

    calls = []

    def rates(encoders, spec):  # each measurement would pick the other engine than the one before
        calls.append(1)
        time.sleep(0.5)
        return {"onnxruntime": 100.0, "torch": 200.0 if len(calls) % 2 else 50.0}

    choices.unlink(missing_ok=True)
    monkeypatch.setattr(encode, "_rates", rates)
    nets = [copy.deepcopy(model.backbone) for _ in range(2)]
    names = {}
    threads = [threading.Thread(target=lambda i=i: names.__setitem__(i, get_encoder(nets[i], model.spec).name)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(calls) == 1 and names[0] == names[1] == "torch float32, channels-last"


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed")
def test_threads_exporting_one_backbone_at_once_both_get_it(tmp_path):
    """torch.export is not thread-safe ("Trying to pop empty mode stack" when two threads export at once):
    exports run one at a time, and the second thread reads what the first wrote."""
    import threading

    from bleep_rs.backbones import BackboneSpec
    from bleep_rs.encode import _onnx_bytes

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))

    torch.manual_seed(0)
    net, spec = Tiny(), BackboneSpec("tiny", 4, 32, (0.5,) * 3, (0.5,) * 3)
    out, errors = {}, []

    def export(i):
        try:
            out[i] = _onnx_bytes(net, spec, tmp_path / "tiny.onnx")
        except Exception as e:  # the failure is what the test looks for
            errors.append(e)

    threads = [threading.Thread(target=export, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and out[0] == out[1] == (tmp_path / "tiny.onnx").read_bytes()


def test_float32_is_the_backbone_itself(model, her2st):
    patches = her2st[0][:6, :160, :190]  # not the input size: resized to 224
    with torch.no_grad():
        want = model.backbone.eval()(to_input(patches, model.spec)).numpy()
    assert to_input(patches, model.spec).shape == (6, 3, 224, 224)
    assert np.array_equal(backbone_features(model.backbone, model.spec, patches, precision="float32"), want)
    auto = backbone_features(model.backbone, model.spec, patches)
    assert agreement(want, auto, np.arange(6) % 2, k=2)["cosine_median"] > 0.999


@pytest.mark.parametrize("engine", ENGINES)
def test_batch_size_does_not_change_the_answer(engine, model, her2st):
    patches = her2st[0][:13]
    whole = backbone_features(model.backbone, model.spec, patches, engine=engine)
    parts = backbone_features(model.backbone, model.spec, patches, engine=engine, batch_size=5)
    assert np.allclose(parts, whole, rtol=1e-2, atol=1e-2 * np.abs(whole).max())
    assert backbone_features(model.backbone, model.spec, patches[:0], engine=engine).shape == (0, 1280)


def test_the_engine_is_kept_until_the_weights_change(her2st):
    net, spec = create_backbone("efficientnet-lite0")
    patches = her2st[0][:4]
    first = get_encoder(net, spec, engine="torch")
    assert get_encoder(net, spec, engine="torch") is first
    before = backbone_features(net, spec, patches, engine="torch")
    with torch.no_grad():
        net.net._conv_head.weight.mul_(1.5)  # an in-place change, as an optimiser step makes
    assert get_encoder(net, spec, engine="torch") is not first
    after = backbone_features(net, spec, patches, engine="torch")
    with torch.no_grad():
        want = net.eval()(to_input(patches, spec)).numpy()
    assert not np.allclose(before, after, atol=1e-3)
    assert agreement(want, after, np.arange(4) % 2, k=1)["cosine_median"] > 0.999


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed")
def test_an_exported_backbone_is_reused_from_the_disk_cache(model, her2st, backbone_cache):
    from pathlib import Path

    get_encoder(model.backbone, model.spec, engine="onnxruntime")
    files = {f: f.stat().st_mtime_ns for f in Path(backbone_cache).glob("efficientnet-lite0-*.onnx")}
    assert files
    again = copy.deepcopy(model.backbone)  # the same weights in another module: no second export
    assert get_encoder(again, model.spec, engine="onnxruntime").name == "onnxruntime float32"
    assert {f: f.stat().st_mtime_ns for f in Path(backbone_cache).glob("efficientnet-lite0-*.onnx")} == files


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed")
def test_a_cached_export_is_checked_against_torch_once_and_again_when_it_changes(model, choices):
    """The check costs an eager torch call (2-3 s of every command's start-up): it runs when an export is
    first used, is recorded beside it, and runs again when the file is no longer the one checked."""
    import onnx
    from onnx import numpy_helper

    from bleep_rs.encode import _onnx_path

    record(model.spec, "onnxruntime")  # the default engine tries ONNX Runtime first, on any CPU
    get_encoder(model.backbone, model.spec, engine="onnxruntime")
    path = _onnx_path(model.backbone, model.spec)
    mark = path.with_name(path.name + ".verified")
    assert mark.read_text().split()[0] and "onnxruntime" in mark.read_text()
    # A valid model computing something else (one weight scaled) in the cached file: refused, torch runs.
    proto = onnx.load_from_string(path.read_bytes())
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    original = path.read_bytes()
    path.write_bytes(proto.SerializeToString())
    try:
        with pytest.warns(UserWarning, match="differs from torch"):
            enc = get_encoder(copy.deepcopy(model.backbone), model.spec)
        assert enc.name.startswith("torch")
    finally:
        path.write_bytes(original)
    assert get_encoder(copy.deepcopy(model.backbone), model.spec).name == "onnxruntime float32"


def test_torch_on_a_cpu_reuses_its_memory_between_batches(her2st):
    """Each batch's activations come from the memory the last batch freed, not from fresh pages (glibc's
    thresholds set by the encoder: without them about 3,500 page faults a patch, EfficientNet-Lite0)."""
    import resource

    from bleep_rs import encode

    net, spec = create_backbone("efficientnet-lite0")
    patches = her2st[0][:32]
    backbone_features(net, spec, patches[:8], engine="torch")  # builds the engine; the first batches
    if not encode._keep_torch_memory():
        pytest.skip("not glibc, or the malloc thresholds are the user's (MALLOC_*_ or GLIBC_TUNABLES)")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    backbone_features(net, spec, patches, engine="torch")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2_000


def test_the_reference_path_leaves_the_module_as_it_was(model, her2st):
    net = copy.deepcopy(model.backbone).train()
    backbone_features(net, model.spec, her2st[0][:2], precision="float32")
    assert net.training


def test_native_bf16_detection():
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(p is not None for p in probes):
        assert native_bf16("cpu") == any(p() for p in probes)
    net, spec = create_backbone("efficientnet-lite0")
    assert ("bfloat16" in get_encoder(net, spec, engine="torch").name) == native_bf16("cpu")


def test_bad_input(model, her2st):
    b, s = model.backbone, model.spec
    with pytest.raises(BleepError, match="precision must be one of"):
        backbone_features(b, s, her2st[0][:2], precision="bfloat16")
    with pytest.raises(BleepError, match="precision must be one of"):
        model.embed_images(her2st[0][:2], precision="fp16")
    with pytest.raises(BleepError, match="engine must be one of"):
        backbone_features(b, s, her2st[0][:2], engine="tensorrt")
    with pytest.raises(BleepError, match="uint8"):
        backbone_features(b, s, her2st[0][:2].astype(np.float32))
    with pytest.raises(BleepError, match="batch_size"):
        backbone_features(b, s, her2st[0][:2], batch_size=0)
    net, spec = create_backbone("features:8")
    with pytest.raises(BleepError, match="precomputed features"):
        backbone_features(net, spec, her2st[0][:2])


def test_tta_views_average_the_named_views(model, her2st):
    """tta_views=N: the mean of the embeddings of TTA_VIEWS[N]; 8 is the model's TTA, 1 none; nothing else."""
    from bleep_rs.augment import TTA_VIEWS

    patches = her2st[0][:4]
    tta = copy.deepcopy(model)
    tta.config.input = tta.config.input.replace(tta=True, tta_views=(8,))
    assert np.allclose(tta.embed_images(patches, tta_views=8), tta.embed_images(patches), atol=1e-6)
    assert np.allclose(tta.embed_images(patches, tta_views=1), tta.embed_images(patches, tta=False), atol=1e-6)
    for n in (2, 4):
        want = tta.embed_features(tta.features(patches, views=TTA_VIEWS[n]))
        assert np.allclose(tta.embed_images(patches, tta_views=n), want, atol=1e-6)
    for bad in (0, 3, 16, True, "2"):
        with pytest.raises(BleepError, match="tta_views must be one count of"):
            tta.embed_images(patches, tta_views=bad)
