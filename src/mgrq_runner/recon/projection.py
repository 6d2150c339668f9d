"""What a reconstruction will cost before it runs (``dry_run=true``): a few timed steps, projected to the budget.

Some units are sampled (the first, the first block, a middle one, the last block, the last: ``sampled_units``).
Each is set up as the engine would (a copy: the model is not changed): its FP targets over every calibration
image are cached, ``steps`` optimisation steps are timed half-way through the budget (the rounding term on), and
it is hardened. A unit's projected time is ``iters x step time`` plus its passes over the calibration set
(caching, moving ``X_q`` on, the two block losses of hardening) and its block distance's statistics (FIMA-Q's
Fisher snapshots: one timed, times their number). Units between samples are interpolated by their
index: a unit's own step costs about the same along a ViT and EBGS's remainder shrinks linearly with depth.
"""

from __future__ import annotations

import copy
import resource
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mgrq_runner.quant.api import quant_layers
from mgrq_runner.recon.cache import batched, fp_outputs
from mgrq_runner.recon.config import LossConfig, ReconConfig
from mgrq_runner.recon.optimizer import Supervision, UnitOptimizer
from mgrq_runner.recon.units import Unit, model_units


@dataclass
class UnitCost:
    """One unit's projected cost: seconds per step, seconds of calibration-set passes; ``measured`` or
    interpolated."""

    name: str
    step_seconds: float
    pass_seconds: float
    measured: bool
    iters: int

    @property
    def seconds(self) -> float:
        return self.iters * self.step_seconds + self.pass_seconds


@dataclass
class Projection:
    """The projected reconstruction: per unit and in all; the peak memory while the sampled units ran."""

    units: list[UnitCost]
    setup_seconds: float  # the FP logits (or features) of every calibration image, for EBGS
    peak_memory_mb: float
    memory: str  # what ``peak_memory_mb`` measures

    @property
    def seconds(self) -> float:
        return self.setup_seconds + sum(u.seconds for u in self.units)


def projection_summary(projection: Projection) -> dict[str, Any]:
    """The projection as results.json records it."""
    return {
        "seconds": round(projection.seconds, 1),
        "setup_seconds": round(projection.setup_seconds, 3),
        "peak_memory_mb": round(projection.peak_memory_mb, 1),
        "memory": projection.memory,
        "units": [
            {
                "unit": u.name,
                "seconds": round(u.seconds, 2),
                "step_ms": round(1000 * u.step_seconds, 3),
                "pass_seconds": round(u.pass_seconds, 3),
                "measured": u.measured,
            }
            for u in projection.units
        ],
    }


def sampled_units(count: int) -> list[int]:
    """The indices timed of ``count`` units: first, first block, middle, last block, last."""
    return sorted({i for i in (0, 1, count // 2, count - 2, count - 1) if 0 <= i < count})


def project(
    quant_model: nn.Module,
    fp_model: nn.Module,
    images: torch.Tensor,
    recon: ReconConfig,
    losses: LossConfig,
    seed: int,
    steps: int = 10,
) -> Projection:
    """Projects ``reconstruct(quant_model, fp_model, images, recon, losses, seed)`` without running it.

    ``quant_model`` (calibrated) is not changed. ``steps`` steps are timed per sampled unit (at least
    ``losses.global_every``, so that the global term's share is in the average).
    """
    device = images.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    quant_units, fp_units = model_units(quant_model), model_units(fp_model)
    requires_grad = {p: p.requires_grad for p in [*fp_model.parameters(), *quant_model.parameters()]}
    for parameter in requires_grad:
        parameter.requires_grad_(False)
    generator = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    supervision = Supervision.create(fp_units, images, recon, losses)
    setup_seconds = time.perf_counter() - start

    sampled = sampled_units(len(quant_units))
    measured: dict[int, tuple[float, float]] = {}
    x_fp = images
    for index, unit in enumerate(quant_units):
        if index in sampled:
            measured[index] = _time_unit(unit, index, x_fp, supervision, generator, steps)
        if index < sampled[-1]:
            x_fp = batched(fp_units[index], x_fp, recon.batch_size)
    for parameter, flag in requires_grad.items():
        parameter.requires_grad_(flag)

    units = []
    for index, unit in enumerate(quant_units):
        step_seconds, pass_seconds = measured.get(index) or _interpolate(measured, index)
        optimised = any(True for _ in quant_layers(unit.module))
        units.append(
            UnitCost(unit.name, step_seconds if optimised else 0.0, pass_seconds, index in measured, recon.iters)
        )
    if device.type == "cuda":
        peak, memory = torch.cuda.max_memory_allocated(device) / 2**20, f"CUDA memory allocated on {device}"
    else:
        peak, memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, "the process's peak RSS"
    return Projection(units, setup_seconds, peak, memory)


def _time_unit(
    unit: Unit, index: int, x_fp: torch.Tensor, supervision: Supervision, generator: torch.Generator, steps: int
) -> tuple[float, float]:
    """A copy of ``unit`` set up, stepped and hardened as the engine does: (seconds per step, seconds of its
    passes over the calibration set). Its quantized input is stood in for by a copy of the FP one."""
    unit = Unit(unit.name, copy.deepcopy(unit.module))
    sync = torch.cuda.synchronize if x_fp.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    if not any(True for _ in quant_layers(unit.module)):
        fp_outputs(unit, x_fp, [], supervision.recon.batch_size)
        sync()
        return 0.0, 2 * (time.perf_counter() - start)  # the engine caches the targets and moves X_q on
    optimizer = UnitOptimizer.for_unit(unit, index, x_fp, supervision)  # caches the targets: timed as a pass
    x_q = x_fp.clone()  # the engine holds X_q beside X_fp
    sync()
    setup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    optimizer.distance.refresh(0)  # the block distance's statistics at the start (FIMA-Q's first snapshot)
    sync()
    refresh_seconds = (time.perf_counter() - start) * optimizer.distance.refresh_count(supervision.recon.iters)
    middle = supervision.recon.iters // 2
    for step in range(middle - 2, middle):  # warm-up: allocations, first-call costs
        optimizer.step(step, x_q, x_fp, generator, refresh=False)
    count = max(steps, supervision.losses.global_every)
    sync()
    start = time.perf_counter()
    for step in range(middle, middle + count):
        optimizer.step(step, x_q, x_fp, generator, refresh=False)
    sync()
    step_seconds = (time.perf_counter() - start) / count
    start = time.perf_counter()
    optimizer.harden(x_q)  # two passes over the calibration set
    sync()
    harden_seconds = time.perf_counter() - start
    passes = setup_seconds + 1.5 * harden_seconds  # + moving X_q on: one pass, as in hardening
    return step_seconds, passes + refresh_seconds


def _interpolate(measured: dict[int, tuple[float, float]], index: int) -> tuple[float, float]:
    """Linear in the unit index between the nearest measured units on either side."""
    below = max(i for i in measured if i < index)
    above = min(i for i in measured if i > index)
    weight = (index - below) / (above - below)
    (step_a, pass_a), (step_b, pass_b) = measured[below], measured[above]
    return step_a + weight * (step_b - step_a), pass_a + weight * (pass_b - pass_a)
