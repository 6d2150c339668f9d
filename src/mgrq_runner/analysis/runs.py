"""Reading runs back: every ``results.json`` under some directories, one ``RunRow`` per run.

A collection's ``runs.csv`` (one run a line, written by ``write_runs_csv``) is read back too, so that a table in
``docs/`` can be extended with new runs after the old run directories are gone.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mgrq_runner.errors import DataError
from mgrq_runner.files import read_text, write_atomic
from mgrq_runner.presets import SWITCH_KEYS, preset_values
from mgrq_runner.results import UnreadableResults, read_results, unconverged_units
from mgrq_runner.rundir import RESULTS, held

FP_LABEL = "FP"
UNKNOWN = "?"
RUNS_CSV = "runs.csv"
RUNS_CSV_COLUMNS = (
    "setting", "method", "model", "seed", "status", "top1", "top5", "fp_top1", "seconds", "run_dir",
    "unconverged_units", "error",
)  # fmt: skip
# Written since 2026-12-02 (quant_prob and machine since 2026-12-03); read when present (older
# files: inferred from the labels, ``parse_label``; the machine stays unknown).
EXTRA_COLUMNS = ("global_weight", "local_weight", "provenance", "quant_prob", "machine")
# A results.json that says "running" while no process holds its run dir's lock: the process ended without a word.
KILLED = (
    "killed: results.json says running, but no process holds the run dir (SIGKILL, out of memory, a lost machine); "
    "resume with resume=true"
)


@dataclass
class RunRow:
    """One run, as read from its ``results.json`` (``status`` is "done", "failed", "interrupted" or "running"; a
    "running" run whose process is gone, ``rundir.held``, reads as "interrupted" with the error ``KILLED``).

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
    quant_prob: float | None = None
    w_bits: int | None = None
    a_bits: int | None = None
    finished: str | None = None
    error: str | None = None
    provenance: str | None = None  # "torch 2.14.1, timm 1.0.31, mgrq_runner 0.1.0 @ <git sha>"
    machine: str | None = None  # the CPU (and a CUDA run's GPU) as results.json records it; None: older runs
    unconverged: list[str] | None = None  # reconstructed units that miss the convergence criterion (None: no recon)
    method_defaults: dict[str, Any] | None = None  # its method preset's own label settings (presets.LABEL_KEYS)

    @property
    def done(self) -> bool:
        return self.status == "done"


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``results.json`` under ``paths`` (directories searched recursively, or run dirs / files), sorted; a
    file given by name (a ``runs.csv`` too) is taken as it is."""
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


def method_label(
    method: str,
    global_weight: float | None,
    local_weight: float | None,
    quant_prob: float | None = None,
    defaults: dict[str, Any] | None = None,
    switches: dict[str, Any] | None = None,
) -> str:
    """The row label: the method name, with the loss weights, QDrop's p and the framework ``switches`` (the run's
    values of ``presets.SWITCH_KEYS``) where the run changed them from its method preset's ``defaults``
    (``mgrq (λG=0, λL=1)``; ``mgrq (p=1)``: mgrq on BRECQ's base, no drop; ``glfq (softmax=log_sqrt2)``). Without
    ``defaults`` (an older record) the preset as it is now counts (``presets.preset_values``)."""
    defaults = preset_values(method) if defaults is None else defaults
    weights = {"loss.global_weight": global_weight, "loss.local_weight": local_weight}
    parts = []
    if any(w is not None and w != defaults.get(key, w) for key, w in weights.items()):
        g = defaults.get("loss.global_weight") if global_weight is None else global_weight
        lw = defaults.get("loss.local_weight") if local_weight is None else local_weight
        parts += [f"λG={compact(g)}" if g is not None else "λG=?", f"λL={compact(lw)}" if lw is not None else "λL=?"]
    if quant_prob is not None and quant_prob != defaults.get("recon.quant_prob", quant_prob):
        parts.append(f"p={compact(quant_prob)}")
    for key, short in SWITCH_KEYS.items():
        value = (switches or {}).get(key)
        preset = defaults.get(key, preset_values(method).get(key, value))  # a switch newer than the record: today's
        if value is not None and value != preset:
            parts.append(f"{short}={str(value).lower() if isinstance(value, bool) else value}")
    return f"{method} ({', '.join(parts)})" if parts else method


def _select(node: Any, dotted: str) -> Any:
    """``node["a"]["b"]`` for "a.b" in a JSON object, None where a level is missing or not an object."""
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _unreadable(path: Path, error: str) -> RunRow:
    return RunRow(
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


def load_run(path: str | Path) -> RunRow:
    """Reads one ``results.json`` (or a run dir holding one); an unreadable file gives a failed record."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    try:
        results = read_results(path)
        if results.get("status") == "running" and held(path.parent) is False:
            results = read_results(path)  # it may have ended between the read and the lock's answer
            if results.get("status") == "running":
                results = {**results, "status": "interrupted", "error": KILLED}
    except UnreadableResults as err:
        return _unreadable(path, str(err))

    method = str(results.get("method", UNKNOWN))
    method_cfg = _select(results, "config.method")
    global_weight = _float(_select(method_cfg, "loss.global_weight"))
    local_weight = _float(_select(method_cfg, "loss.local_weight"))
    quant_prob = _float(_select(method_cfg, "recon.quant_prob"))
    switches = {key: _select(method_cfg, key) for key in SWITCH_KEYS}

    status = results.get("status")
    status = status if status in ("done", "failed", "running", "interrupted", "projected") else "failed"
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
    recorded = results.get("method_defaults")
    # the preset as it stood when the run ran; keys an older record lacks (all of them before 2026-12-02, the
    # framework switches before commit d7f1b7d) come from the preset as it is now
    defaults = {**preset_values(method), **(recorded if isinstance(recorded, dict) else {})}
    return RunRow(
        model=str(model),
        method=method_label(method, global_weight, local_weight, quant_prob, defaults, switches),
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
        quant_prob=quant_prob,
        w_bits=results.get("w_bits"),
        a_bits=results.get("a_bits"),
        finished=results.get("finished"),
        error=None if error is None else str(error),
        provenance=provenance or None,
        machine=" + ".join(str(results[k]) for k in ("machine", "gpu") if results.get(k)) or None,
        unconverged=unconverged_units(reconstruction) if isinstance(reconstruction, list) else None,
        method_defaults=defaults,
    )


def load_runs(paths: Iterable[str | Path]) -> list[RunRow]:
    """Every run found under ``paths`` (``results.json`` files, and the runs.csv files of earlier collections, any
    ``.csv`` given by name), except dry runs (status ``projected``)."""
    rows = []
    for path in find_runs(paths):
        rows.extend(read_runs_csv(path) if path.suffix == ".csv" else [load_run(path)])
    return [row for row in rows if row.status != "projected"]


def write_csv_atomic(path: Path, rows: Iterable[Sequence[Any]]) -> None:
    """CSV rows written onto ``path`` whole (``files.write_atomic``: a link there is replaced, never written
    through; a failed write leaves the previous file)."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows(rows)

    write_atomic(path, write)


def write_runs_csv(records: Iterable[RunRow], path: Path) -> None:
    """One run a line. ``unconverged_units`` is empty for a run without reconstruction, "none" when every unit
    converged."""
    columns = (*RUNS_CSV_COLUMNS, *EXTRA_COLUMNS)
    lines = [columns]
    for r in records:
        row = {**vars(r), "seconds": round(r.seconds, 3)}
        row["unconverged_units"] = "" if r.unconverged is None else " ".join(r.unconverged) or "none"
        lines.append(tuple("" if row[c] is None else row[c] for c in columns))
    write_csv_atomic(path, lines)


# A label with arguments: "mgrq (λG=0, λL=1)", "mgrq (λG=0, λL=1, p=1)", "qdrop (p=0.75)", "glfq (rotation=none)".
LABEL_ARGS = re.compile(r"(?P<name>\w+) \((?P<args>[^)]*)\)")
SETTING_LABEL = re.compile(r"W(?P<w>\d+)A(?P<a>\d+)")


def read_runs_csv(path: Path) -> list[RunRow]:
    """The runs of a collection's ``runs.csv``; the loss weights and bits come back from the labels. A file that
    is not one (not a file, not UTF-8, a column missing, a field of the wrong type) is one DataError naming it."""
    fix = "give mgrq-collect a runs.csv it wrote, or the run dirs themselves"
    text = read_text(path, "runs.csv", fix)
    try:
        lines = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as err:
        raise DataError(f"runs.csv {path} is not CSV ({err}). Fix: {fix}.") from None
    if lines and not set(RUNS_CSV_COLUMNS) <= set(lines[0]):
        missing = sorted(set(RUNS_CSV_COLUMNS) - set(lines[0]))
        raise DataError(f"{path} is not a runs.csv written by mgrq-collect: no column {', '.join(missing)}")
    rows = []
    for number, line in enumerate(lines, start=2):  # line 1 is the header
        try:
            rows.append(_csv_row(line))
        except (ValueError, TypeError, AttributeError) as err:
            raise DataError(f"runs.csv {path} line {number} is not a run ({err}). Fix: {fix}.") from None
    return rows


def _csv_row(line: dict[str, str]) -> RunRow:
    """One line of a runs.csv as a run (raises ValueError or TypeError on a field that is not what it should)."""
    if None in line or None in line.values():
        raise ValueError("it has another number of fields than the header")
    name, args = parse_label(line["method"])
    global_weight, local_weight = _loss_weights(line, name, args)
    bits = SETTING_LABEL.match(line["setting"])
    unconverged = line["unconverged_units"]
    return RunRow(
        model=line["model"],
        method=line["method"],
        method_name=name,
        setting=line["setting"],
        seed=int(line["seed"]) if line["seed"] else None,
        status=line["status"],
        top1=_float(line["top1"] or None),
        top5=_float(line["top5"] or None),
        fp_top1=_float(line["fp_top1"] or None),
        seconds=float(line["seconds"] or 0.0),
        run_dir=line["run_dir"],
        global_weight=global_weight,
        local_weight=local_weight,
        quant_prob=_float(line.get("quant_prob") or args.get("p") or preset_values(name).get("recon.quant_prob")),
        w_bits=int(bits["w"]) if bits else None,
        a_bits=int(bits["a"]) if bits else None,
        error=line["error"] or None,
        provenance=line.get("provenance") or None,
        machine=line.get("machine") or None,
        unconverged=None if not unconverged else [] if unconverged == "none" else unconverged.split(),
        method_defaults=preset_values(name),
    )


def parse_label(label: str) -> tuple[str, dict[str, str]]:
    """``method_label``'s inverse: "mgrq (λG=0, λL=1)" -> ("mgrq", {"λG": "0", "λL": "1"})."""
    match = LABEL_ARGS.fullmatch(label)
    if match is None:
        return label, {}
    pairs = (arg.split("=", 1) for arg in match["args"].split(", ") if "=" in arg)
    return match["name"], {key: value for key, value in pairs}


def _loss_weights(line: dict[str, str], name: str, args: dict[str, str]) -> tuple[float | None, float | None]:
    """A runs.csv line's loss weights: its columns, else its label's, else its method preset's (or None)."""
    if line.get("global_weight") or line.get("local_weight"):
        return _float(line.get("global_weight") or None), _float(line.get("local_weight") or None)
    if "λG" in args and "λL" in args:
        return float(args["λG"]), float(args["λL"])
    defaults = preset_values(name)
    return defaults.get("loss.global_weight"), defaults.get("loss.local_weight")
