"""The squared-error block distance (OBWR's block term, BRECQ's, QDrop's and MGRQ's): ``block_distance=mse``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mgrq_runner.recon.losses.base import BlockDistance, register_block_distance


def block_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||O_hat - O||^2`` summed over the last (feature) dim, averaged over every other dim.

    Squared errors here and in IBLS's ``nmse`` come from ``F.mse_loss``: one pass forward and one fused pass
    backward, the same values as ``(a - b).pow(2)`` and its autograd (2x faster on a deit_s ``fc1`` output, CPU).
    """
    return F.mse_loss(output, target, reduction="none").sum(-1).mean()


@register_block_distance
class SquaredError(BlockDistance):
    """``block_loss``: every output element weighs the same."""

    name = "mse"

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return block_loss(output, target)
