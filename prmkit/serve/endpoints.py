"""What each scoring endpoint does with a request, apart from HTTP: read it, score it, shape the answer.

- ``POST /v1/score``: prmkit's own; each item as `prmkit score` writes it, plus the reward.
- ``POST /get_reward``: OpenRLHF's remote reward model (one reward per query, per-step rewards beside).
- ``POST /pooling``: vLLM's pooling API with ``task: token_classify`` for kinds whose text carries step tags.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prmkit.errors import first_line
from prmkit.kinds.registry import KINDS
from prmkit.serve.batcher import Batcher
from prmkit.serve.policy import scored_item, solution_reward, split_response
from prmkit.serve.schemas import (
    RequestError,
    need_object,
    optional_text,
    refuse_unknown,
    steps_field,
    string_list,
    text_field,
)
from prmkit.tokenization import text_problem

TAG_KINDS = tuple(kind.name for kind in KINDS.values() if kind.uses_step_tag)
"""The kinds whose text carries a step tag, which vLLM's pooling reads."""
POOLING_TASKS = (None, "token_classify", "encode", "reward")
"""``token_classify`` is vLLM's name; ``encode`` and ``reward`` are the older ones PRM clients still send."""


@dataclass
class Service:
    """A loaded model, its batcher and the serve settings: everything the endpoints need."""

    scorer: Any
    batcher: Batcher
    metrics: Any
    name: str
    kind: str
    separator: str
    strip: bool
    aggregate: str = "min"
    policy: str = "lowest"
    threshold: float = 0.5
    max_request_tokens: int = 32768
    specials: list[str] = field(default_factory=list)

    def encode(self, pairs: list[tuple[str, list[str]]], names: list[str]) -> list[Any]:
        """The engine's encodings (on the tokenizer thread), each within serve.max_request_tokens."""
        encoder = getattr(self.scorer, "kind_encoder", None)
        encoded = encoder.encode(pairs, where=names) if encoder is not None else self.scorer.encode(pairs)
        for name, enc in zip(names, encoded, strict=True):
            self.check_length(name, len(enc.input_ids))
        return encoded

    def check_length(self, name: str, tokens: int) -> None:
        if tokens > self.max_request_tokens:
            raise RequestError(
                413, f"{name}: {tokens} tokens, more than serve.max_request_tokens ({self.max_request_tokens})"
            )

    async def run(self, pairs: list[tuple[str, list[str]]], names: list[str]) -> list[Any]:
        results = await self.batcher.score(lambda: self.encode(pairs, names), len(pairs), items=pairs)
        self.metrics.scored(results)
        return results


# ---------------------------------------------------------------------------------------------------------------------
# /v1/score


async def score(svc: Service, obj: Any) -> dict[str, Any]:
    obj = need_object(obj)
    cut: list[str] | None = None
    if "items" in obj:
        refuse_unknown(obj, ("items",))
        raw = obj["items"]
        if not isinstance(raw, list) or not raw:
            raise RequestError(422, 'items: expected a non-empty list of {"prompt": ..., "steps": [...]}')
        pairs, names = [], []
        for i, item in enumerate(raw):
            where = f"items[{i}]."
            if not isinstance(item, dict):
                raise RequestError(422, f"items[{i}]: expected an object with prompt and steps")
            refuse_unknown(item, ("prompt", "steps"), where)
            pairs.append((text_field(item, "prompt", where), steps_field(item, "steps", where)))
            names.append(f"items[{i}]")
    elif "response" in obj or "prompt" in obj:
        refuse_unknown(obj, ("prompt", "response", "step_separator"))
        prompt, response = text_field(obj, "prompt"), text_field(obj, "response")
        given = optional_text(obj, "step_separator")
        if given == "":
            raise RequestError(422, "step_separator: empty; leave it out to use the server's")
        separator, strip = (given, False) if given is not None else (svc.separator, svc.strip)
        cut = split_response(response, separator, strip)
        if not cut:
            raise RequestError(422, f"response: no step in it (cut at {separator!r})")
        pairs, names = [(prompt, cut)], ["response"]
    else:
        raise RequestError(422, "expected items (a list of {prompt, steps}), or prompt and response")
    results = await svc.run(pairs, names)
    items = [
        scored_item(r.scores, r.truncated, svc.threshold, svc.aggregate, svc.policy, name)
        for r, name in zip(results, names, strict=True)
    ]
    if cut is not None:
        items[0]["steps"] = cut
    return {"model": svc.name, "items": items}


# ---------------------------------------------------------------------------------------------------------------------
# /get_reward (OpenRLHF)


def response_of(query: str, prompt: str, specials: Sequence[str], where: str) -> str:
    """The response in an OpenRLHF query (prompt + response, decoded with special tokens kept): the text after the
    prompt, less the padding before the prompt and the end-of-sequence and padding tokens after the response."""
    start = 0
    while not query.startswith(prompt, start):
        token = next((t for t in specials if query.startswith(t, start)), None)
        if token is None:
            raise RequestError(422, f"{where}: does not start with its prompt (prompts{where[5:]})")
        start += len(token)
    end = len(query)
    start += len(prompt)
    while end > start:
        token = next((t for t in specials if query.endswith(t, start, end)), None)
        if token is None:
            break
        end -= len(token)
    return query[start:end]


async def get_reward(svc: Service, obj: Any) -> dict[str, Any]:
    obj = need_object(obj)
    if "query" not in obj:
        raise RequestError(422, "query: missing; expected a list of strings (prompt + response)")
    queries = string_list(obj, "query")
    prompts = obj.get("prompts")
    if queries and prompts is None:
        raise RequestError(422, "prompts: missing; each query is cut after its prompt")
    prompts = string_list(obj, "prompts") if queries else []
    if len(prompts) != len(queries):
        raise RequestError(422, f"prompts: {len(prompts)} prompts for {len(queries)} queries")
    cuts = [
        split_response(response_of(q, p, svc.specials, f"query[{i}]"), svc.separator, svc.strip)
        for i, (q, p) in enumerate(zip(queries, prompts, strict=True))
    ]
    todo = [i for i, steps in enumerate(cuts) if steps]
    results = await svc.run([(prompts[i], cuts[i]) for i in todo], [f"query[{i}]" for i in todo]) if todo else []
    rewards = [0.0] * len(queries)  # a response without a step earns nothing
    step_rewards: list[list[float | None]] = [[] for _ in queries]
    truncated = [0.0] * len(queries)
    for i, r in zip(todo, results, strict=True):
        rewards[i] = solution_reward(r.scores, r.truncated, svc.aggregate, svc.policy, f"query[{i}]")
        step_rewards[i] = list(r.scores)
        truncated[i] = float(r.truncated)
    return {
        "rewards": rewards,
        "scores": list(rewards),
        "step_rewards": step_rewards,
        "extra_logs": {"truncated": truncated, "num_steps": [float(len(c)) for c in cuts]},
    }


# ---------------------------------------------------------------------------------------------------------------------
# /pooling (vLLM)


def _pooling_inputs(svc: Service, obj: dict) -> tuple[list[str | list[int]], bool]:
    """The texts (or token ids) to read, and whether special tokens are added (vLLM's defaults)."""
    add = obj.get("add_special_tokens")
    if add is not None and not isinstance(add, bool):
        raise RequestError(422, f"add_special_tokens: expected a boolean, got {type(add).__name__}")
    if obj.get("messages") is not None:
        from prmkit.kinds.chat_template import render_chat

        messages = obj["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise RequestError(422, 'messages: expected a non-empty list of {"role": ..., "content": ...}')
        for i, m in enumerate(messages):
            text_field(m, "content", f"messages[{i}].")
        encoder = svc.scorer.kind_encoder
        try:
            text = render_chat(svc.scorer.tokenizer, messages, encoder.settings.chat_template)
        except Exception as e:  # a template error is the request's problem, said in one line
            raise RequestError(422, f"messages: the chat template failed: {first_line(e)}") from None
        return [text], bool(add)
    raw = obj.get("input")
    if isinstance(raw, str):
        inputs: list[Any] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = list(raw)
    elif isinstance(raw, list) and raw and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        inputs = [list(raw)]
    elif (
        isinstance(raw, list)
        and raw
        and all(
            isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in raw
        )
    ):
        inputs = [list(x) for x in raw]
    else:
        raise RequestError(422, "input: expected a string, a list of strings, a list of token ids or a list of them")
    for i, x in enumerate(inputs):
        problem = text_problem(x) if isinstance(x, str) else None
        if problem:
            raise RequestError(422, f"input{'' if isinstance(raw, str) else f'[{i}]'}: {problem}")
    return inputs, True if add is None else add


async def pooling(svc: Service, obj: Any) -> dict[str, Any]:
    obj = need_object(obj)
    if svc.kind not in TAG_KINDS:
        raise RequestError(
            400,
            f"/pooling reads step tags, which a {svc.kind} model's text does not carry (only "
            f"{' and '.join(TAG_KINDS)} models'); use /v1/score",
        )
    task = obj.get("task")
    if task not in POOLING_TASKS:
        raise RequestError(
            400, f"task {task!r} is not served; this server answers token_classify (per-step [p_wrong, p_correct])"
        )
    if obj.get("use_activation") is False or obj.get("dimensions") is not None:
        raise RequestError(400, "use_activation: false and dimensions are not served: the data are probabilities")
    inputs, add_special = _pooling_inputs(svc, obj)
    encoder = svc.scorer.kind_encoder
    vocab = len(svc.scorer.tokenizer)

    def encode() -> list[Any]:
        from prmkit.tokenization import Encoded

        texts = [x for x in inputs if isinstance(x, str)]
        ids_of = iter(svc.scorer.tokenizer(texts, add_special_tokens=add_special)["input_ids"]) if texts else iter(())
        out = []
        for i, x in enumerate(inputs):
            ids = list(next(ids_of)) if isinstance(x, str) else x
            name = f"input[{i}]" if len(inputs) > 1 else "input"
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError(422, f"{name}: token id {bad} is outside the tokenizer's {vocab} tokens")
            if encoder.max_length is not None and len(ids) > encoder.max_length:
                raise RequestError(
                    400,
                    f"{name}: {len(ids)} tokens, more than the model's maximum context length ({encoder.max_length})",
                )
            svc.check_length(name, len(ids))
            out.append(Encoded(ids, [k for k, t in enumerate(ids) if t == encoder.tag_id], 0))
        return out

    encoded: list[Any] = []

    def keep() -> list[Any]:
        encoded.extend(encode())
        return encoded

    results = await svc.batcher.score(keep, len(inputs))
    svc.metrics.scored(results)
    tokens = sum(len(e.input_ids) for e in encoded)
    return {
        "id": f"pool-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": obj.get("model") if isinstance(obj.get("model"), str) else svc.name,
        "data": [
            {"index": i, "object": "pooling", "data": [[1.0 - p, p] for p in r.scores]} for i, r in enumerate(results)
        ],
        "usage": {
            "prompt_tokens": tokens,
            "total_tokens": tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        },
    }
