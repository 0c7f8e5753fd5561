"""Evaluation reports: JSON, Markdown and terminal tables; the PNG plots are in :mod:`prmkit.evaluation.plots`.

A report is a plain dict, the same shape for one model and for several (``prmkit/schemas/report.schema.json``
writes it down; :func:`make_report` builds it)::

    {
        "report_version": 1,
        "prmkit_version": str,
        "model": str,                     # the first (or only) model: its figures fill the top level
        "threshold": float,
        "threshold_source": str,          # how the threshold was chosen
        "subsets": {
            NAME: {
                "step": {...},            # prmkit.metrics.step_metrics
                "by_position": [...],     # prmkit.metrics.accuracy_by_position
                "first_error": {...},     # optional, first_error_metrics
                "outcome": {...},         # optional, outcome_metrics
                "best_of_n": {...},       # optional, best_of_n
            },
        },
        "mean_f1": float | None,          # unweighted over the subsets that have a first-error F1
        "mean_f1_subsets": [NAME, ...],   # the subsets averaged
        "mean_f1_left_out": {NAME: why},  # the others, with the reason (e.g. no erroneous samples)
        "models": {MODEL: {"model", "threshold", "threshold_source", "subsets", "mean_f1", ...}, ...},
    }

``models`` holds every model's figures in the order given, the first included, so a reader of one model's report
reads the top level and a comparison iterates ``models``; with several models the Markdown and terminal tables put
them side by side.

Raw step scores are not part of the report (they would bloat
``report.json``); the plots that need them take them through ``raw``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prmkit.errors import PrmkitError

if TYPE_CHECKING:
    pass


__all__ = ["REPORT_VERSION", "MissingExtraError", "make_report", "report_schema"]


REPORT_VERSION = 1


"""The version of ``prmkit/schemas/report.schema.json`` that :func:`make_report` follows."""


MODEL_KEYS = (
    "model",
    "threshold",
    "threshold_source",
    "subsets",
    "mean_f1",
    "mean_f1_subsets",
    "mean_f1_left_out",
    "tokenization",
    "differs_from_training",
)


class MissingExtraError(PrmkitError, RuntimeError):
    """An optional dependency (a pip "extra") is not installed.

    A ``PrmkitError``, so the CLI reports it as one line (exit 1) instead of
    a traceback; still a ``RuntimeError`` for callers that catch that.
    """

    def __init__(
        self,
        message: str = "plots need matplotlib: pip install 'prmkit[plot]'",
        hint: str | None = "or pass --no-plots to skip them",
    ) -> None:
        super().__init__(message, hint=hint)


def make_report(model_reports: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The report for one model or several: the first model's figures on top, every model's in ``models``.

    Each value of ``model_reports`` holds one model's ``model``, ``threshold``, ``threshold_source``, ``subsets``,
    ``mean_f1`` and optionally ``tokenization``; other keys are left out (the schema admits no others).
    """
    from prmkit.core.version import __version__

    if not model_reports:
        raise ValueError("a report needs at least one model")
    models = {str(name): {k: rep[k] for k in MODEL_KEYS if k in rep} for name, rep in model_reports.items()}
    first = next(iter(models.values()))
    return {"report_version": REPORT_VERSION, "prmkit_version": __version__, **first, "models": models}


def report_schema() -> dict[str, Any]:
    """The JSON Schema every ``report.json`` follows (``prmkit/schemas/report.schema.json``)."""
    from importlib.resources import files

    return json.loads((files("prmkit") / "schemas" / "report.schema.json").read_text(encoding="utf-8"))


def _is_multi(report: Mapping[str, Any]) -> bool:
    # One entry in `models` is the top level again; a report without a top level (before report_version 1) compared.
    models = report.get("models")
    return isinstance(models, Mapping) and (len(models) > 1 or "subsets" not in report)


def _model_reports(report: Mapping[str, Any]) -> list[tuple[str | None, Mapping[str, Any]]]:
    if _is_multi(report):
        models = report["models"]
        if not models:
            raise ValueError("report['models'] is empty")
        return [(str(name), sub) for name, sub in models.items()]
    if "subsets" not in report:
        raise ValueError("report has neither 'subsets' nor 'models'")
    return [(None, report)]


def _subsets(report: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    subsets = report.get("subsets")
    if subsets is None:
        return {}
    if not isinstance(subsets, Mapping):
        raise ValueError("report['subsets'] must be a mapping of subset name -> metrics")
    return subsets


def _subset_names(reports: Iterable[Mapping[str, Any]]) -> list[str]:
    # Union in first-seen order, so the order the evaluation ran in is kept.
    names: dict[str, None] = {}
    for rep in reports:
        for name in _subsets(rep):
            names.setdefault(str(name), None)
    return list(names)


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj
