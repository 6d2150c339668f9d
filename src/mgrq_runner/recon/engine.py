"""OBWR: optimise each unit's AdaRound variables and activation step sizes on the fused loss, then harden.

For unit i, in forward order: its quantized-prefix input ``X_q`` and FP input ``X_fp`` are cached; the FP output
``O`` and the FP layer outputs (for IBLS) come from the same unit with quantization off, fed ``X_fp``. After the
unit is optimised and hardened, ``X_q`` moves on through it and ``X_fp`` becomes ``O``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mgrq_runner.errors import ConfigError, NumericalError
from mgrq_runner.quant.api import activation_quantizers, quant_layers
from mgrq_runner.quant.modules import QuantMatMul
from mgrq_runner.quant.primitives import random_mask
from mgrq_runner.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer
from mgrq_runner.recon.adaround import AdaRound, rounding_beta
from mgrq_runner.recon.losses import (
    GLOBAL_DISTANCES,
    LOCAL_DISTANCES,
    LossFusion,
    block_loss,
    global_loss,
    local_loss,
)
from mgrq_runner.recon.units import Unit, model_units, run_units
from mgrq_runner.resume import ReconState

log = logging.getLogger(__name__)

StepCallback = Callable[[str, int, dict[str, float], int], None]  # (unit name, step, loss terms, total steps)
LOCAL_POINTS = ("qkv", "proj", "fc1", "fc2", "attn_probs", "attn_v")


@dataclass(frozen=True)
class ReconConfig:
    """Optimisation settings of every unit (method.md section 2)."""

    iters: int = 20_000
    batch_size: int = 32
    quant_prob: float = 0.5  # QDrop p: chance that an element is quantized (1: BRECQ-style)
    weight_lr: float = 1e-3
    scale_lr: float = 4e-5
    round_warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    learn_log_delta: bool = False

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1:
            raise ConfigError(f"method.recon.iters={self.iters} and batch_size={self.batch_size} must be >= 1.")
        if not 0.0 <= self.quant_prob <= 1.0:
            raise ConfigError(f"method.recon.quant_prob={self.quant_prob} must lie in [0, 1] (1 = no QDrop).")
        if not 0.0 <= self.round_warmup < 1.0:
            raise ConfigError(f"method.recon.round_warmup={self.round_warmup} must lie in [0, 1).")


@dataclass(frozen=True)
class LossConfig:
    """Loss terms and their fusion (method.md sections 3 to 5)."""

    global_weight: float = 1.0
    local_weight: float = 1.0
    round_weight: float = 0.01
    fusion: str = "block_mean"
    warmup: float = 0.0
    global_distance: str = "kl"
    temperature: float = 4.0
    global_every: int = 1
    local_distance: str = "nmse"
    local_layers: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")

    def __post_init__(self) -> None:
        LossFusion(self.global_weight, self.local_weight, self.round_weight, self.fusion, self.warmup)
        if self.global_distance not in GLOBAL_DISTANCES:
            raise ConfigError(f"method.loss.global_distance={self.global_distance!r}. Fix: one of {GLOBAL_DISTANCES}.")
        if self.local_distance not in LOCAL_DISTANCES:
            raise ConfigError(f"method.loss.local_distance={self.local_distance!r}. Fix: one of {LOCAL_DISTANCES}.")
        if self.global_every < 1 or self.temperature <= 0:
            raise ConfigError("method.loss.global_every must be >= 1 and method.loss.temperature > 0.")
        unknown = sorted(set(self.local_layers) - set(LOCAL_POINTS))
        if unknown:
            raise ConfigError(f"method.loss.local_layers has unknown {unknown}. Fix: pick from {LOCAL_POINTS}.")
        if min(self.global_weight, self.local_weight, self.round_weight) < 0:
            raise ConfigError("method.loss weights must be >= 0.")


@dataclass
class UnitReport:
    name: str
    seconds: float
    final: dict[str, float] = field(default_factory=dict)


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def capture_points(unit: nn.Module, names: tuple[str, ...]) -> list[tuple[nn.Module, str]]:
    """(module, what) pairs whose output (or, for attention probabilities, input) IBLS aligns."""
    points = []
    for name, module in unit.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in names and any(True for _ in quant_layers(module)):
            points.append((module, "output"))
        elif isinstance(module, QuantMatMul) and leaf == "matmul_av":
            if "attn_probs" in names:
                points.append((module, "input"))
            if "attn_v" in names:
                points.append((module, "output"))
    return points


def per_image(tensors: list[torch.Tensor], images: int) -> list[torch.Tensor]:
    """Views captured tensors as ``[images, -1, last dim]``, so that targets can be indexed by image.

    Swin's window attention runs on ``[images x windows, ...]`` (image-major): grouping by image keeps each
    image's windows together; a ViT tensor keeps its layout. The last dim (channels) is what IBLS's distances
    reduce over.
    """
    return [t.reshape(images, -1, t.shape[-1]) for t in tensors]


@contextmanager
def _capture(points: list[tuple[nn.Module, str]]) -> Iterator[list[torch.Tensor]]:
    """Records the tensors at ``points`` during forward passes, in order."""
    store: list[torch.Tensor] = []
    handles = []
    for module, what in points:
        if what == "input":
            handles.append(module.register_forward_pre_hook(lambda _m, args: store.append(args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out: store.append(out)))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def set_unit_quantization(unit: nn.Module, enabled: bool) -> None:
    for _, quantizer in activation_quantizers(unit):
        quantizer.enabled = enabled
    for _, layer in quant_layers(unit):
        layer.weight_quantizer.enabled = enabled
        layer.unfreeze()


def reconstruct(
    quant_model: nn.Module,
    fp_model: nn.Module,
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
        on_step: called as ``on_step(unit_name, step, loss_terms, total_steps)`` for progress display.
        state: where every finished unit is saved; the units it already holds (an interrupted run's) are loaded
            instead of optimised, and the RNG states saved after the last of them are restored.

    Returns:
        One report per unit: final loss terms and wall time.
    """
    quant_units, fp_units = model_units(quant_model), model_units(fp_model)
    for parameter in [*fp_model.parameters(), *quant_model.parameters()]:
        parameter.requires_grad_(False)  # only AdaRound variables and step sizes learn, one unit at a time
    generator = torch.Generator(device=images.device).manual_seed(seed)  # draws on the device: no copies
    batch = recon.batch_size
    fp_logits = None
    if losses.global_weight > 0:
        pre_logits = losses.global_distance == "mse_feature"
        fp_logits = _batched(lambda x: _remainder(fp_units, 0, x, pre_logits), images, batch)

    x_q, x_fp = images, images
    reports = []
    finished = len(state.units) if state is not None else 0
    for index, unit in enumerate(quant_units):
        start = time.perf_counter()
        restored = index < finished
        points = capture_points(unit.module, losses.local_layers) if losses.local_weight > 0 and not restored else []
        output, layers = fp_outputs(unit, x_fp, points, batch)
        final: dict[str, float] = {}
        seconds = None
        if restored:
            assert state is not None
            seconds, final = _restore_unit(unit, index, state, recon, generator)
        elif any(True for _ in quant_layers(unit.module)):
            targets = UnitTargets(output, layers, fp_logits)
            final = _optimize_unit(unit, index, fp_units, x_q, x_fp, targets, points, recon, losses, generator, on_step)
        for _, layer in quant_layers(unit.module):
            layer.freeze()
        x_q, x_fp = _batched(unit, x_q, batch), output
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


def _restore_unit(
    unit: Unit, index: int, state: ReconState, recon: ReconConfig, generator: torch.Generator
) -> tuple[float, dict[str, float]]:
    """Loads a unit an earlier run finished, hardened as ``_optimize_unit`` left it, and the RNG states after it."""
    optimised = any(True for _ in quant_layers(unit.module))
    if optimised:
        roundings, scales = prepare_unit(unit.module, recon)
    seconds, final = state.load(index, unit.name, unit.module, generator)
    if optimised:
        harden_unit(unit.module, roundings, scales)
    return seconds, final


def fp_outputs(
    unit: Unit, x_fp: torch.Tensor, points: list[tuple[nn.Module, str]], batch: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The unit's output and the outputs at ``points``, with quantization off, on the FP input."""
    set_unit_quantization(unit.module, False)
    outputs: list[torch.Tensor] = []
    per_batch: list[list[torch.Tensor]] = []
    with torch.no_grad(), _capture(points) as captured:
        for i in range(0, x_fp.shape[0], batch):
            chunk = x_fp[i : i + batch]
            outputs.append(unit(chunk))
            per_batch.append(per_image(captured, chunk.shape[0]))
            captured.clear()
    set_unit_quantization(unit.module, True)
    return torch.cat(outputs), [torch.cat(layer) for layer in zip(*per_batch, strict=True)]


def _remainder(fp_units: list[Unit], first: int, x: torch.Tensor, pre_logits: bool) -> torch.Tensor:
    """FP units ``first..`` applied to ``x``: logits, or the pre-head feature with ``pre_logits``."""
    x = run_units(fp_units[first:-1], x)
    return fp_units[-1].module(x, pre_logits=pre_logits)


@dataclass
class UnitTargets:
    """What a unit is optimised towards, for every calibration image (indexed by mini-batch)."""

    output: torch.Tensor  # O: the FP unit's output on X_fp
    layers: list[torch.Tensor]  # FP outputs at the IBLS capture points, per image (``per_image``)
    logits: torch.Tensor | None  # FP logits (or pre-head features) for EBGS; None when it is off


def qdrop_input(x_q: torch.Tensor, x_fp: torch.Tensor, quant_prob: float, generator: torch.Generator) -> torch.Tensor:
    """Each element is taken from ``x_q`` with probability ``quant_prob``, else from ``x_fp``."""
    if quant_prob >= 1.0:
        return x_q
    return torch.lerp(x_fp, x_q, random_mask(x_q, quant_prob, generator))


def prepare_unit(module: nn.Module, recon: ReconConfig) -> tuple[list[AdaRound], list[nn.Parameter]]:
    """Attaches AdaRound to every quantized layer, makes step sizes learnable, turns QDrop on."""
    roundings = []
    for _, layer in quant_layers(module):
        layer.unfreeze()
        layer.rounding = AdaRound(layer.weight.detach(), layer.weight_quantizer).to(layer.weight.device)
        roundings.append(layer.rounding)
    scales = []
    for _, quantizer in activation_quantizers(module):
        quantizer.drop_prob = 1.0 - recon.quant_prob
        if isinstance(quantizer, UniformQuantizer):
            scales.append(quantizer.scale)
        elif isinstance(quantizer, LogSqrt2Quantizer) and recon.learn_log_delta:
            scales.append(quantizer.delta)
    for parameter in scales:
        parameter.requires_grad_(True)
    return roundings, scales


def harden_unit(module: nn.Module, roundings: list[AdaRound], scales: list[nn.Parameter]) -> None:
    """Fixes the rounding (``h(V) -> 1[V >= 0]``), freezes step sizes, turns QDrop off."""
    for rounding in roundings:
        rounding.hard = True
    for parameter in scales:
        parameter.requires_grad_(False)
    for _, quantizer in activation_quantizers(module):
        quantizer.drop_prob = 0.0


def loss_terms(
    unit: Unit,
    index: int,
    fp_units: list[Unit],
    inputs: torch.Tensor,
    idx: torch.Tensor,
    targets: UnitTargets,
    points: list[tuple[nn.Module, str]],
    losses: LossConfig,
    with_global: bool,
) -> dict[str, torch.Tensor]:
    """Block, global (EBGS) and local (IBLS) terms of one mini-batch (calibration images ``idx``)."""
    with _capture(points) as captured:
        output = unit(inputs)
    terms = {"block": block_loss(output, targets.output[idx])}
    if with_global and targets.logits is not None:
        remainder = _remainder(fp_units, index + 1, output, losses.global_distance == "mse_feature")
        terms["global"] = global_loss(remainder, targets.logits[idx], losses.global_distance, losses.temperature)
    if points:
        layers = per_image(captured, inputs.shape[0])
        terms["local"] = local_loss(layers, [t[idx] for t in targets.layers], losses.local_distance)
    return terms


def _optimize_unit(
    unit: Unit,
    index: int,
    fp_units: list[Unit],
    x_q: torch.Tensor,
    x_fp: torch.Tensor,
    targets: UnitTargets,
    points: list[tuple[nn.Module, str]],
    recon: ReconConfig,
    losses: LossConfig,
    generator: torch.Generator,
    on_step: StepCallback | None,
) -> dict[str, float]:
    """Optimises one unit's AdaRound variables and step sizes on the fused loss, then hardens it."""
    roundings, scales = prepare_unit(unit.module, recon)
    weight_optimizer = torch.optim.Adam([r.variable for r in roundings], lr=recon.weight_lr)
    scale_optimizer = torch.optim.Adam(scales, lr=recon.scale_lr) if scales else None
    scale_schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(scale_optimizer, T_max=recon.iters) if scale_optimizer else None
    )
    fusion = LossFusion(losses.global_weight, losses.local_weight, losses.round_weight, losses.fusion, losses.warmup)
    is_head = index == len(fp_units) - 1  # the head's own output already is the logits

    terms: dict[str, torch.Tensor] = {}
    for step in range(recon.iters):
        idx = torch.randint(0, x_q.shape[0], (recon.batch_size,), generator=generator, device=generator.device)
        inputs = qdrop_input(x_q[idx], x_fp[idx], recon.quant_prob, generator)
        with_global = not is_head and step % losses.global_every == 0
        terms = loss_terms(unit, index, fp_units, inputs, idx, targets, points, losses, with_global)
        beta = rounding_beta(step, recon.iters, recon.round_warmup, recon.beta_start, recon.beta_end)
        if beta is not None:
            terms["rounding"] = torch.stack([r.regularizer(beta) for r in roundings]).sum()
        total = fusion(terms, step / recon.iters)
        if not torch.isfinite(total):
            bad = next((k for k, v in terms.items() if not torch.isfinite(v)), "total")
            raise NumericalError(
                f"reconstruction of unit {unit.name} diverged at step {step}: the {bad} loss is not finite. "
                "Fix: lower method.recon.scale_lr or method.recon.weight_lr, or check the calibration data."
            )
        weight_optimizer.zero_grad(set_to_none=True)
        if scale_optimizer is not None:
            scale_optimizer.zero_grad(set_to_none=True)
        total.backward()
        weight_optimizer.step()
        if scale_optimizer is not None and scale_schedule is not None:
            scale_optimizer.step()
            scale_schedule.step()
        if on_step is not None and (step % 10 == 0 or step == recon.iters - 1):
            on_step(unit.name, step, {k: v.item() for k, v in terms.items()}, recon.iters)

    final = {k: v.item() for k, v in terms.items()}
    return final | _harden_and_measure(unit, roundings, scales, x_q, targets.output, recon.batch_size)


def _harden_and_measure(
    unit: Unit,
    roundings: list[AdaRound],
    scales: list[nn.Parameter],
    x_q: torch.Tensor,
    target: torch.Tensor,
    batch: int,
) -> dict[str, float]:
    """Hardens the unit and reports its convergence (method.md section 5).

    ``block_soft`` and ``block_hard`` are the block loss on the whole calibration set (quantized input, no QDrop)
    just before and just after hardening; ``undecided`` is the fraction of rounding variables with
    ``0.01 < h(V) < 0.99`` at the end. A large jump or many undecided variables mean the budget was too short.
    """
    with torch.no_grad():
        soft = torch.cat([r.soft_rounding().flatten() for r in roundings])
        undecided = ((soft > 0.01) & (soft < 0.99)).float().mean().item()
    for _, quantizer in activation_quantizers(unit.module):
        quantizer.drop_prob = 0.0
    block_soft = calibration_block_loss(unit, x_q, target, batch)
    harden_unit(unit.module, roundings, scales)
    block_hard = calibration_block_loss(unit, x_q, target, batch)
    return {"block_soft": block_soft, "block_hard": block_hard, "undecided": undecided}


def calibration_block_loss(unit: Unit, inputs: torch.Tensor, target: torch.Tensor, batch: int) -> float:
    """The block loss of ``unit`` on all of ``inputs`` against ``target`` (a mean over images)."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch):
            chunk = inputs[i : i + batch]
            total += block_loss(unit(chunk), target[i : i + batch]).item() * chunk.shape[0]
    return total / inputs.shape[0]


def reconstruction_summary(reports: list[UnitReport]) -> list[dict[str, Any]]:
    """Per-unit final loss terms and wall time, for results.json."""
    return [
        {
            "unit": r.name,
            "seconds": round(r.seconds, 3),
            **{k: (round(v, 6) if math.isfinite(v) else str(v)) for k, v in r.final.items()},
        }
        for r in reports
    ]
