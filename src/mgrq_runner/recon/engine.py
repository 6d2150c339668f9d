"""OBWR (optimized block-wise reconstruction): a calibrated quantized model, one unit at a time, in forward order.

For unit i: its quantized-prefix input ``X_q`` and FP input ``X_fp`` are cached; the FP output ``O`` and the FP
layer outputs (for IBLS) come from the same unit with quantization off, fed ``X_fp`` (``recon.cache``). The unit
is optimised and hardened (``recon.optimizer.UnitOptimizer``); then ``X_q`` moves on through it and ``X_fp``
becomes ``O``.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mgrq_runner.quant.api import quant_layers
from mgrq_runner.recon.cache import UnitTargets, batched, capture_points, fp_outputs
from mgrq_runner.recon.config import LossConfig, ReconConfig
from mgrq_runner.recon.curves import StepCallback
from mgrq_runner.recon.optimizer import Remainder, UnitOptimizer, harden_unit, prepare_unit
from mgrq_runner.recon.state import ReconState
from mgrq_runner.recon.units import Unit, model_units, run_units

log = logging.getLogger(__name__)


@dataclass
class UnitReport:
    """One unit's outcome: final loss terms, convergence (``block_soft``, ``block_hard``, ``undecided``), time."""

    name: str
    seconds: float
    final: dict[str, float] = field(default_factory=dict)


def reconstruct(
    quant_model: torch.nn.Module,
    fp_model: torch.nn.Module,
    images: torch.Tensor,
    recon: ReconConfig,
    losses: LossConfig,
    seed: int,
    on_step: StepCallback | None = None,
    state: ReconState | None = None,
) -> list[UnitReport]:
    """Reconstructs ``quant_model`` (calibrated) unit by unit on calibration ``images`` (on the model's device).

    Args:
        quant_model: the calibrated quantized model (modified in place).
        fp_model: its full-precision original (frozen; the remainder for global supervision, and FP logits).
        images: calibration images, already on the device.
        recon: optimisation settings.
        losses: loss settings; zero weights switch terms off.
        seed: seed of the mini-batch sampling.
        on_step: called every 10 steps and at a unit's last step (progress, loss curves).
        state: where every finished unit is saved; the units it already holds (an interrupted run's) are loaded
            instead of optimised, and the RNG states saved after the last of them are restored.

    Returns:
        One report per unit: final loss terms, convergence and wall time.
    """
    quant_units, fp_units = model_units(quant_model), model_units(fp_model)
    for parameter in [*fp_model.parameters(), *quant_model.parameters()]:
        parameter.requires_grad_(False)  # only AdaRound variables and step sizes learn, one unit at a time
    generator = torch.Generator(device=images.device).manual_seed(seed)  # draws on the device: no copies
    batch = recon.batch_size
    pre_logits = losses.global_distance == "mse_feature"
    logits = fp_logits(fp_units, images, losses, batch)

    x_q, x_fp = images, images
    reports = []
    finished = len(state.units) if state is not None else 0
    for index, unit in enumerate(quant_units):
        start = time.perf_counter()
        restored = index < finished
        points = capture_points(unit.module, losses.local_layers) if losses.local_weight > 0 and not restored else []
        output, layers = fp_outputs(unit, x_fp, points, batch, losses.local_dtype)
        final: dict[str, float] = {}
        seconds = None
        if restored:
            assert state is not None
            seconds, final = _restore_unit(unit, index, state, recon, generator)
        elif any(True for _ in quant_layers(unit.module)):
            remainder = fp_remainder(fp_units, index, pre_logits)
            optimizer = UnitOptimizer(unit, remainder, UnitTargets(output, layers, logits), points, recon, losses)
            final = _optimize(optimizer, x_q, x_fp, generator, on_step)
        for _, layer in quant_layers(unit.module):
            layer.freeze()
        x_q, x_fp = batched(unit, x_q, batch), output
        reports.append(UnitReport(unit.name, time.perf_counter() - start if seconds is None else seconds, final))
        if state is not None and not restored:
            state.save(index, unit.name, unit.module, reports[-1].seconds, final, generator)
        log.info(
            "unit %s%s: %s (%.1fs)",
            unit.name,
            " (restored)" if restored else "",
            {k: round(v, 5) for k, v in final.items()},
            reports[-1].seconds,
        )
    return reports


def _optimize(
    optimizer: UnitOptimizer,
    x_q: torch.Tensor,
    x_fp: torch.Tensor,
    generator: torch.Generator,
    on_step: StepCallback | None,
) -> dict[str, float]:
    """Runs the unit's whole budget, then hardens it: its last loss terms and its convergence."""
    iters, name = optimizer.recon.iters, optimizer.unit.name
    terms: dict[str, torch.Tensor] = {}
    for step in range(iters):
        terms = optimizer.step(step, x_q, x_fp, generator)
        if on_step is not None and (step % 10 == 0 or step == iters - 1):
            on_step(name, step, {k: v.item() for k, v in terms.items()}, iters)
    return {k: v.item() for k, v in terms.items()} | optimizer.harden(x_q)


def fp_logits(fp_units: list[Unit], images: torch.Tensor, losses: LossConfig, batch: int) -> torch.Tensor | None:
    """EBGS's targets: the FP model's logits (or pre-head features) of every image; None when EBGS is off."""
    if losses.global_weight == 0:
        return None
    pre_logits = losses.global_distance == "mse_feature"
    return batched(functools.partial(_run_remainder, fp_units, pre_logits), images, batch)


def fp_remainder(fp_units: list[Unit], index: int, pre_logits: bool) -> Remainder | None:
    """EBGS's frozen FP remainder after unit ``index``: its output -> logits (or the pre-head feature with
    ``pre_logits``); None for the head, whose own output already is the logits."""
    if index == len(fp_units) - 1:
        return None
    return functools.partial(_run_remainder, fp_units[index + 1 :], pre_logits)


def _run_remainder(fp_units: list[Unit], pre_logits: bool, x: torch.Tensor) -> torch.Tensor:
    """FP ``fp_units`` (the last one the head) applied to ``x``: logits, or the pre-head feature."""
    x = run_units(fp_units[:-1], x)
    return fp_units[-1].module(x, pre_logits=pre_logits)


def _restore_unit(
    unit: Unit, index: int, state: ReconState, recon: ReconConfig, generator: torch.Generator
) -> tuple[float, dict[str, float]]:
    """Loads a unit an earlier run finished, hardened as its optimisation left it, and the RNG states after it."""
    optimised = any(True for _ in quant_layers(unit.module))
    if optimised:
        roundings, scales = prepare_unit(unit.module, recon)
    seconds, final = state.load(index, unit.name, unit.module, generator)
    if optimised:
        harden_unit(unit.module, roundings, scales)
    return seconds, final


def reconstruction_summary(reports: list[UnitReport]) -> list[dict[str, Any]]:
    """Per-unit final loss terms, convergence and wall time, for results.json."""
    return [
        {
            "unit": r.name,
            "seconds": round(r.seconds, 3),
            **{k: (round(v, 6) if math.isfinite(v) else str(v)) for k, v in r.final.items()},
        }
        for r in reports
    ]
