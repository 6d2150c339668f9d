"""The loss terms of mixed granularity reconstruction and their fusion.

- block (OBWR): squared error of the unit's output, summed over features, averaged over samples and tokens;
- global (EBGS): the unit's output through the frozen FP remainder, compared with the FP model's logits;
- local (IBLS): per-layer alignment of the unit's quantized layer outputs with their FP counterparts;
- rounding: AdaRound's regulariser.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mgrq_runner.errors import ConfigError

GLOBAL_DISTANCES = ("kl", "mse_logits", "mse_feature")
LOCAL_DISTANCES = ("nmse", "kl", "moments")


def block_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||O_hat - O||^2`` summed over the last (feature) dim, averaged over every other dim."""
    return (output - target).pow(2).sum(-1).mean()


def global_loss(output: torch.Tensor, target: torch.Tensor, distance: str, temperature: float) -> torch.Tensor:
    """Distance between the quantized path's logits (or pre-head features) and the FP model's.

    ``kl`` is ``T^2 * KL(softmax(z / T) || softmax(z_hat / T))``, batch-averaged.
    """
    if distance == "kl":
        log_p = F.log_softmax(target / temperature, dim=-1)
        log_q = F.log_softmax(output / temperature, dim=-1)
        return temperature**2 * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    if distance in ("mse_logits", "mse_feature"):
        return block_loss(output, target)
    raise ConfigError(f"method.loss.global_distance={distance!r} is unknown. Fix: one of {GLOBAL_DISTANCES}.")


def _layer_distance(output: torch.Tensor, target: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "nmse":
        return (output - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
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


@dataclass
class LossFusion:
    """Mixed granularity loss fusion: ``L_B/L_B0 + wG L_G/L_G0 + wL L_L/L_L0 + wR L_R``.

    With ``mode='normalized'`` each term is divided by its value on the first mini-batch (detached), so the
    weights are relative and unit-free; ``mode='raw'`` adds the terms as they are. The global and local weights
    ramp up linearly over the first ``warmup`` fraction of the iterations (0: no ramp).
    """

    global_weight: float = 1.0
    local_weight: float = 1.0
    round_weight: float = 0.01
    mode: str = "normalized"
    warmup: float = 0.0
    initial: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("normalized", "raw"):
            raise ConfigError(f"method.loss.fusion={self.mode!r} is unknown. Fix: normalized or raw.")

    def _normalized(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if self.mode == "raw":
            return value
        if name not in self.initial:
            self.initial[name] = max(float(value.detach()), 1e-12)
        return value / self.initial[name]

    def __call__(self, terms: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        """Fuses ``terms`` (keys ``block``, optional ``global``, ``local``, ``rounding``) at ``progress`` in [0, 1]."""
        ramp = min(1.0, progress / self.warmup) if self.warmup > 0 else 1.0
        total = self._normalized("block", terms["block"])
        if "global" in terms:
            total = total + ramp * self.global_weight * self._normalized("global", terms["global"])
        if "local" in terms:
            total = total + ramp * self.local_weight * self._normalized("local", terms["local"])
        if "rounding" in terms:
            total = total + self.round_weight * terms["rounding"]
        return total
