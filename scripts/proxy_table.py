"""Every method on the shipped proxy (Fashion-MNIST test), several bit settings and calibration seeds.

    python scripts/proxy_table.py                          # the full grid: 8 rows x 3 settings x 3 seeds
    python scripts/proxy_table.py --seeds 0 --settings w4a4 --iters 50

Each run is a normal mgrq-run job (its own directory under --out, with results.json); finished runs are reused,
so an interrupted grid resumes. Prints, and writes to <out>/proxy_table.md, a Markdown table of top-1 mean +- std
over seeds and the mean wall time per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hydra import compose, initialize_config_dir

from mgrq_runner.cli import CONFIG_DIR
from mgrq_runner.run import run

SETTINGS = {
    "w8a8": ["quant=w8a8"],
    "w6a6": ["quant=w6a6"],
    "w4a4": ["quant=w4a4"],
    "w3a3": ["quant=w3a3"],
    "w2a4": ["quant.w_bits=2", "quant.a_bits=4"],
}
ROWS = {
    "fp": ["method=fp"],
    "minmax": ["method=minmax"],
    "repq": ["method=repq"],
    "brecq": ["method=brecq"],
    "qdrop": ["method=qdrop"],
    "mgrq": ["method=mgrq"],
    "mgrq, no global (EBGS)": ["method=mgrq", "method.loss.global_weight=0"],
    "mgrq, no local (IBLS)": ["method=mgrq", "method.loss.local_weight=0"],
}


def run_once(out: Path, overrides: list[str]) -> dict:
    results_file = out / "results.json"
    if results_file.exists():
        results = json.loads(results_file.read_text())
        if results.get("status") == "done":
            return results
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={out}", "progress=false", *overrides])
    return run(cfg)


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=["w4a4", "w3a3", "w2a4"], choices=list(SETTINGS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--iters", type=int, default=None, help="reconstruction iterations per unit")
    parser.add_argument("--out", type=Path, default=Path("outputs/proxy_table"))
    args = parser.parse_args()

    extra = [f"method.recon.iters={args.iters}"] if args.iters else []
    top1: dict[tuple[str, str], list[float]] = {}
    seconds: dict[str, list[float]] = {}
    for row in args.rows:
        for setting in args.settings if row != "fp" else args.settings[:1]:
            for seed in args.seeds:
                slug = row.replace(", ", "_").replace(" ", "_").replace("(", "").replace(")", "")
                overrides = [*ROWS[row], *SETTINGS[setting], f"seed={seed}"]
                if row not in ("fp", "minmax", "repq"):
                    overrides += extra
                results = run_once(args.out / setting / slug / f"seed{seed}", overrides)
                top1.setdefault((row, setting), []).append(results["top1"])
                seconds.setdefault(row, []).append(sum(results["times"].values()))
                print(f"{row:24s} {setting} seed {seed}: top-1 {results['top1']:.2f}", flush=True)

    header = "| method | " + " | ".join(s.upper() for s in args.settings) + " | seconds per run |"
    lines = [header, "|---" * (len(args.settings) + 2) + "|"]
    for row in args.rows:
        cells = [
            cell(top1[(row, s)]) if (row, s) in top1 else cell(top1[(row, args.settings[0])]) for s in args.settings
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {statistics.mean(seconds[row]):.0f} |")
    table = "\n".join(lines)
    note = (
        f"\nTop-1 (%) on the Fashion-MNIST test split (10 000 images), mean ± std over calibration seeds "
        f"{args.seeds}; reconstruction iterations per unit: {args.iters or 'the proxy preset (500)'}.\n"
    )
    print(table + note)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "proxy_table.md").write_text(table + "\n" + note)


if __name__ == "__main__":
    main()
