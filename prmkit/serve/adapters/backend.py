"""Where the adapters get their scores: a model in this process, or a `prmkit serve` URL.

Both give the same thing for a list of ``(prompt, response)`` pairs: the response cut into steps, each step's score,
whether ``max_length`` cut the solution, and one reward under the same aggregate and truncation policy as the
server's (:mod:`prmkit.serve.policy`). A URL needs nothing beyond the standard library.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prmkit.errors import PrmkitError, UsageError
from prmkit.kinds.registry import TAG_TEXT, find_kind
from prmkit.serve.policy import AGGREGATES, TRUNCATED, response_separator, solution_reward, split_response


@dataclass
class Scored:
    """One response: its steps, their scores (None: cut by max_length), and its reward."""

    steps: list[str]
    step_scores: list[float | None]
    truncated: bool
    reward: float


class Backend:
    """Common to both: cut responses into steps, score those with steps, reward every one."""

    separator: str
    strip: bool
    aggregate: str
    policy: str

    def _scores(self, items: list[tuple[str, list[str]]]) -> list[tuple[list[float | None], bool]]:
        raise NotImplementedError

    def steps_of(self, response: str) -> list[str]:
        return split_response(response, self.separator, self.strip)

    def score_steps(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[list[float | None], bool]]:
        """(step scores, truncated) for solutions already cut into steps."""
        solutions = [(p, list(s)) for p, s in items]
        todo = [i for i, (_, steps) in enumerate(solutions) if steps]
        out: list[tuple[list[float | None], bool]] = [([], False) for _ in solutions]
        if todo:
            for i, result in zip(todo, self._scores([solutions[i] for i in todo]), strict=True):
                out[i] = result
        return out

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        """Each ``(prompt, response)`` cut into steps and scored; a response without a step earns 0.0."""
        cut = [(prompt, self.steps_of(response)) for prompt, response in pairs]
        results = self.score_steps(cut)
        return [
            Scored(
                steps,
                scores,
                truncated,
                solution_reward(scores, truncated, self.aggregate, self.policy, f"completion {n}"),
            )
            for n, ((_, steps), (scores, truncated)) in enumerate(zip(cut, results, strict=True), 1)
        ]

    async def ascore(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        return await asyncio.to_thread(self.score, list(pairs))


class LocalBackend(Backend):
    """A :class:`~prmkit.scoring.StepScorer` in this process (one forward pass at a time: calls are serialized)."""

    def __init__(
        self, scorer: Any, aggregate: str | None = None, truncated: str | None = None, step_separator: str | None = None
    ):
        self.scorer = scorer
        self.aggregate = _choice("aggregate", aggregate or "min", AGGREGATES)
        self.policy = _choice("truncated", truncated or "lowest", TRUNCATED)
        self.separator, self.strip = response_separator(scorer, step_separator)
        self._lock = threading.Lock()

    def _scores(self, items: list[tuple[str, list[str]]]) -> list[tuple[list[float | None], bool]]:
        with self._lock:
            return [(r.scores, r.truncated) for r in self.scorer.score_solutions(items)]


class RemoteBackend(Backend):
    """A `prmkit serve` URL: its /v1/score, with its separator, aggregate and truncation policy (/v1/model).

    A 503 (a full queue, a model still loading) is retried after its Retry-After, up to ``wait_s`` seconds in all.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        step_separator: str | None = None,
        timeout_s: float = 600.0,
        wait_s: float = 300.0,
    ):
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("PRMKIT_API_KEY") or None
        self.timeout_s = timeout_s
        self.wait_s = wait_s
        info = self._call("GET", "/v1/model")
        self.model = info.get("model")
        self.aggregate, self.policy = info["aggregate"], info["truncated"]
        self.separator = step_separator if step_separator is not None else info["step_separator"]
        kind = find_kind(info.get("kind"))
        self.strip = step_separator is None and kind is not None and kind.layout == TAG_TEXT

    def _scores(self, items: list[tuple[str, list[str]]]) -> list[tuple[list[float | None], bool]]:
        body = {"items": [{"prompt": p, "steps": s} for p, s in items]}
        answer = self._call("POST", "/v1/score", body)
        return [(item["step_scores"], bool(item["truncated"])) for item in answer["items"]]

    def _call(self, method: str, path: str, body: Any = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        give_up = time.monotonic() + self.wait_s
        while True:
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                message = _server_message(e)
                retry = e.headers.get("Retry-After")
                if e.code == 503 and retry and time.monotonic() + float(retry) < give_up:
                    time.sleep(float(retry))
                    continue
                raise PrmkitError(f"{self.url}{path}: {e.code}: {message}") from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise PrmkitError(
                    f"{self.url}{path}: cannot reach the server ({reason})", hint="is `prmkit serve` running there?"
                ) from None


def connect(
    model: Any,
    *,
    aggregate: str | None = None,
    truncated: str | None = None,
    step_separator: str | None = None,
    api_key: str | None = None,
    **load: Any,
) -> Backend:
    """A backend for ``model``: a loaded :class:`~prmkit.scoring.StepScorer`, a `prmkit serve` URL (http:// or
    https://), or anything :meth:`~prmkit.scoring.StepScorer.from_pretrained` loads (``load`` goes to it)."""
    if isinstance(model, Backend):
        return model
    if isinstance(model, str) and model.startswith(("http://", "https://")):
        if aggregate is not None or truncated is not None or load:
            raise UsageError(
                "a prmkit serve URL scores with the server's settings; set serve.aggregate and "
                "serve.truncated on the server instead",
                hint="leave aggregate, truncated and model loading options out for a URL",
            )
        return RemoteBackend(model, api_key=api_key, step_separator=step_separator)
    if hasattr(model, "score_solutions"):
        return LocalBackend(model, aggregate, truncated, step_separator)
    from prmkit.scoring import StepScorer

    return LocalBackend(StepScorer.from_pretrained(model, **load), aggregate, truncated, step_separator)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


def _server_message(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read())["error"]["message"]
    except Exception:  # not prmkit's error shape: say what HTTP said
        return str(error.reason)
