"""One reconstruction unit's convergence against its budget: AdaRound lr, iterations, rounding weight.

    python scripts/unit_budget.py model=proxy_swin quant=w3a3 method=qdrop --unit 0 --try 0.1:1000 0.1:2000 0.3:1000
    python scripts/unit_budget.py model=proxy_swin quant=w3a3 method=qdrop --unit 0 --try 0.1:1000:0.1

Composes the real config (the overrides given), calibrates as ``mgrq-run`` does, then optimises unit ``--unit``
alone once per ``LR:ITERS[:ROUND_WEIGHT]`` and prints its convergence figures (``block_soft``, ``block_hard``,
``undecided``) and the rounding variables left undecided. Use it to tell a budget that is too short (more
iterations or a higher lr decide the rounding) from a unit whose soft optimum lies off the grid (the same
variables stay undecided, and the hardened loss does not move, whatever the budget). Unit 0 sees exactly the
run's inputs; a later unit gets its inputs through the calibrated, not yet reconstructed, prefix.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from mgrq_runner import run as pipeline
from mgrq_runner.presets import CONFIG_DIR
from mgrq_runner.quant.api import quant_layers
from mgrq_runner.recon.cache import batched
from mgrq_runner.recon.optimizer import Supervision, UnitOptimizer
from mgrq_runner.recon.units import model_units
from mgrq_runner.results import ResultsFile
from mgrq_runner.settings import parse_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="mgrq-run overrides: model=, quant=, method=, seed=")
    parser.add_argument("--unit", type=int, default=0, help="the unit's index (0: the patch embedding)")
    parser.add_argument("--try", dest="budgets", nargs="+", required=True, metavar="LR:ITERS[:ROUND_WEIGHT]")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(tempfile.mkdtemp(prefix="unit_budget_"))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={out}", "progress=false", *args.overrides])
    settings = parse_settings(cfg)
    method = settings.method
    if method is None or method.recon is None or method.losses is None:
        raise SystemExit(f"method {cfg.method.name} does not reconstruct: use method=brecq, qdrop or mgrq")
    pipeline.seed_everything(settings.seed)
    device = torch.device("cpu")
    results = ResultsFile(out / "results.json", {})
    fp_model, bundle = pipeline.build(settings, results, device)
    models = {"fp": fp_model}
    images = pipeline.load_calibration(bundle, settings, results, device)
    pipeline.calibrated_model(models, images, settings, results)
    fp_model, calibrated = pipeline.teacher(models), models["quant"]
    for parameter in [*fp_model.parameters(), *calibrated.parameters()]:
        parameter.requires_grad_(False)

    fp_units = model_units(fp_model)
    batch = method.recon.batch_size
    x_q, x_fp = images, images
    for quant_unit, fp_unit in zip(model_units(calibrated)[: args.unit], fp_units[: args.unit], strict=True):
        x_q, x_fp = batched(quant_unit, x_q, batch), batched(fp_unit, x_fp, batch)
    supervision = Supervision.create(fp_units, images, method.recon, method.losses)
    print(f"{settings.model.name} {method.name} W{method.quant.w_bits}A{method.quant.a_bits} seed {settings.seed}, "
          f"unit {args.unit} ({fp_units[args.unit].name}), {args.threads} thread(s)")  # fmt: skip

    for budget in args.budgets:
        lr, iters, *rest = budget.split(":")
        recon = dataclasses.replace(method.recon, weight_lr=float(lr), iters=int(iters))
        losses = dataclasses.replace(method.losses, round_weight=float(rest[0])) if rest else method.losses
        unit = model_units(copy.deepcopy(calibrated))[args.unit]
        optimizer = UnitOptimizer.for_unit(
            unit, args.unit, x_fp, dataclasses.replace(supervision, recon=recon, losses=losses)
        )
        generator = torch.Generator().manual_seed(settings.seed)
        start = time.perf_counter()
        for step in range(recon.iters):
            optimizer.step(step, x_q, x_fp, generator)
        undecided_at = [
            (name, index)
            for name, rounding in zip(_layer_names(unit.module), optimizer.roundings, strict=True)
            for index in _undecided(rounding.soft_rounding())
        ]
        report = optimizer.harden(x_q)
        print(
            f"lr {recon.weight_lr:g} iters {recon.iters} round_weight {losses.round_weight:g}: "
            f"block_soft {report['block_soft']:.5f} block_hard {report['block_hard']:.5f} "
            f"(x{report['block_hard'] / report['block_soft']:.3f}) undecided {report['undecided']:.2%} "
            f"({time.perf_counter() - start:.0f} s)"
        )
        if undecided_at:
            print("  undecided:", ", ".join(f"{name}{list(index)}" for name, index in undecided_at[:12]))


def _layer_names(module: torch.nn.Module) -> list[str]:
    return [name or "(unit)" for name, _ in quant_layers(module)]


def _undecided(soft: torch.Tensor) -> list[tuple[int, ...]]:
    with torch.no_grad():
        return [tuple(i) for i in ((soft > 0.01) & (soft < 0.99)).nonzero().tolist()]


if __name__ == "__main__":
    main()
