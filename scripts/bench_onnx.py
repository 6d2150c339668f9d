"""ONNX deployment benchmark: FP32, this runner's W8A8 export and onnxruntime's own quantize_static W8A8.

For each model (deit_s with random weights, the shipped proxy ViT) it exports the FP32 model, quantizes it with
this runner (calibration only: speed and size do not depend on the method; two softmax quantizers, export=onnx_vnni's
int8 8-bit weights, and the structure of method=glfq: rotated, RMSNorm, ReLU MLPs, uniform softmax) and with
onnxruntime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax calibration on the same
images), then prints, side by side: throughput at batch 1 and 32 on the given threads, file size, and the integer
kernels in onnxruntime's optimised graph (the proof that int8 kernels run). ``--accuracy`` adds the proxy's
Fashion-MNIST test top-1 of quantize_static at W8A8 and at lower bit widths where it supports them (its default
calibration on the runner's 1024 seed-0 calibration images), to set beside the runner's own exports.

    python scripts/bench_onnx.py                        # deit_s and the proxy, 2 threads
    python scripts/bench_onnx.py --model proxy_vit --accuracy
Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import timm
import torch
from omegaconf import OmegaConf

from mgrq_runner.deploy.onnx_export import (
    compact,
    cpu_int8_kernels,
    export_onnx,
    integer_kernels,
    quiet_exporter,
    session,
)
from mgrq_runner.devices import machine_description
from mgrq_runner.models import create_proxy_model
from mgrq_runner.quant.api import QuantConfig, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.transforms.pipeline import rebuild_structure

ROOT = Path(__file__).resolve().parent.parent

STATIC_BITS = {"W8A8": ("QInt8", "QUInt8"), "W4A8": ("QInt4", "QUInt8"), "W4A4": ("QInt4", "QUInt4")}


def export_fp32(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with quiet_exporter():
        program = torch.onnx.export(
            model.eval(),
            (example,),
            dynamo=True,
            opset_version=21,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        )
    onnx.save_model(compact(program.model_proto), str(path))


def runner_w8a8(
    model: torch.nn.Module,
    calib: torch.Tensor,
    out: Path,
    softmax: str,
    bits: tuple[int, int],
    glfq: bool = False,
    int8_weights: bool = False,
) -> Path:
    """This runner's export, calibrated only. ``glfq``: the structure of method=glfq (ReLU MLPs, the Hadamard
    rotation's RMSNorms, no RepQ reparameterisation); its MLPs are swapped, not re-trained: speed and size do not
    depend on their weights."""
    config = QuantConfig(w_bits=bits[0], a_bits=bits[1], softmax_quantizer=softmax)
    model = copy.deepcopy(model).eval()
    if glfq:  # the structure of method=glfq's export
        rebuild_structure(model, {"mlp_relu": True, "rotation": "hadamard"})
    quantized = quantize_(model, config)
    calibrate(quantized, calib.split(32), len(calib.split(32)), InitConfig(reparam=not glfq), torch.device("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(quantized.eval(), out, calib[:2], int8_weights)
    return out / "model.onnx"


def ort_quantize_static(fp32: Path, calib: torch.Tensor, out: Path, weight_type: str, activation_type: str) -> Path:
    """onnxruntime's own static QDQ quantization (per-channel weights, MinMax), preprocessed as its docs advise."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": batch.numpy()} for batch in calib.split(32)])

        def get_next(self):  # noqa: ANN202
            return next(self.batches, None)

    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)  # its symbolic pass fails on this graph
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=getattr(QuantType, weight_type),
            activation_type=getattr(QuantType, activation_type),
            # merge the collected ranges every 7 batches (memory); a count that divides the batches trips its check
            extra_options={"CalibMaxIntermediateOutputs": 7},
        )
    return out


def throughput(
    path: Path, shape: tuple[int, ...], batch: int, threads: int, seconds: float, config: dict[str, str] | None
) -> float:
    sess = session(path, "cpu", threads, config=config)
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)}
    for _ in range(3):
        sess.run(None, feed)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 5:
        sess.run(None, feed)
        runs += 1
    return batch * runs / (time.perf_counter() - start)


def top1(path: Path, images: torch.Tensor, labels: torch.Tensor, threads: int) -> float:
    sess = session(path, "cpu", threads, config={})  # FP32 and quantize_static's models, as their users run them
    name = sess.get_inputs()[0].name
    hits = sum(
        int((torch.from_numpy(sess.run(None, {name: x.numpy()})[0]).argmax(1) == y).sum())
        for x, y in zip(images.split(500), labels.split(500), strict=True)
    )
    return 100.0 * hits / len(labels)


def proxy_data(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The runner's seed-0 calibration draw of 1024 images (the default job's) and the test split."""
    from mgrq_runner.data import build_data

    bundle = build_data(OmegaConf.load(ROOT / "conf/data/fashion_mnist.yaml"), model, 1024, 0)
    calib = torch.stack([bundle.calibration[i][0] for i in range(len(bundle.calibration))])
    test = bundle.evaluation.tensors
    return calib, test[0], test[1]


def bench(name: str, threads: int, seconds: float, accuracy: bool, tmp: Path) -> None:
    torch.manual_seed(0)
    if name == "proxy_vit":
        model = create_proxy_model(pretrained=True).eval()
        calib, test_x, test_y = proxy_data(model)
    else:
        model = timm.create_model(name, pretrained=False).eval()
        calib = torch.randn(32, *model.default_cfg["input_size"])
        test_x = test_y = None
    shape = tuple(calib.shape[1:])
    out = tmp / name
    out.mkdir()
    fp32 = out / "fp32.onnx"
    export_fp32(model, calib[:2], fp32)
    models = {
        "FP32": fp32,
        "runner W8A8 (log-sqrt2 softmax)": runner_w8a8(model, calib, out / "runner_log", "log_sqrt2", (8, 8)),
        "runner W8A8 (uniform softmax)": runner_w8a8(model, calib, out / "runner_uniform", "uniform", (8, 8)),
        "the same, export=onnx_vnni (int8 8-bit weights)": runner_w8a8(
            model, calib, out / "runner_vnni", "uniform", (8, 8), int8_weights=True
        ),
        "runner W8A8 glfq (rotated, ReLU MLPs, uniform softmax)": runner_w8a8(
            model, calib, out / "runner_glfq", "uniform", (8, 8), glfq=True
        ),
        "quantize_static W8A8": ort_quantize_static(fp32, calib, out / "ort_w8a8.onnx", "QInt8", "QUInt8"),
    }
    print(f"\n## {name}: {threads} threads, input {list(shape)}, calibration {len(calib)} images\n")
    print("| model | batch 1 img/s | batch 32 img/s | x FP32 (b32) | file MB | integer kernels |")
    print("|---|---|---|---|---|---|")
    base = None
    for label, path in models.items():
        # the runner's exports with the config they need on this CPU; quantize_static's in a plain session (with
        # session.x64quantprecision=1 onnxruntime 1.32 fails to load it: "Attempt to replace the existing tensor")
        config = {} if label.startswith("quantize_static") else None
        b1 = throughput(path, shape, 1, threads, seconds, config)
        b32 = throughput(path, shape, 32, threads, seconds, config)
        base = base or b32
        kernels = integer_kernels(path, threads, config)
        shown = ", ".join(f"{k} {v}" for k, v in kernels.items() if "Integer" in k or k.startswith("QLinear"))
        size = path.stat().st_size / 1e6
        print(f"| {label} | {b1:.1f} | {b32:.1f} | {b32 / base:.2f} | {size:.2f} | {shown or 'none'} |", flush=True)
    if accuracy and test_x is not None:
        print("\nquantize_static top-1 on the Fashion-MNIST test split (10 000 images):\n")
        print(f"- FP32: {top1(fp32, test_x, test_y, threads):.2f}")
        for bits, (weight, act) in STATIC_BITS.items():
            try:
                path = ort_quantize_static(fp32, calib, out / f"ort_{bits}.onnx", weight, act)
                print(f"- quantize_static {bits}: {top1(path, test_x, test_y, threads):.2f}", flush=True)
            except Exception as err:  # noqa: BLE001 - report what this onnxruntime version refuses
                print(f"- quantize_static {bits}: not supported here ({type(err).__name__}: {str(err)[:120]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="deit_small_patch16_224 and/or proxy_vit (default: both)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per model and batch size")
    parser.add_argument("--accuracy", action="store_true", help="the proxy's quantize_static test top-1 too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, {args.threads} threads")
    cpu = cpu_int8_kernels()
    print(
        f"{machine_description()}; integer kernels: {cpu['isa']} (u8 x s8 pairs in int16: {cpu['u8s8_pairs_in_int16']})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.model or ["deit_small_patch16_224", "proxy_vit"]:
            bench(name, args.threads, args.seconds, args.accuracy, Path(tmp))


if __name__ == "__main__":
    main()
