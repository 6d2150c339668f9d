"""FIMA-Q's block distance (CVPR 2025): a diagonal-plus-low-rank (DPLR) approximation of the Fisher information
of the model's output KL with respect to the unit's output, ``method.loss.block_distance=dplr_fim``.

Statistics (a *snapshot*, taken ``fisher_rank`` times over the unit's budget, evenly spaced from step 0): every
calibration image's FP unit input goes through the quantized unit as it trains (QDrop on, roundings relaxed),
then through the frozen FP rest of the model; ``KL(p_FP || p)`` at temperature ``statistic_temperature``
(batch mean over ``recon.batch_size`` images) is differentiated with respect to the unit's output. A snapshot
keeps ``g``, the mean over images of the gradient's absolute value, and ``delta``, the mean absolute output
error; both are flattened, token-major.

With ``G`` and ``Delta`` the snapshots' rows, ``M = (Delta Delta^T)^-1`` and ``g_bar`` the mean row of ``G``, a
mini-batch's absolute errors ``u`` (flattened) give

    L_LR = mean_b (G u_b)^T M (G u_b),   L_D = mean_{b,d} u_bd^2 g_bar_d,
    L = L_LR / L_LR0 + L_D / L_D0,

each term divided by its value on the first mini-batch after the latest snapshot (the sum is 2 there). The head
is trained on the plain ``KL(softmax(z) || softmax(z_hat))`` of its logits, unnormalised, as in FIMA-Q's code.
Deviation from that code: ``M`` is a pseudo-inverse in float64 (its plain float32 inverse fails on a singular
``Delta Delta^T``, e.g. two equal snapshots); where the inverse exists the two agree.
"""

from __future__ import annotations

import torch

from mgrq_runner.recon.losses.base import (
    BlockDistance,
    UnitContext,
    batch_slices,
    kl_batchmean,
    register_block_distance,
)


def dplr_metric(errors: torch.Tensor) -> torch.Tensor:
    """``M = (Delta Delta^T)^-1`` of the snapshots' error rows ``[r, D]`` (a float64 pseudo-inverse, returned in
    their dtype)."""
    rows = errors.double()
    return torch.linalg.pinv(rows @ rows.T).to(errors.dtype)


def dplr_terms(
    output: torch.Tensor, target: torch.Tensor, gradients: torch.Tensor, metric: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_LR, L_D)`` of a mini-batch ``[B, ...]`` for the snapshots' gradient rows ``gradients`` (G, ``[r, D]``)
    and their ``metric`` (``dplr_metric``)."""
    u = (output - target).abs().flatten(1)
    a = u @ gradients.T
    low_rank = ((a @ metric) * a).sum(1).mean()
    diagonal = (u.square() * gradients.mean(0)).mean()
    return low_rank, diagonal


def snapshot_rows(
    gradients: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One snapshot from per-image gradients and outputs ``[images, ...]``: ``g`` = mean |gradient| and
    ``delta`` = mean |output - target|, each flattened to ``[D]`` (absolute values before the mean)."""
    return gradients.abs().flatten(1).mean(0), (outputs - targets).abs().flatten(1).mean(0)


@register_block_distance
class DplrFisher(BlockDistance):
    """FIMA-Q's DPLR Fisher distance (module docstring)."""

    name = "dplr_fim"
    needs_logits = True

    def __init__(self, context: UnitContext) -> None:
        super().__init__(context)
        self.gradients: torch.Tensor | None = None  # G: one row per snapshot
        self.errors: torch.Tensor | None = None  # Delta
        self.metric: torch.Tensor | None = None  # (Delta Delta^T)^-1
        self.every = max(1, context.recon.iters // context.losses.fisher_rank)
        self.initial: tuple[float, float] | None = None  # (L_LR0, L_D0) since the latest snapshot

    def refresh(self, step: int) -> None:
        if self.context.is_head or step % self.every != 0:
            return
        gradient, error = (row[None] for row in self.snapshot())
        self.gradients = gradient if self.gradients is None else torch.cat([self.gradients, gradient])
        self.errors = error if self.errors is None else torch.cat([self.errors, error])
        self.metric = dplr_metric(self.errors)
        self.initial = None

    def refresh_count(self, iters: int) -> int:
        return 0 if self.context.is_head else len(range(0, iters, self.every))

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The statistics of the unit's current state on every calibration image, summed batch by batch."""
        context = self.context
        assert context.remainder is not None and context.logits is not None
        temperature = context.losses.statistic_temperature
        gradient_sum: torch.Tensor | float = 0.0
        error_sum: torch.Tensor | float = 0.0
        for rows in batch_slices(context.x_fp.shape[0], context.recon.batch_size):
            with torch.no_grad():
                output = context.unit(context.x_fp[rows])
            output.requires_grad_(True)
            with torch.enable_grad():
                loss = kl_batchmean(context.logits[rows], context.remainder(output), temperature)
                (gradient,) = torch.autograd.grad(loss, output)
            g, delta = snapshot_rows(gradient, output.detach(), context.target[rows])
            gradient_sum = gradient_sum + g * output.shape[0]
            error_sum = error_sum + delta * output.shape[0]
        images = context.x_fp.shape[0]
        return gradient_sum / images, error_sum / images  # type: ignore[return-value]

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.context.is_head:
            return kl_batchmean(target, output)
        assert self.gradients is not None and self.metric is not None, "refresh(0) takes the first snapshot"
        low_rank, diagonal = dplr_terms(output, target, self.gradients, self.metric)
        if self.initial is None:
            self.initial = (max(low_rank.item(), 1e-30), max(diagonal.item(), 1e-30))
        return low_rank / self.initial[0] + diagonal / self.initial[1]
