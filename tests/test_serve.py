"""`prmkit serve` in process (FastAPI's TestClient): the scores `prmkit score` writes, batching that changes no bit,
every bad request a one-line 4xx after which the server goes on, a bounded queue, the API key, OpenRLHF's and vLLM's
shapes, and the truncation policy. The real uvicorn process is tests/test_serve_process.py."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make_tiny_prm
from test_kinds import lm_tag_model, qwen_prm_model  # noqa: F401 - the tiny kind models, as fixtures

pytest.importorskip("fastapi", reason="the serve extra: pip install 'prmkit[serve]'")

from fastapi.testclient import TestClient

from prmkit.config.schema import ServeConfig
from prmkit.errors import PrmkitError
from prmkit.metrics import aggregate
from prmkit.serve.app import create_app

SOLUTIONS = [
    ("Which number is larger, 9.8 or 9.11?", ["11 is greater than 8.", "Hence, 9.11 > 9.8."]),
    (
        "Let's call the price of a pencil p and the price of a jumbo eraser e.",
        [
            "The first equation is 3p + e = 124, and the second equation is 5p + e = 182.",
            "So the answer is 42.",
            "We check: 6 * 7 = 42.",
            "Hence 42.",
        ],
    ),
    ("So the answer is 42.", ["We check: 6 * 7 = 42."]),
    (
        "Step 1: Janet spends 3 hours + 5 hours = 8 hours per week on music lessons.",
        ["11 is greater than 8.", "Hence, 9.11 > 9.8.", "So the answer is 42."],
    ),
]
GOOD = {"items": [{"prompt": SOLUTIONS[0][0], "steps": SOLUTIONS[0][1]}]}


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, train_tokenizer_dir) -> Path:
    return make_tiny_prm(tmp_path_factory.mktemp("serve") / "prm", train_tokenizer_dir, seed=3)


@pytest.fixture(scope="module")
def scorer(prm_dir):
    from prmkit.scoring import StepScorer

    return StepScorer.from_pretrained(prm_dir, dtype="float32", device="cpu")


@contextlib.contextmanager
def served(scorer, api_key: str | None = None, load=None, **settings):
    """A TestClient on an app serving ``scorer`` (already loaded), once /health says ready."""
    app = create_app(load or (lambda: scorer), replace(ServeConfig(), **settings), api_key=api_key)
    with TestClient(app) as client:
        if load is None:
            wait_ready(client)
        yield client


def wait_ready(client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.01)


@pytest.fixture(scope="module")
def client(scorer):
    with served(scorer) as c:
        yield c


def items_body(solutions) -> dict:
    return {"items": [{"prompt": p, "steps": s} for p, s in solutions]}


def metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# ---------------------------------------------------------------------------------------------------------------------
# Scores


def test_v1_score_is_what_prmkit_score_writes_bit_for_bit(tmp_path, prm_dir):
    """The same rows through `prmkit score` (the CLI) and /v1/score, with max_length short enough to cut one."""
    from typer.testing import CliRunner

    from prmkit.cli.app import app as cli
    from prmkit.scoring import StepScorer

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "completions": s}) + "\n" for p, s in SOLUTIONS))
    out = tmp_path / "scored.jsonl"
    result = CliRunner().invoke(
        cli,
        [
            "score",
            str(prm_dir),
            str(rows),
            "-o",
            str(out),
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--set",
            "data.max_length=40",
        ],
    )
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert any(w.get("truncated") for w in written) and not all(w.get("truncated") for w in written)

    short = StepScorer.from_pretrained(prm_dir, dtype="float32", device="cpu", tokenization={"max_length": 40})
    with served(short, truncated="read") as c:
        got = c.post("/v1/score", json=items_body(SOLUTIONS)).json()["items"]
    for item, line in zip(got, written, strict=True):
        assert item["step_scores"] == line["step_scores"]  # floats parsed from JSON: the same bits
        assert item["aggregates"] == line["aggregates"]
        assert item["first_error"] == line["first_error"]
        assert item["truncated"] is bool(line.get("truncated"))
        assert item["reward"] == (line["aggregates"]["min"] or 0.0)  # nothing read at all: 0.0


def test_scores_do_not_depend_on_which_requests_share_a_batch(scorer):
    alone = [scorer.score_solutions([s])[0].scores for s in SOLUTIONS]
    # A long wait, so that concurrent requests are gathered into the same engine call.
    with served(scorer, max_wait_ms=300) as c:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: c.post("/v1/score", json=items_body([SOLUTIONS[i % 4]])), range(32)))
        assert metric(c, "prmkit_batch_requests_sum") > metric(c, "prmkit_batch_requests_count")  # some batched
        mixed = c.post("/v1/score", json=items_body(SOLUTIONS[::-1])).json()["items"]
    for i, answer in enumerate(answers):
        assert answer.status_code == 200
        assert answer.json()["items"][0]["step_scores"] == alone[i % 4]
    assert [m["step_scores"] for m in mixed] == alone[::-1]


def test_a_model_scored_prefix_by_prefix_is_served_too(scorer):
    from prmkit.scoring import StepScorer

    prefix = StepScorer(scorer.model, scorer.tokenizer, scorer.params, causal=False)
    assert prefix.prefix_mode
    want = [r.scores for r in prefix.score_solutions(SOLUTIONS)]
    with served(prefix, max_wait_ms=100) as c, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda s: c.post("/v1/score", json=items_body([s])), SOLUTIONS))
    assert [a.json()["items"][0]["step_scores"] for a in answers] == want


def test_a_scored_request_says_where_its_time_went(client):
    timing = client.post("/v1/score", json=GOOD).headers["Server-Timing"]
    parts = dict(p.split(";dur=") for p in timing.split(", "))
    assert set(parts) == {"tokenize", "queue", "engine"} and float(parts["engine"]) > 0


def test_a_response_is_cut_into_steps_at_the_model_separator(client, scorer):
    prompt, steps = SOLUTIONS[1]
    answer = client.post("/v1/score", json={"prompt": prompt, "response": "\n" + "\n".join(steps) + "\n"}).json()
    item = answer["items"][0]
    assert item["steps"] == steps
    assert item["step_scores"] == scorer.score(prompt, steps)
    other = client.post("/v1/score", json={"prompt": prompt, "response": " || ".join(steps), "step_separator": " || "})
    assert other.json()["items"][0]["steps"] == steps


# ---------------------------------------------------------------------------------------------------------------------
# Bad requests


def _long_item(n_words: int = 60) -> dict:
    return {"items": [{"prompt": "What is 6 * 7? " * n_words, "steps": ["So the answer is 42."]}]}


BAD = {
    "malformed JSON": (b'{"items": [', 400, "malformed JSON"),
    "not UTF-8": (b'{"items": "\xff"}', 400, "not UTF-8"),
    "NaN": (b'{"items": [{"prompt": "a", "steps": [NaN]}]}', 400, "NaN is not valid JSON"),
    "a body that is not an object": (b"[1, 2]", 422, "JSON object"),
    "steps not a list": ({"items": [{"prompt": "a", "steps": "b"}]}, 422, "items[0].steps: expected a list"),
    "a step not a string": (
        {"items": [{"prompt": "a", "steps": ["b", 3]}]},
        422,
        "items[0].steps[1]: expected a string",
    ),
    "prompt not a string": ({"items": [{"prompt": None, "steps": ["b"]}]}, 422, "items[0].prompt: expected a string"),
    "a lone surrogate": (b'{"items": [{"prompt": "a", "steps": ["b\\ud800"]}]}', 422, "lone surrogate U+D800"),
    "no steps": ({"items": [{"prompt": "a", "steps": []}]}, 422, "items[0].steps: empty"),
    "an empty step": ({"items": [{"prompt": "a", "steps": ["b", "  "]}]}, 422, "items[0].steps[1]: empty step"),
    "no items": ({"items": []}, 422, "items: expected a non-empty list"),
    "an unknown field": ({"items": [{"prompt": "a", "steps": ["b"], "step": 1}]}, 422, "items[0].step: unknown field"),
    "neither form": ({"text": "a"}, 422, "expected items"),
    "a response without steps": ({"prompt": "a", "response": "\n\n"}, 422, "response: no step"),
    "an item over serve.max_request_tokens": (_long_item(), 413, "items[0]: "),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_is_a_one_line_4xx_and_the_next_good_one_succeeds(scorer, case):
    body, status, words = BAD[case]
    with served(scorer, max_request_tokens=200) as c:
        sent = c.post("/v1/score", content=body) if isinstance(body, bytes) else c.post("/v1/score", json=body)
        assert sent.status_code == status, sent.text
        assert "\n" not in sent.text
        message = sent.json()["error"]["message"]
        assert words in message and "\n" not in message
        assert c.post("/v1/score", json=GOOD).status_code == 200
        assert metric(c, "prmkit_errors_total") >= 1


def test_a_body_over_serve_max_body_mb_is_a_413(scorer):
    with served(scorer, max_body_mb=0.001) as c:
        big = {"items": [{"prompt": "a" * 2000, "steps": ["b"]}]}
        sent = c.post("/v1/score", json=big)
        assert sent.status_code == 413 and "serve.max_body_mb" in sent.json()["error"]["message"]
        chunked = c.post("/v1/score", content=iter([json.dumps(big).encode()]))  # no Content-Length: counted as read
        assert chunked.status_code == 413
        assert c.post("/v1/score", json=GOOD).status_code == 200


def test_a_step_holding_the_step_tag_is_a_4xx(request):
    from prmkit.scoring import StepScorer

    path, _, _ = request.getfixturevalue("lm_tag_model")
    tagged = StepScorer.from_pretrained(path, dtype="float32", device="cpu")
    with served(tagged) as c:
        sent = c.post("/v1/score", json={"items": [{"prompt": "a", "steps": ["b ки c"]}]})
        assert sent.status_code == 422 and "contains the step tag" in sent.json()["error"]["message"]
        assert c.post("/v1/score", json={"items": [{"prompt": "a", "steps": ["b c"]}]}).status_code == 200


def test_unknown_paths_and_methods_answer_in_the_same_json_shape(client):
    assert client.get("/nowhere").json() == {"error": {"message": "Not Found", "code": 404}}
    assert client.get("/v1/score").status_code == 405


def test_the_openapi_schema_documents_the_endpoints(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/score", "/get_reward", "/pooling", "/health", "/metrics", "/v1/model"} <= set(schema["paths"])
    body = schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "$ref" not in json.dumps(body) and "steps" in json.dumps(body)
    assert client.get("/docs").status_code == 200


# ---------------------------------------------------------------------------------------------------------------------
# Load, queue, failures, key


class Gated:
    """The engine, held at its next forward call until ``go`` is set; fails a solution whose prompt says FAIL."""

    def __init__(self, scorer):
        self.inner = scorer
        self.go = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score_encoded(self, encoded):
        self.entered.set()
        assert self.go.wait(30)
        fail = self.inner.tokenizer.encode("FAIL", add_special_tokens=False)
        if any(ids[i : i + len(fail)] == fail for ids in (e.input_ids for e in encoded) for i in range(len(ids))):
            raise PrmkitError("out of cpu memory scoring a single sequence of 99999 tokens (test)")
        return self.inner.score_encoded(encoded)


def test_health_is_503_while_the_model_loads_and_200_once_it_is_ready(scorer):
    loaded = threading.Event()

    def load():
        assert loaded.wait(30)
        return scorer

    with served(scorer, load=load) as c:
        assert c.get("/health").status_code == 503 and c.get("/health").json()["status"] == "loading"
        early = c.post("/v1/score", json=GOOD)
        assert early.status_code == 503 and early.headers["Retry-After"] and "loading" in early.text
        assert c.get("/v1/model").status_code == 503
        loaded.set()
        wait_ready(c)
        assert c.post("/v1/score", json=GOOD).status_code == 200
        info = c.get("/v1/model").json()
        assert info["kind"] == "token-classification" and info["step_separator"] == "\n"
        assert info["tokenization"]["max_length"] == 1024 and info["prmkit_version"]


def test_past_max_queue_the_server_answers_503_with_retry_after(scorer):
    gated = Gated(scorer)
    with served(gated, max_queue=1, max_wait_ms=0) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, "/v1/score", json=GOOD)  # held in the engine
        assert gated.entered.wait(30)
        second = pool.submit(c.post, "/v1/score", json=GOOD)  # queued: the queue is full
        deadline = time.monotonic() + 30
        while metric(c, "prmkit_queue_rows") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = c.post("/v1/score", json=GOOD)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert "serve.max_queue 1" in refused.json()["error"]["message"]
        gated.go.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert c.post("/v1/score", json=GOOD).status_code == 200


def test_one_request_failing_fails_alone_not_the_batch_it_shared(scorer):
    gated = Gated(scorer)
    with served(gated, max_wait_ms=0) as c, ThreadPoolExecutor(4) as pool:
        holder = pool.submit(c.post, "/v1/score", json=GOOD)
        assert gated.entered.wait(30)
        # These queue up behind the held call and are scored together; one of them cannot be scored.
        bad = pool.submit(c.post, "/v1/score", json={"items": [{"prompt": "FAIL", "steps": ["x"]}]})
        goods = [pool.submit(c.post, "/v1/score", json=items_body([s])) for s in SOLUTIONS[1:3]]
        time.sleep(0.3)
        gated.go.set()
        assert holder.result().status_code == 200
        assert bad.result().status_code == 413 and "single sequence" in bad.result().json()["error"]["message"]
        for s, good in zip(SOLUTIONS[1:3], goods, strict=True):
            assert good.result().json()["items"][0]["step_scores"] == scorer.score(*s)


def test_an_api_key_is_required_except_for_health_and_docs(scorer):
    key = "sk-prmkit-test-0123456789"
    with served(scorer, api_key=key) as c:
        assert c.post("/v1/score", json=GOOD).status_code == 401
        assert c.post("/v1/score", json=GOOD, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/metrics").status_code == 401
        ok = c.post("/v1/score", json=GOOD, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and key not in ok.text
        assert c.get("/health").status_code == 200 and c.get("/openapi.json").status_code == 200
        assert key not in c.get("/metrics", headers={"Authorization": f"Bearer {key}"}).text


# ---------------------------------------------------------------------------------------------------------------------
# OpenRLHF /get_reward


def test_get_reward_answers_openrlhf_shapes(client, scorer):
    assert client.post("/get_reward", json={"query": []}).json() == {
        "rewards": [],
        "scores": [],
        "step_rewards": [],
        "extra_logs": {"truncated": [], "num_steps": []},
    }
    assert client.post("/get_reward", json={"query": [], "prompts": [], "labels": []}).json()["rewards"] == []
    pad = scorer.tokenizer.pad_token
    queries, prompts, expected = [], [], []
    for prompt, steps in SOLUTIONS[:3]:
        # Left padding and an end-of-sequence token kept by the decode; a response that opens and closes with "\n".
        queries.append(pad * 2 + prompt + "\n" + "\n".join(steps) + "\n" + pad)
        prompts.append(prompt)
        expected.append(scorer.score(prompt, steps))
    queries.append(SOLUTIONS[3][0] + "\n\n")  # a response without a step
    prompts.append(SOLUTIONS[3][0])
    answer = client.post("/get_reward", json={"query": queries, "prompts": prompts, "labels": ["x"] * 4}).json()
    assert answer["step_rewards"] == [*expected, []]
    assert answer["rewards"] == [min(e) for e in expected] + [0.0] == answer["scores"]
    assert answer["extra_logs"] == {"truncated": [0.0] * 4, "num_steps": [2.0, 4.0, 1.0, 0.0]}


def test_get_reward_refuses_what_it_cannot_cut(client):
    assert client.post("/get_reward", json={"query": ["a b"]}).status_code == 422  # no prompts
    wrong = client.post("/get_reward", json={"query": ["a b"], "prompts": ["c"]})
    assert wrong.status_code == 422 and "does not start with its prompt" in wrong.json()["error"]["message"]
    assert client.post("/get_reward", json={"query": ["a b", "c"], "prompts": ["a"]}).status_code == 422
    assert client.post("/get_reward", json={"query": ["a\nb"], "prompts": ["a"]}).status_code == 200


@pytest.mark.parametrize("policy", ["lowest", "read", "error"])
def test_a_truncated_solution_follows_serve_truncated(prm_dir, scorer, policy):
    from prmkit.scoring import StepScorer

    prompt, steps = SOLUTIONS[1]
    room = scorer.encode([(prompt, steps)])[0].step_positions[1] + 1  # for the first two steps only
    short = StepScorer.from_pretrained(prm_dir, dtype="float32", device="cpu", tokenization={"max_length": room})
    read = short.score(prompt, steps)
    assert None in read and read[0] is not None
    with served(short, truncated=policy) as c:
        scored = c.post("/v1/score", json=items_body([SOLUTIONS[1], SOLUTIONS[0]]))
        rewarded = c.post("/get_reward", json={"query": [prompt + "\n" + "\n".join(steps)], "prompts": [prompt]})
        if policy == "error":
            for answer in (scored, rewarded):
                assert (
                    answer.status_code == 422 and "cut by the model's max_length" in answer.json()["error"]["message"]
                )
            assert c.post("/v1/score", json=GOOD).status_code == 200
            return
        item = scored.json()["items"][0]
        assert item["truncated"] is True and item["step_scores"] == read
        assert item["aggregates"] == aggregate(read)  # as `prmkit score` writes them, whatever the policy
        want = 0.0 if policy == "lowest" else aggregate(read)["min"]
        assert item["reward"] == want and scored.json()["items"][1]["truncated"] is False
        assert rewarded.json()["rewards"] == [want] and rewarded.json()["extra_logs"]["truncated"] == [1.0]
        assert metric(c, "prmkit_truncated_rows_total") == 2


# ---------------------------------------------------------------------------------------------------------------------
# vLLM /pooling


def test_pooling_answers_vllm_shapes_for_a_qwen_prm(request):
    from prmkit.scoring import StepScorer

    path, _, _ = request.getfixturevalue("qwen_prm_model")
    scorer = StepScorer.from_pretrained(path, dtype="float32", device="cpu")
    tok = scorer.tokenizer
    texts = [scorer.kind_encoder._text(p, s) for p, s in SOLUTIONS[:2]]  # what a vLLM client sends
    want = [scorer.score(p, s) for p, s in SOLUTIONS[:2]]
    with served(scorer) as c:
        for task in ("token_classify", "encode", None):
            body = {"model": "prm", "input": texts, **({"task": task} if task else {})}
            answer = c.post("/pooling", json=body).json()
            assert answer["object"] == "list" and answer["model"] == "prm" and answer["id"].startswith("pool-")
            assert [d["index"] for d in answer["data"]] == [0, 1]
            for d, w in zip(answer["data"], want, strict=True):
                assert d["object"] == "pooling"
                assert [pair[1] for pair in d["data"]] == w and all(pair[0] == 1.0 - pair[1] for pair in d["data"])
            tokens = sum(len(tok(t)["input_ids"]) for t in texts)
            assert answer["usage"] == {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            }
        one = c.post("/pooling", json={"input": tok(texts[0])["input_ids"], "task": "token_classify"}).json()
        assert [p[1] for p in one["data"][0]["data"]] == want[0]
        system = "Please reason step by step, and put your final answer within \\boxed{}."
        chat = c.post(
            "/pooling",
            json={
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": SOLUTIONS[0][0]},
                    {"role": "assistant", "content": "<extra_0>".join(SOLUTIONS[0][1]) + "<extra_0>"},
                ]
            },
        ).json()
        assert [p[1] for p in chat["data"][0]["data"]] == want[0]
        assert c.post("/pooling", json={"input": texts[0], "task": "embed"}).status_code == 400
        assert c.post("/pooling", json={"input": 5}).status_code == 422
        assert c.post("/pooling", json={"input": [10**9]}).status_code == 422
        assert c.post("/pooling", json={"input": texts[0] * 40}).status_code == 400  # past max_position_embeddings


def test_pooling_reads_an_lm_tag_model_and_refuses_a_token_classifier(request, client):
    from prmkit.scoring import StepScorer

    path, _, _ = request.getfixturevalue("lm_tag_model")
    scorer = StepScorer.from_pretrained(path, dtype="float32", device="cpu")
    prompt, steps = SOLUTIONS[0]
    with served(scorer) as c:
        answer = c.post("/pooling", json={"input": scorer.kind_encoder._text(prompt, steps)}).json()
        assert [p[1] for p in answer["data"][0]["data"]] == scorer.score(prompt, steps)
        # /get_reward cuts an lm-tag response at its tags, in the layout the model reads.
        query = prompt + " " + "\n".join(f"{s} ки" for s in steps)
        assert c.post("/get_reward", json={"query": [query], "prompts": [prompt]}).json()["step_rewards"] == [
            scorer.score(prompt, steps)
        ]
    refused = client.post("/pooling", json={"input": "a", "task": "token_classify"})
    assert refused.status_code == 400 and "use /v1/score" in refused.json()["error"]["message"]
