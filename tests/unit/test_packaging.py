"""Every third-party import is declared in pyproject.toml: the daemon's among the runtime
dependencies, the tests' and tools' among those or the dev and bench extras."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"spoold", "tests"}
# Shipped, but for the demo and for tests: they may import what only the dev extra installs.
DEV_MODULES = {"spoold/demo.py", "spoold/testing.py"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_normalize(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in requirements}  # type: ignore[union-attr]


def declared() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return {"runtime": _requirement_names(project["dependencies"]),
            **{name: _requirement_names(reqs) for name, reqs in extras.items()}}


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports, stdlib and first party left out."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in FIRST_PARTY}


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # type: ignore[return-value]


def distribution(module: str) -> str:
    """The distribution that installs ``module``; its own name when it is not installed here."""
    names = _installed().get(module) or [module]
    return _normalize(names[0])


def undeclared(files: list[Path], allowed: set[str]) -> dict[str, list[str]]:
    missing: dict[str, list[str]] = {}
    for path in files:
        for module in sorted(third_party_imports(path)):
            if distribution(module) not in allowed:
                missing.setdefault(str(path.relative_to(ROOT)), []).append(module)
    return missing


def test_the_daemon_imports_only_runtime_dependencies() -> None:
    deps = declared()
    files = [p for p in sorted((ROOT / "spoold").rglob("*.py")) if str(p.relative_to(ROOT)) not in DEV_MODULES]
    missing = undeclared(files, deps["runtime"])
    assert not missing, f"imported by spoold/ but not in [project] dependencies: {missing}"


@pytest.mark.parametrize("where", ["tests", *sorted(DEV_MODULES)])
def test_tests_and_tools_import_only_declared_packages(where: str) -> None:
    everything = set().union(*declared().values())
    target = ROOT / where
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert files
    missing = undeclared(files, everything)
    assert not missing, f"imports no [project] dependency or extra declares: {missing}"


def test_an_undeclared_import_is_found(tmp_path: Path) -> None:
    # The check itself: a module no requirement names is reported.
    module = tmp_path / "m.py"
    module.write_text("import json\nimport spoold\nimport surely_not_declared.sub\nfrom trio import sleep\n")
    assert third_party_imports(module) == {"surely_not_declared", "trio"}
    assert distribution("surely_not_declared") == "surely-not-declared"
    assert "surely-not-declared" not in set().union(*declared().values())
