"""Property-based: whatever a job's items look like, the worker answers each one and survives."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queuebert.schema import JobError, check_item, parse_job
from worker.job_rows import finish, split_items

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
texts = st.text(max_size=300) | st.sampled_from(["", " ", "\x00", "\ud800", "🙂" * 50, "a" * 1000])
labels = st.lists(st.text(max_size=6), max_size=4) | json_values
items = st.one_of(
    st.fixed_dictionaries({"id": st.text(max_size=10), "text": texts},
                          optional={"meta": json_values, "text_pair": texts | json_values}),
    st.fixed_dictionaries({"id": st.text(max_size=10), "text": texts, "candidate_labels": labels},
                          optional={"hypothesis_template": st.sampled_from(["{}", "is {}.", "none", "{0}{1}", "{x}"])
                                    | json_values, "multi_label": st.booleans() | json_values}),
    st.dictionaries(st.sampled_from(["id", "text", "meta", "other", "text_pair", "candidate_labels", "multi_label"]),
                    json_values | texts, max_size=4),
    json_values,
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(items, min_size=1, max_size=12))
def test_every_item_gets_exactly_one_answer(engines, raw_items):
    """Through the real validation and the real engine: one result or error per item, in order."""
    engine = engines["bert"]
    # What a job payload looks like after the JSON round trip through Redis.
    raw_items = json.loads(json.dumps(raw_items))
    request = parse_job((), {"items": raw_items}, max_items=100)
    rows = split_items(request, 500, engine.m.model.config.label2id)
    for pos, result in zip(rows.positions, engine.classify(rows.rows, rows.options)):
        rows.results[pos] = result
    results = finish(rows.results, rows.groups, len(raw_items))
    assert len(results) == len(raw_items) and all(r is not None for r in results)
    for raw, result in zip(raw_items, results):
        item, error = check_item(raw, 500)
        if error is not None:
            assert result["error"]["type"] == error["error"]["type"]
        else:
            assert result["id"] == raw["id"]
            if "error" in result:
                continue
            if "candidate_labels" in raw:  # a zero-shot answer: every label, once
                assert sorted(result["labels"]) == sorted(raw["candidate_labels"])
            else:
                assert "label" in result and abs(sum(result["scores"].values()) - 1) < 1e-4
    json.dumps(results)  # results are always JSON-serializable


MAX_ITEMS = 10
JOB_FIELDS = ("items", "run", "deadline", "top_k", "function_to_apply")
#: Per job field: a fitting value and a wrong one (wrong type, out of range, or anything at all).
FIELD_VALUES = {
    "items": (st.lists(json_values, min_size=1, max_size=MAX_ITEMS),
              st.just([]) | st.lists(json_values, min_size=MAX_ITEMS + 1, max_size=MAX_ITEMS + 2) | json_values),
    "run": (st.text(max_size=8), json_values),
    "deadline": (st.floats(allow_nan=False) | st.integers(), st.booleans() | st.text(max_size=5) | json_values),
    "top_k": (st.integers(min_value=1, max_value=5), st.integers(max_value=0) | st.booleans() | json_values),
    "function_to_apply": (st.sampled_from(["default", "softmax", "sigmoid", "none"]),
                          st.text(max_size=8) | json_values),
}


@st.composite
def job_calls(draw: st.DrawFn) -> tuple[tuple[object, ...], object]:
    """``(args, kwargs)`` as a job hash may hold them, near the schema's edges: each field absent,
    fitting or wrong, now and then an unknown field, positional arguments or not an object at all,
    so that about a third of the calls are valid and every refusal reason occurs."""
    args = draw(st.tuples(json_values)) if draw(st.integers(0, 9)) == 0 else ()
    if draw(st.integers(0, 9)) == 0:
        return args, draw(json_values)
    payload = {}
    for name, (fitting, wrong) in FIELD_VALUES.items():
        shape = draw(st.sampled_from(["absent", "wrong", "fitting", "fitting", "fitting"]))
        if shape != "absent":
            payload[name] = draw(fitting if shape == "fitting" else wrong)
    if draw(st.integers(0, 9)) == 0:
        payload[draw(st.text(max_size=8).filter(lambda k: k not in JOB_FIELDS))] = draw(json_values)
    return args, payload


def refusal(args: tuple[object, ...], payload: object) -> str | None:
    """The schema written out once more, as a spec: None for a payload ``parse_job`` must accept,
    else a word its refusal message must contain."""
    if args:
        return "positional"
    if not isinstance(payload, dict):
        return "object"
    if set(payload) - set(JOB_FIELDS):
        return "unknown"
    items = payload.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
        return "items"
    run, top_k, deadline = payload.get("run"), payload.get("top_k"), payload.get("deadline")
    if run is not None and not isinstance(run, str):
        return "run"
    if deadline is not None and type(deadline) not in (int, float):
        return "deadline"
    if top_k is not None and (type(top_k) is not int or top_k < 1):
        return "top_k"
    function = payload.get("function_to_apply")
    if function is not None and function not in ("default", "softmax", "sigmoid", "none"):
        return "function_to_apply"
    return None


@settings(max_examples=200)
@given(job_calls())
def test_job_payload_is_accepted_exactly_when_the_schema_allows_it(call):
    """A valid job is decoded field for field; any other payload is refused with a JobError that
    names what is wrong (RQ shows that message as the failed job's reason)."""
    args, payload = json.loads(json.dumps(call))  # what the worker reads back from Redis
    args = tuple(args)
    expected = refusal(args, payload)
    if expected is None:
        request = parse_job(args, payload, max_items=MAX_ITEMS)
        assert request.items == payload["items"]
        assert (request.run, request.deadline, request.options.top_k) == tuple(payload.get(f) for f in JOB_FIELDS[1:4])
        function = payload.get("function_to_apply")
        assert request.options.function_to_apply == (None if function == "default" else function)
    else:
        with pytest.raises(JobError, match=expected):
            parse_job(args, payload, max_items=MAX_ITEMS)
