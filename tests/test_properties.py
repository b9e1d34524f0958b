"""Property-based: whatever a job's items look like, the worker answers each one and survives."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.schema import check_item, parse_job, JobError
from worker.tasks import split_items

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
texts = st.text(max_size=300) | st.sampled_from(["", " ", "\x00", "\ud800", "🙂" * 50, "a" * 1000])
items = st.one_of(
    st.fixed_dictionaries({"id": st.text(max_size=10), "text": texts}, optional={"meta": json_values}),
    st.dictionaries(st.sampled_from(["id", "text", "meta", "other"]), json_values | texts, max_size=4),
    json_values,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(items, min_size=1, max_size=12))
def test_every_item_gets_exactly_one_answer(engines, raw_items):
    """Through the real validation and the real engine: one result or error per item, in order."""
    engine = engines["bert"]
    # What a job payload looks like after the JSON round trip through Redis.
    raw_items = json.loads(json.dumps(raw_items))
    request = parse_job((), {"items": raw_items}, max_items=100)
    valid, positions, results = split_items(request, max_chars=500)
    for pos, result in zip(positions, engine.classify(valid)):
        results[pos] = result
    assert len(results) == len(raw_items) and all(r is not None for r in results)
    for raw, result in zip(raw_items, results):
        item, error = check_item(raw, 500)
        if error is not None:
            assert result["error"]["type"] == error["error"]["type"]
        else:
            assert result["id"] == raw["id"]
            assert ("label" in result and abs(sum(result["scores"].values()) - 1) < 1e-4) or "error" in result
    json.dumps(results)  # results are always JSON-serializable


@given(json_values)
def test_any_job_payload_is_accepted_or_refused_with_a_job_error(payload):
    try:
        parse_job((), payload, max_items=10)
    except JobError as exc:
        assert str(exc)
