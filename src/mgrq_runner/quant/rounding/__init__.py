"""Weight roundings: what a quantized layer's weight learns during reconstruction, behind one interface.

``AdaRound`` (up or down on a fixed grid) and ``SteRounding`` (the weight and its step, round-to-nearest with a
straight-through gradient) implement ``WeightRounding``; ``ROUNDINGS`` maps each ``method.recon.rounding`` name
to its class. A new rounding is a new module here with a ``@register_rounding`` class, imported below.
"""

from mgrq_runner.quant.rounding.adaround import AdaRound, rounding_beta
from mgrq_runner.quant.rounding.base import ROUNDINGS, WeightRounding, create_rounding, register_rounding
from mgrq_runner.quant.rounding.ste import SteRounding

__all__ = [
    "ROUNDINGS",
    "AdaRound",
    "SteRounding",
    "WeightRounding",
    "create_rounding",
    "register_rounding",
    "rounding_beta",
]
