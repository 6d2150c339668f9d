"""Block-wise reconstruction (OBWR) with QDrop, global (EBGS) and local (IBLS) supervision, fused losses (MGLF).

The public API: ``reconstruct`` with its settings (``ReconConfig``, ``LossConfig``), the step callback and loss
curves, the resumable state, and ``UnitOptimizer`` for driving one unit step by step. Inside:

- ``units``: the model split into units (embedding, blocks, Swin patch merging, head);
- ``cache``: a unit's FP targets (output, IBLS layer tensors) for every calibration image;
- ``losses``: block, global, local and rounding terms and their fusion; ``adaround``: learned rounding;
- ``optimizer``: one unit's optimisation; ``engine``: all units in order; ``convergence``: the criterion;
- ``state``: finished units saved for resuming; ``curves``: per-unit loss curves.
"""

from mgrq_runner.recon.config import LOCAL_POINTS, LossConfig, ReconConfig
from mgrq_runner.recon.curves import LossCurves, StepCallback
from mgrq_runner.recon.engine import UnitReport, reconstruct, reconstruction_summary
from mgrq_runner.recon.optimizer import UnitOptimizer
from mgrq_runner.recon.state import ReconState, check_same_config

__all__ = [
    "LOCAL_POINTS",
    "LossConfig",
    "LossCurves",
    "ReconConfig",
    "ReconState",
    "StepCallback",
    "UnitOptimizer",
    "UnitReport",
    "check_same_config",
    "reconstruct",
    "reconstruction_summary",
]
