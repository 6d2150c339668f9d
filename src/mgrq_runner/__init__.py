"""mgrq-runner: config-driven post-training quantization of Vision Transformers (MGRQ and its baselines).

The Python API (docs/python_api.md): ``quantize``, ``QuantizedModel``, ``load``, ``evaluate`` and ``MgrqError``,
imported on first use so that ``import mgrq_runner`` alone (the collector, the CLI's start) loads no torch.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["MgrqError", "QuantizedModel", "evaluate", "load", "quantize"]


def __getattr__(name: str) -> Any:
    if name == "MgrqError":
        from mgrq_runner.errors import MgrqError

        return MgrqError
    if name in __all__:
        from mgrq_runner import api

        return getattr(api, name)
    raise AttributeError(f"module 'mgrq_runner' has no attribute {name!r}")
