"""Mixed granularity loss fusion (MGLF): how the block, global, local and rounding terms of a step add up."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mgrq_runner.errors import ConfigError

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
