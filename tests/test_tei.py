"""TEI's HTTP API rules (producer.tei): request parsing, response shapes and error bodies, checked
against text-embeddings-inference's router at commit 0d124dc9773be6ac5a9a57d8439aba9bbbf33273
(v1.9.3). The Rust names in comments say where each rule is: ``types.rs`` and ``server.rs`` are
``router/src/http/``, ``lib.rs`` is ``router/src/lib.rs``. No Redis, no HTTP."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from producer import tei
from producer.tei import TEIError
from queuebert import keys, schema
from queuebert.schema import JobOptions

MAX_BATCH = 4  # the gateway's --max-client-batch-size in these tests (TEI's default is 32)
LABELS = ["negative", "neutral", "positive"]


def predict(body: Any, **kw: Any) -> tei.PredictRequest:
    return tei.parse_predict(body, max_client_batch_size=kw.pop("max_client_batch_size", MAX_BATCH), **kw)


def rerank(body: Any, **kw: Any) -> tei.RerankRequest:
    return tei.parse_rerank(body, max_client_batch_size=kw.pop("max_client_batch_size", MAX_BATCH), **kw)


def refused(call: Any, *args: Any, **kw: Any) -> TEIError:
    with pytest.raises(TEIError) as info:
        call(*args, **kw)
    return info.value


def model(labels: list[str], name: str = "org/model", max_length: int = 512) -> tei.ModelInfo:
    return tei.ModelInfo(model=name, device="cpu", dtype="float32", labels=tuple(labels), max_length=max_length,
                         scoring="softmax" if len(labels) > 1 else "sigmoid")


def result(i: int, scores: dict[str, float]) -> dict[str, Any]:
    """An item result as the worker writes it: scores best first, ties in ascending label id."""
    ranked = dict(sorted(scores.items(), key=lambda kv: -kv[1]))
    best = next(iter(ranked))
    return {"id": str(i), "label": best, "score": ranked[best], "scores": ranked}


def failed(i: int, kind: str, message: str = "boom") -> dict[str, Any]:
    return dict(schema.error_result(str(i), kind, message))


# --- errors: lib.rs `enum ErrorType`, `struct ErrorResponse`; server.rs `impl From<&ErrorType> for StatusCode`


def test_error_types_map_to_teis_status_codes() -> None:
    assert tei.STATUS == {"Unhealthy": 503, "Backend": 424, "Overloaded": 429, "Validation": 422,
                          "Tokenizer": 422, "Empty": 400}
    error = TEIError.of(tei.EMPTY, "x")
    assert (error.status, error.body()) == (400, {"error": "x", "error_type": "Empty"})


def test_fixed_errors_have_teis_bodies() -> None:
    # server.rs `health`: ErrorResponse { error: "unhealthy", error_type: ErrorType::Unhealthy } -> 503
    assert (tei.unhealthy().status, tei.unhealthy().body()) == (503, {"error": "unhealthy", "error_type": "Unhealthy"})
    # core lib.rs `TextEmbeddingsError::Overloaded`: #[error("Model is overloaded")] -> 429
    assert (tei.overloaded().status, tei.overloaded().body()) == (429, {"error": "Model is overloaded",
                                                                        "error_type": "Overloaded"})
    late = tei.timed_out(2.5)
    assert (late.status, late.error_type, late.message) == (504, "Overloaded", "no result within 2.5 s")


# --- the body: axum's `Json` extractor, which every TEI handler takes


@pytest.mark.parametrize("raw", [b"{", b"", b'{"inputs": NaN}', b'{"inputs": Infinity}', b"\xff\xfe{}",
                                 '{"inputs": "a"} x'])
def test_a_body_that_is_not_json_is_400(raw: bytes | str) -> None:
    error = refused(tei.decode_body, raw)
    assert error.status == 400 and error.error_type == "Validation"
    assert error.message.startswith("Failed to parse the request body as JSON: ")


def test_a_json_body_decodes() -> None:
    assert tei.decode_body('{"inputs": "héllo 😀"}'.encode()) == {"inputs": "héllo 😀"}


@pytest.mark.parametrize("value", ["application/json", "application/json; charset=utf-8", "Application/JSON",
                                   "application/vnd.api+json"])
def test_json_content_types_pass(value: str) -> None:
    tei.check_content_type(value)


@pytest.mark.parametrize("value", [None, "", "text/plain", "application/x-www-form-urlencoded", "text/json"])
def test_other_content_types_are_415(value: str | None) -> None:
    error = refused(tei.check_content_type, value)
    assert error.status == 415 and "application/json" in error.message


# --- /predict inputs: types.rs `impl<'de> Deserialize<'de> for PredictInput` (PredictInputVisitor)


@pytest.mark.parametrize("inputs, sequences, batch", [
    ("a", [("a", None)], False),                                 # visit_str -> Single(Single)
    (["a"], [("a", None)], False),                               # first is a string, no second -> Single(Single)
    (["a", "b"], [("a", "b")], False),                           # two strings: ONE pair, not a batch of two
    ([["a"]], [("a", None)], True),                              # first is a list -> Batch
    ([["a", "b"]], [("a", "b")], True),
    ([["a"], ["b", "c"], ["d"]], [("a", None), ("b", "c"), ("d", None)], True),  # mixed singles and pairs
])
def test_predict_inputs_follow_predict_input_visitor(inputs: Any, sequences: list[Any], batch: bool) -> None:
    assert tei.predict_inputs(inputs) == (sequences, batch)


@pytest.mark.parametrize("inputs", [
    [],                       # invalid_length(0)
    ["a", "b", "c"],          # invalid_length(3): a pair has two strings
    [["a", "b", "c"]],        # sequence_from_vec: only 1 or 2
    [[]],                     # sequence_from_vec: invalid_length(0)
    [["a"], ["b", "c", "d"]],
    [["a"], "b"],             # after a list, every element must be a list
    ["a", ["b"]],             # after a string, the second must be a string
    ["a", 1],
    [1],                      # untagged `Internal`: neither String nor Vec<String>
    [[1]],
    5, None, {"text": "a"},
])
def test_other_predict_inputs_are_422(inputs: Any) -> None:
    error = refused(tei.predict_inputs, inputs)
    assert error.status == 422 and error.error_type == "Validation"
    assert error.message.startswith("Failed to deserialize the JSON body into the target type: inputs")


def test_invalid_length_says_what_tei_expects() -> None:
    error = refused(tei.predict_inputs, ["a", "b", "c"])
    assert error.message.endswith("invalid length 3, expected a string, a pair of strings [string, string] or a "
                                  "batch of mixed strings and pairs [[string], [string, string], ...]")


# --- /predict body: types.rs `struct PredictRequest`; server.rs `async fn predict`


def test_predict_single_text() -> None:
    req = predict({"inputs": "I like you"})
    assert req == tei.PredictRequest(items=({"id": "0", "text": "I like you"},), batch=False)


def test_predict_pair_and_batch_items() -> None:
    assert predict({"inputs": ["q", "p"]}).items == ({"id": "0", "text": "q", "text_pair": "p"},)
    req = predict({"inputs": [["a"], ["q", "p"]]})
    assert req.batch and req.items == ({"id": "0", "text": "a"}, {"id": "1", "text": "q", "text_pair": "p"})


def test_raw_scores_asks_for_raw_logits() -> None:
    # PredictRequest.raw_scores: #[serde(default)] bool; Infer::predict skips softmax/sigmoid when true
    assert predict({"inputs": "a", "raw_scores": True}).options == JobOptions(function_to_apply="none")
    assert predict({"inputs": "a", "raw_scores": False}).options == JobOptions()
    assert predict({"inputs": "a"}).options == JobOptions()


@pytest.mark.parametrize("truncate", [True, False, None])
def test_truncate_is_accepted_as_option_bool(truncate: bool | None) -> None:
    # PredictRequest.truncate: Option<bool> (null allowed); queuebert truncates in every case
    req = predict({"inputs": "a", "truncate": truncate})
    assert req.truncate is truncate and req.items == ({"id": "0", "text": "a"},)


@pytest.mark.parametrize("field, value", [("truncate", "yes"), ("truncate", 1), ("raw_scores", None),
                                          ("raw_scores", "true"), ("truncation_direction", None),
                                          ("truncation_direction", "up"), ("truncation_direction", 0)])
def test_badly_typed_options_are_422(field: str, value: Any) -> None:
    # raw_scores and truncation_direction are #[serde(default)] non-Option fields: null is refused
    error = refused(predict, {"inputs": "a", field: value})
    assert error.status == 422 and error.error_type == "Validation" and field in error.message


@pytest.mark.parametrize("direction", ["right", "Right"])
def test_right_truncation_is_what_queuebert_does(direction: str) -> None:
    # types.rs `enum TruncationDirection`: variant names and lowercase aliases
    assert predict({"inputs": "a", "truncation_direction": direction}).items


@pytest.mark.parametrize("direction", ["left", "Left"])
def test_left_truncation_is_refused_not_silently_ignored(direction: str) -> None:
    error = refused(predict, {"inputs": "a", "truncation_direction": direction})
    assert (error.status, error.error_type) == (422, "Validation")
    assert error.message.startswith("Input validation error: ") and "right" in error.message


@pytest.mark.parametrize("body", [[], "a", None, ["a"]])
def test_a_body_that_is_not_an_object_is_422(body: Any) -> None:
    assert refused(predict, body).status == 422


def test_missing_inputs_is_422() -> None:
    error = refused(predict, {"input": "a"})
    assert error.status == 422 and error.message.endswith("missing field `inputs`")


def test_unknown_fields_are_ignored_as_serde_does() -> None:
    # no #[serde(deny_unknown_fields)]: /predict ignores huggingface_hub's `parameters` as TEI does
    req = predict({"inputs": "a", "parameters": {"top_k": 1}, "extra": [1, 2]})
    assert (req.batch, req.options.top_k) == (False, None)


def test_batch_over_the_client_limit_is_422_with_teis_message() -> None:
    # server.rs predict: `batch size {batch_size} > maximum allowed batch size {max}`, ErrorType::Validation
    error = refused(predict, {"inputs": [["t"]] * (MAX_BATCH + 1)})
    assert (error.status, error.body()) == (422, {"error": f"batch size {MAX_BATCH + 1} > maximum allowed batch "
                                                           f"size {MAX_BATCH}", "error_type": "Validation"})
    assert len(predict({"inputs": [["t"]] * MAX_BATCH}).items) == MAX_BATCH


def test_the_client_limit_applies_to_batches_only() -> None:
    # server.rs predict: the check is in the PredictInput::Batch arm, so a pair is never refused by it
    assert predict({"inputs": ["q", "p"]}, max_client_batch_size=1).items
    assert refused(predict, {"inputs": [["a"]]}, max_client_batch_size=0).status == 422
    assert predict({"inputs": "a"}, max_client_batch_size=0).items


@pytest.mark.parametrize("inputs", ["", [""], ["", ""], [["a"], [""]], [["a"], ["", ""]]])
def test_empty_inputs_are_400_empty(inputs: Any) -> None:
    # core tokenization.rs `encode`: TextEmbeddingsError::Empty("`inputs` cannot be empty"), shown
    # through #[error("Input validation error: {0}")]; ErrorType::Empty -> 400
    error = refused(predict, {"inputs": inputs})
    assert (error.status, error.body()) == (400, {"error": "Input validation error: `inputs` cannot be empty",
                                                  "error_type": "Empty"})


def test_a_pair_with_one_empty_text_is_not_empty() -> None:
    # tokenization.rs `EncodingInput::is_empty`: Dual(s1, s2) => s1.is_empty() && s2.is_empty()
    assert predict({"inputs": ["", "p"]}).items == ({"id": "0", "text": "", "text_pair": "p"},)
    assert predict({"inputs": ["q", ""]}).items == ({"id": "0", "text": "q", "text_pair": ""},)


def test_the_batch_size_is_checked_before_empty_inputs() -> None:
    # server.rs predict checks the batch size before any input is tokenized
    assert refused(predict, {"inputs": [[""]] * (MAX_BATCH + 1)}).status == 422


def test_a_lone_surrogate_is_400_as_serde_json_refuses_it() -> None:
    body = tei.decode_body(b'{"inputs": "bad \\ud800 text"}')
    error = refused(predict, body)
    assert error.status == 400 and error.message.startswith("Failed to parse the request body as JSON")
    assert refused(rerank, tei.decode_body(b'{"query": "q", "texts": ["\\udfff"]}')).status == 400


# --- POST /: server.rs `run` routes "/" (and "/invocations") to predict for ModelType::Classifier,
# to rerank for ModelType::Reranker; huggingface_hub adds the Inference API's `parameters`


def test_root_dispatches_by_model_type() -> None:
    assert tei.root_route(model(LABELS)) == "predict"
    assert tei.root_route(model(["relevant"])) == "rerank"
    assert tei.root_route(None) == "predict"
    assert isinstance(tei.parse_root({"query": "q", "texts": ["t"]}, max_client_batch_size=MAX_BATCH,
                                     model=model(["relevant"])), tei.RerankRequest)
    assert isinstance(tei.parse_root({"inputs": "a"}, max_client_batch_size=MAX_BATCH, model=model(LABELS)),
                      tei.PredictRequest)


def root(body: Any) -> tei.PredictRequest:
    req = tei.parse_root(body, max_client_batch_size=MAX_BATCH, model=model(LABELS))
    assert isinstance(req, tei.PredictRequest)
    return req


def test_root_without_parameters_is_teis_predict() -> None:
    assert root({"inputs": "a"}) == predict({"inputs": "a"})
    assert root({"inputs": "a", "parameters": None}) == predict({"inputs": "a"})


def test_root_reads_inference_api_parameters() -> None:
    req = root({"inputs": "a", "parameters": {"top_k": 2, "function_to_apply": "sigmoid"}})
    assert (req.batch, req.options) == (True, JobOptions(top_k=2, function_to_apply="sigmoid"))
    assert root({"inputs": "a", "parameters": {}}).batch  # one list per input, even for one input
    assert root({"inputs": "a", "parameters": {"function_to_apply": "none"}, "raw_scores": True}).options \
        == JobOptions(function_to_apply="none")
    assert root({"inputs": "a", "parameters": {"top_k": 1}, "raw_scores": True}).options \
        == JobOptions(top_k=1, function_to_apply="none")


@pytest.mark.parametrize("parameters", [{"top_k": 0}, {"top_k": "2"}, {"top_k": True}, {"function_to_apply": "relu"},
                                        {"function_to_apply": "default"}, [1], "top_k=1"])
def test_bad_parameters_are_422(parameters: Any) -> None:
    error = refused(root, {"inputs": "a", "parameters": parameters})
    assert error.status == 422 and "parameters" in error.message


def test_raw_scores_conflicting_with_function_to_apply_is_422() -> None:
    error = refused(root, {"inputs": "a", "raw_scores": True, "parameters": {"function_to_apply": "softmax"}})
    assert error.status == 422 and "raw_scores" in error.message


# --- /predict answers: types.rs `struct Prediction`, `enum PredictResponse` (untagged Single / Batch);
# server.rs predict: every label, `sort_by(partial_cmp)` then `reverse()`


def test_predict_answer_single_is_one_list_of_every_label_best_first() -> None:
    req = predict({"inputs": "a"})
    answer = tei.predict_response(req, [result(0, {"negative": 0.1, "neutral": 0.2, "positive": 0.7})], LABELS)
    assert answer == [{"score": 0.7, "label": "positive"}, {"score": 0.2, "label": "neutral"},
                      {"score": 0.1, "label": "negative"}]
    assert all(list(p) == ["score", "label"] for p in answer)  # Prediction's field order


def test_predict_answer_batch_is_one_list_per_input_in_order() -> None:
    req = predict({"inputs": [["a"], ["b"]]})
    answer = tei.predict_response(req, [result(0, {"negative": 0.9, "neutral": 0.05, "positive": 0.05}),
                                        result(1, {"negative": 0.0, "neutral": 0.3, "positive": 0.7})], LABELS)
    assert [[p["label"] for p in a] for a in answer] == [["negative", "positive", "neutral"],
                                                         ["positive", "neutral", "negative"]]


def test_ties_come_in_descending_label_id_as_teis_sort_then_reverse() -> None:
    req = predict({"inputs": "a"})
    tie = result(0, {"negative": 0.25, "neutral": 0.25, "positive": 0.5})
    labels = [p["label"] for p in tei.predict_response(req, [tie], LABELS)]
    assert labels == ["positive", "neutral", "negative"]
    # without the model's labels, ties keep the worker's (the pipeline's) order
    assert [p["label"] for p in tei.predict_response(req, [tie])] == ["positive", "negative", "neutral"]


def test_raw_scores_may_be_negative_and_still_sort() -> None:
    req = predict({"inputs": "a", "raw_scores": True})
    answer = tei.predict_response(req, [result(0, {"negative": -2.5, "neutral": 0.0, "positive": 3.25})], LABELS)
    assert [p["score"] for p in answer] == [3.25, 0.0, -2.5]


def test_top_k_cuts_each_answer() -> None:
    req = root({"inputs": [["a"], ["b"]], "parameters": {"top_k": 1}})
    answer = tei.predict_response(req, [result(0, {"negative": 0.9, "neutral": 0.05, "positive": 0.05}),
                                        result(1, {"negative": 0.1, "neutral": 0.2, "positive": 0.7})], LABELS)
    assert answer == [[{"score": 0.9, "label": "negative"}], [{"score": 0.7, "label": "positive"}]]


def test_an_item_error_fails_the_request_with_the_first_error_in_input_order() -> None:
    # server.rs predict: join_all(...).collect::<Result<Vec<_>, ErrorResponse>>()? -> the first Err
    req = predict({"inputs": [["a"], ["b"], ["c"]]})
    results = [result(0, {"negative": 1.0}), failed(1, schema.TEXT_TOO_LONG, "text has 9 characters"),
               failed(2, schema.INFERENCE_ERROR)]
    error = refused(tei.predict_response, req, results, LABELS)
    assert (error.status, error.body()) == (422, {"error": "Input validation error: text has 9 characters",
                                                  "error_type": "Validation"})


def test_a_nan_score_is_424_backend() -> None:
    # server.rs predict: `if s.is_nan()` -> ErrorResponse { error: "score is NaN", ErrorType::Backend }
    req = predict({"inputs": "a"})
    error = refused(tei.predict_response, req, [result(0, {"negative": math.nan, "neutral": 0.5})], LABELS)
    assert (error.status, error.body()) == (424, {"error": "score is NaN", "error_type": "Backend"})


def test_results_must_match_the_items() -> None:
    with pytest.raises(ValueError):
        tei.predict_response(predict({"inputs": "a"}), [], LABELS)


@pytest.mark.parametrize("kind, status, error_type, prefix", [
    (schema.INVALID_ITEM, 422, "Validation", "Input validation error: "),
    (schema.INVALID_TEXT, 422, "Validation", "Input validation error: "),
    (schema.TEXT_TOO_LONG, 422, "Validation", "Input validation error: "),
    (schema.INFERENCE_ERROR, 424, "Backend", "Backend error: "),
    (schema.INVALID_JOB, 424, "Backend", "Backend error: "),
    (schema.DEADLINE_EXCEEDED, 504, "Overloaded", ""),
    ("something_new", 424, "Backend", "Backend error: "),
])
def test_item_errors_become_tei_errors(kind: str, status: int, error_type: str, prefix: str) -> None:
    error = tei.item_error(failed(0, kind, "why"))
    assert (error.status, error.error_type, error.message) == (status, error_type, prefix + "why")
    assert error_type in tei.STATUS  # always one of TEI's ErrorType variants


# --- huggingface_hub's InferenceClient.text_classification against POST /


def test_huggingface_hub_text_classification_round_trip() -> None:
    """What InferenceClient(model=URL).text_classification posts, and how it reads the answer, run
    through the same helper calls as its _client.py (no HTTP: the gateway's tests do that)."""
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.inference._providers import get_provider_helper

    url = "http://127.0.0.1:9"
    helper = get_provider_helper(None, task="text-classification", model=url)
    scores = {"negative": 0.1, "neutral": 0.3, "positive": 0.6}
    for top_k, function in [(None, None), (2, "sigmoid")]:
        request = helper.prepare_request(inputs="I like you", parameters={"function_to_apply": function,
                                                                          "top_k": top_k},
                                         headers={}, model=url, api_key=None)
        assert request.url == url  # a URL model: POST /
        req = root(tei.decode_body(json.dumps(request.json)))
        assert req.options == JobOptions(top_k=top_k, function_to_apply=function)
        answer = json.loads(json.dumps(tei.predict_response(req, [result(0, scores)], LABELS)))
        out = hub.TextClassificationOutputElement.parse_obj_as_list(answer)[0]
        want = sorted(scores.items(), key=lambda kv: -kv[1])[:top_k]
        assert [(o.label, o.score) for o in out] == want
    # TEI's own flat answer would give that client only its first element (why `/` nests, see producer.tei)
    flat = tei.predict_response(predict({"inputs": "I like you"}), [result(0, scores)], LABELS)
    parsed = hub.TextClassificationOutputElement.parse_obj_as_list(flat)
    assert isinstance(parsed[0], hub.TextClassificationOutputElement)


# --- /rerank: types.rs `struct RerankRequest`, `struct Rank`, `struct RerankResponse`; server.rs `async fn rerank`


def test_rerank_request_is_query_text_pairs() -> None:
    req = rerank({"query": "q", "texts": ["a", "b"]})
    assert req.items == ({"id": "0", "text": "q", "text_pair": "a"}, {"id": "1", "text": "q", "text_pair": "b"})
    assert (req.return_text, req.options.function_to_apply, req.truncate) == (False, None, None)
    req = rerank({"query": "q", "texts": ["a"], "raw_scores": True, "return_text": True, "truncate": False})
    assert (req.return_text, req.options.function_to_apply, req.truncate) == (True, "none", False)


@pytest.mark.parametrize("body, field", [
    ({"texts": ["a"]}, "query"), ({"query": "q"}, "texts"), ({"query": 1, "texts": ["a"]}, "query"),
    ({"query": "q", "texts": "a"}, "texts"), ({"query": "q", "texts": ["a", 2]}, "texts"),
    ({"query": "q", "texts": ["a"], "return_text": None}, "return_text"),
    ({"query": "q", "texts": ["a"], "raw_scores": "yes"}, "raw_scores"),
    ({"query": "q", "texts": ["a"], "truncation_direction": "sideways"}, "truncation_direction"),
])
def test_bad_rerank_bodies_are_422(body: dict[str, Any], field: str) -> None:
    error = refused(rerank, body)
    assert error.status == 422 and field in error.message


def test_rerank_checks_run_in_teis_order() -> None:
    # server.rs rerank: texts empty (400 Empty) before the model type (424) before the batch size (422)
    classifier = model(LABELS)
    error = refused(rerank, {"query": "q", "texts": []}, model=classifier)
    assert (error.status, error.body()) == (400, {"error": "`texts` cannot be empty", "error_type": "Empty"})
    error = refused(rerank, {"query": "q", "texts": ["a"] * (MAX_BATCH + 1)}, model=classifier)
    assert (error.status, error.body()) == (424, {"error": "Backend error: model is not a re-ranker model",
                                                  "error_type": "Backend"})
    error = refused(rerank, {"query": "q", "texts": [""] * (MAX_BATCH + 1)}, model=model(["relevant"]))
    assert (error.status, error.error_type) == (422, "Validation")
    assert error.message == f"batch size {MAX_BATCH + 1} > maximum allowed batch size {MAX_BATCH}"


def test_rerank_empty_pairs() -> None:
    # a pair is empty only when query and text both are (EncodingInput::is_empty)
    assert refused(rerank, {"query": "", "texts": ["a", ""]}).status == 400
    assert len(rerank({"query": "", "texts": ["a"]}).items) == 1
    assert len(rerank({"query": "q", "texts": [""]}).items) == 1


def test_rerank_answer_is_every_text_best_first() -> None:
    req = rerank({"query": "q", "texts": ["a", "b", "c"]})
    answer = tei.rerank_response(req, [result(0, {"LABEL_0": 0.2}), result(1, {"LABEL_0": 0.9}),
                                       result(2, {"LABEL_0": 0.5})])
    assert answer == [{"index": 1, "score": 0.9}, {"index": 2, "score": 0.5}, {"index": 0, "score": 0.2}]
    assert all("text" not in r for r in answer)  # Rank.text: skip_serializing_if = "Option::is_none"


def test_rerank_return_text_and_ties_in_descending_index() -> None:
    req = rerank({"query": "q", "texts": ["a", "same", "same"], "return_text": True})
    answer = tei.rerank_response(req, [result(0, {"LABEL_0": 0.1}), result(1, {"LABEL_0": 0.7}),
                                       result(2, {"LABEL_0": 0.7})])
    assert answer == [{"index": 2, "text": "same", "score": 0.7}, {"index": 1, "text": "same", "score": 0.7},
                      {"index": 0, "text": "a", "score": 0.1}]
    assert list(answer[0]) == ["index", "text", "score"]  # Rank's field order


def test_rerank_errors() -> None:
    req = rerank({"query": "q", "texts": ["a", "b"]})
    error = refused(tei.rerank_response, req, [result(0, {"LABEL_0": 0.1}), failed(1, schema.INFERENCE_ERROR, "oom")])
    assert (error.status, error.body()) == (424, {"error": "Backend error: oom", "error_type": "Backend"})
    error = refused(tei.rerank_response, req, [result(0, {"LABEL_0": 0.1}), result(1, {"LABEL_0": math.nan})])
    assert (error.status, error.message) == (424, "score is NaN")
    # scores of a several-label model (no worker had said so when the request was parsed)
    error = refused(tei.rerank_response, req, [result(0, {"a": 0.1, "b": 0.9}), result(1, {"a": 0.5, "b": 0.5})])
    assert (error.status, error.message) == (424, "Backend error: model is not a re-ranker model")


# --- /info: lib.rs `struct Info`, `enum ModelType` (rename_all = "lowercase"), `struct ClassifierModel`


def worker_hash(labels: list[str], *, name: str = "org/model", as_bytes: bool = True) -> dict[Any, Any]:
    """A worker hash as BatchWorker writes it (HSET turns every value into a string) and redis-py
    reads it back (bytes)."""
    values = (name, "cpu", "float32", json.dumps(labels), 512, "softmax" if len(labels) > 1 else "sigmoid")
    fields = {k: str(v) for k, v in zip(keys.WORKER_MODEL_FIELDS, values)}
    fields["state"] = "idle"  # one of RQ's own fields
    return {k.encode(): v.encode() for k, v in fields.items()} if as_bytes else fields


def test_model_info_from_a_worker_hash() -> None:
    for as_bytes in (True, False):
        assert tei.model_info(worker_hash(LABELS, as_bytes=as_bytes)) == model(LABELS)


@pytest.mark.parametrize("change", [{"qb_labels": None}, {"qb_labels": "not json"}, {"qb_labels": "[]"},
                                    {"qb_labels": '{"0": "a"}'}, {"qb_max_length": "many"}, {"qb_model": None}])
def test_a_worker_that_says_too_little_is_no_model(change: dict[str, str | None]) -> None:
    fields = worker_hash(LABELS, as_bytes=False)
    for k, v in change.items():
        if v is None:
            del fields[k]
        else:
            fields[k] = v
    assert tei.model_info(fields) is None


def test_served_model_is_the_majority() -> None:
    old, new = worker_hash(LABELS, name="org/old"), worker_hash(LABELS, name="org/new")
    assert tei.served_model([old, new, new, {b"state": b"idle"}]) == (model(LABELS, name="org/new"), 2)
    assert tei.served_model([{b"state": b"idle"}]) is None
    assert tei.served_model([]) is None


#: lib.rs `Info`'s fields; the OpenAPI schema (docs/openapi.json) marks all but the Option ones required.
INFO_FIELDS = {"model_id", "model_sha", "model_dtype", "served_model_name", "model_type", "max_concurrent_requests",
               "max_input_length", "max_batch_tokens", "max_batch_requests", "max_client_batch_size",
               "auto_truncate", "tokenization_workers", "version", "sha", "docker_label"}


def test_info_for_a_classifier() -> None:
    body = tei.info_body(tei.served_model([worker_hash(LABELS)] * 3), max_client_batch_size=MAX_BATCH,
                         max_concurrent_requests=64, version="9.9")
    assert INFO_FIELDS <= set(body)
    assert body["model_type"] == {"classifier": {"id2label": {"0": "negative", "1": "neutral", "2": "positive"},
                                                 "label2id": {"negative": 0, "neutral": 1, "positive": 2}}}
    assert (body["model_id"], body["served_model_name"], body["model_dtype"]) == ("org/model",) * 2 + ("float32",)
    assert (body["max_input_length"], body["max_batch_tokens"], body["max_client_batch_size"]) == (512, 512, MAX_BATCH)
    assert (body["max_concurrent_requests"], body["tokenization_workers"], body["version"]) == (64, 3, "9.9")
    assert body["auto_truncate"] is True
    assert body["model_sha"] is body["max_batch_requests"] is body["sha"] is body["docker_label"] is None
    assert body["queuebert"] == {"device": "cpu", "scoring": "softmax", "workers": 3}
    json.dumps(body)


def test_info_for_a_reranker_and_defaults() -> None:
    # lib.rs run: `if n_classes > 1 { Classifier } else { Reranker }`
    body = tei.info_body((model(["LABEL_0"]), 1), max_client_batch_size=MAX_BATCH, max_concurrent_requests=8,
                         max_batch_tokens=16384)
    assert body["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    assert body["max_batch_tokens"] == 16384
    assert isinstance(body["version"], str) and body["version"]


def test_info_without_a_worker_is_503_unhealthy() -> None:
    error = refused(tei.info_body, None, max_client_batch_size=MAX_BATCH, max_concurrent_requests=8)
    assert (error.status, error.error_type) == (503, "Unhealthy")
