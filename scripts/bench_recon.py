"""Per-iteration cost of reconstruction relative to a plain FP block forward+backward, measured in one run.

    python scripts/bench_recon.py                                   # deit_s, random weights, batch 32, CPU
    python scripts/bench_recon.py --device cuda --iters 50

    python scripts/bench_recon.py --model proxy_vit --iters 50            # the shipped proxy (28x28 images)
    python scripts/bench_recon.py --model proxy_vit --profile             # where an iteration's time goes
    python scripts/bench_recon.py --model proxy_vit --threads 1           # (run two at once: thread contention)
    python scripts/bench_recon.py --model proxy_vit --unit embed          # another unit (name or index)

Times, on one unit (by default the middle block) and the same batch: an FP forward+backward of the unit; a qdrop
iteration (AdaRound, learned step sizes, QDrop, block loss, rounding regulariser, optimiser steps); an mgrq
iteration with the global term every iteration and the local term; and the FP remainder's own forward+backward.
Targets (issue 12, for a block): qdrop <= 1.5x the FP block step; mgrq's extra cost over qdrop <= the remainder's
forward+backward.

``--profile`` splits a qdrop and an mgrq iteration (torch.profiler, self CPU time of every aten op) into matrix
products, elementwise passes, random draws, other ops, and the rest of the wall time: Python, autograd's engine
and dispatch outside the ops.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import timm
import torch

from mgrq_runner.allocator import keep_freed_memory
from mgrq_runner.models import PROXIES, create_proxy_model
from mgrq_runner.quant.api import QuantConfig, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.recon.config import LossConfig, ReconConfig
from mgrq_runner.recon.optimizer import Supervision, UnitOptimizer
from mgrq_runner.recon.units import fp_remainder, model_units, run_units


def median_ms(step: Callable[[], None], iters: int, device: torch.device) -> float:
    step()  # warm-up
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


MATMUL_OPS = "mm bmm addmm baddbmm matmul linear convolution mkldnn_convolution _scaled_dot_product".split()
RANDOM_OPS = "random randint rand uniform bernoulli".split()
ELEMENTWISE_OPS = (
    "add sub mul div round clamp lerp ne lt ge addcmul sigmoid pow abs exp log softmax _softmax _log_softmax gelu "
    "layer_norm native_layer_norm copy sum mean where masked_fill nan_to_num neg sqrt fill zero sign kl_div "
    "threshold _to_copy std var"
).split()


def op_category(name: str) -> str:
    """``aten::addmm`` -> ``matmul``; the categories of ``--profile``."""
    if not name.startswith("aten::"):
        return "other"
    op = name.removeprefix("aten::").removesuffix("_backward_data").removesuffix("_backward").rstrip("_")
    if any(op.startswith(m) for m in MATMUL_OPS):
        return "matmul"
    if op in RANDOM_OPS:
        return "random"
    if op in ELEMENTWISE_OPS:
        return "elementwise"
    return "other"


def profile_step(label: str, step: Callable[[], None], iters: int) -> None:
    """Prints the op-category breakdown of ``iters`` calls of ``step`` (after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(iters):
            step()
        wall = (time.perf_counter() - start) / iters * 1000
    by_category: dict[str, float] = {}
    calls = 0
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        category = op_category(event.key)
        by_category[category] = by_category.get(category, 0.0) + event.self_cpu_time_total / 1000 / iters
        calls += event.count
    ops = sum(by_category.values())
    parts = ", ".join(f"{k} {v:.1f} ms ({v / wall:.0%})" for k, v in sorted(by_category.items(), key=lambda kv: -kv[1]))
    print(
        f"{label}: {wall:.1f} ms a step (profiled), {calls / iters:.0f} aten ops: {parts}, "
        f"outside ops (Python, autograd engine, dispatch) {wall - ops:.1f} ms ({(wall - ops) / wall:.0%})"
    )


def unit_index(names: list[str], unit: str | None) -> int:
    """The index of ``unit`` (a name or an index) among the unit ``names``; None: the middle one."""
    if unit is None:
        return len(names) // 2
    if unit in names:
        return names.index(unit)
    if unit.lstrip("-").isdigit() and -len(names) <= int(unit) < len(names):
        return int(unit) % len(names)
    raise SystemExit(f"--unit {unit!r} is not a unit of this model. Fix: one of {', '.join(names)}, or an index.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, all cores)")
    parser.add_argument("--unit", help="a unit's name (embed, blocks.3, head) or index (default: the middle one)")
    parser.add_argument("--profile", action="store_true", help="also print where a qdrop and an mgrq step go")
    parser.add_argument("--malloc-defaults", action="store_true", help="skip keep_freed_memory() (as mgrq-run does it)")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    allocator = "glibc defaults" if args.malloc_defaults or not keep_freed_memory() else "keeps freed memory"
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.model in PROXIES:
        fp_model = create_proxy_model(args.model).eval().to(device)
    else:
        fp_model = timm.create_model(args.model, pretrained=False).eval().to(device)
    quant_model = quantize_(copy.deepcopy(fp_model), QuantConfig(w_bits=4, a_bits=4))
    size = fp_model.pretrained_cfg["input_size"]
    images = torch.randn(args.batch_size, *size, device=device)
    calibrate(quant_model, [images], 1, InitConfig(), device)
    for parameter in [*fp_model.parameters(), *quant_model.parameters()]:
        parameter.requires_grad_(False)
    fp_units, quant_units = model_units(fp_model), model_units(quant_model)
    index = unit_index([u.name for u in fp_units], args.unit)
    unit, fp_unit = quant_units[index], fp_units[index]
    with torch.no_grad():
        x_fp = run_units(fp_units[:index], images)
        logits = fp_model(images)
        fp_output = fp_unit(x_fp)

    fp_block = copy.deepcopy(fp_unit.module).requires_grad_(True)
    fp_optimizer = torch.optim.Adam(fp_block.parameters(), lr=1e-6)
    target = fp_output + 0.01

    def fp_step() -> None:
        loss = (fp_block(x_fp) - target).pow(2).sum(-1).mean()
        fp_optimizer.zero_grad()
        loss.backward()
        fp_optimizer.step()

    remainder = fp_remainder(fp_units, index, pre_logits=False)  # None for the head: EBGS has nothing to add

    def remainder_step() -> None:
        assert remainder is not None
        out = remainder(fp_output.detach().requires_grad_(True))
        loss = torch.nn.functional.kl_div(
            out.log_softmax(-1), logits.log_softmax(-1), log_target=True, reduction="batchmean"
        )
        loss.backward()

    def recon_step(losses: LossConfig) -> Callable[[], None]:
        """One step of the engine's own unit optimiser (half-way through a 1000-step budget: beta annealing)."""
        local_unit = type(unit)(unit.name, copy.deepcopy(unit.module))
        recon = ReconConfig(iters=1000)
        supervision = Supervision(fp_units, logits if losses.global_weight > 0 else None, recon, losses)
        optimizer = UnitOptimizer.for_unit(local_unit, index, x_fp, supervision)
        generator = torch.Generator(device=device).manual_seed(0)
        return lambda: optimizer.step(500, x_fp, x_fp, generator)

    qdrop, mgrq = recon_step(LossConfig(global_weight=0, local_weight=0)), recon_step(LossConfig(global_every=1))
    fp_ms = median_ms(fp_step, args.iters, device)
    qdrop_ms = median_ms(qdrop, args.iters, device)
    mgrq_ms = median_ms(mgrq, args.iters, device)
    remainder_ms = median_ms(remainder_step, args.iters, device) if remainder is not None else 0.0
    weights = "shipped weights" if args.model in PROXIES else "random weights"
    print(
        f"model {args.model} ({weights}), unit {unit.name}, batch {args.batch_size}, device {device}, "
        f"threads {torch.get_num_threads()}, torch {torch.__version__}, allocator {allocator}"
    )
    print(f"FP unit forward+backward       : {fp_ms:8.1f} ms")
    print(f"qdrop iteration                : {qdrop_ms:8.1f} ms  ({qdrop_ms / fp_ms:.2f}x the FP unit; target <= 1.5)")
    extra = mgrq_ms - qdrop_ms
    if remainder is None:
        print("FP remainder forward+backward  :     none (the head's own output is the logits)")
        print(f"mgrq iteration (no global term): {mgrq_ms:8.1f} ms  (extra over qdrop {extra:.1f} ms)")
    else:
        print(f"FP remainder forward+backward  : {remainder_ms:8.1f} ms")
        print(
            f"mgrq iteration (global_every=1): {mgrq_ms:8.1f} ms  (extra over qdrop {extra:.1f} ms = "
            f"{extra / remainder_ms:.2f}x the remainder's forward+backward; target <= 1)"
        )
    if args.profile:
        steps = [("FP unit", fp_step), ("qdrop", qdrop), ("mgrq", mgrq)]
        for label, step in steps + ([("FP remainder", remainder_step)] if remainder is not None else []):
            profile_step(label, step, args.iters)


if __name__ == "__main__":
    main()
