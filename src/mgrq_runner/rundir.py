"""The files of a run directory: one name for each, used by the runner that writes them and the tools that read.

A run directory holds ``.hydra/`` (Hydra's), ``cli.log`` and:
"""

from __future__ import annotations

from pathlib import Path

RESULTS = "results.json"  # metrics, times, versions, status: record.RunRecord writes it, analysis reads it
CALIBRATION_LIST = "calibration_images.txt"  # the calibration images' ids, one a line
RECON_CURVES = "recon_curves.json"  # per unit, the loss terms every 10 steps (recon.curves.LossCurves)
RECON_STATE = "recon_state"  # a folder: the finished units of an unfinished reconstruction (recon.state)
EXPORT_WEIGHTS = "quantized_model.safetensors"  # integer weight codes and quantizer parameters (export.py)
EXPORT_MANIFEST = "quantized_model.json"  # what the export holds: bits, method, versions, sizes


def results_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RESULTS
