"""Reading inputs: JSONL, CSV, TSV or plain text lines, from a file or stdin, one record at a time.

A line that cannot be read is reported with its line number and skipped, or stops the read,
depending on ``on_error``; everything else streams through lazily so any size of input works.
Input is read the way spreadsheets and editors write it: a UTF-8 byte-order mark at the start (Excel's
"CSV UTF-8") is dropped, CRLF line ends are accepted, and CSV fields may hold quoted newlines.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

import structlog

log = structlog.get_logger(__name__)

FORMATS = ("jsonl", "csv", "tsv", "txt")
#: The formats whose records have named fields (``text_field`` and friends choose among them).
TABULAR = {"csv": ",", "tsv": "\t"}
#: The id field used when the caller names none: taken when present, generated when absent.
DEFAULT_ID_FIELD = "id"

BOM = "\ufeff"

#: Longest CSV/TSV field read, in characters. The csv module's default (131,072) made a longer text
#: a crash of the whole read (``_csv.Error: field larger than field limit``) where the worker would
#: have classified it, or refused it with its own ``text_too_long`` past ``max_text_chars``
#: (200,000 by default): this leaves that decision to the worker for any text a setting allows.
#: A field beyond even this is the line's error, like any unreadable line.
MAX_FIELD_CHARS = 64 * 1024 * 1024


class InputError(ValueError):
    """A record that cannot be read; carries its line number."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line


class InputShapeError(InputError):
    """The input as a whole does not fit the options (a CSV without the text column, say).

    Raised once, before any record is read, whatever ``on_error`` says: skipping would skip every line.
    """

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.line = 1


def guess_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith(".tsv"):
        return "tsv"
    return "txt"


def open_input(path: str) -> IO[str]:
    """A text stream over ``path`` or stdin (``-``) that keeps line ends as written (``newline=""``),
    which the csv module needs for quoted newlines; bytes that are not UTF-8 survive as surrogates."""
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape", newline="")
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


def _without_bom(lines: Iterable[str]) -> Iterator[str]:
    """The lines of ``lines`` with a byte-order mark removed from the first.

    Done here rather than by opening with ``utf-8-sig`` so that any text stream works, stdin and
    streams a caller opened included.
    """
    it = iter(lines)
    first = next(it, None)
    if first is None:
        return
    if first.startswith(BOM):
        first = first[1:]
    if first:  # a file holding nothing but the mark is empty, not a blank header
        yield first
    yield from it


def _record(obj: dict[str, Any], line: int, text_field: str, id_field: str,
            text_pair_field: str | None) -> dict[str, Any]:
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


def _check_columns(fmt: str, columns: Sequence[str] | None, wanted: list[tuple[str, str]]) -> None:
    """One clear error for a column the options name and the header lacks."""
    if columns is None:  # an empty input: no header, no records
        return
    for name, flag in wanted:
        if name not in columns:
            found = ", ".join(columns) or "none"
            raise InputShapeError(f"{fmt.upper()} has no column {name!r} (columns: {found}); choose one with {flag}")


def read_records(
    stream: IO[str], fmt: str, *, text_field: str = "text", id_field: str | None = None,
    text_pair_field: str | None = None, on_error: str = "skip", errors: list[InputError] | None = None,
) -> Iterator[dict[str, Any]]:
    """Items ``{"text", "text_pair"?, "id"?, "meta"?}``; items without an id get one from the producer.

    ``id_field=None`` takes ids from the ``id`` field where there is one. A CSV/TSV header is read
    and checked here, before the first record is asked for: a column named by ``text_field``,
    ``text_pair_field`` or an explicit ``id_field`` that the header lacks is an
    :class:`InputShapeError`. JSONL has no header, so there a missing text is the line's error and a
    missing id a generated one. Fields other than these go to ``meta``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r} (one of {', '.join(FORMATS)})")
    if text_pair_field is not None and fmt == "txt":
        raise InputShapeError("plain text lines have no fields: a text pair needs jsonl, csv or tsv input")
    lines = _without_bom(stream)
    rows: Iterator[tuple[int, Any]]
    if fmt in TABULAR:
        reader = csv.DictReader(lines, delimiter=TABULAR[fmt])
        wanted = [(text_field, "--text-field")]
        if text_pair_field is not None:
            wanted.append((text_pair_field, "--text-pair-field"))
        if id_field is not None:
            wanted.append((id_field, "--id-field"))
        _raise_field_limit()
        try:
            header = reader.fieldnames  # read now
        except csv.Error as exc:  # nothing can be read without it, whatever on_error says
            raise InputShapeError(f"line 1: the {fmt.upper()} header cannot be read: {exc}") from None
        _check_columns(fmt, header, wanted)
        rows = _csv_rows(reader, fmt)
    else:
        rows = ((n, line) for n, line in enumerate(lines, 1) if line.strip() != "")
    return _records(rows, fmt, text_field, id_field or DEFAULT_ID_FIELD, text_pair_field, on_error, errors)


def _raise_field_limit() -> None:
    """Lift the csv module's field limit to :data:`MAX_FIELD_CHARS`. The limit is process-wide, so
    it is only ever raised (never lowered, never put back): lowering it under another thread's
    read would fail that read, and a larger limit only lets fields through that were refused."""
    if csv.field_size_limit() < MAX_FIELD_CHARS:
        csv.field_size_limit(MAX_FIELD_CHARS)


def _csv_rows(reader: csv.DictReader[str], fmt: str) -> Iterator[tuple[int, Any]]:
    """``(line number, row)`` pairs of ``reader``; a row the csv module cannot parse (a field over
    the limit, a NUL byte) becomes that line's :class:`InputError` (the line its record starts on),
    so ``on_error`` decides, as for any unreadable line; the read goes on from the next line."""
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield line, InputError(line, f"not valid {fmt.upper()}: {exc}")
            continue
        yield reader.line_num, row


def _records(
    rows: Iterator[tuple[int, Any]], fmt: str, text_field: str, id_field: str, text_pair_field: str | None,
    on_error: str, errors: list[InputError] | None,
) -> Iterator[dict[str, Any]]:
    for line_no, raw in rows:
        try:
            if isinstance(raw, InputError):  # a row the csv module could not parse
                raise raw
            if fmt == "jsonl":
                yield record_from_json_line(raw, line_no, text_field=text_field, id_field=id_field,
                                            text_pair_field=text_pair_field)
            elif fmt in TABULAR:
                yield _record(raw, line_no, text_field, id_field, text_pair_field)
            else:
                yield {"text": raw.rstrip("\r\n")}
        except InputError as exc:
            _unreadable(exc, on_error, errors)


def record_from_json_line(
    raw: str | bytes, line_no: int, *, text_field: str = "text", id_field: str = DEFAULT_ID_FIELD,
    text_pair_field: str | None = None,
) -> dict[str, Any]:
    """One JSONL line as :func:`read_records` reads it (a bare string is the text; fields other
    than text, id and pair go to ``meta``); raises :class:`InputError`. The gateway's ``POST /runs``
    reads its body's lines with it, so both ways in read a line alike."""
    obj = _json_line(raw, line_no)
    if isinstance(obj, str):
        obj = {text_field: obj}
    if not isinstance(obj, dict):
        raise InputError(line_no, "a JSON line must be an object or a string")
    return _record(obj, line_no, text_field, id_field, text_pair_field)


def _json_line(raw: str | bytes, line_no: int) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        # json's message names the position ("... at line 1 column 12 (char 11)"); exc.msg alone
        # stopped mid-sentence ("Invalid control character at"). The column is the one to show:
        # the line number is the file's, which the InputError gives.
        if exc.lineno > 1:  # past the line's own end (its line end), e.g. a line cut short
            where = "the end of the line" if exc.msg.endswith(" at") else "at the end of the line"
        else:
            where = f"column {exc.colno}" if exc.msg.endswith(" at") else f"at column {exc.colno}"
        raise InputError(line_no, f"not valid JSON: {exc.msg} {where}") from None
    except UnicodeDecodeError:  # bytes (the gateway's lines) that are not UTF-8
        raise InputError(line_no, "not valid JSON: not UTF-8") from None
    except RecursionError:  # json's C scanner recurses once per nesting level
        raise InputError(line_no, "not valid JSON: nested too deeply") from None


class LineSplitter:
    """The lines of a byte stream that arrives in chunks (an HTTP body), numbered from 1.

    Linear in the bytes fed: each chunk is searched once for line ends and a line's pieces are
    appended to one buffer, so a line cut into many chunks is never re-joined or re-searched (the
    gateway's first splitter re-split the whole pending line on every chunk: quadratic in a line's
    length). A line longer than ``max_line_bytes`` is reported once as an :class:`InputError` and
    the rest of it is dropped as it arrives, so memory stays bounded by the limit."""

    def __init__(self, max_line_bytes: int):
        self.max_line_bytes = max_line_bytes
        self._line = bytearray()
        self._dropping = False  # the current line is over the limit (already reported)
        self._number = 0  # lines ended so far

    def feed(self, chunk: bytes) -> list[tuple[int, bytes | InputError]]:
        """The lines that ``chunk`` ends (without their ``\n``), or their errors."""
        out: list[tuple[int, bytes | InputError]] = []
        view = memoryview(chunk)
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._take(view[start:end], out)
            self._number += 1
            if not self._dropping:
                out.append((self._number, bytes(self._line)))
            self._line.clear()
            self._dropping = False
            start = end + 1
        self._take(view[start:], out)
        return out

    def end(self) -> list[tuple[int, bytes | InputError]]:
        """The last line, when the stream does not end with a line end."""
        last: list[tuple[int, bytes | InputError]] = (
            [(self._number + 1, bytes(self._line))] if self._line and not self._dropping else [])
        self._line.clear()
        return last

    def _take(self, piece: memoryview, out: list[tuple[int, bytes | InputError]]) -> None:
        if self._dropping or not piece:
            return
        self._line += piece
        if len(self._line) > self.max_line_bytes:
            out.append((self._number + 1, InputError(self._number + 1,
                                                     f"longer than {self.max_line_bytes} bytes: skipped")))
            self._line.clear()
            self._dropping = True


def _unreadable(exc: InputError, on_error: str, errors: list[InputError] | None) -> None:
    """A line that cannot be read stops the read (``on_error="fail"``) or is reported and skipped."""
    if on_error == "fail":
        raise exc
    log.warning("skipped unreadable input", line=exc.line, error=str(exc))
    if errors is not None:
        errors.append(exc)


def read_objects(stream: IO[str], *, on_error: str = "skip", errors: list[InputError] | None = None,
                 ) -> Iterator[dict[str, Any]]:
    """JSON objects, one per line, as they are (``queuebert rerank``'s queries)."""
    for n, line in enumerate(_without_bom(stream), 1):
        if line.strip() == "":
            continue
        try:
            obj = _json_line(line, n)
            if not isinstance(obj, dict):
                raise InputError(n, "a JSON line must be an object")
            yield obj
        except InputError as exc:
            _unreadable(exc, on_error, errors)
