"""Facts about the package's structure, read from the source with the standard library (nothing is imported):
no import circle, and the layers that must not reach into reconstruction do not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "mgrq_runner"


def _module_name(path: Path, package: Path) -> str:
    return ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")


def module_imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module's imports of this package at import time: module level, not under ``if TYPE_CHECKING``, not
    inside functions; ``from pkg import name`` counts as importing ``pkg.name`` when that is a module."""
    paths = {_module_name(path, package): path for path in package.rglob("*.py")}
    imports: dict[str, set[str]] = {}
    for name, path in paths.items():
        found: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name in paths}
            elif isinstance(node, ast.ImportFrom) and node.module in paths:
                for alias in node.names:
                    found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in paths else node.module)
        imports[name] = found
    return imports


def import_cycle(imports: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(imports[module]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(imports):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_the_detector_finds_a_circle() -> None:
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert "mgrq_runner.quant.rounding.base" in module_imports()["mgrq_runner.quant.rounding.adaround"]


def test_no_import_circle() -> None:
    assert import_cycle(module_imports()) is None


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [
        ("mgrq_runner.quant", "mgrq_runner.recon"),  # a rounding is a weight parameterisation, not reconstruction
        ("mgrq_runner.deploy", "mgrq_runner.recon"),  # exports ask quant/ and transforms/
        ("mgrq_runner.console", "mgrq_runner.recon"),
        ("mgrq_runner.analysis", "mgrq_runner.recon"),
        ("mgrq_runner.transforms", "mgrq_runner.deploy"),
        ("mgrq_runner.quant", "mgrq_runner.deploy"),
        ("mgrq_runner.settings", "mgrq_runner.models"),  # the typed boundary knows no model building
        ("mgrq_runner.settings", "mgrq_runner.data"),  # nor data loading
    ],
)
def test_layers_keep_their_distance(importer: str, forbidden: str) -> None:
    reaches = sorted(
        f"{module} -> {target}"
        for module, targets in module_imports().items()
        if module == importer or module.startswith(f"{importer}.")
        for target in targets
        if target == forbidden or target.startswith(f"{forbidden}.")
    )
    assert reaches == []


def test_the_proxy_names_settings_knows_are_the_proxies_models_builds() -> None:
    from mgrq_runner.models import PROXIES
    from mgrq_runner.presets import PROXY_NAMES

    assert tuple(PROXIES) == PROXY_NAMES
