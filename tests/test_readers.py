"""Inputs as spreadsheets and editors write them: byte-order marks, CRLF, quoted newlines, renamed
columns, text pairs; through the reader and through the CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from producer.readers import InputError, InputShapeError, open_input, read_records

from conftest import PYTHON, REPO, subprocess_env

QB = [PYTHON, "-m", "queuebert_cli"]
BOM = b"\xef\xbb\xbf"


def _read(data: bytes, fmt: str, path: Path, **kwargs) -> list[dict]:
    """Records of ``data`` written to a file and read back the way the CLI opens it."""
    path.write_bytes(data)
    with open_input(str(path)) as stream:
        return list(read_records(stream, fmt, **kwargs))


def test_csv_crlf_and_quoted_newlines(tmp_path):
    data = b'id,text,stars\r\na1,"first line\r\nsecond line",5\r\na2,"say ""hi""\nthere",1\r\na3,plain,3\r\n'
    rows = _read(data, "csv", tmp_path / "in.csv")
    assert rows == [
        {"id": "a1", "text": "first line\r\nsecond line", "meta": {"stars": "5"}},
        {"id": "a2", "text": 'say "hi"\nthere', "meta": {"stars": "1"}},
        {"id": "a3", "text": "plain", "meta": {"stars": "3"}},
    ]


def test_jsonl_and_txt_crlf(tmp_path):
    data = b'{"id": "j1", "text": "one"}\r\n\r\n{"id": "j2", "text": "two"}\r\n'
    assert _read(data, "jsonl", tmp_path / "in.jsonl") == [{"id": "j1", "text": "one"}, {"id": "j2", "text": "two"}]
    assert _read(b"one\r\ntwo\r\n", "txt", tmp_path / "in.txt") == [{"text": "one"}, {"text": "two"}]


@pytest.mark.parametrize(("fmt", "data", "expected"), [
    ("csv", b"id,text\r\nx1,hello\r\nx2,world\r\n", [{"id": "x1", "text": "hello"}, {"id": "x2", "text": "world"}]),
    ("tsv", b"id\ttext\nx1\thello, world\n", [{"id": "x1", "text": "hello, world"}]),
    ("jsonl", b'{"id": "x1", "text": "hello"}\n', [{"id": "x1", "text": "hello"}]),
    ("txt", b"hello\nworld\n", [{"text": "hello"}, {"text": "world"}]),
])
def test_a_byte_order_mark_is_dropped(tmp_path, fmt, data, expected):
    assert _read(BOM + data, fmt, tmp_path / f"in.{fmt}") == expected


def test_a_byte_order_mark_on_stdin_and_undecodable_bytes(monkeypatch):
    # Not UTF-8 after the mark: kept as surrogates for the worker to reject, never a crash here.
    fake_stdin = io.TextIOWrapper(io.BytesIO(BOM + b"id,text\r\ns1,caf\xe9\r\n"))
    monkeypatch.setattr(sys, "stdin", fake_stdin)
    with open_input("-") as stream:
        assert list(read_records(stream, "csv")) == [{"id": "s1", "text": "caf\udce9"}]


def test_missing_text_column_is_one_error_naming_the_columns():
    data = "id,body\nb1,hello\nb2,world\n"
    for on_error in ("skip", "fail"):
        with pytest.raises(InputShapeError) as exc:
            read_records(io.StringIO(data), "csv", on_error=on_error)  # at the call: before any record
        assert str(exc.value) == "CSV has no column 'text' (columns: id, body); choose one with --text-field"
    assert [r["text"] for r in read_records(io.StringIO(data), "csv", text_field="body")] == ["hello", "world"]


def test_id_column_missing_only_errors_when_asked_for():
    data = "key,text\nk1,hello\n"
    # The default id column absent: ids are generated later, every other column is meta.
    assert list(read_records(io.StringIO(data), "csv")) == [{"text": "hello", "meta": {"key": "k1"}}]
    with pytest.raises(InputShapeError, match=r"no column 'id' \(columns: key, text\); choose one with --id-field"):
        read_records(io.StringIO(data), "csv", id_field="id")
    assert list(read_records(io.StringIO(data), "csv", id_field="key")) == [{"id": "k1", "text": "hello"}]


def test_missing_text_in_jsonl_stays_per_line():
    errors: list[InputError] = []
    data = '{"id": "1", "body": "x"}\n{"id": "2", "text": "y"}\n'
    assert list(read_records(io.StringIO(data), "jsonl", errors=errors)) == [{"id": "2", "text": "y"}]
    assert [e.line for e in errors] == [1]


def test_text_pair_field():
    data = ('{"id": "1", "q": "is it good?", "text": "it is great", "src": "a"}\n'
            '{"id": "2", "text": "no pair"}\n'
            '{"id": "3", "q": 7, "text": "pair not a string"}\n')
    errors: list[InputError] = []
    rows = list(read_records(io.StringIO(data), "jsonl", text_pair_field="q", errors=errors))
    assert rows == [{"id": "1", "text": "it is great", "text_pair": "is it good?", "meta": {"src": "a"}}]
    assert [(e.line, "'q' missing or not a string" in str(e)) for e in errors] == [(2, True), (3, True)]
    with pytest.raises(InputError, match="line 2"):
        list(read_records(io.StringIO(data), "jsonl", text_pair_field="q", on_error="fail"))

    csv_data = "id,premise,hypothesis\r\np1,a cat sat,an animal sat\r\n"
    assert list(read_records(io.StringIO(csv_data, newline=""), "csv", text_field="premise",
                             text_pair_field="hypothesis")) == [
        {"id": "p1", "text": "a cat sat", "text_pair": "an animal sat"}]
    with pytest.raises(InputShapeError, match="no column 'pair'.*choose one with --text-pair-field"):
        read_records(io.StringIO(csv_data), "csv", text_field="premise", text_pair_field="pair")
    with pytest.raises(InputShapeError, match="text pair needs"):
        read_records(io.StringIO("a\n"), "txt", text_pair_field="pair")


def test_empty_csv_is_no_records():
    assert list(read_records(io.StringIO(""), "csv")) == []
    assert list(read_records(io.StringIO(BOM.decode()), "csv")) == []


def test_enqueue_keeps_the_ids_of_a_csv_saved_by_excel(conn, redis_server, tiny_models, tmp_path):
    src = tmp_path / "excel.csv"
    rows = [f'e{i},"review {i}\r\nnice",{i}' for i in range(12)]
    src.write_bytes(BOM + ("id,text,stars\r\n" + "\r\n".join(rows) + "\r\n").encode())
    env = subprocess_env(redis_server.url, QUEUEBERT_MODEL=str(tiny_models["bert"]), QUEUEBERT_DTYPE="float32")
    enq = subprocess.run([*QB, "enqueue", str(src), "--chunk-size", "5", "--log-format", "json"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert enq.returncode == 0, enq.stderr
    run_id = enq.stdout.strip()
    work = subprocess.run([*QB, "worker", "--burst", "--log-format", "json"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert work.returncode == 0, work.stderr[-2000:]
    res = subprocess.run([*QB, "results", run_id, "--follow", "--timeout", "30"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["id"] for r in out] == [f"e{i}" for i in range(12)]
    assert out[3]["meta"] == {"stars": "3"} and "error" not in out[3]


def test_enqueue_missing_column_is_one_line(redis_server, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("id,body\n1,hello\n")
    enq = subprocess.run([*QB, "enqueue", str(src), "--log-format", "json"], capture_output=True, text=True,
                         env=subprocess_env(redis_server.url), cwd=REPO, timeout=60)
    assert enq.returncode == 2
    errors = [json.loads(line) for line in enq.stderr.splitlines() if '"error"' in line]
    assert [e["event"] for e in errors] == [
        "CSV has no column 'text' (columns: id, body); choose one with --text-field"]
    assert "Traceback" not in enq.stderr


def test_csv_field_over_the_csv_modules_default_limit(tmp_path):
    """A text longer than csv's default field limit (131,072 characters) but within the worker's
    max_text_chars was ``_csv.Error: field larger than field limit`` and the end of the whole read."""
    long_text = "word " * 40_000  # 200,000 characters
    data = f"id,text\na,short\nb,{long_text}\nc,last\n".encode()
    for fmt, sep in (("csv", ","), ("tsv", "\t")):
        rows = _read(data.replace(b",", sep.encode()), fmt, tmp_path / f"long.{fmt}")
        assert [(r["id"], len(r["text"])) for r in rows] == [("a", 5), ("b", len(long_text)), ("c", 4)]


def test_csv_error_is_the_lines_input_error(tmp_path, monkeypatch):
    """A row the csv module cannot parse is an InputError with its line number, so --on-error
    applies (skip: reported and the next lines read; fail: the read stops there), not a crash."""
    import csv

    import producer.readers as readers

    monkeypatch.setattr(readers, "MAX_FIELD_CHARS", 100, raising=False)  # absent before the fix
    saved = csv.field_size_limit(100)
    try:
        data = "id,text\na,ok\nb," + "x" * 500 + "\nc,after\n"
        errors: list[InputError] = []
        rows = list(read_records(io.StringIO(data), "csv", errors=errors))
        assert [r["id"] for r in rows] == ["a", "c"]
        assert [e.line for e in errors] == [3] and "field larger than field limit" in str(errors[0])
        with pytest.raises(InputError, match="line 3"):
            list(read_records(io.StringIO(data), "csv", on_error="fail"))
    finally:
        csv.field_size_limit(saved)


def test_json_error_names_the_column():
    """json's message alone stopped mid-sentence: "not valid JSON: Invalid control character at"."""
    errors: list[InputError] = []
    assert list(read_records(io.StringIO('{"text": "a\tb"}\n{"text": "x"} y\n'), "jsonl", errors=errors)) == []
    assert [str(e) for e in errors] == ["line 1: not valid JSON: Invalid control character at column 12",
                                        "line 2: not valid JSON: Extra data at column 15"]
