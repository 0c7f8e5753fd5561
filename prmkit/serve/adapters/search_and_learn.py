"""A ``PRM`` for Hugging Face's search-and-learn: Best-of-N, beam search and DVTS with any prmkit-readable PRM.

    from prmkit.serve.adapters.search_and_learn import PRM
    prm = PRM("http://localhost:8000")            # or PRM("runs/prm"), or PRM(scorer)
    scores = prm.score(questions, outputs)         # [question][output][step]

search-and-learn cuts a completion into steps at blank lines (``"\\n\\n"``, its default ``split_on``) and aggregates
the step scores itself (``last``, ``min``, ``prod``). A completion cut by the model's ``max_length`` must not look
good for its first steps alone: under ``truncated="lowest"`` (the default) the unread steps score 0.0, under
``"read"`` only the steps read are returned, under ``"error"`` it raises. A completion without a step scores
``[0.0]``.
"""

from __future__ import annotations

from typing import Any

from prmkit.serve.adapters.backend import connect
from prmkit.serve.policy import solution_reward


class PRM:
    def __init__(
        self,
        model: Any,
        *,
        split_on: str = "\n\n",
        truncated: str | None = None,
        api_key: str | None = None,
        **load: Any,
    ):
        self.backend = connect(model, truncated=truncated, step_separator=split_on, api_key=api_key, **load)
        self.split_on = split_on

    def score(self, questions: list[str], outputs: list[list[str]]) -> list[list[list[float]]]:
        if len(questions) != len(outputs):
            raise ValueError(f"{len(questions)} questions for {len(outputs)} lists of outputs")
        flat = [(q, self.backend.steps_of(o)) for q, outs in zip(questions, outputs, strict=True) for o in outs]
        results = iter(self.backend.score_steps(flat))
        answer = []
        n = 0
        for outs in outputs:
            row = []
            for _ in outs:
                scores, truncated = next(results)
                n += 1
                row.append(self._steps(scores, truncated, f"output {n}"))
            answer.append(row)
        return answer

    def _steps(self, scores: list[float | None], truncated: bool, where: str) -> list[float]:
        if not scores:
            return [0.0]
        solution_reward(scores, truncated, "min", self.backend.policy, where)  # raises under "error"
        if self.backend.policy == "read":
            return [s for s in scores if s is not None] or [0.0]
        return [0.0 if s is None else s for s in scores]
