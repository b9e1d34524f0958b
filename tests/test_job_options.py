"""A job option lives in one place, :class:`queuebert.schema.JobOptions`: checked there, written
and read back by it, taken by the clients and the command line from its fields, and applied per
row by the engine, so jobs with different options still share a forward batch."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import fields
from typing import Any

import numpy as np
import pytest
from rq import Queue
from rq.job import Job

from producer import AsyncClient, Client
from queuebert.schema import OPTION_NAMES, JobError, JobOptionFields, JobOptions, job_kwargs, parse_job
from queuebert.serializer import JSONSerializer
from queuebert.settings import ClientSettings
from queuebert_cli.main import main as cli_main
from worker.engine import apply_scoring
from worker.job_rows import Raw

from conftest import PYTHON, REPO, subprocess_env


def test_defaults_write_nothing_and_read_back_as_defaults() -> None:
    assert JobOptions().to_kwargs() == {}
    assert job_kwargs([{"id": "a", "text": "x"}], None) == {"items": [{"id": "a", "text": "x"}]}
    # "default" is the model's rule, the same job as no option: equal, so coalesced submits share a job.
    assert JobOptions(function_to_apply="default") == JobOptions()
    assert hash(JobOptions(function_to_apply="default")) == hash(JobOptions())


@pytest.mark.parametrize("options", [JobOptions(top_k=2), JobOptions(function_to_apply="none"),
                                     JobOptions(top_k=1, function_to_apply="sigmoid")])
def test_options_travel_as_rq_kwargs_and_parse_back_equal(options: JobOptions) -> None:
    kwargs = job_kwargs([{"id": "a", "text": "x"}], "run-1", 12.5, options)
    assert set(kwargs) == {"items", "run", "deadline", *options.to_kwargs()}
    request = parse_job((), kwargs, max_items=10)
    assert (request.run, request.deadline, request.options) == ("run-1", 12.5, options)


@pytest.mark.parametrize(("fields_", "name"), [({"top_k": 0}, "top_k"), ({"top_k": True}, "top_k"),
                                               ({"top_k": "2"}, "top_k"), ({"function_to_apply": "relu"},
                                                                          "function_to_apply")])
def test_a_bad_option_is_refused_by_name(fields_: dict[str, Any], name: str) -> None:
    with pytest.raises(JobError) as caught:
        JobOptions(**fields_)
    assert str(caught.value).startswith(name + " ")  # what the gateway and the CLI prefix with their own path
    with pytest.raises(JobError, match=name):  # as a worker reads it from a job someone else wrote
        parse_job((), {"items": [{"id": "a", "text": "x"}], **fields_}, max_items=10)


def test_the_clients_keyword_arguments_are_the_options_fields() -> None:
    assert list(JobOptionFields.__annotations__) == [f.name for f in fields(JobOptions)] == list(OPTION_NAMES)
    options = JobOptions(top_k=3, function_to_apply="sigmoid")
    assert JobOptions(**options.as_fields()) == options


def test_clients_refuse_a_bad_option_before_writing(conn, redis_server) -> None:
    client = Client.from_url(redis_server.url)
    with pytest.raises(JobError, match="top_k"):
        client.submit("a text", top_k=0)
    with pytest.raises(JobError, match="function_to_apply"):
        client.enqueue_stream(["a", "b"], function_to_apply="relu")
    with pytest.raises(TypeError):
        client.submit("a text", top_n=3)  # type: ignore[call-arg]  # not an option: Python's own error

    async def through_async() -> None:
        async with AsyncClient.from_url(redis_server.url) as ac:
            with pytest.raises(JobError, match="top_k"):
                await ac.submit("a text", top_k=-1)
            with pytest.raises(JobError, match="function_to_apply"):
                await ac.submit_many(["a"], function_to_apply="tanh")

    asyncio.run(through_async())
    assert conn.dbsize() == 0


def test_the_command_line_takes_each_option_as_a_flag(conn, redis_server, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["enqueue", "--top-k", "0", str(tmp_path / "none.txt")])
    assert exited.value.code == 2 and "--top-k must be a positive integer" in capsys.readouterr().err
    src = tmp_path / "in.txt"
    src.write_text("first text\nsecond text\n")
    enq = subprocess.run([PYTHON, "-m", "queuebert_cli", "enqueue", str(src), "--top-k", "1",
                          "--function-to-apply", "sigmoid", "--log-format", "json"],
                         capture_output=True, text=True, env=subprocess_env(redis_server.url), cwd=REPO, timeout=60)
    assert enq.returncode == 0, enq.stderr
    (job_id,) = Queue(ClientSettings().queue, connection=conn).job_ids  # both lines, one job
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    assert parse_job(job.args, job.kwargs, 10).options == JobOptions(top_k=1, function_to_apply="sigmoid")


def test_rows_of_jobs_with_different_options_share_a_forward(engines) -> None:
    """One batch: each row scored by its own job's options, a zero-shot pair as raw logits."""
    engine = engines["bert"]
    items = [{"id": str(i), "text": f"the same batch, row {i}"} for i in range(4)]
    options = [JobOptions(), JobOptions(top_k=1), JobOptions(function_to_apply="none"), Raw.LOGITS]
    enc, errors = engine.encode(items, options)
    assert not errors
    before = engine.forward_calls
    results = engine.run_batch(items, options, enc.ids)
    assert engine.forward_calls == before + 1
    logits = engine.forward(enc.ids)
    labels = engine.m.labels
    probs = apply_scoring(logits, engine.m.function)
    assert results[0]["scores"] == pytest.approx(dict(zip(labels, probs[0].tolist())), abs=1e-5)
    best = int(np.argmax(probs[1]))
    assert results[1]["scores"] == pytest.approx({labels[best]: float(probs[1][best])}, abs=1e-5)
    assert results[2]["scores"] == pytest.approx(dict(zip(labels, logits[2].tolist())), abs=1e-4)
    assert results[3] == {"id": "3", "logits": pytest.approx(logits[3].tolist(), abs=1e-4)}
