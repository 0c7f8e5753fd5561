"""A reward function for TRL's ``GRPOTrainer``: one process reward per completion.

    from prmkit.serve.adapters.trl import reward_function
    trainer = GRPOTrainer(model=..., reward_funcs=[reward_function("http://localhost:8000")], ...)

TRL calls it with ``prompts``, ``completions`` and ``completion_ids`` (and the dataset's other columns). Plain
completions are strings; conversational ones are lists of messages, where the prompt is the last user turn and the
response the assistant turns' text. The response is cut into steps at the model's separator (or ``step_separator``)
and the reward is the chosen aggregate of the step scores: a completion cut by ``max_length`` gets 0.0 under the
default ``truncated="lowest"``, and a completion without a step gets 0.0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prmkit.serve.adapters.backend import connect


def message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
        return "".join(texts)
    return "" if content is None else str(content)


def prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt or () if isinstance(m, dict) and m.get("role") == "user"]
    return message_text(users[-1].get("content")) if users else ""


def completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(
        message_text(m.get("content"))
        for m in completion or ()
        if isinstance(m, dict) and m.get("role", "assistant") == "assistant"
    )


def reward_function(
    model: Any,
    *,
    aggregate: str | None = None,
    truncated: str | None = None,
    step_separator: str | None = None,
    api_key: str | None = None,
    asynchronous: bool = False,
    name: str = "prmkit_prm",
    **load: Any,
) -> Callable[..., Any]:
    """TRL's reward function signature, ``(prompts, completions, completion_ids, **kwargs) -> list[float]``.

    ``model`` is a `prmkit serve` URL, a loaded :class:`~prmkit.scoring.StepScorer`, or a model to load (``load``
    goes to :meth:`~prmkit.scoring.StepScorer.from_pretrained`). ``asynchronous`` returns a coroutine function, which
    TRL runs beside its other async reward functions.
    """
    backend = connect(
        model, aggregate=aggregate, truncated=truncated, step_separator=step_separator, api_key=api_key, **load
    )

    def pairs(prompts: list[Any], completions: list[Any]) -> list[tuple[str, str]]:
        return [(prompt_text(p), completion_text(c)) for p, c in zip(prompts, completions, strict=True)]

    async def async_reward(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **kwargs: Any
    ) -> list[float]:
        return [s.reward for s in await backend.ascore(pairs(prompts, completions))]

    def sync_reward(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **kwargs: Any
    ) -> list[float]:
        return [s.reward for s in backend.score(pairs(prompts, completions))]

    reward: Any = async_reward if asynchronous else sync_reward
    reward.__name__ = reward.__qualname__ = name  # TRL names the reward's column and logs after it
    reward.backend = backend  # the adapter's scorer or URL, for callers who want the settings in use
    return reward
