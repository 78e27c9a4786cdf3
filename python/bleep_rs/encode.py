"""Running an image backbone over patches: the one inference path of ``embed_images``, ``predict`` and the
training feature cache.

    feats = backbone_features(model.backbone, model.spec, patches)   # uint8 (n, h, w, 3) -> float32 (n, D)

Patches become the backbone's input here (its own mean and std, resized to its input size when they
differ), then go through an engine, chosen once per backbone and kept while its weights stay the same:

* ``precision="auto"`` on a CPU with ONNX Runtime installed (``pip install 'bleep-rs[fast]'``): ONNX
  Runtime (the backbone exported to ONNX once, cached in :func:`cache_dir`) or torch channels-last, both
  in float32 (the float32 answer), whichever runs the network faster on this CPU: measured on first use
  and recorded in the cache folder (the speeds: docs/benchmarks.md, "The image encoder").
* ``precision="auto"`` otherwise (and on a GPU): torch's fast path: inference mode, channels-last,
  bfloat16 autocast where the device computes bfloat16 natively (AVX512-BF16 or AMX; CUDA), float32 elsewhere. The
  convolutions at half the input resolution or more stay in float32: in bfloat16 their rounding,
  amplified by the layers after them, takes EfficientNet-Lite0's features on the HER2ST spots to a
  median cosine of 0.9989 and 94.9 % shared top-50 neighbours (below the rule); in float32, 0.9996 and
  97.2 %, at about 80 % of the plain bfloat16 channels-last rate.
* ``precision="float32"``: the backbone as it is, float32, eager, NCHW: the reference the others are
  checked against.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ._core import BleepError
from .backbones import BackboneSpec

__all__ = ["PRECISIONS", "Encoder", "backbone_features", "input_features", "get_encoder", "to_input", "to_inputs", "native_bf16", "cache_dir",
           "agreement", "weights_digest"]

PRECISIONS = ("auto", "float32")
#: Patches per batch. ONNX Runtime on a CPU: 4 to 64 run alike (its arena reuses its memory); 64, the
#: batch a CPU's prediction reads, leaves the fewest calls.
CPU_BATCH = 64
#: torch on a CPU: 4. glibc gives blocks above its mmap threshold (32 MB at most) fresh pages every time,
#: and a batch of 8 EfficientNet-Lite0 patches has 38 MB activations, so larger batches paid page faults on
#: every batch: float32 eager ran 22 patches/s at 64 a batch (sys time above user time), 46-57 at 4-8; the
#: fast path 54 at 64, 112-129 at 4-8 (HER2ST patches, 2 cores, AMD EPYC, 2026-12-06). See also
#: :func:`_keep_torch_memory`.
TORCH_CPU_BATCH = 4
CUDA_BATCH = 256


# -- the backbone's input -------------------------------------------------------------------------------


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def to_input(patches: np.ndarray, spec: BackboneSpec, device: "torch.device | str | None" = None) -> torch.Tensor:
    """uint8 (n, h, w, 3) patches to the backbone's normalised float32 input (n, 3, s, s) on ``device``,
    resized (bilinear, antialiased) to its input size s when they differ."""
    from .normalize import to_tensor

    x = torch.from_numpy(to_tensor(patches, spec.mean, spec.std))
    return _resize(x.to(device or "cpu"), spec.input_size)


def to_inputs(patches: np.ndarray, spec: BackboneSpec, chunk: int = CPU_BATCH) -> torch.Tensor:
    """:func:`to_input` of many patches on the CPU, ``chunk`` at a time, so that no more than a chunk is
    ever held at the patches' own size (a slide's wider fields are resized once, not once per view)."""
    out = torch.empty((len(patches), 3, spec.input_size, spec.input_size))
    for start in range(0, len(patches), chunk):
        out[start : start + chunk] = to_input(patches[start : start + chunk], spec)
    return out


def _batches(patches: np.ndarray, spec: BackboneSpec, batch_size: int, device: torch.device):
    """The backbone's input, batch after batch, on ``device``. The conversion writes into one reused
    buffer (two pinned ones on CUDA, copied without blocking while the previous batch computes)."""
    from .normalize import to_tensor

    n, h, w = patches.shape[:3]
    cuda = device.type == "cuda"
    bufs = [torch.empty((min(batch_size, n), 3, h, w), pin_memory=cuda) for _ in range(2 if cuda else 1)]
    done = [None] * len(bufs)
    for i, start in enumerate(range(0, n, batch_size)):
        block = patches[start : start + batch_size]
        slot = i % len(bufs)
        if done[slot] is not None:
            done[slot].synchronize()  # its previous copy to the GPU has finished
        x = bufs[slot][: len(block)]
        to_tensor(block, spec.mean, spec.std, out=x.numpy())
        if cuda:
            x = x.to(device, non_blocking=True)
            done[slot] = torch.cuda.Event()
            done[slot].record()
        yield _resize(x, spec.input_size)


# -- hardware -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: "torch.device | str" = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively: on a CPU, AVX512-BF16 or AMX (read from
    /proc/cpuinfo, or from torch where there is none); on CUDA, what torch reports (Ampere and newer)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = _cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(p() for p in probes if p is not None)


# -- engines --------------------------------------------------------------------------------------------


class Encoder:
    """A backbone ready to run: ``encoder(x)`` maps the backbone's input (n, 3, s, s), float32 on
    ``device``, to its features (n, D) on the same device. ``name`` says which engine it is."""

    def __init__(self, name: str, run: Callable[[torch.Tensor], torch.Tensor], device: torch.device, batch_size: int):
        self.name, self._run, self.device, self.batch_size = name, run, device, batch_size
        #: How it was chosen: "asked for" (``engine=``), "precision='float32': the reference", "measured:
        #: <rates>", "measured (cached)", "the one engine on <device>", or why the only engine left ran.
        self.reason = "asked for"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._run(x).float()

    def __repr__(self) -> str:
        return f"Encoder({self.name!r} on {self.device}, batches of {self.batch_size}; {self.reason})"


def _device(backbone: nn.Module) -> torch.device:
    p = next(iter(backbone.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@functools.lru_cache(maxsize=None)
def _keep_torch_memory() -> bool:
    """For torch on a CPU, with glibc: blocks up to 32 MB come from the heap (``M_MMAP_THRESHOLD``) and up
    to 128 MB of freed heap stay in the process (``M_TRIM_THRESHOLD``), so that each batch reuses the last
    one's memory instead of mapping and faulting in fresh pages (glibc's own thresholds move with what was
    freed and trimmed the heap between batches: EfficientNet-Lite0 at 4 a batch, 224-672 px patches, 70
    patches/s and 3,500 page faults a patch before, 117 and none after; 2 cores, AMD EPYC, 2026-12-06).
    Process-wide, set the first time torch runs a backbone on a CPU; left alone where the user set
    ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or any ``GLIBC_TUNABLES``, or where another C
    library runs. Returns whether it was set."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 128 << 20))
    except (OSError, AttributeError):
        return False


def _float32_reference(backbone: nn.Module, device: torch.device) -> Encoder:
    ref = weakref.ref(backbone)  # kept beside the backbone: no strong reference back to it
    if device.type == "cpu":
        _keep_torch_memory()

    def run(x):
        backbone = ref()
        was = backbone.training
        backbone.eval()
        try:
            return backbone(x)
        finally:
            backbone.train(was)

    return Encoder("torch float32 eager", run, device, CUDA_BATCH if device.type == "cuda" else TORCH_CPU_BATCH)


class _Float32(nn.Module):
    """Runs the wrapped layer in float32 under an autocast context."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.layer(x.float())


def _keep_high_resolution_float32(net: nn.Module, size: int, device: torch.device) -> int:
    """Wraps the convolutions whose input is at least half the network's input size in :class:`_Float32`
    (found by one forward pass of a blank image); returns how many."""
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, min(args[0].shape[-2:]))

        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            net(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in hooks:
            h.remove()
    wide = [name for name, s in seen.items() if 2 * s >= size]
    for name in wide:
        parent, _, leaf = name.rpartition(".")
        owner = net.get_submodule(parent)
        setattr(owner, leaf, _Float32(getattr(owner, leaf)))
    return len(wide)


def _torch_fast(backbone: nn.Module, spec: BackboneSpec, device: torch.device, *, bf16: bool = True) -> Encoder:
    """Channels-last; bfloat16 autocast where native (the high-resolution convolutions in float32) unless
    ``bf16=False``."""
    if device.type == "cpu":
        _keep_torch_memory()
    net = copy.deepcopy(backbone).eval()
    bf16 = bf16 and native_bf16(device) and device.type in ("cpu", "cuda")
    if bf16:
        _keep_high_resolution_float32(net, spec.input_size, device)
    net = net.to(memory_format=torch.channels_last)

    def run(x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return net(x.contiguous(memory_format=torch.channels_last))

    name = f"torch {'bfloat16 autocast (high resolution in float32)' if bf16 else 'float32'}, channels-last"
    return Encoder(name, run, device, CUDA_BATCH if device.type == "cuda" else TORCH_CPU_BATCH)


def cache_dir() -> Path:
    """Where exported backbones are kept: ``$BLEEP_RS_CACHE``, else ``$XDG_CACHE_HOME/bleep-rs``, else
    ``~/.cache/bleep-rs``."""
    if os.environ.get("BLEEP_RS_CACHE"):
        return Path(os.environ["BLEEP_RS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bleep-rs"


def usable_cache(folder: Path, what: str) -> Optional[Path]:
    """``folder`` (created) when files can be written in it; otherwise None, with a warning saying that
    ``what`` is not cached (a cache is an optimisation: a cache path that is a file, or a folder that is
    not writable, costs time, not the run)."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        warnings.warn(f"the cache folder {folder} cannot be used ({e.strerror or e}; set BLEEP_RS_CACHE to a writable folder): "
                      f"{what} are not cached", stacklevel=3)
        return None
    return folder


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's state (names and bytes, any dtype): the key of what is computed from its
    weights and cached on disk (the exported ONNX model, the training feature cache)."""
    h = hashlib.sha256()
    state = module.state_dict()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _onnx_path(backbone: nn.Module, spec: BackboneSpec) -> Path:
    """Where the backbone's ONNX export is cached: the key covers the weights, the input size and the
    torch version."""
    h = hashlib.sha256(f"{spec.name}|{spec.input_size}|{torch.__version__}|{weights_digest(backbone)}".encode())
    return cache_dir() / f"{''.join(c if c.isalnum() else '-' for c in spec.name)}-{h.hexdigest()[:16]}.onnx"


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` written to ``path`` through the package's one temporary-then-rename step."""
    from ._atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


#: torch.export is not thread-safe: two threads exporting at once failed ("Trying to pop empty mode stack").
_EXPORTING = threading.Lock()


def _onnx_bytes(backbone: nn.Module, spec: BackboneSpec, path: Path) -> bytes:
    """The backbone as an ONNX model (batch dimension free), from ``path`` or exported now (10-20 s on 2
    cores, one thread at a time) and cached there."""
    if path.exists():
        return path.read_bytes()
    with _EXPORTING:
        if path.exists():  # exported by the thread that held the lock
            return path.read_bytes()
        return _export(backbone, spec, path)


def _export(backbone: nn.Module, spec: BackboneSpec, path: Path) -> bytes:
    net = copy.deepcopy(backbone).cpu().float().eval()
    x = torch.zeros(2, 3, spec.input_size, spec.input_size)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it lists the torchvision operators it skips
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(net, (x,), dynamo=True, input_names=["x"], output_names=["features"],
                                        dynamic_shapes=({0: torch.export.Dim("n")},), optimize=True, verbose=False)
    finally:
        quiet.setLevel(level)
    data = program.model_proto.SerializeToString()
    try:
        _write_atomic(path, data)
    except (OSError, BleepError) as e:
        warnings.warn(f"cannot cache the exported backbone in {path.parent} ({e}): it is exported again next time", stacklevel=3)
    return data


def _verified_mark(data: bytes, ort_version: str) -> bytes:
    """What the file beside a cached export records once its output has matched torch's: the export's
    digest and the ONNX Runtime version that ran it (either changing means checking again)."""
    return f"{hashlib.sha256(data).hexdigest()} onnxruntime {ort_version}\n".encode()


def _check_against_torch(backbone: nn.Module, spec: BackboneSpec, run: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """A blank and a noise image through both engines: an export that changed the function is refused."""
    size = (1, 3, spec.input_size, spec.input_size)
    probe = torch.cat([torch.zeros(size), torch.rand(size, generator=torch.Generator().manual_seed(0)) * 2 - 1])
    want = _float32_reference(backbone, torch.device("cpu"))(probe)
    got = run(probe)
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max())):
        raise BleepError(f"its output differs from torch's by up to {float((got - want).abs().max()):.3g}")


def _onnxruntime(backbone: nn.Module, spec: BackboneSpec) -> Optional[Encoder]:
    """The backbone in ONNX Runtime, float32, on the CPU; None when onnxruntime is not installed, or (with
    a warning) when the export fails or its output is not the backbone's. The output is checked against
    torch once per export and ONNX Runtime version (the first eager torch call costs 2-3 s of start-up)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    try:
        path = _onnx_path(backbone, spec)
        data = _onnx_bytes(backbone, spec, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()  # one knob for both: torch.set_num_threads
        opts.inter_op_num_threads = 1
        # Its threads sleep between batches instead of spinning: spinning took the CPU from the reader
        # thread, the head and the tensor conversion (B4 on 2 cores: 148-149 tiles/s end to end against
        # 128-141 with spinning, the encoder alone no slower).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(x):
            return torch.from_numpy(session.run(None, {name: np.ascontiguousarray(x.numpy())})[0])

        mark, marked = path.with_name(path.name + ".verified"), _verified_mark(data, ort.__version__)
        if not (mark.exists() and mark.read_bytes() == marked):
            _check_against_torch(backbone, spec, run)
            with contextlib.suppress(OSError, BleepError):  # unrecorded: checked again next time
                _write_atomic(mark, marked)
    except Exception as e:  # any failure of the optional engine: torch does the work instead
        warnings.warn(f"ONNX Runtime cannot run the {spec.name} backbone ({e}): using torch", stacklevel=2)
        return None
    return Encoder("onnxruntime float32", run, torch.device("cpu"), CPU_BATCH)


# -- choosing and keeping an engine ---------------------------------------------------------------------

_ENGINES = ("onnxruntime", "torch")
_KEPT: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _weights_token(backbone: nn.Module) -> tuple:
    """Changes whenever a weight is replaced or changed in place (optimiser steps, load_state_dict)."""
    return tuple((t.data_ptr(), getattr(t, "_version", 0)) for t in (*backbone.parameters(), *backbone.buffers()))


def get_encoder(backbone: nn.Module, spec: BackboneSpec, precision: str = "auto", *, engine: Optional[str] = None) -> Encoder:
    """The engine :func:`backbone_features` uses for this backbone on its device (built on first use, kept
    while the weights stay the same). On a CPU, ONNX Runtime or torch, both float32, whichever runs this
    network faster on this CPU (measured once, then read from the cache folder; ``Encoder.reason`` says
    how it was chosen); on a GPU, torch's fast path. ``engine``: force ``"onnxruntime"`` or ``"torch"``
    (the fast path, bfloat16 where native) instead of choosing; ignored for ``precision="float32"``."""
    if precision not in PRECISIONS:
        raise BleepError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if engine is not None and engine not in _ENGINES:
        raise BleepError(f"engine must be one of {_ENGINES}, not {engine!r}")
    if not spec.takes_images:
        raise BleepError(f"the {spec.name} backbone takes precomputed features, not patches")
    device = _device(backbone)
    key = (precision, engine or "", str(device), spec.input_size)  # the wider fields of view run at their own size
    kept = _KEPT.setdefault(backbone, {})
    token = _weights_token(backbone)
    if key in kept and kept[key][0] == token:
        return kept[key][1]
    if precision == "float32":
        enc = _float32_reference(backbone, device)
        enc.reason = "precision='float32': the reference"
    elif engine == "onnxruntime":
        enc = _onnxruntime(backbone, spec) if device.type == "cpu" else None
        if enc is None:
            raise BleepError("the onnxruntime engine needs a CPU backbone and: pip install 'bleep-rs[fast]' (onnxruntime, onnxscript)")
    elif engine is None and device.type == "cpu":
        enc = _fastest_on_this_cpu(backbone, spec)
    else:
        enc = _torch_fast(backbone, spec, device)
        if engine is None:
            enc.reason = f"the one engine on {device.type}"
    kept[key] = (token, enc)
    return enc


#: The file in :func:`cache_dir` that keeps, per network and CPU, the engine measured fastest there.
ENGINE_CHOICES = "encoder-engines.json"
#: torch must beat ONNX Runtime by this much to be chosen: a closer race is within the measurement's noise.
TORCH_MARGIN = 1.1


def _fastest_on_this_cpu(backbone: nn.Module, spec: BackboneSpec) -> Encoder:
    """ONNX Runtime or torch, both in float32 (the exact answer), whichever ran this network faster on
    this CPU: read from :data:`ENGINE_CHOICES`, else measured now and recorded (a second or two for
    EfficientNet-Lite0; tens of seconds for a large ViT on 2 cores). torch runs channels-last here, without
    the bfloat16 of its fast path: bfloat16's agreement with float32 depends on the network and is
    measured on real patches (benches/bench_encode.py) only for EfficientNet-Lite0, where ONNX Runtime
    is faster anyway. Processes sharing a cache folder measure one at a time and take the first record."""
    cpu = torch.device("cpu")
    try:
        import onnxruntime as ort
    except ImportError:
        return _reasoned(_torch_fast(backbone, spec, cpu), "the only engine (pip install 'bleep-rs[fast]' for ONNX Runtime)")
    key = _engine_key(spec, ort.__version__)
    known = _read_choices().get(key, {}).get("engine")
    with _measuring_alone() if known is None else contextlib.nullcontext():
        if known is None:
            known = _read_choices().get(key, {}).get("engine")  # recorded by another process meanwhile
        if known == "torch":  # no ONNX export for a network that torch runs faster here
            return _reasoned(_torch_fast(backbone, spec, cpu, bf16=False), "measured (cached)")
        onnx = _onnxruntime(backbone, spec)
        if onnx is None:  # the export failed (warned): torch does the work, nothing is recorded
            return _reasoned(_torch_fast(backbone, spec, cpu), "the only engine that runs this network")
        if known is not None:
            return _reasoned(onnx, "measured (cached)")
        return _measure_and_record(onnx, backbone, spec, key)


def _measure_and_record(onnx: Encoder, backbone: nn.Module, spec: BackboneSpec, key: str) -> Encoder:
    """ONNX Runtime (``onnx``, built) against torch float32 channels-last, timed and recorded under ``key``."""
    cpu = torch.device("cpu")
    try:
        exact = _torch_fast(backbone, spec, cpu, bf16=False)
        rates = _rates({"onnxruntime": onnx, "torch": exact}, spec)
    except Exception as e:  # torch failing where ONNX Runtime runs: ONNX Runtime it is
        _record_choice(key, "onnxruntime", {"onnxruntime": 0.0, "torch": 0.0})
        return _reasoned(onnx, f"torch failed when measured ({type(e).__name__}: {e})")
    winner = "torch" if rates["torch"] > TORCH_MARGIN * rates["onnxruntime"] else "onnxruntime"
    _record_choice(key, winner, rates)
    return _reasoned(exact if winner == "torch" else onnx, "measured: " + ", ".join(f"{k} {v:.0f} patches/s" for k, v in rates.items()))


def _reasoned(enc: Encoder, reason: str) -> Encoder:
    enc.reason = reason
    return enc


def _engine_key(spec: BackboneSpec, ort_version: str) -> str:
    """What makes a measured choice valid elsewhere: the network and its input size (not its weights,
    which do not change its speed), the CPU, the threads and the versions of the engines and bleep-rs."""
    from . import __version__, kernel_info

    return (f"{spec.name} {spec.input_size} px | {kernel_info()['cpu']} | {torch.get_num_threads()} threads | "
            f"torch {torch.__version__} | onnxruntime {ort_version} | bleep-rs {__version__} | float32 engines")


def _rates(encoders: dict, spec: BackboneSpec, n: int = 16, rounds: int = 3) -> dict:
    """Patches per second of each encoder on the same ``n`` random inputs in its own batches, after a
    warm-up batch: the best of ``rounds`` rounds, the engines taking turns."""
    x = torch.rand((n, 3, spec.input_size, spec.input_size), generator=torch.Generator().manual_seed(0)) * 2 - 1
    for enc in encoders.values():
        enc(x[: enc.batch_size])
    best = dict.fromkeys(encoders, 0.0)
    for _ in range(rounds):
        for name, enc in encoders.items():
            t = time.perf_counter()
            for i in range(0, n, enc.batch_size):
                enc(x[i : i + enc.batch_size])
            best[name] = max(best[name], n / (time.perf_counter() - t))
    return best


#: Seconds a process waits for another one's measurement before measuring on its own.
MEASURE_WAIT_S = 300.0


@contextlib.contextmanager
def _measuring_alone():
    """Holds ``.encoder-engines.lock`` in the cache folder (``flock``: released when the holder ends,
    however it ends), so that processes sharing the folder (Dask workers) measure one at a time and the
    later ones read the first one's record; after MEASURE_WAIT_S, or where no lock can be made, without it."""
    fd = None
    with contextlib.suppress(OSError, ImportError):
        import fcntl

        cache_dir().mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_dir() / ".encoder-engines.lock", os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + MEASURE_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    fd = None
                    break
                time.sleep(0.1)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _read_choices() -> dict:
    """The recorded choices ({key: {"engine", "patches_per_s"}}); none when the file is absent, not a
    regular file of at most 1 MB, or not one this code wrote (then the engines are measured again)."""
    import stat

    path = cache_dir() / ENGINE_CHOICES
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:  # a FIFO would block, a huge file fill memory
            return {}
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def _record_choice(key: str, engine: str, rates: dict) -> None:
    """Best effort: a choice that cannot be recorded is measured again by the next process."""
    folder = usable_cache(cache_dir(), "measured encoder engines")
    if folder is None:
        return
    choices = _read_choices()
    choices[key] = {"engine": engine, "patches_per_s": {k: round(v, 1) for k, v in rates.items()}}
    with contextlib.suppress(OSError, BleepError):
        _write_atomic(folder / ENGINE_CHOICES, json.dumps(choices, indent=1).encode())


def backbone_features(
    backbone: nn.Module,
    spec: BackboneSpec,
    patches: np.ndarray,
    *,
    precision: str = "auto",
    batch_size: Optional[int] = None,
    progress: bool = False,
    engine: Optional[str] = None,
) -> np.ndarray:
    """The backbone's features, float32 (n, D), of uint8 patches (n, h, w, 3), on the backbone's device.

    ``precision``: ``"auto"`` (the fastest engine that keeps the float32 answer: cosine >= 0.999 and
    top-50 neighbours shared >= 95 % on the HER2ST spots) or ``"float32"`` (eager torch, the reference).
    ``batch_size``: patches per batch (default: the engine's: 64 for ONNX Runtime, 4 for torch on a
    CPU, 256 on a GPU). ``engine``: see :func:`get_encoder`."""
    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
        raise BleepError(f"patches must be uint8 (n, h, w, 3), got {patches.dtype} {patches.shape}")
    enc = get_encoder(backbone, spec, precision, engine=engine)
    if len(patches) == 0:
        return np.zeros((0, spec.feature_dim), np.float32)
    bs = enc.batch_size if batch_size is None else int(batch_size)
    if bs < 1:
        raise BleepError(f"batch_size must be at least 1, got {batch_size}")
    return _run(enc, _batches(patches, spec, bs, enc.device), -(-len(patches) // bs), progress)


def input_features(backbone: nn.Module, spec: BackboneSpec, x: torch.Tensor, *, precision: str = "auto") -> np.ndarray:
    """:func:`backbone_features` of the backbone's input already made (:func:`to_inputs`: float32 (n, 3,
    s, s) on the CPU, normalised, at its input size s), in the engine's batches."""
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, spec.input_size, spec.input_size) or x.dtype != torch.float32:
        raise BleepError(f"the backbone's input must be float32 (n, 3, {spec.input_size}, {spec.input_size}), got {x.dtype} {tuple(x.shape)}")
    enc = get_encoder(backbone, spec, precision)
    if len(x) == 0:
        return np.zeros((0, spec.feature_dim), np.float32)
    bs = enc.batch_size
    return _run(enc, (x[i : i + bs].contiguous().to(enc.device) for i in range(0, len(x), bs)), -(-len(x) // bs), False)


def _run(enc: Encoder, steps, total: int, progress: bool) -> np.ndarray:
    """The encoder over the batches ``steps`` (``total`` of them), with a progress bar if asked."""
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=total, desc="encoding patches", unit="batch", leave=False)
    out = torch.cat([enc(x) for x in steps])
    return out.cpu().numpy()


def agreement(reference: np.ndarray, other: np.ndarray, sections: np.ndarray, k: int = 50) -> dict:
    """How far ``other`` features (or embeddings) of the same patches agree with ``reference`` ones:
    ``cosine_median`` (row by row) and ``overlap_mean``, the mean fraction of the top-``k`` neighbours
    that both share when each section's patches search the other sections' patches (cosine, with
    :meth:`~bleep_rs.Reference.search`), each set embedded by its own encoder."""
    from .reference import Reference

    a, b = np.asarray(reference, np.float32), np.asarray(other, np.float32)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    overlaps = []
    for s in np.unique(sections):
        q, r = sections == s, sections != s
        blank = np.zeros((int(r.sum()), 1), np.float32)
        na, _ = Reference.build(a[r], blank, ["-"]).search(a[q], k)
        nb, _ = Reference.build(b[r], blank, ["-"]).search(b[q], k)
        overlaps += [len(set(x) & set(y)) / na.shape[1] for x, y in zip(na, nb)]
    return {"cosine_median": float(np.median(cos)), "cosine_min": float(cos.min()), "overlap_mean": float(np.mean(overlaps)), "k": int(k)}
