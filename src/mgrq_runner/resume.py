"""Resuming a run: which directory, what the run's model depends on, the earlier results.

The reconstruction's own saved state is ``recon.state.ReconState``; this module holds the run-level part.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from mgrq_runner.errors import ConfigError, printable
from mgrq_runner.results import UnreadableResults, read_results
from mgrq_runner.rundir import RESULTS, results_path

# data keys that only concern evaluation (or where the files are): they may change between an interrupted run
# and its resumption
EVAL_ONLY_DATA_KEYS = ("root", "download_dir", "batch_size", "workers", "eval_split", "heldout_size", "num_eval")


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}.{key}").items()}
    return {prefix: tree}


def fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """What a run's model depends on, as ``{dotted key: value}`` of its resolved config (a plain dict).

    A ``calib.list`` counts by its contents (``calib.list_sha256``, which ``run`` records in the config), not its
    path: the same list moved elsewhere resumes; a list edited in place does not.
    """
    data = {k: v for k, v in config["data"].items() if k not in EVAL_ONLY_DATA_KEYS}
    num_calib = config["calib"]["num_images"]
    return {
        **_flatten(config["model"], "model"),
        **_flatten(config["method"], "method"),
        **_flatten(config["quant"], "quant"),
        **_flatten(data, "data"),
        "seed": config["seed"],
        "num_calib": num_calib if num_calib is not None else config["method"].get("calib_images"),
        "calib.batch_size": config["calib"]["batch_size"],
        "calib.list_sha256": config["calib"].get("list_sha256"),
    }


def check_same_config(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Raises ConfigError naming every key whose value differs between two config fingerprints."""
    keys = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if keys:
        diffs = ", ".join(f"{printable(k)}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys)
        raise ConfigError(
            f"resume: {where} was made with a different config ({diffs}). Fix: resume with the original values, "
            "or start a new run (resume=false and a new output dir)."
        )


def evaluation_question(config: dict[str, Any]) -> dict[str, Any]:
    """What a run's final scores answer besides its model: the data tree, the split, its size, the export."""
    data = config["data"]
    heldout = data.get("eval_split", "val") == "heldout"
    return {
        "data.root": data.get("root"),  # another image tree is another evaluation set (a moved copy: mode=eval)
        "data.eval_split": data.get("eval_split", "val"),
        "data.heldout_size": data.get("heldout_size") if heldout else None,
        "data.num_eval": data.get("num_eval"),
        "export": config.get("export", False),
    }


def check_same_question(previous: dict[str, Any], current: dict[str, Any], run_dir: Path) -> None:
    """A done run resumed is returned as it is: refused when the command asks another evaluation of it."""
    before, now = evaluation_question(previous), evaluation_question(current)
    changed = [f"{key}: {before[key]} -> {now[key]}" for key in before if before[key] != now[key]]
    if changed:
        raise ConfigError(
            f"resume: {run_dir} is done, and its scores answer another question ({', '.join(changed)}). "
            f"Fix: score its export with mode=eval checkpoint={run_dir} (a run made with export=true), or start a "
            "new run (another hydra.run.dir, without resume)."
        )


def list_sha256(entries: list[str]) -> str:
    """The checksum of a ``calib.list``'s entries, in order (blank lines and line endings do not count)."""
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def resume_target(resume: Any, output_dir: str) -> tuple[Path, bool]:
    """The run directory and whether to resume, from ``resume=`` (false, true or a run directory)."""
    if resume is None or resume is False:
        return Path(output_dir), False
    if resume is True:
        return Path(output_dir), True
    path = Path(str(resume)).expanduser()
    if not results_path(path).is_file():
        raise ConfigError(
            f"resume={resume}: {path} holds no {RESULTS}. Fix: resume=<the run dir of an earlier run>, or "
            "resume=true to resume in the current output dir."
        )
    return path, True


def finished_run(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """A resumed run's results when that run is done and answers the same question (returned without recomputing);
    None when there is nothing to return. Refused when the run dir was made with another config."""
    previous = previous_results(run_dir)
    if previous is None:
        return None
    check_same_config(fingerprint(previous["config"]), fingerprint(config), results_path(run_dir))
    if previous.get("status") != "done":
        return None
    check_same_question(previous["config"], config, run_dir)
    return previous


def previous_results(run_dir: Path) -> dict[str, Any] | None:
    """The run directory's results.json, or None when it has none (or an unreadable one)."""
    try:
        results = read_results(run_dir)
    except UnreadableResults:
        return None
    return dict(results) if isinstance(results.get("config"), dict) else None
