"""Wall time of the default job (``mgrq-run``: mgrq W4A4 on the proxy ViT), whole and by stage, 2 threads.

Each job is a process of its own (``mgrq-run threads=2 progress=false`` plus the variant's overrides), into a run
dir under a temporary folder. Variants are taken in turn each repeat (A B A B ...), so a host that slows down
during the benchmark slows each variant alike; the median over repeats is printed with every stage time that
results.json records, the reconstruction's per-unit seconds, the top-1, the units meeting the convergence
criterion and the machine.

    python scripts/bench_default.py                       # the default job, once
    python scripts/bench_default.py --repeats 3 --variant "" --variant "model.recon_iters=1000"
    python scripts/bench_default.py --variant "method.recon.iters=5 data.num_eval=500"   # a quick check of the script
Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mgrq_runner.results import converged


def run_job(run_dir: Path, overrides: list[str]) -> tuple[float, dict[str, Any]]:
    """One ``mgrq-run`` process: its wall time and its results.json."""
    command = [sys.executable, "-m", "mgrq_runner.cli", "threads=2", "progress=false", f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    done = subprocess.run([*command, *overrides], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(overrides) or 'the default job'} failed:\n{done.stderr[-2000:]}")
    return seconds, json.loads((run_dir / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variant", action="append", help="overrides of one variant, quoted ('' is the default)")
    args = parser.parse_args()
    variants = args.variant if args.variant else [""]
    walls: dict[str, list[float]] = {v: [] for v in variants}
    records: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench_default_") as folder:
        for repeat in range(args.repeats):
            for index, variant in enumerate(variants):
                seconds, record = run_job(Path(folder) / f"{index}_{repeat}", shlex.split(variant))
                walls[variant].append(seconds)
                records[variant].append(record)
                print(f"  repeat {repeat} variant {index}: {seconds:.1f} s", flush=True)
    first = records[variants[0]][0]
    print(f"\n{first['machine']}, threads {first['threads']}, torch {first['versions']['torch']}")
    for variant in variants:
        runs = records[variant]
        stages = {stage: statistics.median(r["times"][stage] for r in runs) for stage in runs[0]["times"]}
        units = runs[0]["reconstruction"]
        per_unit = {
            u["unit"]: statistics.median(r["reconstruction"][i]["seconds"] for r in runs) for i, u in enumerate(units)
        }
        print(f"\n{variant or '(the default job)'}: wall {statistics.median(walls[variant]):.1f} s "
              f"(runs: {', '.join(f'{w:.1f}' for w in walls[variant])})")  # fmt: skip
        print("  stages: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
        print("  reconstruct by unit: " + ", ".join(f"{k} {v:.1f}" for k, v in per_unit.items()))
        converged_units = sum(converged(u) for u in units)
        print(f"  top-1 {runs[0]['top1']} (FP {runs[0]['fp_top1']}), converged units {converged_units}/{len(units)}")


if __name__ == "__main__":
    main()
