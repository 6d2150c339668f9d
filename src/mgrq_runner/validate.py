"""Checks a composed config before any work: types and ranges of the run's own values, and no invented keys.

Every problem is a ``ConfigError`` naming the key, the value and the fix. The method's settings (bits,
reconstruction, losses) are checked by their own frozen dataclasses (``QuantConfig``, ``ReconConfig``,
``LossConfig``); this module checks what belongs to the run.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mgrq_runner.errors import ConfigError
from mgrq_runner.onnx_export import require_deploy

DEVICE_PATTERN = re.compile(r"^(auto|cpu|claim|cuda(:\d+)?)$")
EVAL_BACKENDS = ("auto", "gloo", "nccl")
EVAL_RUNTIMES = ("torch", "onnxruntime")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(cfg: DictConfig, key: str, low: int, high: int | None = None, optional: bool = False) -> None:
    """``key`` holds an integer in ``[low, high]`` (or None when ``optional``)."""
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    if not _is_int(value) or value < low or (high is not None and value > high):
        allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        also = " or null" if optional else ""
        raise ConfigError(f"{key}={value!r} is not allowed. Fix: {key}=<{allowed}>{also}.")


def check_choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is unknown. Fix: one of {', '.join(choices)}.")


def check_bool(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not true or false. Fix: {key}=true or {key}=false.")


def max_world_size(device: str) -> int:
    """The most evaluation processes this machine can run: its GPUs for a CUDA device, else its CPU cores."""
    if device.startswith("cuda") or device == "claim":
        return max(1, torch.cuda.device_count())
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def check_values(cfg: DictConfig) -> None:
    """Types and ranges of the run's values (seed, threads, device, calibration, evaluation, data)."""
    check_int(cfg, "seed", 0)
    check_int(cfg, "threads", 1, optional=True)
    device = cfg.get("device")
    if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
        raise ConfigError(f"device={device!r} is unknown. Fix: device=auto, cpu, cuda, cuda:<index> or claim.")
    check_choice(cfg, "mode", ("run", "eval"))
    check_bool(cfg, "progress")
    export = cfg.get("export")
    if export not in (True, False, "onnx"):
        raise ConfigError(
            f"export={export!r} is unknown. Fix: export=true (integer codes, safetensors), export=onnx (that and "
            "model.onnx) or export=false."
        )
    check_bool(cfg, "dry_run")
    check_int(cfg, "calib.num_images", 1, optional=True)
    check_int(cfg, "model.num_classes", 1, optional=True)
    check_int(cfg, "model.img_size", 1, optional=True)
    check_bool(cfg, "model.checkpoint_ema")
    check_int(cfg, "calib.batch_size", 1)
    check_int(cfg, "eval.world_size", 1, max_world_size(device))
    check_choice(cfg, "eval.backend", EVAL_BACKENDS)
    check_choice(cfg, "eval.runtime", EVAL_RUNTIMES)
    if cfg.eval.runtime == "onnxruntime" and cfg.mode != "eval":
        raise ConfigError(
            "eval.runtime=onnxruntime evaluates an exported model. Fix: mode=eval checkpoint=<run dir of a run made "
            "with export=onnx> eval.runtime=onnxruntime."
        )
    if cfg.eval.runtime == "onnxruntime" and cfg.eval.world_size > 1:
        raise ConfigError("eval.runtime=onnxruntime runs in one process. Fix: eval.world_size=1.")
    if export == "onnx" or cfg.eval.runtime == "onnxruntime":
        require_deploy()
    check_int(cfg, "data.batch_size", 1)
    check_int(cfg, "data.workers", 0)
    check_int(cfg, "data.num_eval", 1, optional=True)
    check_int(cfg, "data.heldout_size", 1)
    check_choice(cfg, "data.eval_split", ("val", "heldout"))


def check_overrides(overrides: list[str], cfg: DictConfig) -> None:
    """Refuses ``+key=value`` / ``++key=value`` outside ``hydra.``: every key of the runner is in its presets, so
    an added key is a misspelling that would be silently ignored."""
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").split("=", 1)[0]
        if key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        known = [k for k in node.keys() if k != leaf] if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, known, n=1)
        value = override.split("=", 1)[1] if "=" in override else "..."
        fix = f"{parent + '.' if parent else ''}{close[0]}={value} (no +)" if close else "drop it (see --cfg job)"
        raise ConfigError(f"{override}: {key} is not a setting of mgrq-run. Fix: {fix}.")
