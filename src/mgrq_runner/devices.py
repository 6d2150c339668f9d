"""Which device a run computes on: ``device=auto|cpu|cuda|cuda:N|claim``; ``claim`` takes a free local GPU."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mgrq_runner.errors import ConfigError

log = logging.getLogger(__name__)

GPU_LOCK_DIR = Path(tempfile.gettempdir()) / "mgrq-gpu-locks"
CPU_CORES = torch.get_num_threads()  # torch's default: the cores this process may use (read before any change)
_claimed_gpu: tuple[int, Any] | None = None  # (device index, its lock file, open for the process's lifetime)


@functools.cache
def machine_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU a run computes on, e.g. "AMD EPYC (family 26, model 2), AVX512, 2 cores".

    Runs repeated with the same seed and threads give the same results bit for bit on one kind of CPU but not
    across kinds (another model or vector width reduces floats in another order: docs/proxy/README.md), so a
    table's comparisons are cleanest among runs of one description.
    """
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}, {CPU_CORES} cores"


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``claim`` a GPU no other local job holds."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "claim":  # a GPU of this process's own, for sweeps on several local GPUs (docs/scale-out.md)
        return torch.device(claim_gpu())
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here. Fix: device=auto or device=cpu.")
    return device


def claim_gpu(lock_dir: Path = GPU_LOCK_DIR) -> str:
    """``cuda:i`` for the first visible GPU that no other process has claimed; the claim lasts until this process
    exits (an ``flock`` on ``lock_dir/gpu-<id>.lock``), and later calls return the same GPU.

    For sweeps on several local GPUs (``hydra/launcher=local_gpus device=claim``): each long-lived joblib worker
    keeps one GPU to itself, whatever order its jobs finish in.

    Raises:
        ConfigError: no GPU is visible, or every one is claimed already.
    """
    global _claimed_gpu
    if _claimed_gpu is not None:
        return f"cuda:{_claimed_gpu[0]}"
    import fcntl

    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError("device=claim but no GPU is visible here. Fix: device=cpu, or run where CUDA is available.")
    visible = [name.strip() for name in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if name.strip()]
    ids = visible if len(visible) == count else [str(i) for i in range(count)]  # lock physical ids when known
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index, gpu in enumerate(ids):
        handle = open(lock_dir / f"gpu-{gpu}.lock", "a+")  # kept open: closing it would release the claim
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _claimed_gpu = (index, handle)
        log.info("claimed GPU %s (cuda:%d) for this process", gpu, index)
        return f"cuda:{index}"
    raise ConfigError(
        f"device=claim but all {count} visible GPUs are claimed by other jobs. Fix: hydra.launcher.n_jobs={count} "
        f"or fewer (one job per GPU); a claim ends when its process exits (locks in {lock_dir})."
    )


def cpu_threads(requested: int | None, concurrent_jobs: int = 1, cores: int = CPU_CORES) -> int:
    """A job's torch CPU thread count: ``requested``, else the cores shared among the jobs running at once.

    Measured on 2 cores (proxy mgrq step, docs/speed.md): 2 threads alone 31 ms, 1 thread 45 ms; two jobs of 2
    threads each 2300 ms a step (OpenMP threads spin against each other), of 1 thread each 45 ms.
    """
    if requested is not None:
        return requested
    return max(1, cores // max(1, concurrent_jobs))


def warn_if_cpu_busy(threads: int) -> None:
    """Warns when other processes already load the cores this job's threads would use (the case above)."""
    load = os.getloadavg()[0]
    if threads > 1 and load + threads > CPU_CORES + 0.5:
        log.warning(
            "the CPU is busy (load %.1f on %d cores) and this job runs %d torch threads: threads that share cores "
            "with other processes can make every step many times slower. Fix: threads=1, or run alone.",
            load,
            CPU_CORES,
            threads,
        )


def set_threads(requested: int | None, concurrent_jobs: int) -> int:
    """``threads=N``, else the cores shared among the jobs the launcher runs at once (``cpu_threads``); warns when
    the machine is busy. Returns the thread count set."""
    threads = cpu_threads(requested, concurrent_jobs)
    torch.set_num_threads(threads)
    warn_if_cpu_busy(threads)
    return threads


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """torch's default generators (the CPU's and ``device``'s) seeded with ``seed`` inside the block and restored
    to the caller's states after it. The quantizers' QDrop masks draw from them: seeded here, a reconstruction
    gives the same result whatever ran before it in the process (the CLI's model and data build, a notebook)."""
    with torch.random.fork_rng([device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
