"""The weight-rounding interface and its registry (``method.recon.rounding`` names an entry)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from mgrq_runner.quant import primitives
from mgrq_runner.quant.quantizers import UniformQuantizer

ROUNDINGS: dict[str, type[WeightRounding]] = {}  # name -> class, in registration order


class WeightRounding(nn.Module):
    """A learned parameterisation of one quantized layer's weight on a per-output-channel grid.

    Attached as ``layer.rounding`` during and after reconstruction, it replaces ``weight_quantizer(weight)``: the
    layer computes with ``rounding()``. Everything that reads a layer's weight (codes, export, resume) asks this
    interface, never the concrete class.

    Subclasses are created from ``(weight, quantizer)`` and provide:
        forward(): the weight the layer computes with (relaxed while learning, exact once ``hard``).
        variable: the parameter the weight optimiser learns.
        scale, zero_point: the grid, shaped ``[C, 1, ...]`` (``scale`` is a parameter where ``learns_step``).
        codes(): the integer codes (as floats) of the weight it computes with once hard.
    Class attributes tell the optimiser how to treat it:
        name: its ``method.recon.rounding`` value, also the export manifest's per-layer flag.
        relaxed: it learns a relaxation that hardening rounds (AdaRound): it has a ``regularizer(beta)`` pushing
            the relaxation to the grid, and converges when hardening no longer moves the loss. Else the weight it
            learns is, up to float rounding, the one it keeps, and it reports ``moved_share()``.
        learns_step: its per-channel step is learned too (``method.recon.weight_scale_lr``).
        derived: buffers recomputed exactly from the FP weight, which a resumed run does not need saved.
    """

    name: ClassVar[str]
    relaxed: ClassVar[bool] = False
    learns_step: ClassVar[bool] = False
    derived: ClassVar[tuple[str, ...]] = ()

    bits: int
    hard: bool
    variable: nn.Parameter
    scale: torch.Tensor
    zero_point: torch.Tensor

    def codes(self) -> torch.Tensor:
        raise NotImplementedError

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the grid the codes sit on (the step clamped as the forward clamps it)."""
        return self.scale.detach().clamp(min=primitives.SCALE_EPS), self.zero_point


def register_rounding(cls: type[WeightRounding]) -> type[WeightRounding]:
    """Class decorator: makes ``cls`` available as ``method.recon.rounding=<cls.name>``."""
    if cls.name in ROUNDINGS:
        raise ValueError(f"a rounding named {cls.name!r} is registered already ({ROUNDINGS[cls.name].__name__})")
    ROUNDINGS[cls.name] = cls
    return cls


def create_rounding(name: str, weight: torch.Tensor, quantizer: UniformQuantizer) -> WeightRounding:
    """The registered rounding ``name`` of ``weight`` on ``quantizer``'s grid."""
    factory: Callable[[torch.Tensor, UniformQuantizer], WeightRounding] = ROUNDINGS[name]
    return factory(weight, quantizer)
