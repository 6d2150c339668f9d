"""The result collector: tables of generated run directories, their CSV twins, published rows, the CLI and plots."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mgrq_runner.analysis.plots import plot_loss_grid, plot_recon_curves
from mgrq_runner.analysis.runs import KILLED, RUNS_CSV_COLUMNS, find_runs, load_run, load_runs, method_label
from mgrq_runner.analysis.tables import summary_markdown, write_summary
from mgrq_runner.errors import DataError
from mgrq_runner.rundir import LOCK, locked

MODELS = {"deit_s": "deit_small_patch16_224.fb_in1k", "proxy_vit": "proxy_vit"}
REPQ_DEIT_S = [68.91, 69.40, 68.75]  # the W4A4 repq DeiT-S cell, three seeds


def write_run(
    root: Path,
    preset: str,
    method: str,
    bits: int,
    seed: int,
    top1: float | None,
    loss: tuple[float, float] | None = None,
    quant_prob: float | None = None,
) -> Path:
    """A run directory with a results.json shaped like mgrq-run's (top1 None: a failed run)."""
    name = method + ("" if loss is None else f"_g{loss[0]}_l{loss[1]}")
    name += "" if quant_prob is None else f"_p{quant_prob}"
    run_dir = root / f"w{bits}a{bits}" / f"{name}_{preset}_s{seed}"
    run_dir.mkdir(parents=True)
    method_cfg: dict[str, Any] = {"name": method}
    if loss is not None:
        method_cfg["loss"] = {"global_weight": loss[0], "local_weight": loss[1]}
    if quant_prob is not None:
        method_cfg["recon"] = {"quant_prob": quant_prob}
    results: dict[str, Any] = {
        "model": MODELS[preset],
        "preset": preset,
        "method": method,
        "w_bits": bits,
        "a_bits": bits,
        "seed": seed,
        "run_dir": "/somewhere/else",
        "status": "done",
        "times": {"calibrate": 10.0 + 2 * seed, "evaluate": 2.0},
        "config": {"method": method_cfg},
    }
    if top1 is None:
        results.update(status="failed", error="RuntimeError: out of memory")
    else:
        results.update(top1=top1, top5=99.0, fp_top1=90.72 if preset == "proxy_vit" else 79.80, fp_top5=99.8)
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    write_run(root, "deit_s", "fp", 32, 0, 79.80)
    write_run(root, "proxy_vit", "fp", 32, 0, 90.72)
    for seed, top1 in enumerate(REPQ_DEIT_S):
        write_run(root, "deit_s", "repq", 4, seed, top1)
    write_run(root, "proxy_vit", "repq", 4, 0, 89.26)
    mgrq_dir = write_run(root, "deit_s", "mgrq", 4, 0, 75.10, loss=(1.0, 1.0))
    write_run(root, "deit_s", "mgrq", 4, 1, None, loss=(1.0, 1.0))  # failed
    write_run(root, "proxy_vit", "mgrq", 4, 0, 88.50, loss=(0.0, 1.0))  # ablation; plain mgrq proxy_vit is missing
    write_run(root, "proxy_vit", "mgrq", 4, 0, 87.90, loss=(1.0, 0.0))
    write_run(root, "proxy_vit", "repq", 3, 0, None)  # the only W3A3 run, failed
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text('{"model": "proxy_vit", "status": ')
    curves = {
        "blocks.0": {"step": [0, 10, 20], "block": [1.0, 0.5, 0.0], "global": [0.1, 0.05, 0.01], "rounding": [9, 5, 1]},
        "head": {"step": [0, 10], "block": [0.2, 0.1]},
    }
    (mgrq_dir / "recon_curves.json").write_text(json.dumps(curves))
    return root


def parse_markdown(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """{setting: {row label: {column: cell}}} from "## <setting>" headings followed by Markdown tables."""
    tables: dict[str, dict[str, dict[str, str]]] = {}
    setting, header = None, None
    for line in text.splitlines():
        if line.startswith("## "):
            setting, header = line[3:].strip(), None
        elif line.startswith("|") and setting is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
                tables[setting] = {}
            elif not set(line) <= set("|-"):
                tables[setting][cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return tables


def test_method_label_and_find_runs(runs: Path) -> None:
    assert method_label("mgrq", 1.0, 1.0) == "mgrq"
    assert method_label("mgrq", None, None) == "mgrq"
    assert method_label("mgrq", 0.1, 10.0) == "mgrq (λG=0.1, λL=10)"
    assert method_label("mgrq", 0.0, 1.0) == "mgrq (λG=0, λL=1)"
    assert method_label("qdrop", 0.0, 0.0) == "qdrop"
    assert method_label("mgrq", 1.0, 1.0, 0.5) == "mgrq" and method_label("brecq", 0.0, 0.0, 1.0) == "brecq"
    assert method_label("mgrq", 1.0, 1.0, 1.0) == "mgrq (p=1)"  # mgrq on BRECQ's base: not the mgrq row
    assert method_label("mgrq", 1.0, 0.0, 1.0) == "mgrq (λG=1, λL=0, p=1)"
    assert method_label("qdrop", 0.0, 0.0, 0.75) == "qdrop (p=0.75)"
    found = find_runs([runs])
    assert len(found) == 12 and found == sorted(found, key=str)
    one = next(p for p in found if "repq_deit_s_s1" in str(p))
    assert find_runs([runs, one, one.parent]) == found  # no duplicates
    assert find_runs([one.parent]) == [one]


def test_load_run(runs: Path) -> None:
    record = load_run(runs / "w4a4" / "repq_deit_s_s1")
    assert (record.model, record.method, record.setting, record.seed, record.status) == (
        "deit_s",
        "repq",
        "W4A4",
        1,
        "done",
    )
    assert record.top1 == 69.40 and record.seconds == pytest.approx(14.0)
    assert record.run_dir == str(runs / "w4a4" / "repq_deit_s_s1")
    assert load_run(runs / "w32a32" / "fp_proxy_vit_s0").setting == "FP"
    failed = load_run(runs / "w4a4" / "mgrq_g1.0_l1.0_deit_s_s1" / "results.json")
    assert failed.status == "failed" and failed.top1 is None and "out of memory" in (failed.error or "")
    broken = load_run(runs / "broken" / "results.json")
    assert broken.status == "failed" and "broken" in broken.run_dir and broken.top1 is None


def test_tables(runs: Path) -> None:
    records = load_runs([runs])
    text = summary_markdown(records)
    tables = parse_markdown(text)
    assert list(tables)[:2] == ["W4A4", "W3A3"]
    w4 = tables["W4A4"]
    assert list(w4) == [
        "FP",
        "repq",
        "mgrq",
        "mgrq (λG=0, λL=1)",
        "mgrq (λG=1, λL=0)",
        "FP32 (published)",
        "RepQ-ViT (published)",
        "QDrop, APHQ-ViT re-run (published)",
        "APHQ-ViT (published)",
        "FIMA-Q (published)",
        "GLF-Q (published)",
    ]
    assert list(w4["FP"]) == ["DeiT-S", "proxy_vit", "s/run"]
    assert w4["GLF-Q (published)"]["DeiT-S"] == "77.34"

    n = len(REPQ_DEIT_S)
    mean = sum(REPQ_DEIT_S) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in REPQ_DEIT_S) / (n - 1))
    assert w4["repq"]["DeiT-S"] == f"{mean:.2f} ± {std:.2f}" == "69.02 ± 0.34"  # worked by hand too
    assert w4["repq"]["proxy_vit"] == "89.26"
    assert w4["repq"]["s/run"] == "13.5"  # (12 + 14 + 16 + 12) / 4 seconds
    assert w4["FP"] == {"DeiT-S": "79.80", "proxy_vit": "90.72", "s/run": "12.0"}
    assert w4["mgrq"]["DeiT-S"] == "75.10 (1 failed)"
    assert w4["mgrq"]["proxy_vit"] == "missing"
    assert w4["mgrq (λG=0, λL=1)"] == {"DeiT-S": "missing", "proxy_vit": "88.50", "s/run": "12.0"}
    assert w4["FIMA-Q (published)"] == {"DeiT-S": "76.87", "proxy_vit": "—", "s/run": "—"}
    assert w4["FP32 (published)"]["DeiT-S"] == "79.85"
    assert w4["QDrop, APHQ-ViT re-run (published)"]["DeiT-S"] == "74.73"

    w3 = tables["W3A3"]  # proxy-only table: no published rows
    assert w3 == {"FP": {"proxy_vit": "90.72", "s/run": "12.0"}, "repq": {"proxy_vit": "failed", "s/run": "—"}}
    assert "measured rows from 10 runs" in text  # 2 fp + 8 W4A4 runs
    assert "measured rows from 2 runs" in text  # W3A3: the proxy fp run + the failed repq run
    assert "broken" in text.split("## Failed or incomplete runs")[1]
    for cell in (c for table in tables.values() for row in table.values() for c in row.values()):
        assert cell not in ("0", "0.00", "nan")


def test_no_published_rows_for_proxy_only(tmp_path: Path) -> None:
    write_run(tmp_path, "proxy_vit", "fp", 32, 0, 90.72)
    write_run(tmp_path, "proxy_vit", "repq", 4, 0, 89.26)
    text = summary_markdown(load_runs([tmp_path]))
    assert "(published)" not in text.replace("'(published)' rows", "")
    assert parse_markdown(text)["W4A4"]["repq"]["proxy_vit"] == "89.26"


def test_csv_matches_markdown(runs: Path, tmp_path: Path) -> None:
    records = load_runs([runs])
    write_summary(records, tmp_path / "out")
    markdown = parse_markdown((tmp_path / "out" / "summary.md").read_text())
    from_csv: dict[str, dict[str, dict[str, str]]] = {}
    header: list[str] = []
    with (tmp_path / "out" / "summary.csv").open(newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "setting":
                header = row
                continue
            from_csv.setdefault(row[0], {})[row[1]] = dict(zip(header[2:], row[2:], strict=True))
    assert from_csv == markdown

    with (tmp_path / "out" / "runs.csv").open(newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 12
    assert {"setting", "method", "model", "seed", "status", "top1", "top5", "fp_top1", "seconds", "run_dir"} <= set(
        lines[0]
    )
    assert sum(line["status"] == "failed" for line in lines) == 3
    repq = sorted(float(line["top1"]) for line in lines if line["method"] == "repq" and line["model"] == "deit_s")
    assert repq == sorted(REPQ_DEIT_S)


def test_plot_errors(tmp_path: Path) -> None:
    write_run(tmp_path, "proxy_vit", "mgrq", 4, 0, 88.0, loss=(1.0, 1.0))
    with pytest.raises(ValueError, match="loss-weight grid"):
        plot_loss_grid(load_runs([tmp_path]), tmp_path / "grid.png")
    with pytest.raises(FileNotFoundError, match="recon_curves.json"):
        plot_recon_curves(tmp_path, tmp_path / "curves.png")


def test_cli(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me\n")
    for name in ("summary.md", "runs.csv", "top1_vs_bits.png"):  # links planted where the collector writes
        (out / name).symlink_to(target)
    cmd = [sys.executable, "-m", "mgrq_runner.analysis.collect", str(runs), "--out", str(out), "--plots"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert parse_markdown(proc.stdout) == parse_markdown((out / "summary.md").read_text())
    assert "## W4A4" in proc.stdout
    for name in ("summary.md", "summary.csv", "runs.csv", "top1_vs_bits.png", "loss_grid.png", "recon_curves.png"):
        assert (out / name).stat().st_size > 0 and not (out / name).is_symlink(), name
    assert target.read_text() == "keep me\n", "the links were replaced, not written through"

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "mgrq_runner.analysis.collect", str(empty)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "no results.json" in proc.stderr


def test_repeated_runs_and_heldout_runs_are_flagged(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root / "a", "proxy_vit", "repq", 4, 0, 89.26)
    write_run(root / "b", "proxy_vit", "repq", 4, 0, 89.26)  # the same job collected twice
    tuned = write_run(root / "c", "proxy_vit", "repq", 4, 1, 95.0)
    results = json.loads((tuned / "results.json").read_text())
    (tuned / "results.json").write_text(json.dumps({**results, "eval_split": "heldout"}))
    text = summary_markdown(load_runs([root]))
    assert "## Repeated runs" in text and "W4A4 repq proxy_vit seed 0" in text
    tables = parse_markdown(text)
    assert tables["W4A4"]["repq"]["proxy_vit"] == "89.26 ± 0.00"  # the held-out score stays out of it
    assert tables["W4A4 (held-out train)"]["repq"]["proxy_vit"] == "95.00"


def test_convergence_is_counted_and_the_missing_units_named(tmp_path: Path) -> None:
    good = {"unit": "blocks.0", "block_soft": 1.0, "block_hard": 1.1, "undecided": 0.001}
    jumpy = {"unit": "blocks.1", "block_soft": 1.0, "block_hard": 1.3, "undecided": 0.001}
    undecided = {"unit": "head", "block_soft": 1.0, "block_hard": 1.0, "undecided": 0.05}
    for seed, units in enumerate([[good], [good, jumpy, undecided]]):
        path = write_run(tmp_path, "proxy_vit", "qdrop", 4, seed, 90.0) / "results.json"
        results = json.loads(path.read_text())
        path.write_text(json.dumps({**results, "reconstruction": [{"unit": "embed"}, *units]}))
    write_run(tmp_path, "proxy_vit", "repq", 4, 0, 89.0)  # no reconstruction: not counted
    records = load_runs([tmp_path])
    assert sorted(r.unconverged for r in records if r.unconverged is not None) == [[], ["blocks.1", "head"]]
    text = summary_markdown(records)
    assert "1 of 2 reconstructed runs met it on every unit" in text
    assert "W4A4 qdrop proxy_vit seed 1: blocks.1, head" in text
    write_summary(records, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "runs.csv").open()))
    assert sorted(row["unconverged_units"] for row in rows) == ["", "blocks.1 head", "none"]


def test_a_collection_read_back_from_its_runs_csv(runs: Path, tmp_path: Path) -> None:
    """runs.csv gives back the same tables, loss weights, bits and convergence as the run directories it came
    from, and an earlier table extended with new runs counts both."""
    path = write_run(runs, "proxy_vit", "qdrop", 3, 0, 87.5) / "results.json"
    results = json.loads(path.read_text())
    units = [{"unit": "blocks.0", "block_soft": 1.0, "block_hard": 1.5, "undecided": 0.0}]
    versions = {"torch": "2.14.1", "timm": "1.0.31"}
    path.write_text(json.dumps({**results, "reconstruction": units, "versions": versions, "git_sha": "abc123"}))
    softmax = write_run(runs, "proxy_vit", "qdrop", 4, 0, 90.1) / "results.json"  # qdrop's preset: log_sqrt2
    results = json.loads(softmax.read_text())
    results["config"]["method"]["init"] = {"softmax_quantizer": "uniform"}
    softmax.write_text(json.dumps(results))
    records = load_runs([runs])
    write_summary(records, tmp_path / "first")
    again = load_runs([tmp_path / "first" / "runs.csv"])
    text, text_again = summary_markdown(records), summary_markdown(again)
    assert parse_markdown(text_again) == parse_markdown(text)
    assert sorted(text_again.splitlines()) == sorted(text.splitlines())  # the failed runs listed in another order
    by_label = {(r.method, r.setting, r.model, r.seed): r for r in again}
    ablation = by_label[("mgrq (λG=0, λL=1)", "W4A4", "proxy_vit", 0)]
    assert (ablation.method_name, ablation.global_weight, ablation.local_weight) == ("mgrq", 0.0, 1.0)
    assert (ablation.w_bits, ablation.a_bits, ablation.unconverged) == (4, 4, None)
    assert by_label[("qdrop", "W3A3", "proxy_vit", 0)].unconverged == ["blocks.0"]
    assert by_label[("qdrop (softmax=uniform)", "W4A4", "proxy_vit", 0)].method_name == "qdrop"
    assert ("qdrop", "W4A4", "proxy_vit", 0) not in by_label  # its own row, not the qdrop cell
    assert by_label[("qdrop", "W3A3", "proxy_vit", 0)].provenance == "torch 2.14.1, timm 1.0.31 @ abc123"

    older = tmp_path / "older" / "runs_2026-11-28.csv"  # any name; written before the extra columns
    older.parent.mkdir()
    with (tmp_path / "first" / "runs.csv").open(newline="") as f, older.open("w", newline="") as g:
        csv.writer(g).writerows(row[: len(RUNS_CSV_COLUMNS)] for row in csv.reader(f))
    from_older = load_runs([older])
    assert parse_markdown(summary_markdown(from_older)) == parse_markdown(text)
    weights = {(r.method, r.setting): (r.global_weight, r.local_weight) for r in from_older if r.seed == 0}
    assert weights[("mgrq", "W4A4")] == (1.0, 1.0) and weights[("mgrq (λG=1, λL=0)", "W4A4")] == (1.0, 0.0)
    assert weights[("qdrop", "W3A3")] == (0.0, 0.0)  # the loss-weight grid's (0, 0) corner (docs/method.md section 6)

    new = tmp_path / "new"
    write_run(new, "proxy_vit", "repq", 4, 1, 89.40)
    extended = parse_markdown(summary_markdown(load_runs([tmp_path / "first" / "runs.csv", new])))
    assert extended["W4A4"]["repq"]["proxy_vit"] == "89.33 ± 0.10"  # 89.26 from the csv, 89.40 from the new run

    other = tmp_path / "other" / "runs.csv"
    other.parent.mkdir()
    other.write_text("model,top1\nproxy_vit,90\n")
    with pytest.raises(DataError, match="not a runs.csv written by mgrq-collect"):
        load_runs([other])
    cmd = [sys.executable, "-m", "mgrq_runner.analysis.collect", str(other)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a runs.csv" in proc.stderr


def test_a_qdrop_probability_off_the_preset_is_its_own_row(tmp_path: Path) -> None:
    """mgrq on BRECQ's base (method.recon.quant_prob=1) is not averaged into the mgrq cell, keeps its label through
    runs.csv, and stays out of the loss-weight grid (another reconstruction than the grid's mgrq and qdrop)."""
    root = tmp_path / "runs"
    write_run(root, "proxy_vit", "mgrq", 3, 0, 85.50, loss=(1.0, 1.0), quant_prob=0.5)
    write_run(root, "proxy_vit", "mgrq", 3, 0, 86.20, loss=(1.0, 1.0), quant_prob=1.0)
    write_run(root, "proxy_vit", "mgrq", 3, 0, 86.00, loss=(1.0, 0.0), quant_prob=1.0)
    write_run(root, "proxy_vit", "qdrop", 3, 0, 85.00, loss=(0.0, 0.0), quant_prob=0.5)
    records = load_runs([root])
    w3 = parse_markdown(summary_markdown(records))["W3A3"]
    assert {label: row["proxy_vit"] for label, row in w3.items()} == {
        "qdrop": "85.00",
        "mgrq": "85.50",
        "mgrq (p=1)": "86.20",
        "mgrq (λG=1, λL=0, p=1)": "86.00",
    }
    write_summary(records, tmp_path / "out")
    again = {r.method: r for r in load_runs([tmp_path / "out" / "runs.csv"])}
    assert (again["mgrq (p=1)"].method_name, again["mgrq (p=1)"].quant_prob) == ("mgrq", 1.0)
    assert (again["mgrq (λG=1, λL=0, p=1)"].global_weight, again["mgrq (λG=1, λL=0, p=1)"].local_weight) == (1.0, 0.0)
    assert again["mgrq"].quant_prob == 0.5 and again["qdrop"].quant_prob == 0.5
    pytest.importorskip("matplotlib")
    plot_loss_grid(records, tmp_path / "grid.png")  # (1, 1) and (0, 0): a grid
    with pytest.raises(ValueError, match="no loss-weight grid"):
        plot_loss_grid([r for r in records if r.method != "mgrq"], tmp_path / "none.png")  # p=1 runs: not a grid


def test_wall_times_from_a_separate_timing_pass(tmp_path: Path) -> None:
    """--timing: s/run comes from the timing runs (not the table's), they are kept in timing.csv, and the summary
    counts those that repeat a table run with the same top-1."""
    table, quiet = tmp_path / "table", tmp_path / "quiet"
    for seed, top1 in enumerate([89.20, 89.40, 89.30]):
        write_run(table, "proxy_vit", "repq", 4, seed, top1)  # times 10 + 2 seed + 2: 12, 14, 16 s
    write_run(table, "proxy_vit", "qdrop", 4, 0, 90.10)
    repeat = write_run(quiet, "proxy_vit", "repq", 4, 0, 89.20)
    results = json.loads((repeat / "results.json").read_text())
    (repeat / "results.json").write_text(json.dumps({**results, "times": {"calibrate": 3.0, "evaluate": 1.5}}))
    write_run(quiet, "proxy_vit", "qdrop", 4, 0, 90.15)  # not bit-identical: a different top-1
    plain = parse_markdown(summary_markdown(load_runs([table])))["W4A4"]
    assert plain["repq"]["s/run"] == "14.0"
    text = summary_markdown(load_runs([table]), timing=load_runs([quiet]))
    timed = parse_markdown(text)["W4A4"]
    assert (timed["repq"]["s/run"], timed["qdrop"]["s/run"]) == ("4.5", "12.0")
    assert timed["repq"]["proxy_vit"] == "89.30 ± 0.10"  # the cells stay the table's
    assert "2 timing runs repeat a table run" in text and "1 give the same top-1" in text
    assert "largest difference is 0.05" in text
    also_table = summary_markdown(load_runs([table, quiet / "w4a4" / "qdrop_proxy_vit_s0"]), timing=load_runs([quiet]))
    assert "1 timing runs repeat a table run (same setting, method, model and seed) (1 timing runs are table runs" in (
        also_table
    )  # the qdrop timing run, collected into the table too, repeats nothing: only repq's pair is left

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mgrq_runner.analysis.collect", str(table), "--timing", str(quiet), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(list(csv.DictReader((out / "timing.csv").open()))) == 2
    again = parse_markdown(summary_markdown(load_runs([out / "runs.csv"]), timing=load_runs([out / "timing.csv"])))
    assert again == parse_markdown(text)


def test_the_machines_of_a_collection_are_named_and_mixed_settings_flagged(tmp_path: Path) -> None:
    """results.json's machine reaches runs.csv and back; a setting whose runs come from two CPUs is flagged, one
    whose runs share one CPU (or do not record it) is not."""
    root = tmp_path / "runs"
    machines = {0: "CPU A, AVX512, 2 cores", 1: "CPU B, AVX2, 2 cores"}
    for bits, seeds in ((4, (0, 1)), (3, (0,))):
        for seed in seeds:
            path = write_run(root, "proxy_vit", "qdrop", bits, seed, 90.0 - seed) / "results.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "machine": machines[seed]}))
    write_run(root, "proxy_vit", "repq", 3, 0, 89.0)  # no machine recorded (an older run)
    records = load_runs([root])
    text = summary_markdown(records)
    assert "`CPU A, AVX512, 2 cores` (2 runs)" in text and "`not recorded` (1 run)" in text
    assert "- W4A4: runs of 2 machines" in text and "- W3A3: runs of" not in text
    write_summary(records, tmp_path / "out")
    again = load_runs([tmp_path / "out" / "runs.csv"])
    assert sorted(r.machine or "" for r in again) == sorted(r.machine or "" for r in records)
    assert summary_markdown(again) == text


def test_a_running_record_is_killed_only_when_no_process_holds_its_run_dir(tmp_path: Path) -> None:
    """results.json says running: so it stays while the run dir's lock is held or there is no lock to ask (an old
    or copied run dir); a free lock means the process ended without a word: interrupted, error KILLED."""
    run_dir = tmp_path / "w4a4" / "mgrq_proxy_vit_s0"
    run_dir.mkdir(parents=True)
    fields = {"status": "running", "method": "mgrq", "preset": "proxy_vit", "w_bits": 4, "a_bits": 4, "seed": 0}
    (run_dir / "results.json").write_text(json.dumps(fields))
    assert load_run(run_dir).status == "running"  # no lock file
    with locked(run_dir):
        assert load_run(run_dir).status == "running"
    assert (run_dir / LOCK).exists()
    killed = load_run(run_dir)
    assert (killed.status, killed.error) == ("interrupted", KILLED)
    text = summary_markdown([killed])
    assert "incomplete" in text and f"- interrupted: W4A4 mgrq proxy_vit seed 0 ({run_dir}): {KILLED}" in text
