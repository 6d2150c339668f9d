"""The CPU thread policy: all cores for a job alone, shared among the jobs a launcher runs at once."""

from __future__ import annotations

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf

from mgrq_runner.devices import CPU_CORES, cpu_threads
from mgrq_runner.run import launcher_jobs


def test_requested_threads_win() -> None:
    assert cpu_threads(3, concurrent_jobs=4, cores=2) == 3


@pytest.mark.parametrize(("jobs", "cores", "expected"), [(1, 2, 2), (2, 2, 1), (2, 8, 4), (3, 8, 2), (16, 8, 1)])
def test_cores_are_shared_among_concurrent_jobs(jobs: int, cores: int, expected: int) -> None:
    assert cpu_threads(None, concurrent_jobs=jobs, cores=cores) == expected


def _hydra(mode: RunMode, launcher: dict) -> OmegaConf:
    return OmegaConf.create({"mode": mode, "launcher": launcher})


def test_launcher_jobs() -> None:
    assert launcher_jobs(None) == 1  # run() called from Python
    assert launcher_jobs(_hydra(RunMode.RUN, {"n_jobs": 4})) == 1
    assert launcher_jobs(_hydra(RunMode.MULTIRUN, {"_target_": "BasicLauncher"})) == 1  # one job at a time
    assert launcher_jobs(_hydra(RunMode.MULTIRUN, {"n_jobs": 4})) == 4
    assert launcher_jobs(_hydra(RunMode.MULTIRUN, {"n_jobs": -1})) == CPU_CORES  # joblib: one job per core
    assert launcher_jobs(_hydra(RunMode.MULTIRUN, {"n_jobs": -2})) == max(1, CPU_CORES - 1)
