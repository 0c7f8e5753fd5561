"""Scoring: the engine (p(step correct) for every step, one forward pass per solution) and `prmkit score`'s job.

- :mod:`prmkit.scoring.engine`: :class:`StepScorer`, device and dtype resolution, model identity.
- :mod:`prmkit.scoring.job`: reading records, :func:`score_file` with its resumable output and state.
"""

from prmkit.scoring.engine import (
    DTYPES,
    StepScorer,
    StepScores,
    default_batch_tokens,
    end_distributed,
    model_identity,
)
from prmkit.scoring.job import InputSource, ScoreCounts, ScoreSummary, output_paths, score_file

__all__ = [
    "DTYPES",
    "InputSource",
    "ScoreCounts",
    "ScoreSummary",
    "StepScorer",
    "StepScores",
    "default_batch_tokens",
    "end_distributed",
    "model_identity",
    "output_paths",
    "score_file",
]
