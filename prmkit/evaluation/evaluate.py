"""Evaluate process reward models: read labelled subsets, score them with the scoring engine, compute the report.

The flow is ``load_subsets`` (read and validate every ``--data`` source, as ``prepare`` does) ->
``score_subsets`` (the same :class:`prmkit.scoring.StepScorer` that ``prmkit score`` uses, so the model's
``prmkit.json`` decides the tokenization) -> ``build_model_report`` (pure: metrics from scores and labels) ->
``write_outputs`` (``report.json``, ``report.md``, plots). :func:`evaluate` runs the first three for one model or
several.

What counts as what:

- **Step metrics** use every labelled step that was scored. ProcessBench rows label the steps up to and including
  the first error; steps after it carry no label, so they are scored but only feed the first-error prediction.
  Steps cut off by ``max_length`` have no score and are counted in ``n_steps_unscored``.
- **First error** (ProcessBench's ``run_eval.py``): the prediction is the first step scored below the threshold,
  or -1. The label is ProcessBench's ``label`` for ProcessBench data; for other formats it is the index of the
  first step labelled wrong (or -1) when every step of the row has a hard 0/1 label, and rows with a soft or
  missing label have none. ``first_error["labels_from"]`` says which.
- **Outcome**: solutions whose source record has ``final_answer_correct``; a solution is judged correct when
  every scored step passes the threshold.
- **Best-of-N**: rows are grouped by identical prompt text; problems with at least two candidates of known
  correctness count. Correctness is ``final_answer_correct`` when the record has it, else whether every step is
  labelled correct (>= 0.5; unknown when a step is unlabelled and none is labelled wrong). An ``answer`` field on
  every candidate enables the majority-vote baseline. PRM800K rows are prefixes of one labelled path, not
  independent candidates, so PRM800K data gets no Best-of-N and no outcome figures.

The threshold is given, tuned on one subset (the one maximising its first-error F1, then applied to every
subset), or the default 0.5; ``threshold_source`` in the report says which.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prmkit import metrics
from prmkit.core.version import __version__
from prmkit.data.formats import FORMATS, Options, get_format
from prmkit.data.sources import _hub_split, iter_records, read_step_rows, resolve_source
from prmkit.errors import DataError, PrmkitError, UsageError
from prmkit.models.memory import release_memory

log = logging.getLogger("prmkit")


__all__ = [
    "DEFAULT_THRESHOLD",
    "EvalResult",
    "Subset",
    "build_model_report",
    "choose_threshold",
    "combine_reports",
    "evaluate",
    "load_subsets",
    "score_subsets",
    "subset_name",
]


DEFAULT_THRESHOLD = 0.5


# Solutions per score_batch call. Only progress granularity depends on it: the engine batches by tokens inside.
SCORE_CHUNK = 1024


MAX_KEPT_PROBLEMS = 1000  # problems a DataError carries (the CLI shows the first few): bounded memory on a bad file


ProgressFn = Callable[[str, int, int], None]


"""``progress(description, done, total)``, called after each scored chunk."""


_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Subset:
    """One evaluation subset: validated stepwise rows plus what the metrics need beyond them."""

    name: str
    spec: str
    format: str
    prompts: list[str]
    completions: list[list[str]]
    labels: list[list[Any]]
    first_errors: list[int | None]
    """First-error label per row (see the module docstring), None when the row has none."""
    final_answer_correct: list[bool | None]
    answers: list[str | None]
    rows: list[int]
    """1-based source row (or line) each row came from."""
    rows_in: int = 0
    rows_rejected: int = 0
    first_error_source: str | None = None
    tokens: list[tuple[list[int], list[int]]] | None = None
    """A `prmkit prepare` directory's rows: ``(input_ids, labelled positions)``, scored as they are (no text)."""
    prepared: dict[str, Any] | None = None
    """That directory's metadata, checked against each model before it scores them."""

    def __len__(self) -> int:
        return len(self.prompts)


def subset_name(spec: str) -> tuple[str, str]:
    """``(name, source)`` for a ``--data`` value: ``NAME=SRC``, else the file stem, directory name or Hub split."""
    name, sep, rest = spec.partition("=")
    if sep and rest and _NAME_RE.match(name) and not Path(spec).expanduser().exists():
        return name, rest
    source = resolve_source(spec)
    if source.kind == "hub":
        split = _hub_split(spec)[1]
        return split.split("[", 1)[0] or "train", spec
    assert source.path is not None
    return (source.path.name if source.kind in ("disk", "prepared") else source.path.stem), spec


def _name_subsets(data: Sequence[str]) -> list[tuple[str, str]]:
    named = [subset_name(spec) for spec in data]
    seen: dict[str, str] = {}
    for name, spec in named:
        if name in seen:
            raise UsageError(
                f"--data {seen[name]!r} and {spec!r} are both named {name!r}",
                hint=f"name them explicitly: --data {name}_a={seen[name]} --data {name}_b={spec}",
            )
        seen[name] = spec
    return named


def _first_error_from_labels(labels: Sequence[Any]) -> int | None:
    # Only hard labels define "the first wrong step"; a soft label (a float) or an unlabelled step leaves it unknown.
    if any(label is None or isinstance(label, float) for label in labels):
        return None
    for i, label in enumerate(labels):
        if not label:
            return i
    return -1


def _solution_correct(final_answer_correct: bool | None, labels: Sequence[Any]) -> bool | None:
    if final_answer_correct is not None:
        return final_answer_correct
    if any(label is not None and label < 0.5 for label in labels):
        return False
    if all(label is not None for label in labels):
        return True
    return None


def _whole_solutions(fmt: str | None) -> bool:
    """Whether a subset's rows are whole solutions, with an outcome and Best-of-N groups (not PRM800K's prefixes)."""
    known = FORMATS.get(fmt) if isinstance(fmt, str) else None
    return known is None or known.whole_solutions


def _read_extras(
    spec: str, fmt: str, numbers: set[int], skip_invalid: bool
) -> dict[int, tuple[bool | None, str | None]]:
    """``final_answer_correct`` and ``answer`` of the source records the rows came from."""
    if not _whole_solutions(fmt):
        return {}
    source = resolve_source(spec)
    out: dict[int, tuple[bool | None, str | None]] = {}
    problems: list[str] = []
    for rec in iter_records(source):
        number, record = rec.number, rec.record
        if number not in numbers or not isinstance(record, dict):
            continue
        fac = record.get("final_answer_correct")
        if fac is not None and not isinstance(fac, bool):
            if isinstance(fac, int) and fac in (0, 1):
                fac = bool(fac)
            else:
                problems.append(f"{source.where(number)}: final_answer_correct: expected true or false, got {fac!r}")
                fac = None
        answer = record.get("answer")
        if answer is not None:
            if isinstance(answer, (str, int, float)) and not isinstance(answer, bool):
                answer = str(answer).strip()
            else:
                problems.append(f"{source.where(number)}: answer: expected a string or number, got {answer!r}")
                answer = None
        if fac is not None or answer is not None:
            out[number] = (fac, answer)
    if problems:
        if not skip_invalid:
            raise DataError(
                f"{spec}: {len(problems)} rows have an invalid final_answer_correct or answer",
                problems=problems[:MAX_KEPT_PROBLEMS],
                hint="fix them, or pass --skip-invalid to ignore those fields on those rows",
            )
        log.warning(f"{spec}: ignored an invalid final_answer_correct or answer on {len(problems)} rows")
    return out


def load_subsets(
    data: Sequence[str],
    fmt: str = "auto",
    *,
    separator: str = "\n",
    prm800k_neutral: str = "negative",
    label_threshold: float | None = None,
    skip_invalid: bool = False,
    rejects: list[dict] | None = None,
) -> list[Subset]:
    """Read, convert and validate every source (``read_step_rows``, as ``prepare`` does).

    ``separator`` only drives the warning about steps that contain it. Bad rows raise :class:`DataError` naming
    each row, unless ``skip_invalid``, which collects them into ``rejects``.
    """
    if not data:
        raise UsageError("no evaluation data", hint="pass --data FILE (repeatable) or set eval.data")
    subsets = []
    opts = Options(prm800k_neutral=prm800k_neutral, label_threshold=label_threshold, is_eval=True)
    for name, spec in _name_subsets(data):
        source = resolve_source(spec)
        if source.kind == "prepared":
            subsets.append(_prepared_subset(name, spec, source))
            continue
        rows, split = read_step_rows(spec, fmt, opts, separator, skip_invalid, rejects)
        if not len(rows):
            raise DataError(f"{spec}: no valid rows left ({split.rows_rejected} of {split.rows_in} rejected)")
        if split.rows_rejected:
            log.warning(f"{spec}: skipped {split.rows_rejected} of {split.rows_in} invalid rows")
        extras = _read_extras(spec, split.format, set(rows.rows), skip_invalid)
        if get_format(split.format).first_error_labels:
            first_errors = [None if fe is None else int(fe) for fe in rows.first_errors]
            fe_source = split.format
        else:
            first_errors = [_first_error_from_labels(labels) for labels in rows.labels]
            fe_source = "step labels"
        subsets.append(
            Subset(
                name=name,
                spec=spec,
                format=split.format,
                prompts=rows.prompts,
                completions=rows.completions,
                labels=rows.labels,
                first_errors=first_errors,
                final_answer_correct=[extras.get(n, (None, None))[0] for n in rows.rows],
                answers=[extras.get(n, (None, None))[1] for n in rows.rows],
                rows=rows.rows,
                rows_in=split.rows_in,
                rows_rejected=split.rows_rejected,
                first_error_source=fe_source if any(fe is not None for fe in first_errors) else None,
            )
        )
    return subsets


def _prepared_subset(name: str, spec: str, source: Any) -> Subset:
    """A prepared directory's eval split (or only split) as a subset: its labelled steps, without text.

    Step and first-error figures come out as from the text: a step is a labelled position, and ProcessBench's steps
    after the first error (unlabelled) cannot move its first-error accuracy. Outcome and Best-of-N need
    ``final_answer_correct`` and the prompts, which a prepared directory does not keep: those figures are absent.
    """
    from prmkit.data.prepared_input import load_split, step_rows

    part = load_split(source, "eval")
    ids, positions, labels, rows = step_rows(part.dataset)
    if not ids:
        raise DataError(f"{spec}: the {part.split!r} split holds no rows")
    first_errors = [_first_error_from_labels(row) for row in labels]
    log.info(
        f"{spec}: scoring the {part.split!r} split of a prepared dataset ({len(ids)} rows); outcome and "
        "Best-of-N figures need the text data"
    )
    return Subset(
        name=name,
        spec=spec,
        format=part.format,
        prompts=[f"\0row {i}" for i in range(len(ids))],  # one candidate per "problem": no Best-of-N groups
        completions=[[""] * len(p) for p in positions],
        labels=labels,
        first_errors=first_errors,
        final_answer_correct=[None] * len(ids),
        answers=[None] * len(ids),
        rows=rows,
        rows_in=int(part.report.get("rows_in") or len(ids)),
        rows_rejected=0,
        first_error_source="step labels" if any(fe is not None for fe in first_errors) else None,
        tokens=list(zip(ids, positions)),
        prepared=part.metadata,
    )


def check_prepared(
    subsets: Sequence[Subset],
    scorer: Any,
    model: str,
    label_threshold: float | None = None,
    prm800k_neutral: str = "negative",
) -> None:
    """Refuse a prepared subset made with another tokenizer or tokenization than ``model`` scores with."""
    from prmkit.data.prepared_input import check_matches
    from prmkit.models.model_dir import read_metadata
    from prmkit.tokenization import tokenizer_fingerprint

    trained = None
    for subset in subsets:
        if subset.prepared is None:
            continue
        if trained is None:
            path = Path(split_kind(model)[0]).expanduser()
            trained = ((read_metadata(path) if path.is_dir() else None) or {}).get("tokenizer") or {}
        if getattr(scorer, "kind_encoder", None) is not None:
            raise DataError(
                f"{subset.spec}: prepared data holds TRL's token-classification layout; model {model} "
                "reads another PRM kind's",
                hint="give the text data it was prepared from",
            )
        params = scorer.params.to_dict()
        params.pop("train_on_last_step_only", None)  # training only: an eval split has every label
        check_matches(
            subset.spec,
            subset.prepared,
            tokenizer_fp=tokenizer_fingerprint(scorer.tokenizer),
            params=params,
            kind=None,
            user=f"model {model}",
            trained_tokenizer=trained.get("sha256"),
            labels={"label_threshold": label_threshold, "prm800k_neutral": prm800k_neutral},
        )


def score_subsets(
    scorer: Any, subsets: Sequence[Subset], progress: ProgressFn | None = None, label: str = ""
) -> dict[str, list[list[float | None]]]:
    """Step scores for every row of every subset, from ``scorer.score_batch`` (a ``StepScorer``)."""
    out: dict[str, list[list[float | None]]] = {}
    for subset in subsets:
        scores: list[list[float | None]] = []
        total = len(subset)
        what = f"{label}: {subset.name}" if label else subset.name
        for start in range(0, total, SCORE_CHUNK):
            stop = start + SCORE_CHUNK
            if subset.tokens is not None:
                scores.extend(r.scores for r in scorer.score_tokens(subset.tokens[start:stop]))
            else:
                batch = list(zip(subset.prompts[start:stop], subset.completions[start:stop]))
                scores.extend(scorer.score_batch(batch))
            if progress is not None:
                progress(what, len(scores), total)
        for i, (row_scores, steps) in enumerate(zip(scores, subset.completions)):
            if len(row_scores) != len(steps):
                # A contract breach by the engine; the metrics would silently misalign otherwise.
                raise PrmkitError(f"{subset.name}: row {i}: got {len(row_scores)} scores for {len(steps)} steps")
        if len(scores) != total:
            raise PrmkitError(f"{subset.name}: got scores for {len(scores)} of {total} rows")
        out[subset.name] = scores
    return out


def choose_threshold(
    subsets: Sequence[Subset],
    scores: Mapping[str, Sequence[Sequence[float | None]]],
    threshold: float | None = None,
    tune_on: str | None = None,
) -> tuple[float, str]:
    """``(threshold, source)``: tuned on ``tune_on``'s first-error F1, else ``threshold`` as given, else 0.5.

    Tuning sweeps the scores already computed (the one scoring pass): it never scores again.
    """
    if tune_on is not None:
        subset = _find_subset(subsets, tune_on)
        samples = [(s, fe) for s, fe in zip(scores[subset.name], subset.first_errors) if fe is not None]
        if not samples:
            raise UsageError(
                f"--tune-threshold {tune_on}: that subset has no first-error labels",
                hint="tune on ProcessBench-style data, or rows with hard step labels",
            )
        try:
            value, f1 = metrics.tune_threshold(samples)
        except ValueError as e:
            raise UsageError(f"--tune-threshold {tune_on}: {e}") from None
        return value, f"tuned on {subset.name} (f1={f1:.4f})"
    if threshold is not None:
        if not 0.0 <= float(threshold) <= 1.0:
            raise UsageError(f"threshold must lie in [0, 1], got {threshold}")
        return float(threshold), "given"
    return DEFAULT_THRESHOLD, "default"


def _find_subset(subsets: Sequence[Subset], name: str) -> Subset:
    for subset in subsets:
        if subset.name == name:
            return subset
    raise UsageError(f"--tune-threshold {name}: no such subset", hint=f"subsets: {', '.join(s.name for s in subsets)}")


def _best_of_n_groups(subset: Subset, scores: Sequence[Sequence[float | None]]) -> list[list[dict[str, Any]]]:
    if not _whole_solutions(subset.format):
        return []
    groups: dict[str, list[dict[str, Any]]] = {}
    for prompt, row_scores, labels, fac, answer in zip(
        subset.prompts, scores, subset.labels, subset.final_answer_correct, subset.answers
    ):
        correct = _solution_correct(fac, labels)
        if correct is None:
            continue
        cand: dict[str, Any] = {"step_scores": list(row_scores), "correct": correct}
        if answer is not None:
            cand["answer"] = answer
        groups.setdefault(prompt, []).append(cand)
    return [g for g in groups.values() if len(g) >= 2]


def subset_report(
    subset: Subset, scores: Sequence[Sequence[float | None]], threshold: float
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """One subset's figures and its raw labelled-step scores and targets (for the plots)."""
    step_scores: list[float] = []
    targets: list[float] = []
    positions: list[int] = []
    unscored = labelled = 0
    for row_scores, labels in zip(scores, subset.labels):
        unscored += sum(s is None for s in row_scores)
        for i, (score, label) in enumerate(zip(row_scores, labels)):
            if label is None:
                continue
            labelled += 1
            if score is None:
                continue
            step_scores.append(float(score))
            targets.append(float(label))
            positions.append(i + 1)
    if unscored:
        log.warning(f"{subset.name}: {unscored} steps lie beyond the model's max_length and were not scored")

    out: dict[str, Any] = {
        "source": subset.spec,
        "format": subset.format,
        "n_solutions": len(subset),
        "n_steps": sum(len(c) for c in subset.completions),
        "n_steps_labelled": labelled,
        "n_steps_unscored": unscored,
        "rows_rejected": subset.rows_rejected,
    }
    if step_scores:
        out["step"] = metrics.step_metrics(step_scores, targets, threshold)
        out["by_position"] = metrics.accuracy_by_position(positions, step_scores, targets, threshold)
    else:
        log.warning(f"{subset.name}: no labelled step was scored; no step-level figures")
        out["step"] = None
        out["by_position"] = []

    fe_pairs = [(s, fe) for s, fe in zip(scores, subset.first_errors) if fe is not None]
    if fe_pairs:
        predictions = [metrics.first_error_index(s, threshold) for s, _ in fe_pairs]
        out["first_error"] = {
            **metrics.first_error_metrics(predictions, [fe for _, fe in fe_pairs]),
            "labels_from": subset.first_error_source,
        }
    else:
        out["first_error"] = None

    with_outcome = [(s, c) for s, c in zip(scores, subset.final_answer_correct) if c is not None]
    if with_outcome and _whole_solutions(subset.format):
        out["outcome"] = metrics.outcome_metrics([s for s, _ in with_outcome], [c for _, c in with_outcome], threshold)
    else:
        out["outcome"] = None

    groups = _best_of_n_groups(subset, scores)
    out["best_of_n"] = metrics.best_of_n(groups) if groups else None
    return out, {"scores": step_scores, "targets": targets}


def build_model_report(
    model: str,
    subsets: Sequence[Subset],
    scores: Mapping[str, Sequence[Sequence[float | None]]],
    threshold: float | None = None,
    tune_on: str | None = None,
    tokenization: Mapping[str, Any] | None = None,
    differs_from_training: Mapping[str, tuple[Any, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, list[float]]]]:
    """A single-model report (the shape ``prmkit.evaluation.report`` documents) and its raw scores for the plots."""
    value, source = choose_threshold(subsets, scores, threshold, tune_on)
    report_subsets: dict[str, Any] = {}
    raw: dict[str, dict[str, list[float]]] = {}
    for subset in subsets:
        report_subsets[subset.name], raw[subset.name] = subset_report(subset, scores[subset.name], value)
    mean = metrics.mean_f1_summary({name: sub["first_error"] for name, sub in report_subsets.items()})
    if mean["left_out"] and any(sub["first_error"] is not None for sub in report_subsets.values()):
        covered = f"covers {', '.join(mean['subsets'])} only" if mean["subsets"] else "is undefined"
        log.warning(
            f"{model}: mean_f1 {covered}; left out: "
            + "; ".join(f"{name} ({why})" for name, why in mean["left_out"].items())
        )
    report: dict[str, Any] = {
        "model": model,
        "threshold": value,
        "threshold_source": source,
        "subsets": report_subsets,
        # Unweighted, as ProcessBench defines its headline: every subset counts the same whatever its size.
        "mean_f1": mean["mean_f1"],
        "mean_f1_subsets": mean["subsets"],
        "mean_f1_left_out": mean["left_out"],
        "prmkit_version": __version__,
    }
    if tokenization is not None:
        report["tokenization"] = dict(tokenization)
    if differs_from_training:
        # Settings the user chose over the model's prmkit.json: these figures are not the trained tokenization's.
        report["differs_from_training"] = {k: {"trained": a, "used": b} for k, (a, b) in differs_from_training.items()}
    return report, raw


def combine_reports(
    reports: Mapping[str, Mapping[str, Any]], raws: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One report for one model or several (:func:`prmkit.evaluation.report.make_report`), and the raw scores for the
    plots."""
    from prmkit.evaluation.report import make_report

    if len(reports) == 1:
        ((name, _),) = reports.items()
        return make_report(reports), dict(raws[name])
    return make_report(reports), {n: dict(r) for n, r in raws.items()}


@dataclass
class EvalResult:
    report: dict[str, Any]
    """What goes into report.json: one model's report, or ``{"model": [...], "models": {...}}`` for several."""
    raw: dict[str, Any]
    """Labelled-step scores and targets per subset (per model, then subset, for several): the plots need them."""
    subsets: list[Subset] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    scores: dict[str, dict[str, list[list[float | None]]]] = field(default_factory=dict)
    """Every step score, per model and subset (None: beyond max_length)."""


def _separator_for_warnings(model: str, step_separator: str | None) -> str:
    if step_separator is not None:
        return step_separator
    from prmkit.models.model_dir import read_metadata

    try:
        meta = read_metadata(model) if Path(model).is_dir() else None
    except (OSError, ValueError):
        meta = None
    return ((meta or {}).get("tokenization") or {}).get("step_separator", "\n")


def split_kind(model: str) -> tuple[str, str | None]:
    """``MODEL@KIND`` names a model's PRM kind for this model alone (e.g. ``Qwen/Qwen2.5-Math-PRM-7B@qwen-prm``)."""
    from prmkit.kinds.registry import KINDS

    head, sep, tail = model.rpartition("@")
    if sep and tail in KINDS and head:
        return head, tail
    return model, None


def _default_loader(model: str, **kwargs: Any) -> Any:
    from prmkit.scoring import StepScorer

    return StepScorer.from_pretrained(model, **kwargs)


def evaluate(
    models: Sequence[str],
    data: Sequence[str],
    *,
    fmt: str = "auto",
    step_separator: str | None = None,
    threshold: float | None = None,
    tune_threshold: str | None = None,
    batch_tokens: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_bidirectional: bool = False,
    attn_implementation: str | None = None,
    prm800k_neutral: str = "negative",
    label_threshold: float | None = None,
    skip_invalid: bool = False,
    progress: ProgressFn | None = None,
    load_scorer: Callable[..., Any] | None = None,
    kind_settings: dict[str, Any] | None = None,
    tokenization: Mapping[str, Any] | None = None,
    tokenizer: str | None = None,
) -> EvalResult:
    """Evaluate one model or several on every ``data`` subset.

    ``threshold=None`` with no ``tune_threshold`` means the default 0.5. ``load_scorer(model, **kwargs)`` defaults
    to ``StepScorer.from_pretrained``; every model is loaded, used and released in turn. ``tokenization`` (``data.*``
    keys the user set) and ``tokenizer`` apply over what each model recorded, as in ``prmkit score``; the report's
    ``differs_from_training`` says where that changed a model's tokenization.

    (Over 100 lines with its keyword signature (one parameter a line); the body reads in order.)
    """
    models = [str(m) for m in models]
    if not models:
        raise UsageError("no model to evaluate", hint="pass one or more model directories or Hub ids")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise UsageError(f"threshold must lie in [0, 1], got {threshold}")
    dupes = sorted({m for m in models if models.count(m) > 1})
    if dupes:
        raise UsageError(f"model given twice: {', '.join(dupes)}")
    if load_scorer is None:
        from prmkit.core.locate import locate

        for model in models:  # every model before any scoring: a typo in the last one should not wait for the first
            path = split_kind(model)[0]
            if not Path(path).expanduser().is_dir():
                locate(path, "model")
    rejects: list[dict] = []
    subsets = load_subsets(
        data,
        fmt,
        separator=_separator_for_warnings(
            models[0], step_separator if step_separator is not None else (tokenization or {}).get("step_separator")
        ),
        prm800k_neutral=prm800k_neutral,
        label_threshold=label_threshold,
        skip_invalid=skip_invalid,
        rejects=rejects,
    )
    if tune_threshold is not None:
        _find_subset(subsets, tune_threshold)  # fail before loading any model
    load = load_scorer or _default_loader
    # Passed only when set, so a loader with just the basic StepScorer.from_pretrained keywords works too.
    extra = {
        k: v
        for k, v in (
            ("allow_bidirectional", allow_bidirectional),
            ("attn_implementation", attn_implementation),
            ("tokenization", dict(tokenization or {})),
            ("tokenizer", tokenizer),
        )
        if v
    }
    reports: dict[str, dict[str, Any]] = {}
    raws: dict[str, dict[str, Any]] = {}
    all_scores: dict[str, dict[str, list[list[float | None]]]] = {}
    for model in models:
        log.info(f"loading {model}")
        path, kind = split_kind(model)
        settings = {**(kind_settings or {}), **({"kind": kind} if kind else {})}
        kind_extra = {"kind_settings": settings} if settings else {}
        scorer = load(
            path,
            step_separator=step_separator,
            dtype=dtype,
            device=device,
            batch_tokens=batch_tokens,
            trust_remote_code=trust_remote_code,
            **extra,
            **kind_extra,
        )
        check_prepared(subsets, scorer, model, label_threshold, prm800k_neutral)
        params = getattr(scorer, "params", None)
        # Another kind's model reads its own input layout: the report records that instead of TRL's tokenization.
        kind = (getattr(scorer, "identity", None) or {}).get("kind")
        used = kind if kind else params.to_dict() if params is not None and hasattr(params, "to_dict") else None
        differs = dict(getattr(scorer, "differs_from_training", None) or {})
        scores = score_subsets(scorer, subsets, progress, label=model if len(models) > 1 else "")
        # Free one model before loading the next: two 7B models need not fit at once.
        del scorer
        release_memory()
        reports[model], raws[model] = build_model_report(
            model, subsets, scores, threshold, tune_threshold, tokenization=used, differs_from_training=differs
        )
        all_scores[model] = scores
    report, raw = combine_reports(reports, raws)
    return EvalResult(report, raw, subsets, rejects, all_scores)
