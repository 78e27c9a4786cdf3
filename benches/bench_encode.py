"""The image encoder on the CPU in one run: bleep-rs's default path against float32 eager torch of the same
model and every candidate tried for it, on the same threads (../shared/docs/benchmarks.md, section 5).

    make bench-encode        # or: .venv/bin/python benches/bench_encode.py [--patches 128] [--rounds 3] [--quick]

EfficientNet-Lite0 (ImageNet weights), 224-px spot patches of HER2ST C2, C3, C4 and B4 at native
resolution; every variant maps uint8 patches to 1280-d features in its engine's batches (4 patches for
torch, 64 for ONNX Runtime and OpenVINO: bleep_rs.encode's defaults), tensor conversion included, on
--threads threads (2). Speed: --patches patches spread over the four sections, --rounds
rounds with the variants interleaved (their order rotates each round); each variant's rate is its median
over the rounds and its ratio to float32 eager the median of the per-round ratios, so that a burst of
load from other processes on a shared machine moves both sides of a ratio alike.

  float32 eager               backbone_features(precision="float32"): the backbone as it is, NCHW (reference)
  default                     backbone_features(): what precision="auto" chose here (its engine is printed)
  torch fast path             engine="torch": channels-last, bfloat16 autocast where the CPU has it natively,
                              the convolutions at half the input resolution or more in float32
  torch fast path, 64 a batch the same at batches of 64 (the default before 2026-12-06: page faults)
  float32 channels-last       candidates, built here
  bfloat16 autocast [channels-last]
  torch.compile float32 / bf16   inductor with freezing (BN folded), channels-last; compile time printed
  onnxruntime float32         engine="onnxruntime": the backbone exported to ONNX (bleep-rs's cached export)
  openvino float32 / bf16     the same ONNX model in OpenVINO (INFERENCE_PRECISION_HINT)
  openvino bf16, float32 above 1/N   the same, cut in two: the layers at or above 1/N of the input side in
                              float32, the rest in bf16 (2026-12-06, AMD EPYC: 1/4 meets the rule at 1.1x
                              ONNX Runtime; the head's float32 is most of the time)
  onnxruntime int8 [mixed]    the same ONNX model quantised statically (QDQ: int8 weights per channel, uint8
                              activations, MinMax ranges from 256 MOB1 spot patches, another tissue than the
                              timed sections'); "mixed" keeps the first 6 and last 2 convolutions in float32

Agreement, over all 834 spots: each variant's features, and image embeddings (BLEEP's projection head,
untrained, seed 0), against float32 eager: median (and least) cosine, and the mean overlap of the top-50
neighbour sets when each section's spots search the other three sections' (the issue's rule: cosine
>= 0.999 median, overlap >= 95 %). --quick: no torch.compile, no OpenVINO, no INT8.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BLEEP_RS_DATA", ROOT.parent / "shared" / "data"))
SECTIONS = ["C2", "C3", "C4", "B4"]
BATCH = 64  # ONNX Runtime's and OpenVINO's batch


def installed(name: str) -> str:
    """The installed version of a peer package, or "not installed"."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def load():
    import bleep_rs

    patches, labels = [], []
    for s in SECTIONS:
        p = bleep_rs.section_patches(bleep_rs.read_section(DATA / "her2st" / s), 224)
        patches.append(p)
        labels += [s] * len(p)
    return np.concatenate(patches), np.array(labels)


def batched(fn, batch: int):
    """A variant over all patches: batches of ``batch`` through ``fn`` (uint8 patches -> features)."""

    def run(patches):
        return np.concatenate([fn(patches[i : i + batch]) for i in range(0, len(patches), batch)]).astype(np.float32)

    return run


def torch_variant(net, spec, *, channels_last: bool, bf16: bool):
    import torch

    from bleep_rs.encode import TORCH_CPU_BATCH, to_input

    net = copy.deepcopy(net).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)

    def fn(block):
        x = to_input(block, spec)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net(x).float().numpy()

    return batched(fn, TORCH_CPU_BATCH)


def compiled_variant(net, spec, *, bf16: bool, example):
    """torch.compile (inductor, freezing) of the channels-last network; for bf16 the same network as the
    torch fast path (high-resolution convolutions in float32). Returns (variant, compile seconds)."""
    import torch
    import torch._inductor.config as inductor

    from bleep_rs.encode import TORCH_CPU_BATCH, _keep_high_resolution_float32, to_input

    inductor.freezing = True
    net = copy.deepcopy(net).eval()
    if bf16:
        _keep_high_resolution_float32(net, spec.input_size, torch.device("cpu"))
    net = torch.compile(net.to(memory_format=torch.channels_last))

    def fn(block):
        x = to_input(block, spec).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net(x).float().numpy()

    t = time.perf_counter()
    fn(example)  # compiles
    return batched(fn, TORCH_CPU_BATCH), time.perf_counter() - t


def exported(net, spec) -> Path:
    """bleep-rs's ONNX export of the backbone (its cached one), written where the other runtimes read it."""
    from bleep_rs.encode import _onnx_bytes, _onnx_path

    path = ROOT / ".bench" / "encode-backbone.onnx"
    path.write_bytes(_onnx_bytes(net, spec, _onnx_path(net, spec)))
    return path


def openvino_variants(net, spec, threads):
    import openvino as ov

    from bleep_rs.encode import to_input

    core, model = ov.Core(), ov.Core().read_model(str(exported(net, spec)))
    out = {}
    for hint in ("f32", "bf16"):
        request = core.compile_model(
            model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        ).create_infer_request()
        out[f"openvino {'float32' if hint == 'f32' else 'bf16'}"] = batched(lambda b, r=request: r.infer({0: to_input(b, spec).numpy()})[0].copy(), BATCH)
    return out


def openvino_split_variants(net, spec, threads, fractions=(0.5, 0.25)):
    """OpenVINO bf16 with the high-resolution layers in float32: the ONNX model cut in two at the input of
    the first convolution whose input side is below ``fraction`` of the network's, the head compiled in
    float32 and the tail in bf16 (OpenVINO keeps a node in float32 only through a runtime attribute its
    Python API does not set, so the cut is made in the graph). {name: variant}."""
    import openvino as ov

    from bleep_rs.encode import to_input

    core, path = ov.Core(), str(exported(net, spec))
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}

    def cut(model, fraction):
        for op in model.get_ordered_ops():
            if op.get_type_name() in ("Convolution", "GroupConvolution") and op.get_input_partial_shape(0)[2].get_length() < fraction * spec.input_size:
                return op.input(0).get_source_output()
        raise ValueError(f"no convolution below {fraction} of the input side")

    out = {}
    for fraction in fractions:
        whole = core.read_model(path)
        head = ov.Model([cut(whole, fraction)], whole.get_parameters(), "head")
        rest = core.read_model(path)
        edge = cut(rest, fraction)
        param = ov.opset13.parameter(edge.get_partial_shape(), edge.get_element_type(), "cut")
        for target in list(edge.get_target_inputs()):
            target.replace_source_output(param.output(0))
        tail = ov.Model(rest.get_results(), [param], "tail")
        a = core.compile_model(head, "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
        b = core.compile_model(tail, "CPU", {**config, "INFERENCE_PRECISION_HINT": "bf16"}).create_infer_request()
        run = lambda block, a=a, b=b: b.infer({0: a.infer({0: to_input(block, spec).numpy()})[0]})[0].copy()  # noqa: E731
        out[f"openvino bf16, float32 above 1/{round(1 / fraction)} of the side ({tuple(edge.get_partial_shape())[1]} ch cut)"] = batched(run, BATCH)
    return out


def int8_variants(net, spec, threads):
    """ONNX Runtime INT8 (VNNI / AMX-INT8 where the CPU has them): bleep-rs's ONNX export quantised
    statically, calibrated on MOB1 spot patches. Returns {name: variant}; the quantisation time is printed."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import bleep_rs
    from bleep_rs.normalize import to_tensor

    bench = ROOT / ".bench"
    pre = bench / "encode-backbone-pre.onnx"
    quant_pre_process(str(exported(net, spec)), str(pre))
    mob = bleep_rs.section_patches(bleep_rs.read_section(DATA / "mob" / "MOB1"), 224)
    calib = mob[np.random.default_rng(0).choice(len(mob), min(256, len(mob)), replace=False)]
    graph = onnx.load(str(pre)).graph
    name, convs = graph.input[0].name, [n.name for n in graph.node if n.op_type == "Conv"]

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.blocks = iter([{name: to_tensor(calib[i : i + 32], spec.mean, spec.std)} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.blocks, None)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    out = {}
    for label, exclude in (("onnxruntime int8", []), ("onnxruntime int8 mixed (first 6, last 2 convolutions float32)", convs[:6] + convs[-2:])):
        path = bench / f"encode-backbone-int8-{len(exclude)}.onnx"
        t = time.perf_counter()
        quantize_static(str(pre), str(path), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude)
        print(f"{label}: quantised in {time.perf_counter() - t:.0f} s")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        out[label] = batched(lambda b, s=session: s.run(None, {name: to_tensor(b, spec.mean, spec.std)})[0], BATCH)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=128, help="patches per timed round (default 128)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="skip torch.compile, OpenVINO and INT8")
    args = ap.parse_args()
    import warnings

    warnings.simplefilter("ignore", UserWarning)
    import torch

    import bleep_rs
    from bleep_rs.encode import TORCH_CPU_BATCH, agreement, backbone_features, get_encoder, native_bf16
    from bleep_rs.model import BleepModel, ModelConfig

    torch.set_num_threads(args.threads)
    (ROOT / ".bench").mkdir(exist_ok=True)
    patches, sections = load()
    timed = patches[np.linspace(0, len(patches) - 1, min(args.patches, len(patches))).astype(int)]
    torch.manual_seed(0)
    model = BleepModel(ModelConfig(panel=bleep_rs.Panel(genes=["g"]), input=bleep_rs.InputSpec(fields_of_view=(1.0,), tta=False))).eval()
    net, spec = model.backbone, model.spec
    default = get_encoder(net, spec)
    print(f"CPU: {bleep_rs.kernel_info()['cpu']}; torch {torch.__version__}, onnxruntime {installed('onnxruntime')}, "
          f"openvino {installed('openvino')}")
    print(f"{len(patches)} HER2ST spots; timing {len(timed)} of them, {args.rounds} rounds, {args.threads} threads; "
          f"native bf16: {native_bf16()}; default path: {default.name} ({default.reason})")

    variants = {
        "float32 eager": lambda p: backbone_features(net, spec, p, precision="float32"),
        "default": lambda p: backbone_features(net, spec, p),
        "torch fast path": lambda p: backbone_features(net, spec, p, engine="torch"),
        "torch fast path, 64 a batch": lambda p: backbone_features(net, spec, p, engine="torch", batch_size=64),
        "float32 channels-last": torch_variant(net, spec, channels_last=True, bf16=False),
        "bfloat16 autocast": torch_variant(net, spec, channels_last=False, bf16=True),
        "bfloat16 autocast, channels-last": torch_variant(net, spec, channels_last=True, bf16=True),
    }
    try:
        get_encoder(net, spec, engine="onnxruntime")
        variants["onnxruntime float32"] = lambda p: backbone_features(net, spec, p, engine="onnxruntime")
    except bleep_rs.BleepError as e:
        print(f"onnxruntime: not measured ({e})")
    setup = {}
    if not args.quick:
        for bf16 in (False, True):
            name = f"torch.compile {'bf16 (high resolution float32)' if bf16 else 'float32'}, channels-last"
            variants[name], setup[name] = compiled_variant(net, spec, bf16=bf16, example=timed[:TORCH_CPU_BATCH])
            print(f"{name}: compiled in {setup[name]:.0f} s")
        try:
            variants.update(openvino_variants(net, spec, args.threads))
            variants.update(openvino_split_variants(net, spec, args.threads))
        except ImportError:
            print("openvino: not installed, not measured")
        try:
            variants.update(int8_variants(net, spec, args.threads))
        except ImportError as e:
            print(f"onnxruntime int8: not measured ({e})")

    names = list(variants)
    rates = {k: [] for k in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            t = time.perf_counter()
            variants[k](timed)
            rates[k].append(len(timed) / (time.perf_counter() - t))
        print(f"round {r + 1}: " + ", ".join(f"{k} {rates[k][-1]:.1f}" for k in names), flush=True)

    base = np.array(rates["float32 eager"])
    print(f"\npatches/s, median of {args.rounds} rounds; ratio = median of the per-round ratios to float32 eager")
    print("agreement with float32 eager over all spots: cosine median (least) / top-50 overlap; features | embeddings\n")
    reference = variants["float32 eager"](patches)
    def embed(features):
        with torch.no_grad():
            return model.image_head(torch.from_numpy(features)).numpy()

    ref_emb = embed(reference)
    results = {}
    for k in names:
        feats = reference if k == "float32 eager" else variants[k](patches)
        fa, ea = agreement(reference, feats, sections), agreement(ref_emb, embed(feats), sections)
        ratio = float(np.median(np.array(rates[k]) / base))
        ok = min(fa["cosine_median"], ea["cosine_median"]) >= 0.999 and min(fa["overlap_mean"], ea["overlap_mean"]) >= 0.95
        results[k] = {"patches_per_s": float(np.median(rates[k])), "rounds": rates[k], "ratio": ratio, "features": fa, "embeddings": ea,
                      "meets_accuracy_rule": ok, **({"compile_s": setup[k]} if k in setup else {})}
        print(f"  {k:<48} {np.median(rates[k]):>6.1f}/s {ratio:>5.2f}x   "
              f"{fa['cosine_median']:.5f} ({fa['cosine_min']:.4f}) / {fa['overlap_mean']:.1%} | "
              f"{ea['cosine_median']:.5f} ({ea['cosine_min']:.4f}) / {ea['overlap_mean']:.1%}{'' if ok else '   fails the rule'}", flush=True)
    print(f"\ndefault path ({default.name}): {results['default']['ratio']:.2f}x float32 eager (target 4x)")
    out = ROOT / ".bench" / "encode.json"
    out.write_text(json.dumps(
        {"spots": len(patches), "timed": len(timed), "threads": args.threads, "default_engine": default.name, "results": results}, indent=1
    ))
    print(f"results: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
