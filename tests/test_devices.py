"""The CPU thread policy: all cores for a job alone, shared among the jobs a launcher runs at once."""

from __future__ import annotations

import pytest
import torch
from hydra.types import RunMode
from omegaconf import OmegaConf

from mgrq_runner.devices import CPU_CORES, cpu_threads, machine_description
from mgrq_runner.settings import launcher_jobs


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


def test_machine_description_from_cpuinfo(tmp_path) -> None:
    """The first processor's model, family and model number, the vector instructions torch uses, the cores."""
    cpuinfo = tmp_path / "cpuinfo"
    block = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
    cpuinfo.write_text(block.format(0) + "\n" + block.format(1).replace("EPYC", "Other"))
    capability = torch.backends.cpu.get_cpu_capability()
    assert machine_description.__wrapped__(cpuinfo) == f"AMD EPYC (family 26, model 2), {capability}, {CPU_CORES} cores"
    described = machine_description.__wrapped__(tmp_path / "absent")  # not Linux: platform's name for the CPU
    assert described.endswith(f", {capability}, {CPU_CORES} cores") and not described.startswith(",")
