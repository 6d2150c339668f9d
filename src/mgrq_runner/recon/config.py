"""Reconstruction settings: how every unit is optimised (``ReconConfig``) and on which loss (``LossConfig``).

Torch-free at import (the settings layer builds these without loading torch): the names a field may take are
owned by the registries that implement them (``quant.rounding``, ``recon.losses``) and read when a config is
checked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mgrq_runner.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from mgrq_runner.recon.losses.fusion import LossFusion

# Where IBLS may align a block's layers: the outputs of these Linears, the attention probabilities (the input of
# ``attn @ v``) and the output of ``attn @ v``.
LOCAL_POINTS = ("qkv", "proj", "fc1", "fc2", "attn_probs", "attn_v")
LOCAL_TARGET_DTYPES = ("float32", "bfloat16")
WEIGHT_SCHEDULES = ("constant", "cosine")
APH_FORMS = ("released", "current")  # APHQ-ViT's loss in its first public release, or as its code is now
APH_HESSIANS = ("finite_difference", "exact")


TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "bool": bool, "str": str}
TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def check_types(settings: Any, prefix: str) -> None:
    """Each field holds its annotated type: Hydra passes what the command line said (``iters=abc`` is a str)."""
    for spec in dataclasses.fields(settings):
        value, kind = getattr(settings, spec.name), TYPES.get(str(spec.type))
        if kind is None:
            continue
        if not isinstance(value, kind) or (spec.type != "bool" and isinstance(value, bool)):
            what = TYPE_WORDS[str(spec.type)]
            raise ConfigError(f"{prefix}.{spec.name}={value!r} is not {what}. Fix: {prefix}.{spec.name}=<{what}>.")


@dataclass(frozen=True)
class ReconConfig:
    """Optimisation settings of every unit (docs/method.md section 2)."""

    iters: int = 20_000
    batch_size: int = 32
    quant_prob: float = 0.5  # QDrop's p: the chance that an element is quantized (1: BRECQ-style, no drop)
    weight_lr: float = 1e-3
    scale_lr: float = 4e-5
    round_warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    learn_log_delta: bool = False
    rounding: str = "adaround"  # adaround: up or down on a fixed grid | ste: the weight and its step, round-to-nearest
    weight_scale_lr: float = 0.0  # ste: Adam lr of the per-channel weight steps (0: the steps stay fixed)
    weight_schedule: str = "constant"  # the weight optimiser's lr: constant | cosine (to 0 over the budget)

    def __post_init__(self) -> None:
        check_types(self, "method.recon")
        from mgrq_runner.quant.rounding import ROUNDINGS  # what a unit's weights learn (docs/method.md 2, 9)

        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"method.recon.rounding={self.rounding!r} is unknown. Fix: one of {tuple(ROUNDINGS)}.")
        if self.weight_schedule not in WEIGHT_SCHEDULES:
            raise ConfigError(
                f"method.recon.weight_schedule={self.weight_schedule!r} is unknown. Fix: one of {WEIGHT_SCHEDULES}."
            )
        if self.weight_scale_lr < 0:
            raise ConfigError(f"method.recon.weight_scale_lr={self.weight_scale_lr} must be >= 0.")
        if self.iters < 1 or self.batch_size < 1:
            raise ConfigError(f"method.recon.iters={self.iters} and batch_size={self.batch_size} must be >= 1.")
        if not 0.0 <= self.quant_prob <= 1.0:
            raise ConfigError(f"method.recon.quant_prob={self.quant_prob} must lie in [0, 1] (1 = no QDrop).")
        if not 0.0 <= self.round_warmup < 1.0:
            raise ConfigError(f"method.recon.round_warmup={self.round_warmup} must lie in [0, 1).")


@dataclass(frozen=True)
class LossConfig:
    """Loss terms and their fusion (docs/method.md sections 3 to 5); a zero weight switches a term off."""

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
    local_target_dtype: str = "float32"  # or bfloat16: IBLS's cached FP layer tensors in half the memory
    block_distance: str = "mse"  # the block term: mse | dplr_fim (FIMA-Q) | aph (APHQ-ViT); recon.losses
    statistic_temperature: float = 20.0  # dplr_fim, aph: the KL temperature of their Fisher / Hessian statistics
    fisher_rank: int = 5  # dplr_fim: snapshots per unit, evenly spaced from the first step (FIMA-Q's k)
    aph_form: str = "released"  # aph: released | current (docs/method.md)
    aph_hessian: str = "finite_difference"  # aph: finite_difference (APHQ-ViT's +-1e-6) | exact (a Hessian product)

    @property
    def local_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.local_target_dtype)

    def __post_init__(self) -> None:
        check_types(self, "method.loss")
        from mgrq_runner.recon.losses import BLOCK_DISTANCES
        from mgrq_runner.recon.losses.fusion import FUSION_MODES
        from mgrq_runner.recon.losses.global_local import GLOBAL_DISTANCES, LOCAL_DISTANCES

        if self.block_distance not in BLOCK_DISTANCES:
            raise ConfigError(
                f"method.loss.block_distance={self.block_distance!r} is unknown. Fix: one of {tuple(BLOCK_DISTANCES)}."
            )
        for key, allowed in (("aph_form", APH_FORMS), ("aph_hessian", APH_HESSIANS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"method.loss.{key}={getattr(self, key)!r} is unknown. Fix: one of {allowed}.")
        if self.fisher_rank < 1 or self.statistic_temperature <= 0:
            raise ConfigError("method.loss.fisher_rank must be >= 1 and method.loss.statistic_temperature > 0.")
        if self.fusion not in FUSION_MODES:
            raise ConfigError(f"method.loss.fusion={self.fusion!r} is unknown. Fix: one of {FUSION_MODES}.")
        if self.global_distance not in GLOBAL_DISTANCES:
            raise ConfigError(f"method.loss.global_distance={self.global_distance!r}. Fix: one of {GLOBAL_DISTANCES}.")
        if self.local_distance not in LOCAL_DISTANCES:
            raise ConfigError(f"method.loss.local_distance={self.local_distance!r}. Fix: one of {LOCAL_DISTANCES}.")
        if self.global_every < 1 or self.temperature <= 0:
            raise ConfigError("method.loss.global_every must be >= 1 and method.loss.temperature > 0.")
        unknown = sorted(set(self.local_layers) - set(LOCAL_POINTS))
        if unknown:
            raise ConfigError(f"method.loss.local_layers has unknown {unknown}. Fix: pick from {LOCAL_POINTS}.")
        if self.local_target_dtype not in LOCAL_TARGET_DTYPES:
            raise ConfigError(
                f"method.loss.local_target_dtype={self.local_target_dtype!r}. Fix: one of {LOCAL_TARGET_DTYPES}."
            )
        if min(self.global_weight, self.local_weight, self.round_weight) < 0:
            raise ConfigError("method.loss weights must be >= 0.")

    def new_fusion(self) -> LossFusion:
        """A fusion for one unit: it fixes its normalisers on the unit's first mini-batch."""
        from mgrq_runner.recon.losses.fusion import LossFusion

        return LossFusion(self.global_weight, self.local_weight, self.round_weight, self.fusion, self.warmup)
