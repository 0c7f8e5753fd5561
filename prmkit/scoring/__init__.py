"""Scoring: the engine (p(step correct) for every step, one forward pass per solution) and `prmkit score`'s job.

- :mod:`prmkit.scoring.engine`: :class:`StepScorer`; :mod:`prmkit.scoring.loading`: device and dtype resolution,
  the weights and tokenizer, model identity.
- :mod:`prmkit.scoring.budget`, :mod:`prmkit.scoring.attention`, :mod:`prmkit.scoring.timings`: the engine's batch
  budget, packed attention kernels and where a run's time goes.
- :mod:`prmkit.scoring.pretrained`: the steps of ``StepScorer.from_pretrained``; :mod:`prmkit.scoring.settings`: the
  one mapping from a config to a scorer's settings (``score``, ``eval`` and :mod:`prmkit.api`).
- :mod:`prmkit.scoring.source`: the records to score; :mod:`prmkit.scoring.resume`: the state and batch journal that
  let a killed run resume to the same bytes; :mod:`prmkit.scoring.groups`: ``--group-by`` ranking (Best-of-N) while
  streaming; :mod:`prmkit.scoring.job`: :func:`score_file`, which joins them in a short loop over its steps: the job
  claim (:mod:`~prmkit.scoring.claim`), the windowed reader (:mod:`~prmkit.scoring.window`) and the resumable output
  (:mod:`~prmkit.scoring.resumable`).
"""

from prmkit.models.loading import DTYPES
from prmkit.scoring.engine import StepScorer, StepScores, default_batch_tokens, end_distributed
from prmkit.scoring.groups import GroupSpec
from prmkit.scoring.job import InputSource, ScoreCounts, ScoreSummary, output_paths, score_file
from prmkit.scoring.loading import model_identity

__all__ = [
    "DTYPES",
    "GroupSpec",
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
