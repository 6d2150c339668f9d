"""The ``mgrq-run`` command: Hydra composes the config, ``run`` does the work.

The config directory is found from this file's location (an absolute path), so the installed console script
works from any working directory.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mgrq_runner import console
from mgrq_runner.errors import MgrqError
from mgrq_runner.run import run

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
log = logging.getLogger("mgrq_runner")


def user_message(err: MgrqError) -> str:
    """The error's own sentence; an error re-raised from a DataLoader worker carries a traceback first."""
    text = str(err).strip()
    return text.splitlines()[-1].split(": ", 1)[-1] if "Original Traceback" in text else text


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Runs one job; returns top-1 so that sweepers can optimise it."""
    try:
        results, _ = run(cfg)
        return float(results["top1"])
    except MgrqError as err:
        message = user_message(err)
        log.error("%s", message)
        console.console.print(f"[bold red]error:[/] {message}")  # via the module: main() stays picklable (joblib)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return None  # a sweep goes on with its other jobs; this one's results.json says failed
        sys.exit(2)


if __name__ == "__main__":
    main()
