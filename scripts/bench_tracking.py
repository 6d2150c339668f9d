"""Overhead of experiment tracking: one job with logger=none, logger=mlflow and logger=tensorboard.

Each logger runs the same job (the default job, ``mgrq-run threads=2``, plus any overrides given after ``--``) as a
process of its own, one after another, each into its own run dir under a temporary folder; MLflow logs to a SQLite
store made there for the benchmark (``--tracking-uri`` names another). Prints, per logger, the wall time of the
whole process (the median over ``--repeats``, the loggers taken in turn each repeat), its ratio to logger=none, the
stage times results.json records, and whether the run's numbers (scores, every unit's loss terms) are logger=none's.
The first MLflow run of a fresh store also creates its tables (about 2 s): repeats show the cost without that.

    python scripts/bench_tracking.py                                        # the default job, minutes each
    python scripts/bench_tracking.py --repeats 3
    python scripts/bench_tracking.py -- method.recon.iters=5 data.num_eval=500   # a quick check of the script
Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LOGGERS = ("none", "mlflow", "tensorboard")
SCORES = ("top1", "top5", "fp_top1", "fp_agreement", "num_calib", "num_eval")


def run_job(logger: str, run_dir: Path, tracking_uri: str, overrides: list[str]) -> tuple[float, dict[str, Any]]:
    """One ``mgrq-run`` process: its wall time and its results.json."""
    command = [sys.executable, "-m", "mgrq_runner.cli", "threads=2", "progress=false", f"logger={logger}"]
    if logger == "mlflow":
        command.append(f"logger.tracking_uri={tracking_uri}")
    command += [f"hydra.run.dir={run_dir}", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"logger={logger} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, json.loads((run_dir / "results.json").read_text())


def numbers(results: dict[str, Any]) -> dict[str, Any]:
    """What must not depend on the logger: the scores and every unit's final loss terms (not its seconds)."""
    units = [{k: v for k, v in row.items() if k != "seconds"} for row in results.get("reconstruction", [])]
    return {**{key: results.get(key) for key in SCORES}, "reconstruction": units}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loggers", nargs="+", default=list(LOGGERS), choices=LOGGERS)
    parser.add_argument("--repeats", type=int, default=1, help="runs per logger (default 1)")
    parser.add_argument("--tracking-uri", help="logger=mlflow's store (default: a SQLite store made for the benchmark)")
    parser.add_argument("--keep", type=Path, help="keep the run dirs (and the store) here")
    parser.add_argument("overrides", nargs="*", help="mgrq-run overrides for every job (after --)")
    args = parser.parse_args(argv)
    loggers = ["none", *[name for name in args.loggers if name != "none"]]  # the reference first

    with tempfile.TemporaryDirectory(prefix="bench_tracking_") as scratch:
        root = args.keep or Path(scratch)
        uri = args.tracking_uri or f"sqlite:///{(root / 'mlflow.db').absolute()}"
        walls: dict[str, list[float]] = {name: [] for name in loggers}
        job: dict[str, float] = {}
        results: dict[str, dict[str, Any]] = {}
        for repeat in range(args.repeats):
            for name in loggers:
                seconds, results[name] = run_job(name, root / f"{name}_{repeat}", uri, args.overrides)
                walls[name].append(seconds)
                job[name] = sum((results[name].get("times") or {}).values())
                print(f"repeat {repeat}: logger={name} {seconds:.1f} s", file=sys.stderr)

    reference = statistics.median(walls["none"])
    print(f"job: mgrq-run threads=2 {' '.join(args.overrides)} ({args.repeats} repeat(s), median wall time)")
    print(f"{'logger':<12} {'wall s':>8} {'ratio':>7} {'stages s':>9}  same numbers as logger=none")
    for name in loggers:
        wall = statistics.median(walls[name])
        same = "yes" if numbers(results[name]) == numbers(results["none"]) else "NO"
        print(f"{name:<12} {wall:>8.1f} {wall / reference:>7.3f} {job[name]:>9.1f}  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
