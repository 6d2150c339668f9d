"""Terminal output: rich progress bars for long stages and the summary table of a run."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mgrq_runner.results import HARDENING_JUMP_LIMIT, STE_PLATEAU, UNDECIDED_LIMIT, converged
from mgrq_runner.rundir import results_path

if TYPE_CHECKING:
    from mgrq_runner.recon.curves import StepCallback
    from mgrq_runner.recon.projection import Projection

T = TypeVar("T")
console = Console(stderr=True)


def _progress(*extra: ProgressColumn) -> Progress:
    """A progress display: description, bar, count and elapsed time, then ``extra`` columns."""
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, *extra, console=console, transient=False)


def track(items: Iterable[T], total: int, description: str, enabled: bool = True) -> Iterator[T]:
    """Yields ``items`` while a rich progress bar counts them (a plain pass-through when disabled)."""
    if not enabled:
        yield from items
        return
    with _progress(TextColumn("eta"), TimeRemainingColumn()) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


@contextmanager
def recon_progress(enabled: bool = True) -> Iterator[StepCallback | None]:
    """A progress line per reconstruction unit showing its iteration and loss terms (None when disabled)."""
    if not enabled:
        yield None
        return
    tasks: dict[str, TaskID] = {}
    with _progress(TextColumn("{task.fields[terms]}")) as progress:

        def on_step(unit: str, step: int, terms: dict[str, float], total: int) -> None:
            if unit not in tasks:
                tasks[unit] = progress.add_task(f"reconstruct {unit}", total=total, terms="")
            text = " ".join(f"{name} {value:.3g}" for name, value in terms.items())
            progress.update(tasks[unit], completed=step + 1, terms=text)

        yield on_step


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(results: dict[str, Any]) -> Table:
    """One-row table of a finished run."""
    table = Table(title=f"mgrq-run: {results['model']} / {results['method']}")
    for column in ("W/A", "top-1", "top-5", "FP top-1", "FP top-5", "agree", "calib", "eval", "seconds"):
        table.add_column(column, justify="right")
    bits = "32/32" if results["method"] == "fp" else f"{results['w_bits']}/{results['a_bits']}"
    table.add_row(
        bits,
        _fmt(results["top1"]),
        _fmt(results["top5"]),
        _fmt(results["fp_top1"]),
        _fmt(results["fp_top5"]),
        _fmt(results["fp_agreement"], 4),
        str(results["num_calib"]),
        str(results["num_eval"]),
        _fmt(sum(results["times"].values()), 1),
    )
    return table


def convergence_table(units: list[dict[str, Any]]) -> Table:
    """Per reconstructed unit: block loss on the calibration set before and after hardening, undecided share."""
    table = Table(
        title=f"convergence (criterion: hard/soft <= {HARDENING_JUMP_LIMIT}, undecided < {UNDECIDED_LIMIT:.0%})"
    )
    for column in ("unit", "block_soft", "block_hard", "hard/soft", "undecided", "converged"):
        table.add_column(column, justify="right")
    if any("block_final" in unit for unit in units):
        return ste_convergence_table(units)
    for unit in units:
        if "block_hard" not in unit:
            continue
        ratio = unit["block_hard"] / max(unit["block_soft"], 1e-12)
        table.add_row(
            unit["unit"],
            f"{unit['block_soft']:.4g}",
            f"{unit['block_hard']:.4g}",
            f"{ratio:.3f}",
            f"{unit['undecided']:.2%}",
            "yes" if converged(unit) else "NO",
        )
    return table


def ste_convergence_table(units: list[dict[str, Any]]) -> Table:
    """Per unit tuned by STE: the calibration block loss at 90 % and 100 % of the budget, the codes moved."""
    table = Table(title=f"convergence (STE; criterion: the last 10 % of the budget gains under {STE_PLATEAU:.0%})")
    for column in ("unit", "block_at_90", "block_final", "last 10 %", "moved", "converged"):
        table.add_column(column, justify="right")
    for unit in units:
        if "block_final" not in unit:
            continue
        gain = 1.0 - unit["block_final"] / max(unit["block_at_90"], 1e-12)
        table.add_row(
            unit["unit"],
            f"{unit['block_at_90']:.4g}",
            f"{unit['block_final']:.4g}",
            f"{gain:+.2%}",
            f"{unit['moved']:.2%}",
            "yes" if converged(unit) else "NO",
        )
    return table


def print_projection(projection: Projection) -> None:
    """``dry_run=true``: per unit the step time (measured or interpolated) and projected seconds, then the total."""
    table = Table(title="projected reconstruction (dry_run: nothing was reconstructed)")
    for column in ("unit", "ms/step", "iters", "passes s", "seconds", "how"):
        table.add_column(column, justify="right")
    for unit in projection.units:
        how = "timed" if unit.measured else "interpolated"
        table.add_row(
            unit.name,
            f"{1000 * unit.step_seconds:.1f}",
            str(unit.iters),
            f"{unit.pass_seconds:.2f}",
            f"{unit.seconds:.1f}",
            how,
        )
    console.print(table)
    minutes = projection.seconds / 60
    console.print(
        f"projected reconstruction: {projection.seconds:.0f} s ({minutes:.1f} min) on this device, "
        f"{projection.setup_seconds:.1f} s of it for the FP logits; "
        f"peak memory {projection.peak_memory_mb:.0f} MiB ({projection.memory})"
    )


def print_summary(results: dict[str, Any]) -> None:
    if results.get("reconstruction"):
        console.print(convergence_table(results["reconstruction"]))
    console.print(summary_table(results))
    if results.get("fp_transformed_top1") is not None:
        console.print(
            f"transformed FP model ({', '.join(results.get('fp_transform', {}))}): top-1 "
            f"{results['fp_transformed_top1']:.2f} (original FP {results['fp_top1']:.2f}), top-1 equal to the "
            f"original's on {results['fp_transformed_agreement']:.2%} of images; the quantized model starts from it"
        )
    if "agreement_with_simulation" in results:
        onnx = results["onnx"]
        kernels = ", ".join(f"{op} {n}" for op, n in onnx["kernels"].items())
        cpu = onnx.get("cpu", {}).get("isa", "instruction set not recorded")
        console.print(
            f"onnxruntime ({', '.join(onnx['providers'])}, integer kernels for {cpu}): top-1 equal to the "
            f"simulation's on {results['agreement_with_simulation']:.2%} of images; optimised graph: {kernels}"
        )
    console.print(f"results: {results_path(results['run_dir'])}")
