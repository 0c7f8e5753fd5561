"""What a served score means: steps cut from a response, and one reward per solution.

Shared by the server and the in-process adapters, so a reward is the same whichever way it is asked for. Nothing
here imports the serve extra or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prmkit.errors import DataError
from prmkit.kinds.registry import TAG_TEXT, get_kind
from prmkit.metrics import aggregate, first_error_index

AGGREGATES = ("min", "last", "prod", "mean")
TRUNCATED = ("lowest", "read", "error")
BLANK_LINE = "\n\n"


class Truncated(DataError):
    """A solution cut by the model's max_length, under ``serve.truncated: error``."""


def response_separator(scorer: Any, configured: str | None = None) -> tuple[str, bool]:
    """Where a response is cut into steps, and whether the pieces are stripped of surrounding whitespace.

    ``configured`` (serve.step_separator) wins. Otherwise: a token-classification model's own separator (its
    prmkit.json); an lm-tag model's step tag, whose layout ``"{step} {tag}\\n"`` puts a space before the tag and a line
    break after it (hence the stripping); a blank line for the chat kinds, as Qwen2.5-Math-PRM's card cuts a response.
    """
    encoder = getattr(scorer, "kind_encoder", None)
    if configured is not None:
        return configured, False
    if encoder is None:
        return scorer.params.step_separator, False
    if get_kind(encoder.kind).layout == TAG_TEXT:  # the tag is in the text: a response is split at it
        return encoder.tag, True
    return BLANK_LINE, False


def split_response(text: str, separator: str, strip: bool = False) -> list[str]:
    """The steps of ``text``: the pieces between separators. Whitespace-only pieces are not steps: the empty
    piece before a response that opens with the separator or after one that closes with it, and a blank piece
    where a policy wrote the separator twice (a policy's output must not fail a training step)."""
    if not separator:
        raise ValueError("the step separator is empty")
    pieces = text.split(separator)
    if strip:
        pieces = [p.strip() for p in pieces]
    return [p for p in pieces if p.strip()]


def solution_reward(
    scores: Sequence[float | None], truncated: bool, how: str = "min", policy: str = "lowest", where: str = "solution"
) -> float:
    """One reward for a solution: the ``how`` aggregate of its step scores.

    A solution that ``max_length`` cut must not earn a reward from its first steps alone (a policy would learn to hide
    its wrong steps past the limit): under ``policy`` ``lowest`` it gets 0.0, under ``read`` the aggregate of the
    steps read, under ``error`` :class:`Truncated` is raised. A solution without any step scored gets 0.0.
    """
    if how not in AGGREGATES:
        raise ValueError(f"unknown aggregate {how!r}; expected one of {', '.join(AGGREGATES)}")
    if policy not in TRUNCATED:
        raise ValueError(f"unknown truncation policy {policy!r}; expected one of {', '.join(TRUNCATED)}")
    if truncated:
        if policy == "error":
            read = sum(s is not None for s in scores)
            raise Truncated(
                f"{where}: cut by the model's max_length after {read} of {len(scores)} steps",
                hint="shorten it, or serve with serve.truncated=lowest or read",
            )
        if policy == "lowest":
            return 0.0
    value = aggregate(scores)[how]
    return 0.0 if value is None else float(value)


def scored_item(
    scores: Sequence[float | None], truncated: bool, threshold: float, how: str, policy: str, where: str = "solution"
) -> dict[str, Any]:
    """An item of /v1/score: ``step_scores``, ``aggregates`` and ``first_error`` exactly as `prmkit score` writes
    them, ``truncated`` always, and the ``reward`` under the server's aggregate and truncation policy."""
    scores = list(scores)
    return {
        "step_scores": scores,
        "aggregates": aggregate(scores),
        "first_error": first_error_index(scores, threshold),
        "truncated": bool(truncated),
        "reward": solution_reward(scores, truncated, how, policy, where),
    }
