"""Which device a run computes on: ``device=auto|cpu|cuda|cuda:N|claim``; ``claim`` takes a free local GPU."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from mgrq_runner.errors import ConfigError

log = logging.getLogger(__name__)

GPU_LOCK_DIR = Path(tempfile.gettempdir()) / "mgrq-gpu-locks"
_claimed_gpu: tuple[int, Any] | None = None  # (device index, its lock file, open for the process's lifetime)


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
