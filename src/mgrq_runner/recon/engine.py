"""OBWR (optimized block-wise reconstruction): a calibrated quantized model, one unit at a time, in forward order.

For unit i: its quantized-prefix input ``X_q`` and FP input ``X_fp`` are cached; the FP output ``O`` and the FP
layer outputs (for IBLS) come from the same unit with quantization off, fed ``X_fp`` (``recon.cache``). The unit
is optimised and hardened (``recon.optimizer.UnitOptimizer``, set up by ``UnitOptimizer.for_unit``); then ``X_q``
moves on through it and ``X_fp`` becomes ``O``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mgrq_runner.devices import seeded_rng
from mgrq_runner.quant.api import quant_layers
from mgrq_runner.recon.cache import batched, fp_outputs
from mgrq_runner.recon.config import LossConfig, ReconConfig
from mgrq_runner.recon.curves import StepCallback
from mgrq_runner.recon.optimizer import Supervision, UnitOptimizer, harden_unit, prepare_unit
from mgrq_runner.recon.state import ReconState
from mgrq_runner.recon.units import Unit, model_units

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
        seed: seed of the mini-batch sampling and of the QDrop masks (``seeded_rng``: the result depends on the
            seed and the inputs, not on what the caller drew before, and the caller's RNG state is kept).
        on_step: called every 10 steps and at a unit's last step (progress, loss curves).
        state: where every finished unit is saved; the units it already holds (an interrupted run's) are loaded
            instead of optimised, and the RNG states saved after the last of them are restored.

    Returns:
        One report per unit: final loss terms, convergence and wall time.
    """
    with seeded_rng(seed, images.device):
        quant_units, fp_units = model_units(quant_model), model_units(fp_model)
        for parameter in [*fp_model.parameters(), *quant_model.parameters()]:
            parameter.requires_grad_(False)  # only AdaRound variables and step sizes learn, one unit at a time
        generator = torch.Generator(device=images.device).manual_seed(seed)  # draws on the device: no copies
        supervision = Supervision.create(fp_units, images, recon, losses)

        x_q, x_fp = images, images
        reports = []
        finished = len(state.units) if state is not None else 0
        for index, unit in enumerate(quant_units):
            start = time.perf_counter()
            restored = index < finished
            final: dict[str, float] = {}
            seconds = None
            if restored or not any(True for _ in quant_layers(unit.module)):
                output, _ = fp_outputs(unit, x_fp, [], recon.batch_size)
                if restored:
                    assert state is not None
                    seconds, final = _restore_unit(unit, index, state, recon, generator)
            else:
                optimizer = UnitOptimizer.for_unit(unit, index, x_fp, supervision)
                output = optimizer.targets.output
                final = _optimize(optimizer, x_q, x_fp, generator, on_step)
            for _, layer in quant_layers(unit.module):
                layer.freeze()
            x_q, x_fp = batched(unit, x_q, recon.batch_size), output
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
