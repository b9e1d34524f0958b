"""Reading inputs: JSONL, CSV or plain text lines, from a file or stdin, one record at a time.

A line that cannot be read is reported with its line number and skipped, or stops the read,
depending on ``on_error``; everything else streams through lazily so any size of input works.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from typing import IO, Any

import structlog

log = structlog.get_logger(__name__)

FORMATS = ("jsonl", "csv", "txt")


class InputError(ValueError):
    """A record that cannot be read; carries its line number."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line


def guess_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    return "txt"


def open_input(path: str) -> IO[str]:
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


def _record(obj: dict[str, Any], line: int, text_field: str, id_field: str,
            text_pair_field: str | None = None) -> dict[str, Any]:
    text = obj.get(text_field)
    if not isinstance(text, str):
        raise InputError(line, f"field {text_field!r} missing or not a string")
    item: dict[str, Any] = {"text": text}
    if text_pair_field is not None:
        pair = obj.get(text_pair_field)
        if not isinstance(pair, str):
            raise InputError(line, f"field {text_pair_field!r} missing or not a string")
        item["text_pair"] = pair
    if obj.get(id_field) not in (None, ""):
        item["id"] = str(obj[id_field])
    extra = {k: v for k, v in obj.items() if k not in (text_field, id_field, text_pair_field)}
    if extra:
        item["meta"] = extra
    return item


def read_records(
    stream: IO[str], fmt: str, *, text_field: str = "text", id_field: str = "id", text_pair_field: str | None = None,
    on_error: str = "skip", errors: list[InputError] | None = None,
) -> Iterator[dict[str, Any]]:
    """Items ``{"text", "text_pair"?, "id"?, "meta"?}``; items without an id get one from the producer."""

    def rows() -> Iterator[tuple[int, Any]]:
        if fmt == "csv":
            reader = csv.DictReader(stream)
            for row in reader:
                yield reader.line_num, row
        else:
            for n, line in enumerate(stream, 1):
                if line.strip() == "":
                    continue
                yield n, line

    for line_no, raw in rows():
        try:
            if fmt == "jsonl":
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise InputError(line_no, f"not valid JSON: {exc.msg}") from None
                if isinstance(obj, str):
                    obj = {text_field: obj}
                if not isinstance(obj, dict):
                    raise InputError(line_no, "a JSON line must be an object or a string")
                yield _record(obj, line_no, text_field, id_field, text_pair_field)
            elif fmt == "csv":
                yield _record(raw, line_no, text_field, id_field, text_pair_field)
            else:
                yield {"text": raw.rstrip("\r\n")}
        except InputError as exc:
            if on_error == "fail":
                raise
            log.warning("skipped unreadable input", line=exc.line, error=str(exc))
            if errors is not None:
                errors.append(exc)


def read_objects(stream: IO[str], *, on_error: str = "skip", errors: list[InputError] | None = None,
                 ) -> Iterator[dict[str, Any]]:
    """JSON objects, one per line, as they are (``queuebert rerank``'s queries)."""
    for n, line in enumerate(stream, 1):
        if line.strip() == "":
            continue
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(n, f"not valid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise InputError(n, "a JSON line must be an object")
            yield obj
        except InputError as exc:
            if on_error == "fail":
                raise
            log.warning("skipped unreadable input", line=exc.line, error=str(exc))
            if errors is not None:
                errors.append(exc)
