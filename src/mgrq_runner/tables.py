"""Collects the ``results.json`` of many runs into per-setting top-1 tables (Markdown and CSV).

Each table is one bit setting (W4A4, W3A3, ...): rows are methods (the FP row first, then the baselines, MGRQ and
its loss-weight ablations), columns are models in the papers' order, cells are top-1 mean ± std over seeds. The
papers' ImageNet numbers are added as ``(published)`` rows where the setting and model columns match.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgrq_runner.recon.convergence import HARDENING_JUMP_LIMIT, UNDECIDED_LIMIT, unconverged_units
from mgrq_runner.rundir import RESULTS

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
METHOD_ORDER = ["fp", "minmax", "repq", "brecq", "qdrop", "mgrq"]
DEFAULT_LOSS_WEIGHTS = {"global_weight": 1.0, "local_weight": 1.0}
FP_LABEL = "FP"
UNKNOWN = "?"
NO_VALUE = "—"

# Published ImageNet top-1 (%) from /work/shared/method.md: section 8 (W4A4 table, the Swin-T RepQ-ViT W4A4 number
# given under it, the W3A3 FIMA-Q and LS-ViT lines, GLF-Q's mean of 3 seeds at W3A3 and W4A4) and section 7 (the FP32
# references of the pinned timm weights).
# Keyed by setting; the "FP" entry is shown in every table that has ImageNet model columns.
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "FP": {
        "FP32 (published)": {
            "vit_s": 81.39,
            "vit_b": 84.54,
            "deit_t": 72.21,
            "deit_s": 79.85,
            "deit_b": 81.80,
            "swin_t": 81.35,
            "swin_s": 83.23,
            "swin_b": 85.27,
        },
    },
    "W4A4": {
        "RepQ-ViT (published)": {
            "vit_s": 65.05,
            "vit_b": 68.48,
            "deit_t": 57.43,
            "deit_s": 69.03,
            "deit_b": 75.61,
            "swin_t": 72.31,
            "swin_s": 79.45,
            "swin_b": 78.32,
        },
        "QDrop, APHQ-ViT re-run (published)": {
            "vit_s": 67.62,
            "vit_b": 82.02,
            "deit_t": 64.95,
            "deit_s": 74.73,
            "deit_b": 79.64,
            "swin_s": 81.03,
            "swin_b": 82.79,
        },
        "APHQ-ViT (published)": {
            "vit_s": 76.07,
            "vit_b": 82.41,
            "deit_t": 66.66,
            "deit_s": 76.40,
            "deit_b": 80.21,
            "swin_s": 81.81,
            "swin_b": 83.42,
        },
        "FIMA-Q (published)": {
            "vit_s": 76.68,
            "vit_b": 83.04,
            "deit_t": 66.84,
            "deit_s": 76.87,
            "deit_b": 80.33,
            "swin_s": 81.82,
            "swin_b": 83.60,
        },
        "GLF-Q (published)": {
            "vit_s": 77.82,
            "vit_b": 83.22,
            "deit_t": 67.37,
            "deit_s": 77.34,
            "deit_b": 80.53,
            "swin_s": 82.01,
            "swin_b": 83.80,
        },
    },
    "W3A3": {
        "FIMA-Q (published)": {
            "vit_s": 64.09,
            "vit_b": 77.63,
            "deit_t": 55.55,
            "deit_s": 69.13,
            "deit_b": 76.54,
            "swin_s": 77.26,
            "swin_b": 78.82,
        },
        "LS-ViT (published)": {
            "vit_s": 64.10,
            "vit_b": 77.65,
            "deit_t": 55.72,
            "deit_s": 69.41,
            "deit_b": 76.57,
            "swin_s": 77.39,
            "swin_b": 79.40,
        },
        "GLF-Q (published)": {
            "vit_s": 67.40,
            "vit_b": 78.18,
            "deit_t": 56.48,
            "deit_s": 71.55,
            "deit_b": 77.20,
            "swin_s": 78.10,
            "swin_b": 80.45,
        },
    },
}


@dataclass
class Record:
    """One run, as read from its ``results.json`` (``status`` is "done", "failed" or "running").

    ``run_dir`` is the directory the file was found in (the recorded ``run_dir`` may be relative or moved).
    """

    model: str
    method: str
    method_name: str
    setting: str
    seed: int | None
    status: str
    top1: float | None
    top5: float | None
    fp_top1: float | None
    seconds: float
    run_dir: str
    global_weight: float | None = None
    local_weight: float | None = None
    w_bits: int | None = None
    a_bits: int | None = None
    finished: str | None = None
    error: str | None = None
    provenance: str | None = None  # "torch 2.14.1, timm 1.0.31, mgrq_runner 0.1.0 @ <git sha>"
    unconverged: list[str] | None = None  # reconstructed units that miss the convergence criterion (None: no recon)

    @property
    def done(self) -> bool:
        return self.status == "done"


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


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``results.json`` under ``paths`` (directories searched recursively, or run dirs / files), sorted."""
    found: dict[Path, Path] = {}
    for path in map(Path, paths):
        if path.is_file():
            candidates = [path]
        elif path.is_dir():
            candidates = list(path.rglob(RESULTS))
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
        for candidate in candidates:
            found.setdefault(candidate.resolve(), candidate)
    return sorted(found.values(), key=str)


def compact(value: float) -> str:
    """A float without trailing zeros: 0, 0.1, 10."""
    return f"{value:g}"


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def setting_of(method: str, w_bits: Any, a_bits: Any) -> str:
    """The setting label: FP for the full-precision method (or 32/32 bits), else e.g. W4A4."""
    if method == "fp" or (w_bits == 32 and a_bits == 32):
        return FP_LABEL
    if w_bits is None or a_bits is None:
        return UNKNOWN
    return f"W{w_bits}A{a_bits}"


def method_label(method: str, global_weight: float | None, local_weight: float | None) -> str:
    """The row label: the method name, with the loss weights for an mgrq run off the defaults."""
    weights = {"global_weight": global_weight, "local_weight": local_weight}
    if method != "mgrq" or all(w is None or w == DEFAULT_LOSS_WEIGHTS[k] for k, w in weights.items()):
        return method
    g = DEFAULT_LOSS_WEIGHTS["global_weight"] if global_weight is None else global_weight
    lw = DEFAULT_LOSS_WEIGHTS["local_weight"] if local_weight is None else local_weight
    return f"mgrq (λG={compact(g)}, λL={compact(lw)})"


def _unreadable(path: Path, error: str) -> Record:
    return Record(
        model=UNKNOWN,
        method=UNKNOWN,
        method_name=UNKNOWN,
        setting=UNKNOWN,
        seed=None,
        status="failed",
        top1=None,
        top5=None,
        fp_top1=None,
        seconds=0.0,
        run_dir=str(path.parent),
        error=error,
    )


def load_run(path: str | Path) -> Record:
    """Reads one ``results.json`` (or a run dir holding one); an unreadable file gives a failed record."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return _unreadable(path, f"{type(err).__name__}: {err}")
    if not isinstance(results, dict):
        return _unreadable(path, "not a JSON object")

    method = str(results.get("method", UNKNOWN))
    config = results.get("config")
    method_cfg = config.get("method") if isinstance(config, dict) else None
    loss = method_cfg.get("loss") if isinstance(method_cfg, dict) else None
    loss = loss if isinstance(loss, dict) else {}
    global_weight, local_weight = _float(loss.get("global_weight")), _float(loss.get("local_weight"))

    status = results.get("status")
    status = status if status in ("done", "failed", "running") else "failed"
    error = results.get("error")
    top1 = _float(results.get("top1"))
    if status == "done" and top1 is None:
        status, error = "failed", "status done but no top1"
    done = status == "done"
    times = results.get("times")
    seconds = sum(v for v in times.values() if isinstance(v, int | float)) if isinstance(times, dict) else 0.0
    seed = results.get("seed")
    setting = setting_of(method, results.get("w_bits"), results.get("a_bits"))
    if results.get("eval_split") == "heldout":  # tuning runs score train images: never mixed with val numbers
        setting += " (held-out train)"
    versions = results.get("versions") if isinstance(results.get("versions"), dict) else {}
    provenance = ", ".join(f"{k} {versions[k]}" for k in ("torch", "timm", "mgrq_runner") if k in versions)
    provenance += f" @ {results['git_sha']}" if results.get("git_sha") else ""
    model = results.get("preset") if results.get("preset") is not None else results.get("model", UNKNOWN)
    reconstruction = results.get("reconstruction")
    return Record(
        model=str(model),
        method=method_label(method, global_weight, local_weight),
        method_name=method,
        setting=setting,
        seed=seed if isinstance(seed, int) else None,
        status=status,
        top1=top1 if done else None,
        top5=_float(results.get("top5")) if done else None,
        fp_top1=_float(results.get("fp_top1")),
        seconds=float(seconds),
        run_dir=str(path.parent),
        global_weight=global_weight,
        local_weight=local_weight,
        w_bits=results.get("w_bits"),
        a_bits=results.get("a_bits"),
        finished=results.get("finished"),
        error=None if error is None else str(error),
        provenance=provenance or None,
        unconverged=unconverged_units(reconstruction) if isinstance(reconstruction, list) else None,
    )


def load_runs(paths: Iterable[str | Path]) -> list[Record]:
    """``load_run`` of every ``results.json`` found under ``paths``."""
    return [load_run(path) for path in find_runs(paths)]


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
    """Sort key: fp, minmax, repq, brecq, qdrop, mgrq, mgrq ablations (sorted), then the rest alphabetically."""
    if label in METHOD_ORDER:
        return (METHOD_ORDER.index(label), "")
    if label.startswith("mgrq ("):
        return (len(METHOD_ORDER), label)
    return (len(METHOD_ORDER) + 1, label)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell_text(records: Sequence[Record]) -> str:
    """The table cell of one (setting, method, model) group: "76.12 ± 0.30", "76.12 (1 failed)", "failed"..."""
    if not records:
        return "missing"
    values = [r.top1 for r in records if r.done and r.top1 is not None]
    failed = sum(r.status == "failed" for r in records)
    incomplete = sum(r.status == "running" for r in records)
    if not values:
        return "failed" if failed else "incomplete"
    mean, std = mean_std(values)
    text = f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"
    notes = [f"{n} {what}" for n, what in ((failed, "failed"), (incomplete, "incomplete")) if n]
    return text + (f" ({', '.join(notes)})" if notes else "")


def _seconds_text(records: Sequence[Record]) -> str:
    seconds = [r.seconds for r in records if r.done]
    return f"{statistics.mean(seconds):.1f}" if seconds else NO_VALUE


def build_tables(records: Sequence[Record]) -> list[Table]:
    """One ``Table`` per setting; the fp runs make the first row of every table, published rows come last."""
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
            table.rows.append((FP_LABEL, cells, _seconds_text(fp_here)))
        for label in sorted({r.method for r in runs}, key=method_key):
            row_runs = [r for r in runs if r.method == label]
            cells = [cell_text([r for r in row_runs if r.model == m]) for m in models]
            table.rows.append((label, cells, _seconds_text(row_runs)))
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


def _problems(records: Sequence[Record]) -> list[str]:
    lines = []
    for r in records:
        if r.done:
            continue
        what = f"{r.setting} {r.method} {r.model} seed {r.seed}" if r.setting != UNKNOWN else f"unreadable {RESULTS}"
        lines.append(f"- {r.status}: {what} ({r.run_dir})" + (f": {r.error}" if r.error else ""))
    return lines


def _duplicates(records: Sequence[Record]) -> str:
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


def summary_markdown(records: Sequence[Record]) -> str:
    """Every setting's table under a "## <setting>" heading, then a list of failed / incomplete runs."""
    parts = []
    for table in build_tables(records):
        note = (
            f"top-1 (%), mean ± std over seeds; measured rows from {table.num_runs} runs; '(published)' rows are "
            "ImageNet numbers from the papers, not measured here."
        )
        parts.append(f"## {table.setting}\n\n{table_markdown(table)}\n\n{note}\n")
    duplicates = _duplicates(records)
    if duplicates:
        parts.append("## Repeated runs (averaged as if they were seeds; collect fewer directories?)\n\n" + duplicates)
    provenance = sorted({r.provenance for r in records if r.provenance})
    if provenance:
        parts.append("Runs made with: " + "; ".join(f"`{p}`" for p in provenance) + "\n")
    reconstructed = [r for r in records if r.done and r.unconverged is not None]
    if reconstructed:
        missed = [r for r in reconstructed if r.unconverged]
        parts.append(
            f"Convergence (block_hard <= {HARDENING_JUMP_LIMIT} block_soft, under {UNDECIDED_LIMIT:.0%} undecided): "
            f"{len(reconstructed) - len(missed)} of {len(reconstructed)} reconstructed runs met it on every unit.\n"
            + "".join(
                f"- {r.setting} {r.method} {r.model} seed {r.seed}: {', '.join(r.unconverged or [])}\n" for r in missed
            )
        )
    problems = _problems(records)
    if problems:
        parts.append("## Failed or incomplete runs\n\n" + "\n".join(problems) + "\n")
    return "\n".join(parts)


def _run_key(r: Record) -> tuple:
    seed = -1 if r.seed is None else r.seed
    return (setting_key(r.setting), method_key(r.method), model_key(r.model), seed, r.run_dir)


def write_summary(records: Sequence[Record], out_dir: str | Path, header: str = "") -> list[Path]:
    """Writes ``summary.md``, ``summary.csv`` (the tables, one block per setting) and ``runs.csv`` (one run a line)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "summary.md", out / "summary.csv", out / "runs.csv"]
    paths[0].write_text(header + ("\n" if header else "") + summary_markdown(records))

    with paths[1].open("w", newline="") as f:
        writer = csv.writer(f)
        for i, table in enumerate(build_tables(records)):
            if i:
                writer.writerow([])
            writer.writerow(["setting", *table.header])
            writer.writerows([table.setting, label, *cells, seconds] for label, cells, seconds in table.rows)

    columns = ["setting", "method", "model", "seed", "status", "top1", "top5", "fp_top1", "seconds", "run_dir"]
    with paths[2].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*columns, "unconverged_units", "error"])
        for r in sorted(records, key=_run_key):
            row = {**vars(r), "seconds": round(r.seconds, 3)}
            unconverged = "" if r.unconverged is None else " ".join(r.unconverged) or "none"
            writer.writerow([("" if row[c] is None else row[c]) for c in columns] + [unconverged, r.error or ""])
    return paths
