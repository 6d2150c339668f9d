"""Size and shape of the source tree, and where the run's settings are read: a before/after figure for refactors.

    python scripts/code_metrics.py                      # src/mgrq_runner of this checkout
    python scripts/code_metrics.py /path/to/other/src/mgrq_runner

Prints, from the source alone (nothing is imported):
- files and lines; functions over 50 lines; functions over 6 parameters (``self``/``cls`` not counted);
- the raw config's reach: the functions that take the composed Hydra config (a parameter annotated ``DictConfig``
  or named ``cfg``/``*_cfg``), per file, and how many reads of it (``cfg.x``, ``cfg["x"]``, ``cfg.get("x")``) each
  file makes;
- the walk of every run setting: for each top-level key (seed, device, export, ...) the files that read it, from
  the raw config or from a settings object (``settings.seed``, ``job.seed``), and the read sites in all.
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter, defaultdict
from pathlib import Path

RUN_SETTINGS = (
    "seed", "device", "threads", "progress", "mode", "export", "dry_run", "resume", "checkpoint", "calib", "data",
    "eval", "model", "method", "quant",
)  # fmt: skip
SETTINGS_NAMES = {"settings", "job", "run_settings"}  # names a parsed settings object goes by


def is_config_name(name: str) -> bool:
    return name == "cfg" or name.endswith("_cfg")


def config_params(func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The parameters of ``func`` that hold the raw config."""
    found = []
    for arg in [*func.args.posonlyargs, *func.args.args, *func.args.kwonlyargs]:
        annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
        if "DictConfig" in annotation or is_config_name(arg.arg):
            found.append(arg.arg)
    return found


def read_key(node: ast.AST) -> tuple[str, str] | None:
    """``(base name, key)`` of ``base.key``, ``base["key"]`` or ``base.get("key")``; else None."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr != "get":
        return node.value.id, node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            return node.value.id, node.slice.value
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("get", "select")
        and isinstance(node.func.value, ast.Name)
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.func.value.id, node.args[0].value.split(".")[0]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(__file__).resolve().parent.parent / "src" / "mgrq_runner"
    parser.add_argument("package", nargs="?", type=Path, default=default)
    args = parser.parse_args()

    files = sorted(p for p in args.package.rglob("*.py") if "conf" not in p.relative_to(args.package).parts)
    lines = 0
    long_functions, wide_functions = [], []
    config_functions: dict[str, list[str]] = defaultdict(list)
    raw_reads: Counter[str] = Counter()
    setting_reads: dict[str, Counter[str]] = defaultdict(Counter)
    for path in files:
        name = str(path.relative_to(args.package))
        source = path.read_text()
        lines += len(source.splitlines())
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                params = [a.arg for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]]
                params = [p for p in params if p not in ("self", "cls")]
                if length > 50:
                    long_functions.append(f"{name}:{node.name} ({length} lines)")
                if len(params) > 6:
                    wide_functions.append(f"{name}:{node.name} ({len(params)} parameters)")
                if config_params(node):
                    config_functions[name].append(node.name)
            found = read_key(node)
            if found is None:
                continue
            base, key = found
            if is_config_name(base):
                raw_reads[name] += 1
            if (is_config_name(base) or base in SETTINGS_NAMES) and key in RUN_SETTINGS:
                setting_reads[key][name] += 1

    print(f"package {args.package}")
    print(f"files {len(files)}, lines {lines}")
    print(f"functions over 50 lines: {len(long_functions)}" + "".join(f"\n  {f}" for f in long_functions))
    print(f"functions over 6 parameters: {len(wide_functions)}" + "".join(f"\n  {f}" for f in wide_functions))
    total = sum(len(v) for v in config_functions.values())
    print(f"functions taking the raw config: {total} in {len(config_functions)} files")
    for name, functions in sorted(config_functions.items()):
        print(f"  {name}: {', '.join(functions)} ({raw_reads[name]} raw reads)")
    print(f"raw config reads in all: {sum(raw_reads.values())} in {len(raw_reads)} files")
    print("settings walk (files reading each run setting; read sites in all):")
    for key in RUN_SETTINGS:
        where = setting_reads.get(key, Counter())
        places = ", ".join(f"{n} x{c}" for n, c in sorted(where.items()))
        print(f"  {key:10s} {len(where)} files, {sum(where.values())} reads: {places}")


if __name__ == "__main__":
    main()
