"""The progress bar the commands share: quiet off a terminal, exact at the end, totals from a cheap count."""

from __future__ import annotations

import io
import threading

from queuebert_cli.progress import Progress, count_lines, estimate_records


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_when_the_stream_is_not_a_terminal():
    stream = io.StringIO()
    with Progress("classified", "texts", total=10, file=stream) as bar:
        bar.update(4)
        bar.set_total(4)
    assert stream.getvalue() == ""
    assert (bar.n, bar.total) == (4, 4)  # still counted: callers may read it


def test_forced_off_on_a_terminal():
    stream = FakeTerminal()
    with Progress(total=3, file=stream, enabled=False) as bar:
        bar.update(3)
    assert stream.getvalue() == ""


def test_on_a_terminal_the_last_line_is_the_exact_count_and_total():
    for stream, enabled in ((FakeTerminal(), None), (io.StringIO(), True)):
        # An estimate first (a line count with a header and a blank line), the exact total later,
        # updates from several threads like the producer and the result reader.
        with Progress("classified", "queries", total=1002, file=stream, enabled=enabled) as bar:
            threads = [threading.Thread(target=lambda: [bar.update() for _ in range(250)]) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            bar.set_total(1000)
        last = stream.getvalue().rstrip("\n").split("\r")[-1]
        assert last.startswith("classified: 100%") and "1000/1000" in last and "queries/s" in last, last


def test_count_lines(tmp_path):
    crlf = tmp_path / "a.csv"
    crlf.write_bytes(b"id,text\r\n1,a\r\n2,b")  # no newline after the last line
    assert count_lines(str(crlf)) == 3
    assert estimate_records(str(crlf), "csv") == 2
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 700_000 + b"\n" + b"y\n" * 600_000)  # spans chunk boundaries
    assert count_lines(str(big)) == estimate_records(str(big), "txt") == 600_001
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert count_lines(str(empty)) == 0 and estimate_records(str(empty), "csv") == 0
    assert count_lines("-") is None and count_lines(str(tmp_path)) is None
