"""prmkit: train, evaluate, score and publish process-supervised reward models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "StepScorer"]


def __getattr__(name: str):
    # Importing torch and transformers takes seconds; `prmkit --help` should not pay for it.
    if name == "StepScorer":
        from prmkit.scoring import StepScorer

        return StepScorer
    raise AttributeError(f"module 'prmkit' has no attribute {name!r}")
