"""Imports run one way: worker -> queuebert (the shared contract) <- producer, and the command line
(``queuebert_cli``, the application that starts either side) on top of all of them: nothing
imports it, and it is the only package that imports both sides."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> top-level packages of this repository it must not import
FORBIDDEN = {"queuebert": {"producer", "worker", "modelbuild", "queuebert_cli"},
             "producer": {"worker", "modelbuild", "queuebert_cli"},
             "worker": {"producer", "queuebert_cli"}, "modelbuild": {"producer", "worker", "queuebert_cli"},
             "queuebert_cli": set()}
#: Third-party packages the contract must not need: a producer's light install stays light.
CONTRACT_MUST_NOT_IMPORT = {"tqdm", "torch", "transformers", "starlette", "uvicorn"}


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
        if bad:
            offenders[rel] = sorted(bad)
    assert not offenders, f"imports against the layout: {offenders}"


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from producer.client import Client\n    import worker.engine\n")
    assert imported_packages(bad) == {"producer", "worker"}


def test_the_contract_needs_no_application_library() -> None:
    """tqdm (the command line's progress bars) and the heavy sides' libraries stay out of ``queuebert``."""
    offenders = {path.relative_to(ROOT).as_posix(): sorted(imported_packages(path) & CONTRACT_MUST_NOT_IMPORT)
                 for path in sorted((ROOT / "queuebert").rglob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}
