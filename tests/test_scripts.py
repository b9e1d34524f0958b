"""The Lua loader: includes, constants, named arguments, and the mistakes it refuses at load time."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from queuebert import scripts
from queuebert.scripts import ArgLayout


@pytest.fixture()
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """An importable package of its own (name, ``lua/`` folder), as producer and worker have."""
    name = "qbluatest_" + re.sub(r"\W", "_", tmp_path.name)
    root = tmp_path / name
    (root / "lua").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, root / "lua"


def test_includes_constants_and_layouts(package: tuple[str, Path]):
    pkg, lua = package
    (lua / "shared.lua").write_text("local function twice(x) return 2 * x end\n")
    (lua / "main.lua").write_text(
        "-- KEYS[1] a key; ARGV[ARG.count] how many\n"
        f"--#include {pkg}/shared.lua\n"
        f"--#include {pkg}/shared.lua\n"
        "return {twice(tonumber(ARGV[ARG.count])), PREFIX, LIMIT, NAMES[1], SEEN['x'] and 1 or 0}\n")
    text = scripts.load(pkg, "main.lua", {"ARG": ArgLayout(("count",)), "PREFIX": 'rq:"job":', "LIMIT": 7,
                                                  "NAMES": ("a", "b"), "SEEN": frozenset({"x"})})
    assert text.count("local function twice") == 1  # included once
    assert 'local PREFIX = "rq:\\"job\\":"' in text and "local LIMIT = 7" in text
    assert 'local NAMES = {"a", "b"}' in text and 'local SEEN = {["x"] = true}' in text
    assert "local ARG = {count = 1}" in text
    assert ArgLayout(("id", "queue"), first=0).lua() == "{id = 0, queue = 1}"


def test_an_undefined_name_fails_at_load(package: tuple[str, Path]):
    pkg, lua = package
    (lua / "s.lua").write_text("-- uses a constant nobody passes\nreturn PREFIX .. ARGV[1]\n")
    with pytest.raises(ValueError, match="undefined names: PREFIX"):
        scripts.load(pkg, "s.lua")


def test_an_argument_the_layout_lacks_fails_at_load(package: tuple[str, Path]):
    pkg, lua = package
    (lua / "s.lua").write_text("return {ARGV[ARG.count], ARGV[ARG.cuont]}\n")
    with pytest.raises(ValueError, match="ARG.cuont, which its argument layout lacks"):
        scripts.load(pkg, "s.lua", {"ARG": ArgLayout(("count",))})


def test_an_argument_the_script_never_reads_fails_at_load(package: tuple[str, Path]):
    pkg, lua = package
    (lua / "s.lua").write_text("return ARGV[ARG.count]\n")
    with pytest.raises(ValueError, match="never reads ARG.extra"):
        scripts.load(pkg, "s.lua", {"ARG": ArgLayout(("count", "extra"))})


def test_layout_fields_are_lua_names():
    with pytest.raises(ValueError, match="not a Lua field name"):
        ArgLayout(("job-id",))
