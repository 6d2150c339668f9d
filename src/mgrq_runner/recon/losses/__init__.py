"""Reconstruction loss terms, one module each, and how they are fused.

- ``base``: the block-distance interface (``BlockDistance``, ``UnitContext``) and its registry ``BLOCK_DISTANCES``
  (``method.loss.block_distance`` names an entry); ``mse`` (BRECQ, QDrop, MGRQ), ``fisher`` (FIMA-Q's DPLR
  Fisher), ``hessian`` (APHQ-ViT's average perturbation Hessian) register one each;
- ``global_local``: MGRQ's global (EBGS) and local (IBLS) terms; ``fusion``: MGLF, the sum of a step's terms.

A new block distance is a module here with a ``@register_block_distance`` class, imported below, and a preset.
"""

from mgrq_runner.recon.losses import fisher, hessian, mse
from mgrq_runner.recon.losses.base import (
    BLOCK_DISTANCES,
    BlockDistance,
    UnitContext,
    create_block_distance,
    register_block_distance,
)

__all__ = [
    "BLOCK_DISTANCES",
    "BlockDistance",
    "UnitContext",
    "create_block_distance",
    "fisher",
    "hessian",
    "mse",
    "register_block_distance",
]
