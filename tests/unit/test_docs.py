"""The docs cannot drift from the code.

The set of config keys comes from spoold/config.py itself: the parser is run on the example
config (plus one destination of each kind) while every key it reads, checks against its
allowed-keys sets, or forbids for a kind is recorded. No key list is written here by hand.
"""

from __future__ import annotations

import ast
import functools
import re
import tomllib
from collections import defaultdict
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path

import pytest

from spoold import config

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CONFIG_DOC = DOCS / "configuration.md"
README = ROOT / "README.md"
EXAMPLE = ROOT / "config.example.toml"
README_LIMIT = 12 * 1024
PAGES = ("configuration.md", "operations.md", "guarantees.md", "benchmarks.md", "design.md")

# Destinations that together reach every branch of the destination parser: each kind, and the
# keys that are read only with another (stream_arn instead of stream, a yds stream by folder).
EXTRA_DESTINATIONS = [
    {"name": "k", "kind": "kinesis", "socket": "k.sock", "stream_arn":
     "arn:aws:kinesis:eu-west-1:123456789012:stream/s", "aggregation": "kpl"},
    {"name": "f", "kind": "firehose", "socket": "f.sock", "stream": "s", "region": "eu-west-1"},
    {"name": "y", "kind": "yds", "socket": "y.sock", "stream": "s", "folder": "f", "database": "d"},
]


def _section(where: str) -> str:
    """A _Table's location ("[spool].", "destination[2].", "") as the docs name the section."""
    if where.startswith("destination["):
        return "[[destination]]"
    return where.rstrip(".") or "top"


@functools.cache
def accepted_keys() -> dict[str, frozenset[str]]:
    """Every key config.py accepts, by section, recorded while it parses a full config."""
    keys: dict[str, set[str]] = defaultdict(set)
    table = config._Table

    def record(mp: pytest.MonkeyPatch, name: str) -> None:
        orig = getattr(table, name)

        def wrapper(self: config._Table, *args: object, **kwargs: object) -> object:
            first = args[0]
            keys[_section(self.where)].update([first] if isinstance(first, str) else first)  # type: ignore[arg-type]
            if name == "allow":
                keys[_section(self.where)].update(args[1:])  # type: ignore[arg-type]
            return orig(self, *args, **kwargs)

        mp.setattr(table, name, wrapper)

    with pytest.MonkeyPatch.context() as mp:
        # _get: every key read; known: the allowed-keys sets checked before reading; forbid: keys
        # of another kind; allow: the top-level sections.
        for name in ("_get", "known", "forbid", "allow"):
            record(mp, name)
        doc = tomllib.loads(EXAMPLE.read_text())  # parse() looks up no group: spoold-writers may be absent
        doc["destination"] = doc["destination"] + EXTRA_DESTINATIONS
        config.parse(doc, EXAMPLE)
    sections = keys.pop("top", set())
    assert sections, "config.parse read no sections: has config._Table changed? Update this test"
    result = {("[[destination]]" if n == "destination" else f"[{n}]"): frozenset() for n in sections}
    result.update({s: frozenset(k) for s, k in keys.items()})
    return result


def _by_section(text: str, section_of: Callable[[str], str | None],
                keys_of: Callable[[str], list[str]]) -> dict[str, set[str]]:
    """Keys by section; section_of(line) names a section that starts, "" ends one, None neither."""
    found: dict[str, set[str]] = defaultdict(set)
    section = ""
    for line in text.splitlines():
        start = section_of(line)
        if start is not None:
            section = start
        elif section:
            found[section].update(keys_of(line))
    return dict(found)


def _beyond(these: Mapping[str, AbstractSet[str]], those: Mapping[str, AbstractSet[str]]) -> dict[str, list[str]]:
    """The keys of `these` that `those` lacks, by section."""
    return {s: sorted(k - those.get(s, set())) for s, k in these.items() if k - those.get(s, set())}


def documented_keys() -> dict[str, set[str]]:
    """The keys in the first column of each table of docs/configuration.md, by `## [section]`."""

    def section_of(line: str) -> str | None:
        heading = re.match(r"^##\s+`?(\[\[?[a-z]+\]\]?)`?", line)
        return heading.group(1) if heading else ("" if line.startswith("## ") else None)

    def keys_of(line: str) -> list[str]:
        return re.findall(r"`([a-z_]+)`", line.split("|")[1]) if line.startswith("|") else []

    return _by_section(CONFIG_DOC.read_text(), section_of, keys_of)


def example_keys() -> dict[str, set[str]]:
    """Keys of config.example.toml by section, including the ones commented out for users to enable."""

    def section_of(line: str) -> str | None:
        head = re.match(r"^\s*(\[\[?[a-z]+\]\]?)", line)
        return head.group(1) if head else None

    def keys_of(line: str) -> list[str]:
        return re.findall(r"^\s*#?\s*([a-z_]+)\s*=", line)

    return _by_section(EXAMPLE.read_text(), section_of, keys_of)


def test_every_config_key_is_documented() -> None:
    accepted = accepted_keys()
    assert {"[spool]", "[[destination]]"} <= set(accepted)
    missing = _beyond(accepted, documented_keys())
    assert not missing, f"config keys missing from the tables of docs/configuration.md: {missing}"


def test_every_documented_key_is_accepted() -> None:
    documented = documented_keys()
    assert documented, "docs/configuration.md has no `## [section]` tables"
    stale = _beyond(documented, accepted_keys())
    assert not stale, f"docs/configuration.md documents keys config.py does not accept: {stale}"


def test_example_keys_are_known() -> None:
    example = example_keys()
    assert example.get("[[destination]]"), "found no destination keys in config.example.toml"
    unknown = _beyond(example, accepted_keys())
    assert not unknown, f"config.example.toml has keys config.py does not know: {unknown}"


def test_readme_is_a_short_manual() -> None:
    text = README.read_text()
    size = len(text.encode())
    assert size <= README_LIMIT, f"README.md is {size} bytes: move reference material into docs/"
    assert text.startswith(
        "# spoold\n\n```sh\npip install -e '.[dev]' && spoold demo\npip install -e '.[dev]' && pytest\n```\n"
    ), "README.md must open with the title and the two set-up commands (.ci/run runs the second)"
    for page in PAGES:
        assert f"docs/{page}" in text, f"README.md does not link docs/{page}"


def _links(path: Path) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", path.read_text()) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{p}" for p in PAGES)])
def test_relative_links_resolve(page: str) -> None:
    path = ROOT / page
    assert path.exists(), f"{page} is missing"
    broken = [t for t in _links(path) if t.split("#")[0] and not (path.parent / t.split("#")[0]).exists()]
    assert not broken, f"{page} links to files that do not exist: {broken}"


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_guarantees_name_real_tests() -> None:
    """Each `tests/FILE.py::NAME` in guarantees.md is a function in that file."""
    refs = re.findall(r"(tests/[\w/]+\.py)::(\w+)", (DOCS / "guarantees.md").read_text())
    assert len(refs) >= 10, "docs/guarantees.md should name the test behind each row"
    missing = [f"{f}::{n}" for f, n in refs if not (ROOT / f).exists() or n not in _test_functions(ROOT / f)]
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"
