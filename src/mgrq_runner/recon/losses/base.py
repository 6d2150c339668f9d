"""The block-distance interface and its registry (``method.loss.block_distance`` names an entry).

A block distance is the term that compares a unit's quantized output with its FP output on a mini-batch: the
squared error of BRECQ, QDrop and MGRQ, or a curvature-weighted error (FIMA-Q's Fisher, APHQ-ViT's Hessian) whose
weights are statistics of the whole model. One is created per unit, from a ``UnitContext``: what it may read of
the unit and of the FP model; the optimiser calls ``refresh(step)`` before every step (a distance whose statistics
change while the unit learns recomputes them there) and the distance itself on every mini-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mgrq_runner.recon.config import LossConfig, ReconConfig
    from mgrq_runner.recon.units import Unit

BLOCK_DISTANCES: dict[str, type[BlockDistance]] = {}  # name -> class, in registration order


@dataclass(frozen=True)
class UnitContext:
    """What a block distance may use of the unit it supervises.

    Attributes:
        unit: the quantized unit, as the optimiser trains it (QDrop on, roundings relaxed).
        x_fp: the unit's FP input for every calibration image (the FP prefix's output).
        target: the FP unit's output for every calibration image.
        remainder: the frozen FP rest of the model, unit output -> logits; None for the head.
        logits: the FP model's logits of every calibration image, when the distance ``needs_logits``; else None.
        recon, losses: the reconstruction's settings.
    """

    unit: Unit
    x_fp: torch.Tensor
    target: torch.Tensor
    remainder: Callable[[torch.Tensor], torch.Tensor] | None
    logits: torch.Tensor | None
    recon: ReconConfig
    losses: LossConfig

    @property
    def is_head(self) -> bool:
        return self.remainder is None


class BlockDistance:
    """The block term of one unit. Subclasses set ``name`` (and ``needs_logits`` when they read
    ``UnitContext.logits``) and implement ``__call__``; ``refresh`` is theirs to override."""

    name: ClassVar[str]
    needs_logits: ClassVar[bool] = False

    def __init__(self, context: UnitContext) -> None:
        self.context = context

    def refresh(self, step: int) -> None:
        """Called before optimisation step ``step``: recompute statistics that depend on the unit's state."""

    def refresh_count(self, iters: int) -> int:
        """How many of a budget's ``iters`` steps recompute statistics in ``refresh`` (``dry_run`` times one)."""
        return 0

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The term on a mini-batch: the quantized unit's ``output`` against the FP ``target`` (same shape)."""
        raise NotImplementedError


def register_block_distance(cls: type[BlockDistance]) -> type[BlockDistance]:
    """Class decorator: makes ``cls`` available as ``method.loss.block_distance=<cls.name>``."""
    if cls.name in BLOCK_DISTANCES:
        raise ValueError(f"a block distance named {cls.name!r} is registered already")
    BLOCK_DISTANCES[cls.name] = cls
    return cls


def create_block_distance(name: str, context: UnitContext) -> BlockDistance:
    """The registered block distance ``name`` of the unit in ``context``."""
    return BLOCK_DISTANCES[name](context)


def kl_batchmean(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(softmax(target / T) || softmax(logits / T))`` summed over classes, averaged over the batch (no T^2)."""
    log_p = F.log_softmax(target_logits / temperature, dim=-1)
    log_q = F.log_softmax(logits / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def batch_slices(count: int, batch: int) -> list[slice]:
    """``[0, count)`` in consecutive slices of ``batch`` (the last one shorter)."""
    return [slice(i, min(i + batch, count)) for i in range(0, count, batch)]
