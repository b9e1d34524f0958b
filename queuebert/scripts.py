"""Loading queuebert's Lua scripts from their ``.lua`` files.

Every script lives in a ``lua/`` folder of its package (installed as package data) and documents
its KEYS and ARGV at the top. Two things are added at load time, so that no value is written in
two places:

- ``--#include <package>/<file>.lua`` lines are replaced by that file: the run record
  (``queuebert/lua/run_record.lua``) is one file, included by every script that completes a job;
- constants are prepended as ``local NAME = ...``: numbers, strings, tuples (a Lua list), sets of
  strings (a table of ``true``) and argument layouts (:class:`ArgLayout`: a table of named ARGV
  offsets, generated from the same names the Python side builds its arguments from).

A name a script uses but nobody defines, or an argument the Python side sends but the script never
reads, fails here, when the script is loaded, rather than as a ``nil`` inside Redis on the first
call or an argument silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

_INCLUDE = re.compile(r"^--#include ([A-Za-z_][\w]*)/([\w.]+\.lua)\s*$", re.MULTILINE)
_STRINGS = re.compile(r"'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"")
_COMMENT = re.compile(r"--.*$", re.MULTILINE)
_CONSTANT_USE = re.compile(r"\b([A-Z][A-Z0-9_]+)\b")
_FIELD_USE = re.compile(r"\b([A-Z][A-Z0-9_]*)\.([a-z_][a-z0-9_]*)\b")
_LOCALS = re.compile(r"\blocal\s+([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)")
_BUILTIN = {"KEYS", "ARGV"}


@dataclass(frozen=True)
class ArgLayout:
    """Named positions of a script's arguments: ``NAME.field`` in Lua is ``first + index``.

    ``first`` is 1 for fixed arguments (``ARGV[ARG.worker]``) and 0 for a group repeated per job
    (``ARGV[i + JOB.id]``, with ``i`` stepping by ``len(fields)``).
    """

    fields: tuple[str, ...]
    first: int = 1

    def __post_init__(self) -> None:
        for name in self.fields:
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
                raise ValueError(f"not a Lua field name: {name!r}")

    def lua(self) -> str:
        entries = ", ".join(f"{name} = {self.first + n}" for n, name in enumerate(self.fields))
        return "{" + entries + "}"


Constant = int | str | ArgLayout | frozenset[Any] | set[Any] | tuple[Any, ...] | list[Any]


def _literal(value: Constant) -> str:
    if isinstance(value, ArgLayout):
        return value.lua()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(f"[{_literal(v)}] = true" for v in sorted(value)) + "}"
    if isinstance(value, (tuple, list)):
        return "{" + ", ".join(_literal(v) for v in value) + "}"
    raise TypeError(f"no Lua literal for {type(value).__name__}")


def read(package: str, name: str) -> str:
    """The text of ``<package>/lua/<name>``, as installed."""
    return resources.files(package).joinpath("lua", name).read_text(encoding="utf-8")


def _expand(source: str, seen: set[tuple[str, str]]) -> str:
    def include(match: re.Match[str]) -> str:
        where = (match.group(1), match.group(2))
        if where in seen:
            return f"-- ({where[0]}/{where[1]} is already included above)"
        seen.add(where)
        return _expand(read(*where), seen)

    return _INCLUDE.sub(include, source)


def load(package: str, name: str, constants: Mapping[str, Constant] | None = None) -> str:
    """The script ``<package>/lua/<name>`` with its includes expanded and ``constants`` prepended.

    Raises ValueError when the script uses an upper-case name that is neither a constant given here
    nor defined by the script, uses a ``NAME.field`` that its :class:`ArgLayout` lacks, or never
    reads a field of one.
    """
    constants = dict(constants or {})
    body = _expand(read(package, name), {(package, name)})
    code = _STRINGS.sub("''", _COMMENT.sub("", body))  # (no script has '--' inside a string)
    defined = set(constants) | _BUILTIN
    for names in _LOCALS.findall(code):
        defined.update(n.strip() for n in names.split(","))
    missing = sorted(set(_CONSTANT_USE.findall(code)) - defined)
    if missing:
        raise ValueError(f"{package}/lua/{name} uses undefined names: {', '.join(missing)}")
    used = set(_FIELD_USE.findall(code))
    for table, field in sorted(used):
        layout = constants.get(table)
        if isinstance(layout, ArgLayout) and field not in layout.fields:
            raise ValueError(f"{package}/lua/{name} uses {table}.{field}, which its argument layout lacks")
    for table, layout in constants.items():
        unread = [f for f in layout.fields if (table, f) not in used] if isinstance(layout, ArgLayout) else []
        if unread:
            raise ValueError(f"{package}/lua/{name} never reads {', '.join(f'{table}.{f}' for f in unread)}")
    prologue = "".join(f"local {key} = {_literal(value)}\n" for key, value in constants.items())
    return prologue + body
