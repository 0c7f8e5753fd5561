"""verl: an async ``compute_score`` with step scores, and step rewards at the step-end tokens (dense ``rm_scores``).

In a file named by verl's ``custom_reward_function.path`` (with ``custom_reward_function.name=compute_score``)::

    from prmkit.serve.adapters.verl import compute_score_fn
    compute_score = compute_score_fn("http://localhost:8000")

verl passes ``data_source``, ``solution_str`` (the decoded response), ``ground_truth`` and ``extra_info``; the
problem is read from ``extra_info`` (``question``, ``prompt`` or ``problem``, as verl's data preprocessing writes
it). The answer is ``{"score": reward, "step_scores": [...], "truncated": bool, "num_steps": n}``; verl puts
``score`` at the response's last token and logs the other keys.

Dense rewards: :func:`step_end_tokens` gives the index in the response's token ids of the token that ends each step,
and :func:`dense_scores` a row of ``len(response_ids)`` holding each step's score there and 0 elsewhere, which is
what verl's ``rm_scores`` (batch x response length) holds for a reward model scored token by token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prmkit.serve.adapters.backend import connect

PROBLEM_KEYS = ("question", "prompt", "problem")


def compute_score_fn(
    model: Any,
    *,
    aggregate: str | None = None,
    truncated: str | None = None,
    step_separator: str | None = None,
    api_key: str | None = None,
    problem_keys: Sequence[str] = PROBLEM_KEYS,
    **load: Any,
) -> Callable[..., Awaitable[dict]]:
    """verl's ``compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs)``, async."""
    backend = connect(
        model, aggregate=aggregate, truncated=truncated, step_separator=step_separator, api_key=api_key, **load
    )

    async def compute_score(
        data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        info = extra_info if isinstance(extra_info, dict) else {}
        problem = next((info[k] for k in problem_keys if isinstance(info.get(k), str)), "")
        scored = (await backend.ascore([(problem, solution_str)]))[0]
        return {
            "score": scored.reward,
            "step_scores": scored.step_scores,
            "truncated": scored.truncated,
            "num_steps": len(scored.steps),
        }

    compute_score.backend = backend  # type: ignore[attr-defined]  # the settings in use, for callers to read
    return compute_score


def step_ends(solution_str: str, separator: str, strip: bool = False) -> list[int]:
    """The character offset just past each step of ``solution_str``, as the adapters cut it into steps."""
    ends, start = [], 0
    for piece in solution_str.split(separator):
        text = piece.strip() if strip else piece
        if text.strip():
            ends.append(start + piece.index(text) + len(text))
        start += len(piece) + len(separator)
    return ends


def step_end_tokens(
    solution_str: str, response_ids: Sequence[int], tokenizer: Any, separator: str, strip: bool = False
) -> list[int]:
    """For each step, the index in ``response_ids`` of the token holding its last character.

    The offsets come from decoding prefixes of ``response_ids`` (a binary search per step), so the positions are
    those of the policy's own tokens, not of a re-tokenization of the text.
    """
    ids = list(response_ids)

    def decoded(n: int) -> int:
        return len(tokenizer.decode(ids[:n], skip_special_tokens=False))

    positions, low = [], 0
    for end in step_ends(solution_str, separator, strip):
        lo, hi = low, len(ids)
        while lo < hi:  # the fewest tokens whose text reaches `end`
            mid = (lo + hi) // 2
            if decoded(mid + 1) >= end:
                hi = mid
            else:
                lo = mid + 1
        position = min(lo, len(ids) - 1)
        positions.append(position)
        low = position
    return positions


def dense_scores(step_scores: Sequence[float | None], positions: Sequence[int], length: int) -> list[float]:
    """A row of ``length`` zeros with each step's score at its step-end token (an unscored step adds 0)."""
    row = [0.0] * length
    for score, position in zip(step_scores, positions, strict=False):
        if score is not None and 0 <= position < length:
            row[position] += score
    return row
