"""Per-setting top-1 tables of many runs (Markdown and CSV), with the published numbers beside them.

Each table is one bit setting (W4A4, W3A3, ...): rows are methods (the FP row first, then the baselines, MGRQ and
its loss-weight ablations), columns are models in the papers' order, cells are top-1 mean ± std over seeds. The
papers' ImageNet numbers are added as ``(published)`` rows where the setting and model columns match.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgrq_runner.analysis.published import PUBLISHED
from mgrq_runner.analysis.runs import FP_LABEL, RUNS_CSV, UNKNOWN, RunRow, write_csv_atomic, write_runs_csv
from mgrq_runner.files import write_text_atomic
from mgrq_runner.results import HARDENING_JUMP_LIMIT, STE_PLATEAU, UNDECIDED_LIMIT
from mgrq_runner.rundir import RESULTS

TIMING_CSV = "timing.csv"  # the runs of a collection's s/run column (mgrq-collect --timing)
MODEL_ORDER = ["vit_s", "vit_b", "deit_t", "deit_s", "deit_b", "swin_t", "swin_s", "swin_b"]
MODEL_NAMES = {
    "vit_s": "ViT-S",
    "vit_b": "ViT-B",
    "deit_t": "DeiT-T",
    "deit_s": "DeiT-S",
    "deit_b": "DeiT-B",
    "swin_t": "Swin-T",
    "swin_s": "Swin-S",
    "swin_b": "Swin-B",
}
METHOD_ORDER = [
    "fp",
    "minmax",
    "repq",
    "brecq",
    "qdrop",
    "mgrq",
    "mgrq_brecq",
    "pdquant",
    "aphq",
    "fimaq",
    "glfq",
    "glfq_no_rotation",
    "glfq_no_mlp_relu",
    "glfq_adaround",
    "mgrq_glfq",
]
NO_VALUE = "—"


@dataclass
class Table:
    """One setting's table: column model keys and rows of (label, cell texts, seconds-per-run text)."""

    setting: str
    models: list[str]
    rows: list[tuple[str, list[str], str]] = field(default_factory=list)
    num_runs: int = 0

    @property
    def header(self) -> list[str]:
        return ["method", *(MODEL_NAMES.get(m, m) for m in self.models), "s/run"]


def setting_key(setting: str) -> tuple[float, float, str]:
    """Sort key: FP first, then by total bits (high first), then weight bits; unknown settings last."""
    if setting == FP_LABEL:
        return (-math.inf, 0, setting)
    match = re.fullmatch(r"W(\d+)A(\d+)", setting)
    if match is None:
        return (math.inf, 0, setting)
    w, a = int(match[1]), int(match[2])
    return (-(w + a), -w, setting)


def model_key(model: str) -> tuple[int, str]:
    """Sort key: the papers' model order, then anything else alphabetically."""
    return (MODEL_ORDER.index(model), "") if model in MODEL_ORDER else (len(MODEL_ORDER), model)


def method_key(label: str) -> tuple[int, str]:
    """Sort key: ``METHOD_ORDER``, then mgrq ablations (sorted), then the rest alphabetically."""
    if label in METHOD_ORDER:
        return (METHOD_ORDER.index(label), "")
    if label.startswith("mgrq ("):
        return (len(METHOD_ORDER), label)
    return (len(METHOD_ORDER) + 1, label)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell_text(records: Sequence[RunRow]) -> str:
    """The table cell of one (setting, method, model) group: "76.12 ± 0.30", "76.12 (1 failed)", "failed"..."""
    if not records:
        return "missing"
    values = [r.top1 for r in records if r.done and r.top1 is not None]
    failed = sum(r.status == "failed" for r in records)
    incomplete = sum(r.status in ("running", "interrupted") for r in records)
    if not values:
        return "failed" if failed else "incomplete"
    mean, std = mean_std(values)
    text = f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"
    notes = [f"{n} {what}" for n, what in ((failed, "failed"), (incomplete, "incomplete")) if n]
    return text + (f" ({', '.join(notes)})" if notes else "")


def _seconds_text(records: Sequence[RunRow]) -> str:
    seconds = [r.seconds for r in records if r.done]
    return f"{statistics.mean(seconds):.1f}" if seconds else NO_VALUE


def build_tables(records: Sequence[RunRow], timing: Sequence[RunRow] | None = None) -> list[Table]:
    """One ``Table`` per setting; the fp runs make the first row of every table, published rows come last.

    ``s/run`` is the mean wall time of a row's runs, or with ``timing`` (a separate pass, e.g. seed 0 alone on the
    machine) the mean of the timing runs of the same setting, method and models.
    """

    def seconds(setting: str, label: str, row_runs: Sequence[RunRow], models: list[str]) -> str:
        if timing is None:
            return _seconds_text(row_runs)
        return _seconds_text([t for t in timing if (t.setting, t.method) == (setting, label) and t.model in models])

    readable = [r for r in records if r.setting != UNKNOWN]
    fp_runs = [r for r in readable if r.setting == FP_LABEL]
    quantized = [r for r in readable if r.setting != FP_LABEL]
    settings = sorted({r.setting for r in quantized}, key=setting_key) or ([FP_LABEL] if fp_runs else [])
    tables = []
    for setting in settings:
        runs = [r for r in quantized if r.setting == setting]
        models = sorted({r.model for r in (runs or fp_runs)}, key=model_key)
        table = Table(setting, models)
        fp_here = [r for r in fp_runs if r.model in models]
        if fp_here:
            cells = [cell_text([r for r in fp_here if r.model == m]) for m in models]
            table.rows.append((FP_LABEL, cells, seconds(FP_LABEL, "fp", fp_here, models)))
        for label in sorted({r.method for r in runs}, key=method_key):
            row_runs = [r for r in runs if r.method == label]
            cells = [cell_text([r for r in row_runs if r.model == m]) for m in models]
            table.rows.append((label, cells, seconds(setting, label, row_runs, models)))
        table.num_runs = len(fp_here) + len(runs)
        published = {**PUBLISHED[FP_LABEL], **(PUBLISHED.get(setting, {}) if setting != FP_LABEL else {})}
        for label, numbers in published.items():
            if any(m in numbers for m in models):
                cells = [f"{numbers[m]:.2f}" if m in numbers else NO_VALUE for m in models]
                table.rows.append((label, cells, NO_VALUE))
        tables.append(table)
    return tables


def table_markdown(table: Table) -> str:
    """A Markdown table (no heading)."""
    lines = ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join([label, *cells, seconds]) + " |" for label, cells, seconds in table.rows]
    return "\n".join(lines)


def _problems(records: Sequence[RunRow]) -> list[str]:
    lines = []
    for r in records:
        if r.done:
            continue
        what = f"{r.setting} {r.method} {r.model} seed {r.seed}" if r.setting != UNKNOWN else f"unreadable {RESULTS}"
        lines.append(f"- {r.status}: {what} ({r.run_dir})" + (f": {r.error}" if r.error else ""))
    return lines


def _duplicates(records: Sequence[RunRow]) -> str:
    """Finished runs that share setting, method, model and seed: the same cell counted twice."""
    groups: dict[tuple, list[str]] = {}
    for r in records:
        if r.done:
            groups.setdefault((r.setting, r.method, r.model, r.seed), []).append(r.run_dir)
    return "".join(
        f"- {setting} {method} {model} seed {seed}: {', '.join(dirs)}\n"
        for (setting, method, model, seed), dirs in groups.items()
        if len(dirs) > 1
    )


def _reruns(records: Sequence[RunRow], timing: Sequence[RunRow]) -> str:
    """How the timing pass's top-1 compares with the table's runs of the same setting, method, model and seed (a
    timing run that is itself one of the table's runs repeats nothing)."""
    table = {(r.setting, r.method, r.model, r.seed): r.top1 for r in records if r.done}
    in_table = {r.run_dir for r in records}
    shared = sum(t.run_dir in in_table for t in timing)
    note = f" ({shared} timing runs are table runs themselves)" if shared else ""
    pairs = [
        (t, table[key])
        for t in timing
        if t.done and t.run_dir not in in_table and (key := (t.setting, t.method, t.model, t.seed)) in table
    ]
    if not pairs:
        return f"The timing runs repeat none of the table's runs (same setting, method, model and seed){note}.\n"
    gaps = [abs((t.top1 or 0.0) - (top1 or 0.0)) for t, top1 in pairs]
    return (
        f"Run-to-run: {len(pairs)} timing runs repeat a table run (same setting, method, model and seed){note}; "
        f"{sum(g == 0 for g in gaps)} give the same top-1, the largest difference is {max(gaps):.2f}.\n"
    )


def summary_markdown(records: Sequence[RunRow], timing: Sequence[RunRow] | None = None) -> str:
    """Every setting's table under a "## <setting>" heading, then a list of failed / incomplete runs."""
    parts = []
    if timing is None:
        seconds_note = "s/run: mean wall time of the row's runs."
    else:
        seconds_note = f"s/run: wall time of the timing pass ({sum(t.done for t in timing)} runs), not of these runs."
    for table in build_tables(records, timing):
        note = (
            f"top-1 (%), mean ± std over seeds; measured rows from {table.num_runs} runs; '(published)' rows are "
            f"ImageNet numbers from the papers, not measured here. {seconds_note}"
        )
        parts.append(f"## {table.setting}\n\n{table_markdown(table)}\n\n{note}\n")
    if timing is not None:
        parts.append(_reruns(records, timing))
    duplicates = _duplicates(records)
    if duplicates:
        parts.append("## Repeated runs (averaged as if they were seeds; collect fewer directories?)\n\n" + duplicates)
    provenance = sorted({r.provenance for r in records if r.provenance})
    if provenance:
        parts.append("Runs made with: " + "; ".join(f"`{p}`" for p in provenance) + "\n")
    parts.append(_machines(records))
    reconstructed = [r for r in records if r.done and r.unconverged is not None]
    if reconstructed:
        missed = [r for r in reconstructed if r.unconverged]
        parts.append(
            f"Convergence (AdaRound: block_hard <= {HARDENING_JUMP_LIMIT} block_soft, under {UNDECIDED_LIMIT:.0%} "
            f"undecided; STE: the last 10 % of the budget lowers the block loss by under {STE_PLATEAU:.0%}): "
            f"{len(reconstructed) - len(missed)} of {len(reconstructed)} reconstructed runs met it on every unit.\n"
            + "".join(
                f"- {r.setting} {r.method} {r.model} seed {r.seed}: {', '.join(r.unconverged or [])}\n" for r in missed
            )
        )
    problems = _problems(records)
    if problems:
        parts.append("## Failed or incomplete runs\n\n" + "\n".join(problems) + "\n")
    return "\n".join(parts)


def _machines(records: Sequence[RunRow]) -> str:
    """Which CPUs the runs were made on, and the settings whose runs come from more than one: the same run on
    two kinds of CPU differs by about a seed std (docs/proxy/README.md), a spread that such a table's
    comparisons carry on top of the seeds'."""
    done = [r for r in records if r.done]
    counts = Counter(r.machine or "not recorded" for r in done)
    if not counts:
        return ""
    text = "Machines: " + "; ".join(f"`{m}` ({n} run{'s' * (n != 1)})" for m, n in sorted(counts.items())) + "\n"
    for setting in sorted({r.setting for r in done}, key=setting_key):
        machines = {r.machine for r in done if r.setting == setting and r.machine}
        if len(machines) > 1:
            text += f"- {setting}: runs of {len(machines)} machines (its differences carry the spread between them).\n"
    return text


def _run_key(r: RunRow) -> tuple:
    seed = -1 if r.seed is None else r.seed
    return (setting_key(r.setting), method_key(r.method), model_key(r.model), seed, r.run_dir)


def write_summary(
    records: Sequence[RunRow], out_dir: str | Path, header: str = "", timing: Sequence[RunRow] | None = None
) -> list[Path]:
    """Writes ``summary.md``, ``summary.csv`` (the tables, one block per setting) and ``runs.csv`` (one run a line);
    with ``timing`` runs (the ``s/run`` column's) also ``timing.csv``, in runs.csv's format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "summary.md", out / "summary.csv", out / RUNS_CSV]
    write_text_atomic(paths[0], header + ("\n" if header else "") + summary_markdown(records, timing))
    rows: list[list[Any]] = []
    for i, table in enumerate(build_tables(records, timing)):
        rows += [[]] if i else []
        rows.append(["setting", *table.header])
        rows += [[table.setting, label, *cells, seconds] for label, cells, seconds in table.rows]
    write_csv_atomic(paths[1], rows)

    write_runs_csv(sorted(records, key=_run_key), paths[2])
    if timing is not None:
        paths.append(out / TIMING_CSV)
        write_runs_csv(sorted(timing, key=_run_key), paths[3])
    return paths
