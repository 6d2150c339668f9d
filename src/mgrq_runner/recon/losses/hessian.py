"""APHQ-ViT's block distance (CVPR 2025): the squared error weighted by an average perturbation Hessian (APH),
``method.loss.block_distance=aph``.

Statistic (once per unit, before its optimisation): every calibration image goes through the FP model with the
unit's FP output shifted by ``+eps`` and by ``-eps`` in every element at once (``eps = 1e-6``); the gradient of
``KL(p_FP || p)`` at temperature ``statistic_temperature`` (batch mean) with respect to that output is taken at
both, and ``H = mean over images of |g+ - g-|`` (shape of one image's output). To first order ``g+ - g- =
2 eps H_i 1``: the row sums of each image's Hessian, not its diagonal (all elements move together).
``method.loss.aph_hessian=exact`` computes that product with a Hessian-vector product (double backward) instead of
the finite difference, whose 1e-6 shift sits near float32's resolution.

Loss, ``method.loss.aph_form``:

- ``released`` (the first public release, whose README already held the published table): ``H~ = H / mean(H)``,
  ``L = sum over dim 1 of (z_hat - z)^2 H~, averaged over the other dims, / 10``; the head's KL raw;
- ``current`` (the repository's code since 2025-03-31): ``L = mean((z_hat - z)^2 H)``, divided by its value on
  the unit's first mini-batch and doubled; the head's KL likewise.

The head is trained on ``KL(softmax(z) || softmax(z_hat))`` of its logits. Deviation: APHQ-ViT takes ``H`` on the
original GELU model while its targets come from that model too; here both come from the model the run
reconstructs towards (with ``method.init.mlp_relu`` the re-trained ReLU one, with a rotation the rotated one).
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mgrq_runner.recon.losses.base import (
    BlockDistance,
    UnitContext,
    batch_slices,
    kl_batchmean,
    register_block_distance,
)

PERTURBATION = 1e-6  # APHQ-ViT's eps


def aph_statistic(differences: torch.Tensor) -> torch.Tensor:
    """``H``: the mean over images (dim 0) of ``|g+ - g-|``, keeping that dim (size 1) to broadcast."""
    return differences.abs().mean(0, keepdim=True)


def aph_weights(hessian: torch.Tensor, form: str) -> torch.Tensor:
    """What the squared error is multiplied by: ``H`` (``current``), or ``H`` scaled to mean 1 (``released``)."""
    return hessian / hessian.mean() if form == "released" else hessian


def aph_loss(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, form: str) -> torch.Tensor:
    """The weighted squared error of a mini-batch (``weights`` from ``aph_weights``), before ``current``'s
    first-value normalisation."""
    weighted = (output - target).square() * weights
    return weighted.sum(1).mean() / 10 if form == "released" else weighted.mean()


@register_block_distance
class AveragePerturbationHessian(BlockDistance):
    """APHQ-ViT's APH-weighted distance (module docstring)."""

    name = "aph"
    needs_logits = True

    def __init__(self, context: UnitContext) -> None:
        super().__init__(context)
        self.form = context.losses.aph_form
        self.hessian = None if context.is_head else self.statistic()
        self.weights = None if self.hessian is None else aph_weights(self.hessian, self.form)  # once, not per step
        self.initial: float | None = None  # ``current``: the first mini-batch's value

    def statistic(self) -> torch.Tensor:
        """``H`` on every calibration image, batch by batch (``recon.batch_size`` images per KL batch mean)."""
        context = self.context
        total: torch.Tensor | float = 0.0
        for rows in batch_slices(context.target.shape[0], context.recon.batch_size):
            difference = self._difference(context.target[rows], context.logits[rows])  # type: ignore[index]
            total = total + aph_statistic(difference) * difference.shape[0]
        return total / context.target.shape[0]  # type: ignore[return-value]

    def _difference(self, output: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``g+ - g-`` of one batch (``exact``: ``2 eps`` times the Hessian-vector product with ones)."""
        context = self.context
        assert context.remainder is not None
        temperature = context.losses.statistic_temperature

        def gradient(shifted: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
            with torch.enable_grad():
                loss = kl_batchmean(logits, context.remainder(shifted), temperature)
                return torch.autograd.grad(loss, shifted, create_graph=create_graph)[0]

        if context.losses.aph_hessian == "exact":  # fused attention kernels have no double backward: the math one
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                point = output.detach().clone().requires_grad_(True)
                first = gradient(point, create_graph=True)
                (product,) = torch.autograd.grad(first, point, grad_outputs=torch.ones_like(first))
            return 2 * PERTURBATION * product
        plus = gradient((output + PERTURBATION).requires_grad_(True))
        minus = gradient((output - PERTURBATION).requires_grad_(True))
        return plus - minus

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.weights is None:  # the head
            value = kl_batchmean(target, output)
        else:
            value = aph_loss(output, target, self.weights, self.form)
        if self.form == "released":
            return value
        if self.initial is None:
            self.initial = max(value.item(), 1e-30)
        return 2 * value / self.initial
