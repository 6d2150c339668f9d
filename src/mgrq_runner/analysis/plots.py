"""Plots of collected runs: top-1 against bit setting, the MGRQ loss-weight grid, reconstruction loss curves.

matplotlib is imported inside the functions (Agg backend), so the rest of the package works without it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mgrq_runner.analysis.runs import FP_LABEL, RunRow
from mgrq_runner.analysis.tables import mean_std, method_key, model_key, setting_key
from mgrq_runner.files import read_json, write_atomic
from mgrq_runner.rundir import RECON_CURVES

TERM_ORDER = ["block", "global", "local", "rounding"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install matplotlib (or pip install -e '.[tables]')") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(count: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(count, max_cols)
    return math.ceil(count / cols), cols


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))
    _pyplot().close(fig)
    return path


def plot_top1_vs_bits(records: Sequence[RunRow], path: str | Path) -> Path:
    """One subplot per model: mean top-1 (± std) of each method across bit settings, FP as a dashed line."""
    done = [r for r in records if r.done and r.top1 is not None]
    quantized = [r for r in done if r.setting not in (FP_LABEL, "?")]
    if not quantized:
        raise ValueError("no finished quantized runs to plot top-1 against bits")
    plt = _pyplot()
    models = sorted({r.model for r in quantized}, key=model_key)
    settings = sorted({r.setting for r in quantized}, key=setting_key)
    rows, cols = _grid(len(models))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
    for ax, model in zip(axes.flat, models, strict=False):
        runs = [r for r in quantized if r.model == model]
        for label in sorted({r.method for r in runs}, key=method_key):
            xs, ys, errs = [], [], []
            for i, setting in enumerate(settings):
                values = [r.top1 for r in runs if r.method == label and r.setting == setting]
                if values:
                    mean, std = mean_std(values)
                    xs.append(i)
                    ys.append(mean)
                    errs.append(std or 0.0)
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
        # FP reference: the fp runs of this model, else the FP accuracy every quantized run records
        fp_values = [r.top1 for r in done if r.setting == FP_LABEL and r.model == model]
        fp_values = fp_values or [r.fp_top1 for r in runs if r.fp_top1 is not None]
        if fp_values:
            ax.axhline(mean_std(fp_values)[0], color="black", linestyle="--", linewidth=1, label="FP")
        ax.set_title(model)
        ax.set_xticks(range(len(settings)), settings)
        ax.set_xlabel("bit setting")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(models) :]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_loss_grid(records: Sequence[RunRow], path: str | Path) -> Path:
    """Heatmaps of mean top-1 over (global_weight, local_weight) of mgrq (and qdrop) runs, per model and setting."""
    cells: dict[tuple[str, str], dict[tuple[float, float], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        # qdrop is mgrq with both weights 0 (same reconstruction, block loss only): the grid's (0, 0) corner.
        # Runs at another QDrop p (mgrq on BRECQ's base) are another reconstruction: not in the grid.
        grid_method = r.method_name in ("mgrq", "qdrop")
        preset_p = (r.method_defaults or {}).get("recon.quant_prob")
        if grid_method and r.quant_prob in (None, preset_p) and r.done and r.top1 is not None:
            g = 1.0 if r.global_weight is None else r.global_weight
            loc = 1.0 if r.local_weight is None else r.local_weight
            cells[(r.model, r.setting)][(g, loc)].append(r.top1)
    panels = {key: grid for key, grid in cells.items() if len(grid) >= 2}
    if not panels:
        raise ValueError("no loss-weight grid: needs finished mgrq runs with 2 or more distinct loss weights")
    plt = _pyplot()
    keys = sorted(panels, key=lambda k: (model_key(k[0]), setting_key(k[1])))
    rows, cols = _grid(len(keys), max_cols=3)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        grid = panels[key]
        gs = sorted({g for g, _ in grid})
        ls = sorted({loc for _, loc in grid})
        values = [[mean_std(grid[(g, loc)])[0] if (g, loc) in grid else math.nan for g in gs] for loc in ls]
        image = ax.imshow(values, origin="lower", cmap="viridis", aspect="auto")
        for y, row in enumerate(values):
            for x, value in enumerate(row):
                if not math.isnan(value):
                    bright = image.norm(value) > 0.6  # dark text on the yellow end of viridis
                    color = "black" if bright else "white"
                    ax.text(x, y, f"{value:.2f}", ha="center", va="center", color=color, fontsize="small")
        ax.set_xticks(range(len(gs)), [f"{g:g}" for g in gs])
        ax.set_yticks(range(len(ls)), [f"{loc:g}" for loc in ls])
        ax.set_xlabel("global_weight (λG)")
        ax.set_ylabel("local_weight (λL)")
        ax.set_title(f"mgrq top-1 (%): {key[0]} {key[1]}")
        fig.colorbar(image, ax=ax)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_recon_curves(run_dir: str | Path, path: str | Path) -> Path:
    """One subplot per loss term of ``<run_dir>/recon_curves.json``, one line per unit, log scale."""
    source = Path(run_dir) / RECON_CURVES
    if not source.is_file():
        raise FileNotFoundError(f"no reconstruction curves: {source} does not exist")
    loaded = read_json(source, "loss curves", "rerun the job, or collect without --plots", follow_links=False)
    curves: dict[str, dict[str, list[float]]] = {k: v for k, v in loaded.items() if isinstance(v, dict)}
    found = {term for unit in curves.values() for term in unit if term != "step"}
    terms = [t for t in TERM_ORDER if t in found] + sorted(found - set(TERM_ORDER))
    if not terms:
        raise ValueError(f"{source} holds no loss terms")
    plt = _pyplot()
    rows, cols = _grid(len(terms), max_cols=2)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, term in zip(axes.flat, terms, strict=False):
        for unit, series in curves.items():
            steps = series.get("step") or list(range(len(series.get(term, []))))
            values = series.get(term, [])
            points = [(s, v) for s, v in zip(steps, values, strict=False) if isinstance(v, int | float) and v > 0]
            if points:
                ax.plot(*zip(*points, strict=True), label=unit, linewidth=1)
        ax.set_yscale("log")
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize="x-small", ncol=2)
    for ax in list(axes.flat)[len(terms) :]:
        ax.set_visible(False)
    return _save(fig, path)
