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
    """``||O_hat - O||^2`` summed over the last (feature) dim, averaged over every other dim.

    Squared errors here and in IBLS's ``nmse`` come from ``F.mse_loss``: one pass forward and one fused pass
    backward, the same values as ``(a - b).pow(2)`` and its autograd (2x faster on a deit_s ``fc1`` output, CPU).
    """
    return F.mse_loss(output, target, reduction="none").sum(-1).mean()


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


FUSION_MODES = ("block_mean", "normalized", "raw")


@dataclass
class LossFusion:
    """Mixed granularity loss fusion (docs/method.md section 5), one of ``FUSION_MODES``:

    - ``block_mean`` (default): ``(L_B + wG c_G L_G + wL c_L L_L) / (1 + wG + wL) + wR L_R`` with
      ``c_X = L_B0 / L_X0``. With ``wG = wL = 0`` it is exactly BRECQ's and QDrop's ``L_B + wR L_R``; with the new
      terms on, the data part still starts at ``L_B0``, so the rounding regulariser keeps QDrop's relative strength.
    - ``normalized``: ``L_B/L_B0 + wG L_G/L_G0 + wL L_L/L_L0 + wR L_R`` (effective rounding weight ``wR L_B0``).
    - ``raw``: ``L_B + wG L_G + wL L_L + wR L_R``.

    ``X0`` is a term's value on the first mini-batch it appears in (detached). The global and local weights ramp
    up linearly over the first ``warmup`` fraction of the iterations (0: no ramp); a term absent from a step
    (``global_every`` > 1) leaves the mean over the terms that are present.
    """

    global_weight: float = 1.0
    local_weight: float = 1.0
    round_weight: float = 0.01
    mode: str = "block_mean"
    warmup: float = 0.0
    initial: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in FUSION_MODES:
            raise ConfigError(f"method.loss.fusion={self.mode!r} is unknown. Fix: one of {FUSION_MODES}.")

    def _scale(self, name: str, value: torch.Tensor) -> float:
        """The factor a data term is multiplied by before its weight (fixed on the term's first value)."""
        if self.mode == "raw":
            return 1.0
        if name not in self.initial:
            self.initial[name] = max(float(value.detach()), 1e-12)
        if self.mode == "normalized":
            return 1.0 / self.initial[name]
        return self.initial["block"] / self.initial[name]  # block_mean: c_X = L_B0 / L_X0, and 1 for the block

    def __call__(self, terms: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        """Fuses ``terms`` (keys ``block``, optional ``global``, ``local``, ``rounding``) at ``progress`` in [0, 1]."""
        ramp = min(1.0, progress / self.warmup) if self.warmup > 0 else 1.0
        weights = {"block": 1.0, "global": ramp * self.global_weight, "local": ramp * self.local_weight}
        present = [name for name in weights if name in terms]  # block first: its L_B0 is set first
        data = sum(weights[name] * self._scale(name, terms[name]) * terms[name] for name in present)
        if self.mode == "block_mean":
            data = data / sum(weights[name] for name in present)
        if "rounding" in terms:
            data = data + self.round_weight * terms["rounding"]
        return data
