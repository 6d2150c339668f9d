"""MGRQ's model-level and layer-level terms: global supervision (EBGS: the unit's output through the frozen FP
remainder, against the FP model's logits or pre-head feature) and local supervision (IBLS: the unit's quantized
layer outputs against their FP counterparts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mgrq_runner.errors import ConfigError
from mgrq_runner.recon.losses.base import kl_batchmean
from mgrq_runner.recon.losses.mse import block_loss

GLOBAL_DISTANCES = ("kl", "mse_logits", "mse_feature")
LOCAL_DISTANCES = ("nmse", "kl", "moments")


def global_loss(output: torch.Tensor, target: torch.Tensor, distance: str, temperature: float) -> torch.Tensor:
    """Distance between the quantized path's logits (or pre-head features) and the FP model's.

    ``kl`` is ``T^2 * KL(softmax(z / T) || softmax(z_hat / T))``, batch-averaged.
    """
    if distance == "kl":
        return temperature**2 * kl_batchmean(target, output, temperature)
    if distance in ("mse_logits", "mse_feature"):
        return block_loss(output, target)
    raise ConfigError(f"method.loss.global_distance={distance!r} is unknown. Fix: one of {GLOBAL_DISTANCES}.")


def _layer_distance(output: torch.Tensor, target: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "nmse":
        return F.mse_loss(output, target, reduction="sum") / target.pow(2).sum().clamp_min(1e-12)
    if distance == "kl":
        log_p = F.log_softmax(target.flatten(0, -2), dim=-1)
        log_q = F.log_softmax(output.flatten(0, -2), dim=-1)
        return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    if distance == "moments":
        output_rows, target_rows = output.flatten(0, -2), target.flatten(0, -2)
        mean_gap = (output_rows.mean(0) - target_rows.mean(0)).pow(2).mean()
        std_gap = (output_rows.std(0) - target_rows.std(0)).pow(2).mean()
        return mean_gap + std_gap
    raise ConfigError(f"method.loss.local_distance={distance!r} is unknown. Fix: one of {LOCAL_DISTANCES}.")


def local_loss(outputs: list[torch.Tensor], targets: list[torch.Tensor], distance: str) -> torch.Tensor:
    """Mean over layers of the distance between quantized and FP layer outputs."""
    if not outputs:
        raise ValueError("local supervision found no layer outputs to align")
    terms = [_layer_distance(o, t, distance) for o, t in zip(outputs, targets, strict=True)]
    return torch.stack(terms).mean()
