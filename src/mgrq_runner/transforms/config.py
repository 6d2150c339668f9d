"""Settings of the FP transforms that are re-trained (checked when built; torch-free, for the settings layer)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mgrq_runner.errors import ConfigError


@dataclass(frozen=True)
class MlpReluConfig:
    """How each MLP's fc1/fc2 are re-trained after the GELU -> ReLU swap (``transforms.mlp_relu``)."""

    iters: int = 500  # Adam steps per MLP
    lr: float = 1e-3  # Adam learning rate on fc1/fc2 weights and biases, cosine-annealed to 0
    batch_size: int = 32  # images per step

    def __post_init__(self) -> None:
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ConfigError(
                f"method.init.mlp_relu_iters={self.iters} must be an integer >= 1; "
                "Fix: method.init.mlp_relu_iters=500 (Adam steps per MLP)."
            )
        if (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, (int, float))
            or not (math.isfinite(self.lr) and self.lr > 0)
        ):
            raise ConfigError(
                f"method.init.mlp_relu_lr={self.lr} must be a finite number > 0; Fix: method.init.mlp_relu_lr=1e-3."
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(
                f"method.init.mlp_relu_batch_size={self.batch_size} must be an integer >= 1; "
                "Fix: method.init.mlp_relu_batch_size=32 (images per step)."
            )
