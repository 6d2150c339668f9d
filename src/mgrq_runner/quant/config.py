"""What a method quantizes and how its ranges start: ``QuantConfig`` (``quantize_``) and ``InitConfig``
(``calibrate``), checked when built.

Torch-free at import, so that the settings layer can build them without loading torch: the names a field may
take are owned by the modules that implement them and are imported when a config is checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mgrq_runner.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantConfig:
    """What ``quantize_`` inserts.

    Attributes:
        w_bits: weight bits (every Linear, the patch-embedding conv, the head).
        a_bits: activation bits (Linear inputs and both operands of both attention matmuls).
        input_bits: bits of the image entering the patch-embedding conv.
        softmax_quantizer: the post-softmax operand's quantizer: ``log_sqrt2`` (strictly b bits), ``log_sqrt2_repq``
            (RepQ-ViT's convention: 2**b levels plus zero) or ``uniform``.
    """

    w_bits: int = 4
    a_bits: int = 4
    input_bits: int = 8
    softmax_quantizer: str = "log_sqrt2"

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "input_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                raise ConfigError(
                    f"quant.{name}={bits!r} is outside {MIN_BITS}..{MAX_BITS}. "
                    f"Fix: pick an integer from {MIN_BITS} to {MAX_BITS} (e.g. quant=w4a4)."
                )
        from mgrq_runner.quant.attention import SOFTMAX_QUANTIZERS  # the names live with the quantizers

        if self.softmax_quantizer not in SOFTMAX_QUANTIZERS:
            raise ConfigError(
                f"method.init.softmax_quantizer={self.softmax_quantizer!r} is unknown. "
                f"Fix: one of {SOFTMAX_QUANTIZERS}."
            )


@dataclass(frozen=True)
class InitConfig:
    """How quantizer ranges are initialised.

    Attributes:
        search: ``mse`` (percentile candidates, least squared error) or ``minmax``.
        percentiles: candidate upper percentiles for ``mse`` (1.0 = min/max).
        reparam: apply the RepQ-ViT post-LayerNorm reparameterisation.
        observer_samples: elements each activation observer keeps over the whole calibration set.
        rotation: ``hadamard``: rotate the FP model before quantization (``transforms.rotation``); ``none``.
        mlp_relu: replace every MLP's GELU by ReLU and re-train fc1/fc2 in FP first (``transforms.mlp_relu``).
    """

    search: str = "mse"
    percentiles: Sequence[float] = (0.999, 0.9999, 0.99999, 1.0)
    reparam: bool = True
    observer_samples: int = 2**21
    rotation: str = "none"
    mlp_relu: bool = False

    def __post_init__(self) -> None:
        from mgrq_runner.transforms.rotation import ROTATIONS  # the names live with the transform

        if self.rotation not in ROTATIONS:
            raise ConfigError(f"method.init.rotation={self.rotation!r} is unknown. Fix: one of {ROTATIONS}.")
        if self.rotation != "none" and self.reparam:
            raise ConfigError(
                "method.init.rotation with method.init.reparam=true: the rotation turns a ViT's LayerNorms into "
                "RMSNorms without affine, on which the RepQ reparameterisation acts. Fix: method.init.reparam=false."
            )
        if not isinstance(self.mlp_relu, bool):
            raise ConfigError(f"method.init.mlp_relu={self.mlp_relu!r} is not true or false.")
        if self.search not in ("mse", "minmax"):
            raise ConfigError(f"method.init.search={self.search!r} is unknown. Fix: mse or minmax.")
        if not self.percentiles or not all(0.5 < p <= 1.0 for p in self.percentiles):
            raise ConfigError(f"method.init.percentiles={list(self.percentiles)} must lie in (0.5, 1].")

    @property
    def candidates(self) -> tuple[float, ...]:
        return (1.0,) if self.search == "minmax" else tuple(self.percentiles)
