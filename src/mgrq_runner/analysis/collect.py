"""``mgrq-collect``: the results.json of many runs into per-setting top-1 tables, and optionally plots.

    mgrq-collect outputs/proxy_table                       # writes outputs/proxy_table/summary.*
    mgrq-collect outputs/a outputs/b --out reports --plots
    mgrq-collect docs/proxy/swin/runs.csv outputs/new_runs --out docs/proxy/swin   # an earlier table, extended
    mgrq-collect docs/proxy/runs.csv --timing outputs/quiet_seed0 --out docs/proxy  # s/run from a quiet pass

Writes <OUT>/summary.md, summary.csv (the tables) and runs.csv (one line per run) and prints the Markdown; OUT
defaults to the first DIR. With --plots also top1_vs_bits.png, loss_grid.png (when mgrq runs with several loss
weights exist) and recon_curves.png (of the most recent finished run that has recon_curves.json). With --timing,
the s/run column comes from those runs (a separate pass, one job at a time on an otherwise idle machine) instead
of the table's own, they are written to <OUT>/timing.csv, and the summary says how many of them repeat a table run
with the same top-1 (the run-to-run spread).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mgrq_runner.analysis.runs import RunRow, load_runs
from mgrq_runner.analysis.tables import write_summary
from mgrq_runner.errors import MgrqError
from mgrq_runner.rundir import RECON_CURVES, results_path


def note(message: str) -> None:
    print(message, file=sys.stderr)


def latest_with_curves(records: list[RunRow]) -> RunRow | None:
    """The most recent finished run (by its finish time, then file time) that has recon_curves.json."""
    candidates = [r for r in records if r.done and (Path(r.run_dir) / RECON_CURVES).is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.finished or "", os.path.getmtime(results_path(r.run_dir))))


def make_plots(records: list[RunRow], out: Path) -> None:
    from mgrq_runner.analysis import plots

    try:
        note(f"wrote {plots.plot_top1_vs_bits(records, out / 'top1_vs_bits.png')}")
    except ValueError as err:
        note(f"note: no top1_vs_bits.png: {err}")
    try:
        note(f"wrote {plots.plot_loss_grid(records, out / 'loss_grid.png')}")
    except ValueError as err:
        note(f"note: no loss_grid.png: {err}")
    latest = latest_with_curves(records)
    if latest is None:
        note("note: no recon_curves.png: no finished run has recon_curves.json")
    else:
        try:
            note(f"wrote {plots.plot_recon_curves(latest.run_dir, out / 'recon_curves.png')}")
        except (ValueError, MgrqError) as err:
            note(f"note: no recon_curves.png: {err}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "dirs", nargs="+", type=Path, metavar="DIR", help="run directories or folders of them, or a runs.csv"
    )
    parser.add_argument("--out", type=Path, default=None, help="where to write the summary (default: the first DIR)")
    parser.add_argument("--plots", action="store_true", help="also write PNG plots (needs matplotlib)")
    parser.add_argument(
        "--timing", nargs="+", type=Path, metavar="DIR", help="runs (or a timing.csv) whose wall times fill s/run"
    )
    args = parser.parse_args(argv)

    try:
        records = load_runs(args.dirs)
        timing = load_runs(args.timing) if args.timing else None
    except (FileNotFoundError, ValueError, MgrqError) as err:
        note(f"collect: error: {err}")
        return 2
    if not records:
        note(f"collect: error: no results.json found under {' '.join(map(str, args.dirs))}")
        return 2
    out = args.out or (args.dirs[0] if args.dirs[0].is_dir() else args.dirs[0].parent)
    command = "mgrq-collect " + " ".join(sys.argv[1:] if argv is None else argv)
    header = f"Collected with `{command}` from {len(records)} runs.\n"
    written = write_summary(records, out, header=header, timing=timing)
    print((out / "summary.md").read_text(), end="")
    note("wrote " + ", ".join(map(str, written)))
    if args.plots:
        make_plots(records, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
