"""Every experiment composes, and its sweep expands (with Hydra's own sweeper logic) to the expected jobs."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from mgrq_runner.settings import parse_settings
from tests.conftest import compose_config

IMAGENET_MODELS = {"vit_s", "vit_b", "deit_t", "deit_s", "deit_b", "swin_t", "swin_s", "swin_b"}


def _compose(*overrides: str, hydra: bool = False) -> DictConfig:
    return compose_config("/tmp/unused", *overrides, hydra=hydra)


def expand(experiment: str) -> list[list[str]]:
    """The override list of every job of the experiment's sweep, as Hydra's basic sweeper splits it."""
    sweep = _compose(f"experiment={experiment}", hydra=True).hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in sweep.items()])
    return [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]


def job_summary(experiment: str, job: list[str]) -> tuple:
    cfg = _compose(f"experiment={experiment}", *job)
    method = parse_settings(cfg).method  # every job's settings validate
    assert method is not None
    losses = method.losses
    weights = (losses.global_weight, losses.local_weight) if losses else (0.0, 0.0)
    return (cfg.model.preset, cfg.method.name, cfg.quant.w_bits, cfg.quant.a_bits, *weights, int(cfg.seed))


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_paper_tables(bits: int) -> None:
    jobs = [job_summary(f"table_w{bits}a{bits}", job) for job in expand(f"table_w{bits}a{bits}")]
    methods = [("fp", 0.0, 0.0), ("repq", 0.0, 0.0), ("qdrop", 0.0, 0.0), ("mgrq", 1.0, 1.0)]
    expected = {(m, name, bits, bits, g, lw, 0) for m in IMAGENET_MODELS for name, g, lw in methods}
    assert len(jobs) == 32 and set(jobs) == expected


def test_ablation_and_loss_grid() -> None:
    jobs = [job_summary("ablation", job) for job in expand("ablation")]
    weights = [("qdrop", 0.0, 0.0), ("mgrq", 1.0, 0.0), ("mgrq", 0.0, 1.0), ("mgrq", 1.0, 1.0)]
    expected = {(m, name, b, b, g, lw, 0) for m in ("deit_s", "vit_s") for b in (3, 4) for name, g, lw in weights}
    assert len(jobs) == 16 and set(jobs) == expected
    grid = [job_summary("loss_grid", job) for job in expand("loss_grid")]
    values = (0.0, 0.1, 1.0, 10.0)
    assert len(grid) == 16 and set(grid) == {("deit_s", "mgrq", 4, 4, g, lw, 0) for g in values for lw in values}


def test_proxy_experiments() -> None:
    jobs = [job_summary("proxy_table", job) for job in expand("proxy_table")]
    assert len(jobs) == 72 and len(set(jobs)) == 72
    assert {job[0] for job in jobs} == {"proxy_vit"}
    assert {(job[2], job[3]) for job in jobs} == {(4, 4), (3, 3), (2, 4)} and {job[-1] for job in jobs} == {0, 1, 2}
    rows = {(job[1], job[4], job[5]) for job in jobs}
    assert ("mgrq", 0.0, 1.0) in rows and ("mgrq", 1.0, 0.0) in rows and ("brecq", 0.0, 0.0) in rows and len(rows) == 8
    swin = [job_summary("proxy_swin_table", job) for job in expand("proxy_swin_table")]
    assert len(swin) == 48 and len(set(swin)) == 48 and {job[0] for job in swin} == {"proxy_swin"}
    assert {(job[2], job[3]) for job in swin} == {(4, 4), (3, 3)}
    # The Swin table's AdaRound lr is chosen per setting (3e-2 at W4A4, 1e-1 at W3A3); the command line still wins.
    swin_lr = {
        q: _compose("experiment=proxy_swin_table", f"quant={q}", "method=qdrop").method.recon.weight_lr
        for q in ("w4a4", "w3a3")
    }
    assert swin_lr == {"w4a4": 3e-2, "w3a3": 1e-1}
    overridden = _compose("experiment=proxy_swin_table", "quant=w3a3", "method=mgrq", "model.recon_weight_lr=0.05")
    assert overridden.method.recon.weight_lr == 0.05

    # The proxy ViT's own budget is per setting (the default job's W4A4: 600 at 4e-2; else 1000 at 3e-2); its
    # tables pin 1000 at 3e-2 at every setting, the budget they were collected at; the command line still wins.
    def budget(*overrides: str) -> tuple[int, float]:
        recon = _compose(*overrides).method.recon
        return recon.iters, recon.weight_lr

    assert budget() == (600, 4e-2) and budget("quant=w3a3") == budget("quant=w2a4") == (1000, 3e-2)
    for experiment in ("proxy_table", "proxy_leaders", "proxy_framework"):
        assert budget(f"experiment={experiment}", "quant=w4a4", "method=qdrop") == (1000, 3e-2)
    assert budget("model.recon_iters=700") == (700, 4e-2) and budget("model=proxy_swin") == (1000, 3e-2)
    for experiment in ("proxy_table", "proxy_swin_table"):  # a table keeps the thread count fixed
        assert _compose(f"experiment={experiment}").threads == 1
    for experiment, model in (("proxy_leaders", "proxy_vit"), ("proxy_leaders_swin", "proxy_swin")):
        leaders = [job_summary(experiment, job) for job in expand(experiment)]
        assert len(leaders) == 18 and len(set(leaders)) == 18 and {job[0] for job in leaders} == {model}
        assert {job[1] for job in leaders} == {"fimaq", "aphq", "pdquant"}
    grid = [job_summary("proxy_loss_grid", job) for job in expand("proxy_loss_grid")]
    assert len(grid) == 9 and all(job[:4] == ("proxy_vit", "mgrq", 3, 3) for job in grid)


def test_every_experiment_is_a_multirun_and_a_user_override_wins() -> None:
    experiments = ("table_w4a4", "table_w3a3", "table_w6a6", "ablation", "loss_grid", "proxy_table", "proxy_swin_table")
    experiments += ("proxy_leaders", "proxy_leaders_swin")
    for experiment in experiments:
        assert str(_compose(f"experiment={experiment}", hydra=True).hydra.mode) == "RunMode.MULTIRUN"
    # A sweep narrowed on the command line, as the Makefile and the slow test do it.
    assert _compose("experiment=proxy_table", "quant=w2a4").quant.w_bits == 2


def test_optuna_search_tunes_on_heldout_train_images() -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose("experiment=optuna_loss", hydra=True)
    assert cfg.data.eval_split == "heldout" and cfg.method.name == "mgrq"
    sweeper = cfg.hydra.sweeper
    assert "optuna" in sweeper._target_.lower() and sweeper.direction == "maximize" and sweeper.n_trials == 20
    assert set(sweeper.params) == {"method.loss.global_weight", "method.loss.local_weight"}


def test_combinations_helper_is_consistent() -> None:
    # expand() must agree with a plain cartesian product of the comma lists (no Hydra internals drift).
    sweep = _compose("experiment=proxy_loss_grid", hydra=True).hydra.sweeper.params
    product = list(itertools.product(*[str(v).split(",") for v in sweep.values()]))
    assert len(expand("proxy_loss_grid")) == len(product)


@pytest.mark.slow
def test_proxy_table_end_to_end_on_a_tiny_budget(tmp_path) -> None:
    """The proxy_table sweep narrowed to one seed and setting, 3 iterations per unit, then collected."""
    sweep = tmp_path / "sweep"
    command = ["mgrq-run", "experiment=proxy_table", "seed=0", "quant=w4a4", "model.recon_iters=3"]
    command += ["calib.num_images=32", "data.num_eval=200", "progress=false", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(sweep.glob("*/results.json"))) == 8
    collect = [sys.executable, "-m", "mgrq_runner.analysis.collect", str(sweep)]
    done = subprocess.run(collect, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (sweep / "summary.md").read_text()
    rows = [line.split(" | ")[0].lstrip("| ") for line in summary.splitlines() if line.startswith("| ")]
    expected = ["FP", "minmax", "repq", "brecq", "qdrop", "mgrq", "mgrq (λG=0, λL=1)", "mgrq (λG=1, λL=0)"]
    assert rows[1:] == expected and "failed" not in summary and "missing" not in summary


@pytest.mark.parametrize(
    ("launcher", "target", "fields"),
    [
        ("slurm", "SlurmLauncher", {"gpus_per_node": 1, "tasks_per_node": 1, "max_num_timeout": 3}),
        ("local_gpus", "JoblibLauncher", {"prefer": "processes"}),
    ],
)
def test_launchers_compose_with_a_table(launcher: str, target: str, fields: dict) -> None:
    plugin = "hydra_submitit_launcher" if launcher == "slurm" else "hydra_joblib_launcher"
    pytest.importorskip(f"hydra_plugins.{plugin}")
    cfg = _compose("experiment=table_w4a4", f"hydra/launcher={launcher}", hydra=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert {key: cfg.hydra.launcher[key] for key in fields} == fields
    assert len(expand("table_w4a4")) == 32  # the launcher leaves the sweep as it is
