"""Evaluation reports: JSON, Markdown and terminal tables; the PNG plots are in :mod:`prmkit.plots`.

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
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prmkit.atomic import write_atomic
from prmkit.redact import mask, redact
from prmkit.errors import PrmkitError
from prmkit.jsonio import dumps, finite
from prmkit.metrics import AGGREGATES

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["REPORT_VERSION", "MissingExtraError", "build_markdown", "make_report", "report_schema", "rich_tables",
           "write_report"]

REPORT_VERSION = 1
"""The version of ``prmkit/schemas/report.schema.json`` that :func:`make_report` follows."""
MODEL_KEYS = ("model", "threshold", "threshold_source", "subsets", "mean_f1", "mean_f1_subsets", "mean_f1_left_out",
              "tokenization", "differs_from_training")


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


# --------------------------------------------------------------------------
# report shape helpers


def make_report(model_reports: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The report for one model or several: the first model's figures on top, every model's in ``models``.

    Each value of ``model_reports`` holds one model's ``model``, ``threshold``, ``threshold_source``, ``subsets``,
    ``mean_f1`` and optionally ``tokenization``; other keys are left out (the schema admits no others).
    """
    from prmkit import __version__

    if not model_reports:
        raise ValueError("a report needs at least one model")
    models = {str(name): {k: rep[k] for k in MODEL_KEYS if k in rep} for name, rep in model_reports.items()}
    first = next(iter(models.values()))
    return {"report_version": REPORT_VERSION, "prmkit_version": __version__, **first, "models": models}


def report_schema() -> dict[str, Any]:
    """The JSON Schema every ``report.json`` follows (``prmkit/schemas/report.schema.json``)."""
    from importlib.resources import files

    return json.loads(files("prmkit").joinpath("schemas", "report.schema.json").read_text(encoding="utf-8"))


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


def _model_label(model: Any) -> str:
    if model is None:
        return "unknown"
    if isinstance(model, (list, tuple)):
        return ", ".join(str(m) for m in model)
    return str(model)


# --------------------------------------------------------------------------
# formatting


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_threshold(value: Any) -> str:
    # Tuned thresholds can be midpoints such as 0.4875; don't round them away.
    return "n/a" if value is None else f"{float(value):.4g}"


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    header = [_md_cell(h) for h in header]
    # Right-aligned numbers line up on the decimal point.
    align = align or ("l" + "r" * (len(header) - 1))
    rule = [":---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Metric:
    label: str
    path: tuple[str, ...]
    better: str | None = "high"  # "high", "low" or None (no "best")
    digits: int = 3


_BON_LABELS = {
    "min": "Best-of-N by min",
    "prod": "Best-of-N by prod",
    "last": "Best-of-N by last",
    "mean": "Best-of-N by mean",
}

# One list drives both the Markdown and the terminal comparison, so the two
# never drift apart.
_HEADLINE: tuple[_Metric, ...] = (
    _Metric("Steps", ("step", "n"), None),
    _Metric("Step accuracy", ("step", "accuracy")),
    _Metric("Correct-step F1", ("step", "correct_f1")),
    _Metric("Wrong-step F1", ("step", "wrong_f1")),
    _Metric("PRMScore", ("step", "prm_score")),
    _Metric("AUROC", ("step", "auroc")),
    _Metric("Log-loss", ("step", "log_loss"), "low", 4),
    _Metric("Brier", ("step", "brier"), "low", 4),
    _Metric("ECE", ("step", "ece"), "low", 4),
    _Metric("First-error acc. (erroneous)", ("first_error", "error_accuracy")),
    _Metric("First-error acc. (correct)", ("first_error", "correct_accuracy")),
    _Metric("First-error F1", ("first_error", "f1")),
    _Metric("Outcome accuracy", ("outcome", "accuracy")),
    _Metric("Outcome F1", ("outcome", "f1")),
    *(_Metric(_BON_LABELS[a], ("best_of_n", a)) for a in AGGREGATES),
    _Metric("Best-of-N majority vote", ("best_of_n", "majority_vote"), None),
    _Metric("Best-of-N random pick", ("best_of_n", "random"), None),
    _Metric("Best-of-N pass@N", ("best_of_n", "pass_at_n"), None),
)

# Columns of the one-row-per-subset summary; the full list is too wide.
_SUMMARY: tuple[_Metric, ...] = (
    _Metric("Steps", ("step", "n"), None),
    _Metric("Accuracy", ("step", "accuracy")),
    _Metric("Correct F1", ("step", "correct_f1")),
    _Metric("Wrong F1", ("step", "wrong_f1")),
    _Metric("PRMScore", ("step", "prm_score")),
    _Metric("AUROC", ("step", "auroc")),
    _Metric("ECE", ("step", "ece"), "low", 4),
    _Metric("First-error F1", ("first_error", "f1")),
    _Metric("Outcome F1", ("outcome", "f1")),
)


def _best_indices(values: Sequence[Any], better: str | None) -> set[int]:
    nums = [(i, v) for i, v in enumerate(values) if isinstance(v, (int, float)) and v is not None]
    if better is None or len(nums) < 2:
        return set()
    distinct = {v for _, v in nums}
    if len(distinct) < 2:
        return set()  # everyone equal: marking all of them says nothing
    target = max(distinct) if better == "high" else min(distinct)
    return {i for i, v in nums if v == target}


def _comparison_rows(
    subs: Sequence[Mapping[str, Any] | None],
    metrics: Sequence[_Metric],
    mark: Callable[[str], str],
) -> list[list[str]]:
    rows = []
    for metric in metrics:
        values = [_get(s, *metric.path) if s is not None else None for s in subs]
        if all(v is None for v in values):
            continue
        best = _best_indices(values, metric.better)
        cells = [_fmt(v, metric.digits) for v in values]
        cells = [mark(c) if i in best else c for i, c in enumerate(cells)]
        rows.append([metric.label, *cells])
    return rows


# --------------------------------------------------------------------------
# Markdown


def _h(level: int, text: str) -> str:
    return "#" * min(level, 6) + " " + text


def _mean_f1_line(rep: Mapping[str, Any]) -> str:
    """The mean first-error F1 and what it covers: a mean that silently averaged fewer subsets would mislead."""
    text = _fmt(rep.get("mean_f1"))
    left_out = rep.get("mean_f1_left_out") or {}
    if not left_out:
        return text
    covered = rep.get("mean_f1_subsets") or []
    over = f" over {', '.join(map(str, covered))} only" if covered else ""
    return f"{text}{over}; left out: {_left_out(rep)}"


def _left_out(rep: Mapping[str, Any]) -> str:
    return "; ".join(f"{name} ({why})" for name, why in (rep.get("mean_f1_left_out") or {}).items()) or "none"


def _threshold_line(rep: Mapping[str, Any]) -> str:
    source = rep.get("threshold_source") or "not recorded"
    return f"{_fmt_threshold(rep.get('threshold'))} (chosen by: {source})"


def _md_subset(name: str, sub: Mapping[str, Any], level: int) -> list[str]:
    out = [_h(level, f"Subset: {name}")]
    step = sub.get("step")
    if isinstance(step, Mapping):
        out.append(_h(level + 1, "Step level"))
        soft = " (soft targets)" if step.get("soft_targets") else ""
        out.append(
            _md_table(
                ["Metric", "Value"],
                [
                    ["Steps (correct / wrong)", f"{_fmt(step.get('n'))} "
                     f"({_fmt(step.get('n_correct'))} / {_fmt(step.get('n_wrong'))})"],
                    ["Accuracy", _fmt(step.get("accuracy"))],
                    ["PRMScore (mean of the two F1s)", _fmt(step.get("prm_score"))],
                    ["AUROC", _fmt(step.get("auroc"))],
                    [f"Log-loss{soft}", _fmt(step.get("log_loss"), 4)],
                    [f"Brier{soft}", _fmt(step.get("brier"), 4)],
                    ["ECE", _fmt(step.get("ece"), 4)],
                ],
            )
        )
        out.append(
            _md_table(
                ["Class", "Precision", "Recall", "F1"],
                [
                    ["Correct steps", *(_fmt(step.get(f"correct_{k}")) for k in ("precision", "recall", "f1"))],
                    ["Wrong steps", *(_fmt(step.get(f"wrong_{k}")) for k in ("precision", "recall", "f1"))],
                ],
            )
        )
        conf = step.get("confusion")
        if isinstance(conf, Mapping):
            out.append(
                _md_table(
                    ["Confusion (steps)", "Predicted correct", "Predicted wrong"],
                    [
                        ["Labelled correct", _fmt(conf.get("tp")), _fmt(conf.get("fn"))],
                        ["Labelled wrong", _fmt(conf.get("fp")), _fmt(conf.get("tn"))],
                    ],
                )
            )

    by_pos = sub.get("by_position")
    if by_pos:
        out.append(_h(level + 1, "Step accuracy by position"))
        out.append(
            _md_table(
                ["Step", "Steps", "Accuracy"],
                [[r.get("position"), _fmt(r.get("n")), _fmt(r.get("accuracy"))] for r in by_pos],
            )
        )

    fe = sub.get("first_error")
    if isinstance(fe, Mapping):
        out.append(_h(level + 1, "First error (ProcessBench)"))
        out.append(
            _md_table(
                ["Acc. on erroneous", "Acc. on correct", "F1", "Erroneous samples", "Correct samples"],
                [[_fmt(fe.get("error_accuracy")), _fmt(fe.get("correct_accuracy")),
                  _fmt(fe.get("f1")), _fmt(fe.get("n_error")), _fmt(fe.get("n_correct"))]],
                align="rrrrr",
            )
        )
        if fe.get("f1") is None and fe.get("f1_undefined"):
            out.append(f"F1 undefined: {fe['f1_undefined']}; this subset is left out of the mean.")

    oc = sub.get("outcome")
    if isinstance(oc, Mapping):
        out.append(_h(level + 1, "Outcome (solution judged correct when every step passes)"))
        out.append(
            _md_table(
                ["Accuracy", "Precision", "Recall", "F1", "Solutions"],
                [[_fmt(oc.get("accuracy")), _fmt(oc.get("precision")), _fmt(oc.get("recall")),
                  _fmt(oc.get("f1")), _fmt(oc.get("n"))]],
                align="rrrrr",
            )
        )

    bon = sub.get("best_of_n")
    if isinstance(bon, Mapping):
        out.append(_h(level + 1, "Best-of-N"))
        out.append(
            f"{_fmt(bon.get('n_problems'))} problems, {_fmt(bon.get('n'), 2)} candidates each; "
            "ties go to the first candidate."
        )
        rows = [[f"PRM {a}", _fmt(bon.get(a))] for a in AGGREGATES]
        rows += [
            ["Majority vote", _fmt(bon.get("majority_vote"))],
            ["Random pick (expected)", _fmt(bon.get("random"))],
            ["pass@N (upper bound)", _fmt(bon.get("pass_at_n"))],
        ]
        out.append(_md_table(["Selection", "Accuracy"], rows))
        curve = bon.get("curve")
        if curve:
            cols = [*AGGREGATES, "majority_vote", "random", "pass"]
            names = [*AGGREGATES, "majority", "random", "pass@k"]
            out.append(
                _md_table(
                    ["k", *names],
                    [[_fmt(r.get("k")), *(_fmt(r.get(c)) for c in cols)] for r in curve],
                    align="r" * (len(cols) + 1),
                )
            )
    return out


def _md_single_body(rep: Mapping[str, Any], level: int) -> list[str]:
    subsets = _subsets(rep)
    out: list[str] = []
    differs = rep.get("differs_from_training")
    if isinstance(differs, Mapping) and differs:
        # Settings chosen over the model's prmkit.json: say so where the figures are, not only on stderr.
        out.append("**Not the trained tokenization:** " + "; ".join(
            f"`{key}` {json.dumps(d.get('used'))} (trained with {json.dumps(d.get('trained'))})"
            for key, d in differs.items() if isinstance(d, Mapping)) + ".")
    if subsets:
        subs = list(subsets.values())
        metrics = [m for m in _SUMMARY if any(_get(s, *m.path) is not None for s in subs)]
        out.append(_h(level, "Summary"))
        out.append(
            _md_table(
                ["Subset", *(m.label for m in metrics)],
                [[name, *(_fmt(_get(s, *m.path)) for m in metrics)] for name, s in subsets.items()],
            )
        )
    for name, sub in subsets.items():
        out.extend(_md_subset(str(name), sub, level))
    return out


def _md_preamble(multi: bool) -> str:
    lines = [
        "Rates are fractions in [0, 1]. A step counts as correct when its label is >= 0.5, "
        "and is predicted correct when its score is >= the threshold."
    ]
    if multi:
        lines.append("**Bold** marks the best model on a row where one is better.")
    return " ".join(lines)


def build_markdown(report: Mapping[str, Any]) -> str:
    """Render a report (single model or ``{"models": ...}``) as Markdown."""
    entries = _model_reports(report)
    out: list[str] = []
    if not _is_multi(report):
        rep = entries[0][1]
        out.append(_h(1, "PRM evaluation report"))
        facts = [
            f"- **Model:** `{_model_label(rep.get('model'))}`",
            f"- **Threshold:** {_threshold_line(rep)}",
        ]
        if "mean_f1" in rep:
            facts.append(
                "- **Mean first-error F1** (unweighted over subsets, as in ProcessBench): "
                f"{_mean_f1_line(rep)}"
            )
        out.append("\n".join(facts))
        out.append(_md_preamble(multi=False))
        out.extend(_md_single_body(rep, level=2))
        return "\n\n".join(out) + "\n"

    names = [name for name, _ in entries]
    reps = [rep for _, rep in entries]
    out.append(_h(1, "PRM evaluation report: model comparison"))
    out.append(_md_preamble(multi=True))
    out.append(_h(2, "Models"))
    mean_f1s = [r.get("mean_f1") for r in reps]
    best = _best_indices(mean_f1s, "high")
    out.append(
        _md_table(
            ["", *names],
            [
                ["Model id", *(f"`{_model_label(r.get('model', n))}`" for n, r in zip(names, reps))],
                ["Threshold", *(_fmt_threshold(r.get("threshold")) for r in reps)],
                ["Threshold chosen by", *(r.get("threshold_source") or "not recorded" for r in reps)],
                ["Mean first-error F1 (unweighted)",
                 *(f"**{_fmt(v)}**" if i in best else _fmt(v) for i, v in enumerate(mean_f1s))],
                *([["Mean F1 leaves out", *(_left_out(r) for r in reps)]]
                  if any(r.get("mean_f1_left_out") for r in reps) else []),
            ],
        )
    )
    for subset in _subset_names(reps):
        subs = [_subsets(r).get(subset) for r in reps]
        rows = _comparison_rows(subs, _HEADLINE, lambda s: f"**{s}**")
        out.append(_h(2, f"Subset: {subset}"))
        out.append(_md_table(["Metric", *names], rows) if rows else "No figures.")
    for name, rep in entries:
        out.append(_h(2, f"Details: {name}"))
        out.append(f"Threshold {_threshold_line(rep)}.")
        out.extend(_md_single_body(rep, level=3))
    return "\n\n".join(out) + "\n"


# --------------------------------------------------------------------------
# rich


def rich_tables(report: Mapping[str, Any]) -> list[Table]:
    """Terminal tables for a report; the caller prints them."""
    from rich.markup import escape
    from rich.table import Table

    entries = _model_reports(report)

    if _is_multi(report):
        names = [name for name, _ in entries]
        reps = [rep for _, rep in entries]
        tables = []
        head = Table(title="Models")
        head.add_column("")
        for n in names:
            head.add_column(escape(n), justify="right")
        mean_f1s = [r.get("mean_f1") for r in reps]
        best = _best_indices(mean_f1s, "high")
        head.add_row("Threshold", *(_fmt_threshold(r.get("threshold")) for r in reps))
        head.add_row("Chosen by", *(escape(str(r.get("threshold_source") or "not recorded")) for r in reps))
        head.add_row(
            "Mean first-error F1",
            *(f"[bold]{_fmt(v)}[/bold]" if i in best else _fmt(v) for i, v in enumerate(mean_f1s)),
        )
        if any(r.get("mean_f1_left_out") for r in reps):
            head.add_row("Mean F1 leaves out", *(escape(_left_out(r)) for r in reps))
        tables.append(head)
        for subset in _subset_names(reps):
            subs = [_subsets(r).get(subset) for r in reps]
            table = Table(title=escape(f"Subset: {subset}"))
            table.add_column("Metric")
            for n in names:
                table.add_column(escape(n), justify="right")
            for row in _comparison_rows(subs, _HEADLINE, lambda s: f"[bold]{s}[/bold]"):
                table.add_row(*row)
            tables.append(table)
        return tables

    rep = entries[0][1]
    subsets = _subsets(rep)
    caption = f"threshold {_threshold_line(rep)}"
    tables = []

    subs = list(subsets.values())
    step_metrics = [m for m in _SUMMARY if m.path[0] == "step" and any(_get(s, *m.path) is not None for s in subs)]
    table = Table(title=escape(f"Step level: {_model_label(rep.get('model'))}"), caption=escape(caption))
    table.add_column("Subset")
    for m in step_metrics:
        table.add_column(m.label, justify="right")
    for name, s in subsets.items():
        table.add_row(escape(str(name)), *(_fmt(_get(s, *m.path)) for m in step_metrics))
    tables.append(table)

    with_fe = [(n, s["first_error"]) for n, s in subsets.items() if isinstance(s.get("first_error"), Mapping)]
    if with_fe:
        table = Table(
            title="First error (ProcessBench)",
            caption=escape(f"mean F1 (unweighted): {_mean_f1_line(rep)}"),
        )
        for col in ("Subset", "Acc. erroneous", "Acc. correct", "F1", "Erroneous", "Correct"):
            table.add_column(col, justify="left" if col == "Subset" else "right")
        for n, fe in with_fe:
            table.add_row(
                escape(str(n)),
                *(_fmt(fe.get(k)) for k in ("error_accuracy", "correct_accuracy", "f1", "n_error", "n_correct")),
            )
        tables.append(table)

    with_oc = [(n, s["outcome"]) for n, s in subsets.items() if isinstance(s.get("outcome"), Mapping)]
    if with_oc:
        table = Table(title="Outcome")
        for col in ("Subset", "Accuracy", "Precision", "Recall", "F1", "Solutions"):
            table.add_column(col, justify="left" if col == "Subset" else "right")
        for n, oc in with_oc:
            table.add_row(
                escape(str(n)), *(_fmt(oc.get(k)) for k in ("accuracy", "precision", "recall", "f1", "n"))
            )
        tables.append(table)

    with_bon = [(n, s["best_of_n"]) for n, s in subsets.items() if isinstance(s.get("best_of_n"), Mapping)]
    if with_bon:
        table = Table(title="Best-of-N accuracy")
        cols = ["Subset", "N", *AGGREGATES, "Majority", "Random", "pass@N"]
        for col in cols:
            table.add_column(col, justify="left" if col == "Subset" else "right")
        for n, bon in with_bon:
            table.add_row(
                escape(str(n)),
                _fmt(bon.get("n"), 2),
                *(_fmt(bon.get(a)) for a in AGGREGATES),
                _fmt(bon.get("majority_vote")),
                _fmt(bon.get("random")),
                _fmt(bon.get("pass_at_n")),
            )
        tables.append(table)
    return tables


# --------------------------------------------------------------------------
# files


def _is_raw_leaf(value: Any) -> bool:
    return isinstance(value, Mapping) and "scores" in value and not isinstance(value["scores"], Mapping)


def _raw_by_model(
    report: Mapping[str, Any], raw: Mapping[str, Any] | None
) -> dict[str | None, Mapping[str, Mapping[str, Sequence[float]]]]:
    if not raw:
        return {}
    if _is_multi(report):
        if any(_is_raw_leaf(v) for v in raw.values()):
            raise ValueError("for a multi-model report, raw must map model -> subset -> {scores, targets}")
        out = {str(m): v for m, v in raw.items()}
    else:
        out = {None: raw}
    for per_subset in out.values():
        for subset, leaf in per_subset.items():
            if not _is_raw_leaf(leaf) or "targets" not in leaf:
                raise ValueError(f"raw[{subset!r}] must be a mapping with 'scores' and 'targets'")
            if len(leaf["scores"]) != len(leaf["targets"]):
                raise ValueError(f"raw[{subset!r}]: scores and targets differ in length")
    return out


def write_report(
    report: Mapping[str, Any],
    out_dir: Path,
    plots: bool = True,
    raw: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``report.json``, ``report.md`` and (with ``plots``) PNG plots.

    ``raw`` carries the step scores the distribution plots need and the JSON
    leaves out: ``{subset: {"scores": [...], "targets": [...]}}``, or for a
    multi-model report ``{model: {subset: {...}}}``. Plots written:

    - ``accuracy_by_position.png`` when any subset has ``by_position`` rows;
    - ``reliability.png`` and ``score_histogram.png`` when ``raw`` is given;
    - ``best_of_n.png`` when any subset has ``best_of_n``.

    Every file is written atomically. Returns the written paths. Raises
    ``MissingExtraError`` before writing anything when ``plots`` is true and
    matplotlib is not installed; ``plots=False`` needs no matplotlib.
    """
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise MissingExtraError() from exc
    out_dir = Path(out_dir)
    raw_models = _raw_by_model(report, raw)  # validate before touching the disk
    report = redact(finite(report))  # a model or data spec may be a URL with credentials in it
    markdown = build_markdown(report)
    payload = dumps(report, indent=2) + "\n"

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("report.json", payload), ("report.md", markdown)):
        path = out_dir / name
        write_atomic(path, text.encode("utf-8"))
        written.append(path)
    if plots:
        from prmkit.plots import write_plots

        # The plots show the saved (redacted) model names; raw scores follow them.
        raw_models = {mask(k) if isinstance(k, str) else k: v for k, v in raw_models.items()}
        written.extend(write_plots(report, out_dir, raw_models))
    return written
