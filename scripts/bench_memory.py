"""Peak memory of one reconstruction, and what its per-unit caches account for (random weights, 2 iterations).

    python scripts/bench_memory.py --model deit_base_patch16_224 --images 128
    python scripts/bench_memory.py --model swin_base_patch4_window7_224 --images 128 --local-target-dtype bfloat16

Prints, per unit, the bytes reconstruction caches for every calibration image (X_q, X_fp, the FP output O, the
IBLS layer targets) and the FP logits, at ``--images`` and at ``--project-to`` images (exact: shapes x count);
then runs the reconstruction and prints the process's peak memory (CPU: peak RSS; CUDA: max allocated). The
caches grow linearly with the image count; the rest (weights, one mini-batch's activations through the remainder)
does not, so two runs at different ``--images`` give the peak at any count.
"""

from __future__ import annotations

import argparse
import copy
import resource

import timm
import torch

from mgrq_runner.quant.api import QuantConfig, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.recon.cache import capture_points, fp_outputs
from mgrq_runner.recon.config import LossConfig, ReconConfig
from mgrq_runner.recon.engine import reconstruct
from mgrq_runner.recon.units import model_units

MIB = 2**20


def rss_mib() -> float:
    """The process's resident memory now (Linux)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def cache_per_image(fp_model: torch.nn.Module, quant_model: torch.nn.Module, losses: LossConfig, size) -> list:
    """Per unit: bytes per calibration image of X_q + X_fp, of O, of the IBLS targets (one image's shapes)."""
    rows = []
    x = torch.zeros(1, *size)
    for fp_unit, quant_unit in zip(model_units(fp_model), model_units(quant_model), strict=True):
        points = capture_points(quant_unit.module, losses.local_layers) if losses.local_weight > 0 else []
        output, layers = fp_outputs(quant_unit, x, points, 1, losses.local_dtype)
        rows.append((fp_unit.name, 2 * x.nbytes, output.nbytes, sum(t.nbytes for t in layers)))
        with torch.no_grad():
            x = fp_unit.module(x)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--project-to", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--local-target-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    fp_model = timm.create_model(args.model, pretrained=False).eval()
    size = fp_model.pretrained_cfg["input_size"]
    quant_model = quantize_(copy.deepcopy(fp_model), QuantConfig(w_bits=4, a_bits=4))
    calibrate(quant_model, [torch.randn(8, *size)], 1, InitConfig(), torch.device("cpu"))
    losses = LossConfig(local_target_dtype=args.local_target_dtype)  # mgrq: every cache present
    rows = cache_per_image(fp_model, quant_model, losses, size)
    logits_per_image = 4 * fp_model.num_classes

    print(
        f"model {args.model} (random weights), mgrq, {args.images} images at {size}, {args.iters} iterations per "
        f"unit, IBLS targets in {args.local_target_dtype}, device {device}, threads {torch.get_num_threads()}"
    )
    print(f"{'unit':<22} {'X_q+X_fp':>9} {'O':>9} {'IBLS':>9}   MiB at {args.images} / at {args.project_to} images")
    largest = max(rows, key=lambda r: sum(r[1:]))
    for name, inputs, output, layers in rows:
        total = inputs + output + layers
        print(
            f"{name:<22} {inputs * args.images / MIB:9.1f} {output * args.images / MIB:9.1f} "
            f"{layers * args.images / MIB:9.1f}   {total * args.images / MIB:8.1f} / "
            f"{total * args.project_to / MIB:8.1f}"
        )
    per_image = sum(largest[1:]) + logits_per_image
    print(
        f"largest unit ({largest[0]}) + FP logits: {per_image * args.images / MIB:.1f} MiB at {args.images} images, "
        f"{per_image * args.project_to / MIB:.1f} MiB at {args.project_to}"
    )

    fp_model, quant_model = fp_model.to(device), quant_model.to(device)
    images = torch.randn(args.images, *size, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / MIB
    else:
        before = rss_mib()
    reconstruct(quant_model, fp_model, images, ReconConfig(iters=args.iters, batch_size=32), losses, seed=0)
    if device.type == "cuda":
        peak, what = torch.cuda.max_memory_allocated(device) / MIB, "CUDA max allocated"
    else:
        peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS"
    print(f"memory before reconstruction {before:.0f} MiB (model, images); {what} of the whole process {peak:.0f} MiB")


if __name__ == "__main__":
    main()
