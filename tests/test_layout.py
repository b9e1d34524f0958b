"""Imports run one way: worker -> queuebert (the shared contract) <- producer. Only the command line
(``queuebert.cli`` and ``queuebert.run_command``) imports both sides, since the ``queuebert`` command
starts either."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> top-level packages of this repository it must not import
FORBIDDEN = {"queuebert": {"producer", "worker", "modelbuild"}, "producer": {"worker", "modelbuild"},
             "worker": {"producer"}, "modelbuild": {"producer", "worker"}}
EXEMPT = {"queuebert/cli.py", "queuebert/run_command.py"}


def imported_packages(path: Path) -> set[str]:
    tops: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            tops |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package: str) -> None:
    offenders = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        bad = imported_packages(path) & FORBIDDEN[package]
        if bad and rel not in EXEMPT:
            offenders[rel] = sorted(bad)
    assert not offenders, f"imports against the layout: {offenders}"


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from producer.client import Client\n    import worker.engine\n")
    assert imported_packages(bad) == {"producer", "worker"}
