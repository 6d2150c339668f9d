"""dry_run's projection: which units are timed, interpolation between them, and the model left as it was."""

import pytest
import torch

from mgrq_runner.analysis.runs import load_runs
from mgrq_runner.errors import ConfigError
from mgrq_runner.quant.api import quant_layers
from mgrq_runner.recon.config import LossConfig, ReconConfig
from mgrq_runner.recon.projection import project, sampled_units
from mgrq_runner.recon.units import model_units
from mgrq_runner.run import run
from tests.conftest import needs_fashion_mnist
from tests.recon.test_families import FAMILIES, tiny_models


def test_sampled_units_are_the_ends_the_first_block_and_a_middle_one() -> None:
    assert sampled_units(6) == [0, 1, 3, 4, 5]
    assert sampled_units(14) == [0, 1, 7, 12, 13]
    assert sampled_units(2) == [0, 1]
    assert sampled_units(1) == [0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_projection_covers_every_unit_and_leaves_the_model_unchanged(family: str) -> None:
    fp_model, quant_model, images = tiny_models(family)
    before = {k: v.clone() for k, v in quant_model.state_dict().items()}
    grads_before = [p.requires_grad for p in [*fp_model.parameters(), *quant_model.parameters()]]
    recon, losses = ReconConfig(iters=100, batch_size=4), LossConfig(global_every=2)
    projection = project(quant_model, fp_model, images, recon, losses, seed=0, steps=2)

    units = model_units(quant_model)
    assert [u.name for u in projection.units] == [u.name for u in units]
    timed = sampled_units(len(units))
    assert [i for i, u in enumerate(projection.units) if u.measured] == timed
    for index, cost in enumerate(projection.units):
        assert cost.step_seconds > 0 and cost.pass_seconds > 0 and cost.iters == 100
        if not cost.measured:  # linear in the index between the nearest timed units
            below, above = max(i for i in timed if i < index), min(i for i in timed if i > index)
            a, b = projection.units[below].step_seconds, projection.units[above].step_seconds
            expected = a + (index - below) / (above - below) * (b - a)
            assert cost.step_seconds == pytest.approx(expected)
    assert projection.seconds == pytest.approx(projection.setup_seconds + sum(u.seconds for u in projection.units))
    assert projection.peak_memory_mb > 0
    after = quant_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(layer.rounding is None for _, layer in quant_layers(quant_model))
    assert [p.requires_grad for p in [*fp_model.parameters(), *quant_model.parameters()]] == grads_before


@needs_fashion_mnist
def test_dry_run_records_a_projection_and_no_result(compose_cfg) -> None:
    cfg = compose_cfg("dry_run=true", "calib.num_images=32", "model.recon_iters=50", "threads=1")
    results, _ = run(cfg)
    assert results["status"] == "projected" and "top1" not in results and "reconstruct" not in results["times"]
    projection = results["projection"]
    assert [u["unit"] for u in projection["units"]] == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    rounding = 0.05 + 0.005 * len(projection["units"])  # the total is rounded to 0.1 s, each unit to 0.01 s
    assert projection["seconds"] + rounding >= sum(u["seconds"] for u in projection["units"])
    assert load_runs([cfg.output_dir]) == []  # a projection is not a result: tables skip it


def test_dry_run_needs_a_method_that_reconstructs(compose_cfg) -> None:
    with pytest.raises(ConfigError, match="does not reconstruct"):
        run(compose_cfg("dry_run=true", "method=repq"))


def test_projection_times_a_distances_statistics_apart() -> None:
    # FIMA-Q's Fisher snapshots happen at a few steps of the budget: the projection times one and counts them,
    # and the timed steps in the middle of the budget do not recompute them.
    fp_model, quant_model, images = tiny_models("deit_distilled")
    recon = ReconConfig(iters=100, batch_size=4)
    projections = {
        distance: project(quant_model, fp_model, images, recon, LossConfig(block_distance=distance), seed=0, steps=2)
        for distance in ("mse", "dplr_fim")
    }
    for projection in projections.values():
        assert all(u.step_seconds > 0 and u.pass_seconds > 0 for u in projection.units)
    from mgrq_runner.recon.losses.fisher import DplrFisher

    calls = []
    original = DplrFisher.snapshot

    def counted(self):  # type: ignore[no-untyped-def]
        calls.append(self.context.unit.name)
        return original(self)

    DplrFisher.snapshot = counted
    try:
        project(quant_model, fp_model, images, recon, LossConfig(block_distance="dplr_fim"), seed=0, steps=2)
    finally:
        DplrFisher.snapshot = original
    units = model_units(quant_model)
    timed_blocks = [units[i].name for i in sampled_units(len(units)) if i < len(units) - 1]
    assert calls == timed_blocks  # one snapshot per timed unit but the head, none in the timed steps
