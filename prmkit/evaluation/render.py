"""A report as Markdown (``report.md``) and as rich tables for the terminal; one model or several side by side."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prmkit.evaluation.report import _get, _is_multi, _model_reports, _subset_names, _subsets
from prmkit.metrics import AGGREGATES

if TYPE_CHECKING:
    from rich.table import Table


def _model_label(model: Any) -> str:
    if model is None:
        return "unknown"
    if isinstance(model, (list, tuple)):
        return ", ".join(str(m) for m in model)
    return str(model)


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
    subs: Sequence[Mapping[str, Any] | None], metrics: Sequence[_Metric], mark: Callable[[str], str]
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
    for section in (_md_step, _md_by_position, _md_first_error, _md_outcome, _md_best_of_n):
        out += section(sub, level + 1)
    return out


def _md_step(sub: Mapping[str, Any], level: int) -> list[str]:
    """Step-level metrics: the headline table, per class, and the confusion matrix."""
    out: list[str] = []
    step = sub.get("step")
    if isinstance(step, Mapping):
        out.append(_h(level, "Step level"))
        soft = " (soft targets)" if step.get("soft_targets") else ""
        out.append(
            _md_table(
                ["Metric", "Value"],
                [
                    [
                        "Steps (correct / wrong)",
                        f"{_fmt(step.get('n'))} ({_fmt(step.get('n_correct'))} / {_fmt(step.get('n_wrong'))})",
                    ],
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
    return out


def _md_by_position(sub: Mapping[str, Any], level: int) -> list[str]:
    """Step accuracy by the step's position in its solution."""
    out: list[str] = []
    by_pos = sub.get("by_position")
    if by_pos:
        out.append(_h(level, "Step accuracy by position"))
        out.append(
            _md_table(
                ["Step", "Steps", "Accuracy"],
                [[r.get("position"), _fmt(r.get("n")), _fmt(r.get("accuracy"))] for r in by_pos],
            )
        )
    return out


def _md_first_error(sub: Mapping[str, Any], level: int) -> list[str]:
    """ProcessBench's first-error accuracies and F1."""
    out: list[str] = []
    fe = sub.get("first_error")
    if isinstance(fe, Mapping):
        out.append(_h(level, "First error (ProcessBench)"))
        out.append(
            _md_table(
                ["Acc. on erroneous", "Acc. on correct", "F1", "Erroneous samples", "Correct samples"],
                [
                    [
                        _fmt(fe.get("error_accuracy")),
                        _fmt(fe.get("correct_accuracy")),
                        _fmt(fe.get("f1")),
                        _fmt(fe.get("n_error")),
                        _fmt(fe.get("n_correct")),
                    ]
                ],
                align="rrrrr",
            )
        )
        if fe.get("f1") is None and fe.get("f1_undefined"):
            out.append(f"F1 undefined: {fe['f1_undefined']}; this subset is left out of the mean.")
    return out


def _md_outcome(sub: Mapping[str, Any], level: int) -> list[str]:
    """Solution-level outcome: judged correct when every step passes."""
    out: list[str] = []
    oc = sub.get("outcome")
    if isinstance(oc, Mapping):
        out.append(_h(level, "Outcome (solution judged correct when every step passes)"))
        out.append(
            _md_table(
                ["Accuracy", "Precision", "Recall", "F1", "Solutions"],
                [
                    [
                        _fmt(oc.get("accuracy")),
                        _fmt(oc.get("precision")),
                        _fmt(oc.get("recall")),
                        _fmt(oc.get("f1")),
                        _fmt(oc.get("n")),
                    ]
                ],
                align="rrrrr",
            )
        )
    return out


def _md_best_of_n(sub: Mapping[str, Any], level: int) -> list[str]:
    """Best-of-N selection accuracy per aggregate, and its curve over k."""
    out: list[str] = []
    bon = sub.get("best_of_n")
    if isinstance(bon, Mapping):
        out.append(_h(level, "Best-of-N"))
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
        out.append(
            "**Not the trained tokenization:** "
            + "; ".join(
                f"`{key}` {json.dumps(d.get('used'))} (trained with {json.dumps(d.get('trained'))})"
                for key, d in differs.items()
                if isinstance(d, Mapping)
            )
            + "."
        )
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
        facts = [f"- **Model:** `{_model_label(rep.get('model'))}`", f"- **Threshold:** {_threshold_line(rep)}"]
        if "mean_f1" in rep:
            facts.append(
                f"- **Mean first-error F1** (unweighted over subsets, as in ProcessBench): {_mean_f1_line(rep)}"
            )
        out.append("\n".join(facts))
        out.append(_md_preamble(multi=False))
        out.extend(_md_single_body(rep, level=2))
        return "\n\n".join(out) + "\n"

    names = [str(name) for name, _ in entries]  # multi: every entry is named
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
                [
                    "Mean first-error F1 (unweighted)",
                    *(f"**{_fmt(v)}**" if i in best else _fmt(v) for i, v in enumerate(mean_f1s)),
                ],
                *(
                    [["Mean F1 leaves out", *(_left_out(r) for r in reps)]]
                    if any(r.get("mean_f1_left_out") for r in reps)
                    else []
                ),
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


def rich_tables(report: Mapping[str, Any]) -> list[Table]:
    """Terminal tables for a report; the caller prints them."""
    from rich.markup import escape
    from rich.table import Table

    entries = _model_reports(report)

    if _is_multi(report):
        names = [str(name) for name, _ in entries]  # multi: every entry is named
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
        table = Table(title="First error (ProcessBench)", caption=escape(f"mean F1 (unweighted): {_mean_f1_line(rep)}"))
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
            table.add_row(escape(str(n)), *(_fmt(oc.get(k)) for k in ("accuracy", "precision", "recall", "f1", "n")))
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
