"""The method presets' own values, read from ``conf/method/<name>.yaml`` (its defaults chain followed) without
composing a run. A run records them (results.json ``method_defaults``) so that its table label says only what it
changed from its method's preset, as the preset stood when it ran. No torch import: the collector uses it.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")  # absolute: the installed console script finds it
PRESET_NAME = re.compile(r"\w+")  # a preset's file name: never a path
PROXY_NAMES = ("proxy_vit", "proxy_swin")  # the shipped proxies (models.PROXIES builds them; a test keeps both equal)
# The method settings a table label shows when a run changes them from its preset: mgrq (λG=0, λL=1), qdrop (p=1),
# glfq (softmax=log_sqrt2). The framework switches are shown under their short names.
SWITCH_KEYS = {
    "init.reparam": "reparam",
    "init.rotation": "rotation",
    "init.mlp_relu": "mlp_relu",
    "init.softmax_quantizer": "softmax",
    "recon.rounding": "rounding",
    "recon.weight_schedule": "schedule",
    "loss.block_distance": "distance",
}
LABEL_KEYS = ("loss.global_weight", "loss.local_weight", "recon.quant_prob", *SWITCH_KEYS)


@functools.cache
def preset_values(method: str) -> dict[str, Any]:
    """The ``LABEL_KEYS`` that method preset ``method`` sets (``{"loss.global_weight": 1.0, ...,
    "init.rotation": "none"}``); empty for a method with no such preset."""
    node = _load(method, depth=0)
    if node is None:
        return {}
    values = {key: OmegaConf.select(node, key, default=None) for key in LABEL_KEYS}
    return {key: value for key, value in values.items() if isinstance(value, int | float | str)}  # bool is an int


def _load(method: str, depth: int) -> DictConfig | None:
    """``conf/method/<method>.yaml`` merged with the presets its ``defaults`` list names (same group), in order."""
    path = Path(CONFIG_DIR) / "method" / f"{method}.yaml"
    if depth > 10 or not PRESET_NAME.fullmatch(method) or not path.is_file():  # a name read from a record is data
        return None
    own = OmegaConf.load(path)
    assert isinstance(own, DictConfig)
    entries = list(own.pop("defaults", []))
    merged = OmegaConf.create()
    for entry in entries if "_self_" in entries else [*entries, "_self_"]:  # Hydra's order: _self_ where listed
        part = own if entry == "_self_" else _load(str(entry), depth + 1)
        merged = OmegaConf.merge(merged, part) if part is not None else merged
    return merged  # type: ignore[return-value]
