"""Loss curves of a reconstruction: every reported step's loss terms, per unit (``recon_curves.json``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mgrq_runner.errors import DataError
from mgrq_runner.files import read_json, write_text_atomic

# Called as ``on_step(unit_name, step, loss_terms, total_steps)`` every 10 steps and at a unit's last step.
StepCallback = Callable[[str, int, dict[str, float], int], None]


class LossCurves:
    """A step callback that records the loss terms per unit, then forwards them (e.g. to a progress display).

    Every term's list is aligned with the unit's ``step`` list: a term not computed at a reported step (the
    rounding regulariser during its warm-up, a global term skipped by ``global_every``) holds null there.

    The curves are saved to ``path`` at every unit's last step, before the unit itself is saved for resuming: a
    run killed at any moment keeps the curves of every unit it can resume with.
    """

    def __init__(self, path: Path, forward_to: StepCallback | None = None) -> None:
        self.path = path
        self.curves: dict[str, dict[str, list[float | None]]] = {}
        self.forward_to = forward_to

    def __call__(self, unit: str, step: int, terms: dict[str, float], total: int) -> None:
        curve = self.curves.setdefault(unit, {"step": []})
        earlier = len(curve["step"])
        curve["step"].append(step)
        for name, value in terms.items():
            curve.setdefault(name, [None] * earlier).append(value)
        for values in curve.values():
            if len(values) == earlier:  # a term not computed at this step
                values.append(None)
        if step == total - 1:
            self.save()
        if self.forward_to is not None:
            self.forward_to(unit, step, terms, total)

    def restore(self, units: list[str]) -> None:
        """Takes back the curves an interrupted run recorded for ``units`` (none where it has none)."""
        try:
            curves = read_json(self.path, "loss curves", "none needed: the curves restart", follow_links=False)
        except DataError:
            return
        self.curves = {unit: curves[unit] for unit in units if isinstance(curves.get(unit), dict)}

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.curves))


def chain(first: StepCallback | None, second: StepCallback | None) -> StepCallback | None:
    """One callback calling ``first`` then ``second`` (either may be None)."""
    if first is None or second is None:
        return first or second

    def both(unit: str, step: int, terms: dict[str, float], total: int) -> None:
        first(unit, step, terms, total)
        second(unit, step, terms, total)

    return both
