"""The optimisation of one unit (OBWR): prepare it, step on the fused loss, harden it and report convergence.

``UnitOptimizer`` is what the engine runs for every unit, and what a benchmark or a test drives step by step;
``UnitOptimizer.for_unit`` sets one up from what the whole reconstruction shares (``Supervision``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mgrq_runner.errors import NumericalError
from mgrq_runner.quant.api import activation_quantizers, quant_layers
from mgrq_runner.quant.primitives import random_mask
from mgrq_runner.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer
from mgrq_runner.quant.rounding import ROUNDINGS, WeightRounding, create_rounding, rounding_beta
from mgrq_runner.recon.cache import (
    CapturePoint,
    UnitTargets,
    calibration_block_loss,
    capture,
    capture_points,
    fp_logits,
    fp_outputs,
    per_image,
)
from mgrq_runner.recon.config import LossConfig, ReconConfig
from mgrq_runner.recon.losses import BLOCK_DISTANCES, BlockDistance, UnitContext, create_block_distance
from mgrq_runner.recon.losses.global_local import global_loss, local_loss
from mgrq_runner.recon.units import Unit, fp_remainder

STE_CHECK_AT = 0.9  # STE's convergence report: the calibration block loss at 90 % and at 100 % of the budget

# The unit's output pushed through the frozen FP rest of the model: logits (or the pre-head feature). None for
# the head, whose own output already is the logits.
Remainder = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Supervision:
    """What every unit's optimiser of one reconstruction shares: the FP model's units (EBGS's remainder after each
    unit), the FP logits (or pre-head features) of every calibration image for EBGS (None when it is off), the FP
    logits for a block distance that ``needs_logits`` (else None), and the settings."""

    fp_units: list[Unit]
    logits: torch.Tensor | None
    recon: ReconConfig
    losses: LossConfig
    class_logits: torch.Tensor | None = None

    @classmethod
    def create(cls, fp_units: list[Unit], images: torch.Tensor, recon: ReconConfig, losses: LossConfig) -> Supervision:
        """Caches the FP logits (or pre-head features) of ``images`` that the configured terms read."""
        pre_logits = losses.global_distance == "mse_feature"
        logits = fp_logits(fp_units, images, pre_logits, recon.batch_size) if losses.global_weight > 0 else None
        class_logits = None
        if BLOCK_DISTANCES[losses.block_distance].needs_logits:
            reuse = logits is not None and not pre_logits
            class_logits = logits if reuse else fp_logits(fp_units, images, False, recon.batch_size)
        return cls(fp_units, logits, recon, losses, class_logits)

    def block_distance(self, unit: Unit, index: int, x_fp: torch.Tensor, target: torch.Tensor) -> BlockDistance:
        """The configured block distance of quantized ``unit`` (the ``index``-th)."""
        remainder = fp_remainder(self.fp_units, index, pre_logits=False)
        context = UnitContext(unit, x_fp, target, remainder, self.class_logits, self.recon, self.losses)
        return create_block_distance(self.losses.block_distance, context)


def pick(cache: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The rows of ``cache`` for the mini-batch's ``images``: ``cache[images]``, by ``index_select``, which on the
    CPU copies them 5-7x faster than advanced indexing (1024 x 50 x 384 cache, 32 images)."""
    return cache.index_select(0, images)


def qdrop_input(x_q: torch.Tensor, x_fp: torch.Tensor, quant_prob: float, generator: torch.Generator) -> torch.Tensor:
    """Each element is taken from ``x_q`` with probability ``quant_prob``, else from ``x_fp``."""
    if quant_prob >= 1.0:
        return x_q
    return torch.lerp(x_fp, x_q, random_mask(x_q, quant_prob, generator))


def prepare_unit(module: nn.Module, recon: ReconConfig) -> tuple[list[WeightRounding], list[nn.Parameter]]:
    """Attaches the configured rounding (AdaRound, STE tuning) to every quantized layer, makes step sizes learnable,
    turns QDrop on."""
    roundings: list[WeightRounding] = []
    for _, layer in quant_layers(module):
        layer.unfreeze()
        rounding = create_rounding(recon.rounding, layer.weight.detach(), layer.weight_quantizer)
        layer.rounding = rounding.to(layer.weight.device)
        roundings.append(layer.rounding)
    scales = []
    for _, quantizer in activation_quantizers(module):
        quantizer.quant_prob = recon.quant_prob
        if isinstance(quantizer, UniformQuantizer):
            scales.append(quantizer.scale)
        elif isinstance(quantizer, LogSqrt2Quantizer) and recon.learn_log_delta:
            scales.append(quantizer.delta)
    for parameter in scales:
        parameter.requires_grad_(True)
    return roundings, scales


def harden_unit(module: nn.Module, roundings: list[WeightRounding], scales: list[nn.Parameter]) -> None:
    """Fixes the rounding (AdaRound: ``h(V) -> 1[V >= 0]``; STE: exact codes), freezes step sizes, turns QDrop
    off."""
    for rounding in roundings:
        rounding.hard = True
    for parameter in scales:
        parameter.requires_grad_(False)
    _qdrop_off(module)


def _qdrop_off(module: nn.Module) -> None:
    for _, quantizer in activation_quantizers(module):
        quantizer.quant_prob = 1.0


class UnitOptimizer:
    """Optimises one unit's AdaRound variables and activation step sizes on the fused loss.

    Args:
        unit: the quantized unit (modified in place).
        remainder: its output -> FP logits of the rest of the model, for EBGS; None for the head.
        targets: the unit's FP targets for every calibration image.
        points: the IBLS capture points in ``unit`` (empty: no local term).
        supervision: the settings (``recon``, ``losses``) and what the whole reconstruction shares.
        distance: the block term (``method.loss.block_distance``; ``Supervision.block_distance`` builds it).
    """

    def __init__(
        self,
        unit: Unit,
        remainder: Remainder | None,
        targets: UnitTargets,
        points: list[CapturePoint],
        supervision: Supervision,
        distance: BlockDistance,
    ) -> None:
        self.unit, self.remainder, self.targets, self.points = unit, remainder, targets, points
        recon, losses = supervision.recon, supervision.losses
        self.recon, self.losses, self.distance = recon, losses, distance
        self.roundings, self.scales = prepare_unit(unit.module, recon)
        self.fusion = losses.new_fusion()
        kind = ROUNDINGS[recon.rounding]
        self.relaxed = kind.relaxed  # AdaRound: judged at hardening; STE: by the loss at STE_CHECK_AT and the end
        self.block_at_check: float | None = None  # STE: the calibration block loss at STE_CHECK_AT of the budget
        groups: list[dict] = [{"params": [r.variable for r in self.roundings], "lr": recon.weight_lr}]
        if kind.learns_step and recon.weight_scale_lr > 0:
            groups.append({"params": [r.scale for r in self.roundings], "lr": recon.weight_scale_lr})
        self.weight_optimizer = torch.optim.Adam(groups)
        self.weight_schedule = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.weight_optimizer, T_max=recon.iters)
            if recon.weight_schedule == "cosine"
            else None
        )
        self.scale_optimizer = torch.optim.Adam(self.scales, lr=recon.scale_lr) if self.scales else None
        self.scale_schedule = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.scale_optimizer, T_max=recon.iters)
            if self.scale_optimizer
            else None
        )

    @classmethod
    def for_unit(cls, unit: Unit, index: int, x_fp: torch.Tensor, supervision: Supervision) -> UnitOptimizer:
        """The optimiser of quantized ``unit`` (the ``index``-th), its FP targets cached from its FP input ``x_fp``:
        the output and, with IBLS on, the layer tensors; EBGS's frozen remainder after it."""
        recon, losses = supervision.recon, supervision.losses
        points = capture_points(unit.module, losses.local_layers) if losses.local_weight > 0 else []
        output, layers = fp_outputs(unit, x_fp, points, recon.batch_size, losses.local_dtype)
        remainder = fp_remainder(supervision.fp_units, index, losses.global_distance == "mse_feature")
        targets = UnitTargets(output, layers, supervision.logits)
        distance = supervision.block_distance(unit, index, x_fp, output)
        return cls(unit, remainder, targets, points, supervision, distance)

    def loss_terms(self, inputs: torch.Tensor, images: torch.Tensor, with_global: bool) -> dict[str, torch.Tensor]:
        """Block, global (EBGS) and local (IBLS) terms of one mini-batch: ``inputs`` of calibration ``images``."""
        with capture(self.points) as captured:
            output = self.unit(inputs)
        terms = {"block": self.distance(output, pick(self.targets.output, images))}
        if with_global and self.remainder is not None and self.targets.logits is not None:
            logits = self.remainder(output)
            terms["global"] = global_loss(
                logits, pick(self.targets.logits, images), self.losses.global_distance, self.losses.temperature
            )
        if self.points:
            layers = per_image(captured, inputs.shape[0])
            targets = [pick(t, images).float() for t in self.targets.layers]  # cached in float32 or bfloat16
            terms["local"] = local_loss(layers, targets, self.losses.local_distance)
        return terms

    def step(
        self, step: int, x_q: torch.Tensor, x_fp: torch.Tensor, generator: torch.Generator, refresh: bool = True
    ) -> dict[str, torch.Tensor]:
        """One optimisation step on a random mini-batch of the cached inputs; returns the loss terms (detached).
        ``refresh=False`` skips the block distance's statistics (``dry_run`` times them apart)."""
        recon = self.recon
        if refresh:
            self.distance.refresh(step)
        images = torch.randint(0, x_q.shape[0], (recon.batch_size,), generator=generator, device=generator.device)
        inputs = qdrop_input(pick(x_q, images), pick(x_fp, images), recon.quant_prob, generator)
        terms = self.loss_terms(inputs, images, step % self.losses.global_every == 0)
        beta = rounding_beta(step, recon.iters, recon.round_warmup, recon.beta_start, recon.beta_end)
        if beta is not None and self.relaxed:  # STE has no rounding to push to 0 or 1
            terms["rounding"] = torch.stack([r.regularizer(beta) for r in self.roundings]).sum()
        total = self.fusion(terms, step / recon.iters)
        if not torch.isfinite(total):
            bad = next((k for k, v in terms.items() if not torch.isfinite(v)), "total")
            raise NumericalError(
                f"reconstruction of unit {self.unit.name} diverged at step {step}: the {bad} loss is not finite. "
                "Fix: lower method.recon.scale_lr or method.recon.weight_lr, or check the calibration data."
            )
        self.weight_optimizer.zero_grad(set_to_none=True)
        if self.scale_optimizer is not None:
            self.scale_optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.weight_optimizer.step()
        if self.weight_schedule is not None:
            self.weight_schedule.step()
        if self.scale_optimizer is not None and self.scale_schedule is not None:
            self.scale_optimizer.step()
            self.scale_schedule.step()
        if not self.relaxed and step + 1 == max(1, round(STE_CHECK_AT * recon.iters)):
            self.block_at_check = self._calibration_block_loss(x_q)
        return {k: v.detach() for k, v in terms.items()}

    def _calibration_block_loss(self, x_q: torch.Tensor) -> float:
        """The block loss on the whole calibration set, quantized input, no QDrop (QDrop's setting is kept)."""
        probs = [(q, q.quant_prob) for _, q in activation_quantizers(self.unit.module)]
        _qdrop_off(self.unit.module)
        try:
            return calibration_block_loss(self.unit, x_q, self.targets.output, self.recon.batch_size)
        finally:
            for quantizer, prob in probs:
                quantizer.quant_prob = prob

    def harden(self, x_q: torch.Tensor) -> dict[str, float]:
        """Hardens the unit and reports its convergence (docs/method.md section 5, ``results.converged``).

        AdaRound: ``block_soft`` and ``block_hard`` are the block loss on the whole calibration set (quantized
        input, no QDrop) just before and just after hardening; ``undecided`` is the fraction of rounding variables
        with ``0.01 < h(V) < 0.99`` at the end. STE: ``block_at_90`` and ``block_final``, the same block loss at
        90 % and at the end of the budget (no soft/hard gap to report), and ``moved``, the share of codes away from
        the FP weight's round-to-nearest.
        """
        if not self.relaxed:
            harden_unit(self.unit.module, self.roundings, self.scales)
            block_final = calibration_block_loss(self.unit, x_q, self.targets.output, self.recon.batch_size)
            at_check = block_final if self.block_at_check is None else self.block_at_check
            moved = [(r.moved_share(), r.variable.numel()) for r in self.roundings]
            share = sum(s * n for s, n in moved) / max(1, sum(n for _, n in moved))
            return {"block_at_90": at_check, "block_final": block_final, "moved": share}
        with torch.no_grad():
            soft = torch.cat([r.soft_rounding().flatten() for r in self.roundings])
            undecided = ((soft > 0.01) & (soft < 0.99)).float().mean().item()
        _qdrop_off(self.unit.module)
        batch = self.recon.batch_size
        block_soft = calibration_block_loss(self.unit, x_q, self.targets.output, batch)
        harden_unit(self.unit.module, self.roundings, self.scales)
        block_hard = calibration_block_loss(self.unit, x_q, self.targets.output, batch)
        return {"block_soft": block_soft, "block_hard": block_hard, "undecided": undecided}
