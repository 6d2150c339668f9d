"""Loss fusion (docs/method.md section 5): the baselines' objective is exactly theirs; new terms keep its scale."""

import pytest
import torch

from mgrq_runner.errors import ConfigError
from mgrq_runner.recon.losses.fusion import LossFusion


def terms(block: float, global_: float, local: float, rounding: float) -> dict[str, torch.Tensor]:
    return {
        "block": torch.tensor(block),
        "global": torch.tensor(global_),
        "local": torch.tensor(local),
        "rounding": torch.tensor(rounding),
    }


def test_block_mean_without_new_terms_is_the_papers_objective() -> None:
    fusion = LossFusion(global_weight=0.0, local_weight=0.0, round_weight=0.01)
    for block, rounding in ((0.37, 5123.0), (12.5, 80.0), (0.004, 0.0)):  # later batches: no renormalisation
        loss = fusion({"block": torch.tensor(block), "rounding": torch.tensor(rounding)}, 0.5)
        assert loss.item() == (torch.tensor(block) + 0.01 * torch.tensor(rounding)).item()
    # Zero weights with the terms present are the same objective.
    loss = LossFusion(0.0, 0.0, 0.01)(terms(0.37, 9.0, 0.2, 100.0), 0.0)
    assert loss.item() == (torch.tensor(0.37) + 0.01 * torch.tensor(100.0)).item()


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.1, 10.0), (10.0, 0.0), (0.0, 3.0), (2.5, 0.3)])
def test_block_mean_data_part_starts_at_the_block_loss(weights: tuple[float, float]) -> None:
    fusion = LossFusion(*weights, round_weight=0.0)
    first = fusion(terms(0.37, 42.0, 0.0021, 0.0), 0.0)
    assert first.item() == pytest.approx(0.37, rel=1e-6)
    # Afterwards each term is scaled by c_X = L_B0 / L_X0 and the sum divided by 1 + wG + wL.
    later = fusion(terms(0.2, 21.0, 0.0042, 0.0), 0.3)
    global_weight, local_weight = weights
    expected = (0.2 + global_weight * 0.37 / 42.0 * 21.0 + local_weight * 0.37 / 0.0021 * 0.0042) / (
        1 + global_weight + local_weight
    )
    assert later.item() == pytest.approx(expected, rel=1e-6)


def test_block_mean_keeps_the_rounding_weight_absolute() -> None:
    fusion = LossFusion(1.0, 1.0, round_weight=0.01)
    fusion(terms(0.37, 42.0, 0.0021, 0.0), 0.0)
    with_rounding = fusion(terms(0.37, 42.0, 0.0021, 1000.0), 0.5)
    assert with_rounding.item() == pytest.approx(0.37 + 10.0, rel=1e-6)


def test_a_missing_global_term_leaves_the_mean_of_the_others() -> None:
    fusion = LossFusion(1.0, 1.0, round_weight=0.0)
    fusion(terms(0.5, 4.0, 0.01, 0.0), 0.0)
    without_global = fusion({"block": torch.tensor(0.5), "local": torch.tensor(0.01)}, 0.5)  # global_every > 1
    assert without_global.item() == pytest.approx(0.5, rel=1e-6)


def test_normalized_and_raw_options() -> None:
    normalized = LossFusion(2.0, 3.0, round_weight=0.01, mode="normalized")
    assert normalized(terms(0.5, 4.0, 0.01, 100.0), 0.5).item() == pytest.approx(1 + 2 + 3 + 1.0, rel=1e-6)
    raw = LossFusion(2.0, 3.0, round_weight=0.01, mode="raw")
    assert raw(terms(0.5, 4.0, 0.01, 100.0), 0.5).item() == pytest.approx(0.5 + 8.0 + 0.03 + 1.0, rel=1e-6)


def test_warmup_ramps_the_new_terms() -> None:
    fusion = LossFusion(1.0, 0.0, round_weight=0.0, warmup=0.5)
    fusion(terms(1.0, 1.0, 0.0, 0.0), 0.0)
    # At a quarter of the run the global weight is 0.5: (L_B + 0.5 * L_G) / 1.5.
    assert fusion({"block": torch.tensor(1.0), "global": torch.tensor(4.0)}, 0.25).item() == pytest.approx(2.0)


def test_unknown_fusion_is_refused() -> None:
    with pytest.raises(ConfigError, match="block_mean"):
        LossFusion(mode="sum")
