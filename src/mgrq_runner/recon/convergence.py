"""The convergence criterion of a reconstructed unit (docs/method.md section 5), shared by the runner and the collector.

The engine reports, per unit, ``block_soft`` and ``block_hard`` (the block loss on the calibration set just before
and just after hardening the rounding) and ``undecided`` (the share of rounding variables with 0.01 < h(V) < 0.99).
A unit tuned by STE (``method.recon.rounding=ste``) has nothing to harden; it reports ``block_at_90`` and
``block_final``, the same calibration block loss at 90 % and at 100 % of its budget, and counts as converged when the
last tenth of the budget lowered it by less than ``STE_PLATEAU`` (the loss has flattened).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

HARDENING_JUMP_LIMIT = 1.2  # block_hard / block_soft of a converged unit
UNDECIDED_LIMIT = 0.02  # share of rounding variables still between 0.01 and 0.99 at the end
STE_PLATEAU = 0.01  # STE: largest relative drop of the block loss over the last 10 % of the budget


def converged(unit: Mapping[str, Any]) -> bool:
    """Whether one unit's report meets the criterion (a unit without rounding variables always does)."""
    if "block_final" in unit:
        return unit["block_final"] >= (1.0 - STE_PLATEAU) * unit["block_at_90"]
    if "block_hard" not in unit:
        return True
    return unit["block_hard"] <= HARDENING_JUMP_LIMIT * unit["block_soft"] and unit["undecided"] < UNDECIDED_LIMIT


def unconverged_units(reconstruction: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the units of a run's ``reconstruction`` list that miss the criterion."""
    return [str(unit.get("unit")) for unit in reconstruction if not converged(unit)]
