"""Evaluation throughput of a fake-quantized ViT relative to its FP model, measured in one run.

    python scripts/bench_quant.py                              # deit_s, random weights, batch 32, CPU, W4A4
    python scripts/bench_quant.py --model swin_tiny_patch4_window7_224 --device cuda --batch-size 128

The FP model runs timm's own forward (fused attention where timm uses it); the quantized model runs the explicit
attention path with every quantizer on. Timed rounds alternate between the two models so that drift in the
machine's speed hits both alike. Target (issue 2): ratio >= 0.7 for deit_s at batch 32 on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

from mgrq_runner.quant.api import QuantConfig, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate


def seconds_per_batch(model: torch.nn.Module, images: torch.Tensor) -> float:
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    fp_model = timm.create_model(args.model, pretrained=False).eval().to(device)
    quant_model = quantize_(copy.deepcopy(fp_model), QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits))
    size = fp_model.pretrained_cfg["input_size"]
    calibrate(quant_model, [torch.randn(8, *size)], 1, InitConfig(), device)
    images = torch.randn(args.batch_size, *size, device=device)

    for model in (fp_model, quant_model):  # warm-up
        seconds_per_batch(model, images)
    fp_times, quant_times = [], []
    for _ in range(args.rounds):
        fp_times.append(seconds_per_batch(fp_model, images))
        quant_times.append(seconds_per_batch(quant_model, images))
    fp_rate = args.batch_size / statistics.median(fp_times)
    quant_rate = args.batch_size / statistics.median(quant_times)
    print(
        f"model {args.model} (random weights), batch {args.batch_size}, device {device}, "
        f"threads {torch.get_num_threads()}, torch {torch.__version__}, timm {timm.__version__}"
    )
    print(f"FP     : {fp_rate:8.1f} images/s (median of {args.rounds} batches)")
    print(f"W{args.w_bits}A{args.a_bits}   : {quant_rate:8.1f} images/s (fake-quantized, explicit attention)")
    print(f"ratio  : {quant_rate / fp_rate:.3f} (target >= 0.7)")


if __name__ == "__main__":
    main()
