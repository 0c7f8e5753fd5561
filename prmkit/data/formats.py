"""Step-labelled data formats, each converted to stepwise rows ``{prompt, completions: [str], labels: [...]}``.

- ``stepwise``: TRL's stepwise-supervision rows, as they are.
- ``math-shepherd``: raw ``{input, label}``; steps end with the tag ``ки`` in ``input`` and ``label`` holds ``+``/``-``
  at the same places. Converted as TRL's ``examples/datasets/math_shepherd.py`` did.
- ``prm800k``: raw OpenAI lines, expanded along the labelled path as TRL's ``examples/datasets/prm800k.py`` did,
  except that a path with no step (the first step was rated and none chosen) is no row: TRL emits it with no
  completion and no label, which teaches nothing and, alone in a batch, gives a 0/0 (NaN) loss.
- ``processbench``: ``{problem, steps, label}`` with ``label`` the first wrong step or -1.

Each format is declared once, in :data:`FORMATS`: its name, the columns that detect it, its converter and what the
rest of prmkit asks of it (``fmt.scored_as_is``, ``fmt.first_error_labels``, ...); nothing else spells a format's name.
A converter raises :class:`RowError` naming the field and the reason; the caller adds file and row.

This module imports nothing heavy at module level (:mod:`prmkit.tokenization` loads numpy), so the config and
``--help`` read the registry fast.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

from prmkit.errors import DataError

AUTO = "auto"
"""``data.format: auto``: each source's format is detected from its first record's columns."""

STEPWISE = "stepwise"
MATH_SHEPHERD = "math-shepherd"
PRM800K = "prm800k"
PROCESSBENCH = "processbench"


@dataclass(frozen=True)
class Format:
    """One data format. The fields are facts; code asks them instead of comparing names."""

    name: str
    signature: tuple[str, ...]
    """The columns that identify it; ``auto`` picks the one format whose columns are all present."""
    convert: Callable[[dict, Options], list[dict]]
    """(record, options) -> stepwise rows, not yet validated (:func:`convert` validates them)."""
    score_columns: tuple[str, str, str] | None = None
    """(prompt, steps, labels) columns of a record `prmkit score` scores as it is and writes back whole; None: its
    converted stepwise rows are scored and written."""
    first_error_labels: bool = False
    """Its label is the index of the first wrong step: steps after it are unlabelled in eval, and eval's first-error
    figures read that index (not the step labels)."""
    whole_solutions: bool = True
    """Each row is a whole solution, so a record's ``final_answer_correct`` and ``answer`` give the outcome and
    Best-of-N figures; False where rows are prefixes of one labelled path (PRM800K)."""
    neutral_ratings: bool = False
    """Its ratings include a neutral one, counted as ``data.prm800k_neutral`` says."""

    @property
    def scored_as_is(self) -> bool:
        return self.score_columns is not None


FORMATS: dict[str, Format] = {
    STEPWISE: Format(
        STEPWISE,
        ("prompt", "completions", "labels"),
        lambda r, o: [_stepwise(r)],
        score_columns=("prompt", "completions", "labels"),
    ),
    MATH_SHEPHERD: Format(MATH_SHEPHERD, ("input", "label"), lambda r, o: [_math_shepherd(r)]),
    PRM800K: Format(
        PRM800K,
        ("question", "label"),
        lambda r, o: _prm800k(r, o.prm800k_neutral),
        whole_solutions=False,
        neutral_ratings=True,
    ),
    PROCESSBENCH: Format(
        PROCESSBENCH,
        ("problem", "steps", "label"),
        lambda r, o: [_processbench(r, o.is_eval)],
        score_columns=("problem", "steps", "label"),
        first_error_labels=True,
    ),
}
"""Every format, in the order choices are listed. Tests add one with ``monkeypatch.setitem``: read it at call time."""


@cache
def _tokenization() -> ModuleType:
    """:mod:`prmkit.tokenization`, imported on first use: it loads numpy, which ``--help`` and the config never need.
    Cached, so a row's check pays a call rather than an import."""
    import prmkit.tokenization

    return prmkit.tokenization


def format_choices() -> tuple[str, ...]:
    """``data.format``'s values (and ``eval.format``'s, ``score.format``'s)."""
    return (AUTO, *FORMATS)


def get_format(name: str | None) -> Format:
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise DataError(f"unknown format {name!r}", hint=f"use one of {', '.join(format_choices())}")
    return fmt


def format_signatures() -> dict[str, tuple[str, ...]]:
    """{format: the columns that identify it}."""
    return {name: fmt.signature for name, fmt in FORMATS.items()}


def uses_neutral_ratings(names: Iterable[Any]) -> bool:
    """Whether any of these format names (``auto`` and None allowed) is a format with neutral ratings."""
    return any(fmt.neutral_ratings for fmt in (FORMATS.get(n) if isinstance(n, str) else None for n in names) if fmt)


SHEPHERD_TAG = "ки"
_SHEPHERD_MARK = "ⶻ"  # one character, so positions in `input` line up with `label` (TRL's trick)
# Rows of Math-Shepherd whose prompt carries a stray first tag; TRL's converter drops that first label.
_SHEPHERD_QUIRKS = (
    "Mr. Rocky",
    "Parker",
    "What is the smallest positive",
    " The Myth",
    "Let $\\mathbf{a}$",
    "Find the arithmetic",
    "Determine an ordered pair",
    "Determine the ordered pair",
    "At the Quill and Scroll stationery",
    "Round to the nearest",
    r"Calculate $\sqrt{10p}",
    r"Simplify $\sqrt{28x}",
)


class RowError(ValueError):
    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass
class Options:
    """What conversion depends on besides the row itself."""

    prm800k_neutral: str = "negative"
    label_threshold: float | None = None
    is_eval: bool = False


def detect_format(columns: Iterable[str], source: str) -> str:
    cols = set(columns)
    # Formats that share a column (`label`) are told apart by the others (`input`, `question`, `problem`).
    matches = [name for name, fmt in FORMATS.items() if set(fmt.signature) <= cols]
    if not matches:
        wanted = "; ".join(f"{n}: {', '.join(s)}" for n, s in format_signatures().items())
        raise DataError(
            f"{source}: cannot detect the data format from columns {sorted(cols)}",
            hint=f"set data.format, or give the columns of one format ({wanted})",
        )
    if len(matches) > 1:
        raise DataError(
            f"{source}: columns {sorted(cols)} fit several formats ({', '.join(matches)})",
            hint="set data.format to the one you mean",
        )
    return matches[0]


def check_format(fmt: str, record: Any, origin: str, signatures: dict[str, tuple[str, ...]] | None = None) -> None:
    """Raise RowError when ``record`` lacks a column of ``fmt`` but has every column of one other format.

    ``origin`` says where ``fmt`` came from ("the format detected from line 1"), so a file that mixes formats is
    named as such rather than reported as a row with a missing field.
    """
    if signatures is None:
        known = FORMATS.get(fmt)
        own = known.signature if known is not None else None
    else:
        own = signatures.get(fmt)
    if not isinstance(record, dict) or own is None or set(own) <= record.keys():
        return  # the usual row: checked without building the other formats' table
    signatures = signatures if signatures is not None else format_signatures()
    others = [name for name, sig in signatures.items() if name != fmt and set(sig) <= record.keys()]
    if len(others) == 1:
        cols = ", ".join(sorted(record))
        raise RowError("row", f"a {others[0]} row (columns {cols}), but {origin} is {fmt}; one source holds one format")


def convert(fmt: str, record: dict[str, Any], opts: Options) -> list[dict[str, Any]]:
    """Convert one source record into zero or more validated stepwise rows."""
    if not isinstance(record, dict):
        raise RowError("row", f"expected a JSON object, got {type(record).__name__}")
    spec = get_format(fmt)
    rows = spec.convert(record, opts)
    return [validate(row, opts.label_threshold, allow_unlabelled=spec.first_error_labels) for row in rows]


def validate(row: dict[str, Any], label_threshold: float | None = None, allow_unlabelled: bool = False) -> dict:
    """Check a stepwise row and normalise its labels (0/1 hard, float soft). Raises RowError."""
    normalize_label = _tokenization().normalize_label
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise RowError("prompt", f"expected a string, got {_kind(prompt)}")
    steps = _check_steps("completions", row.get("completions"))
    for i, step in enumerate(steps):
        problem = step_problem(step)
        if problem:
            raise RowError(f"completions[{i}]", problem)
    _check_texts(prompt, steps)
    labels = row.get("labels")
    if not isinstance(labels, list):
        raise RowError("labels", f"expected a list, got {_kind(labels)}")
    if len(labels) != len(steps):
        raise RowError("labels", f"{len(labels)} labels for {len(steps)} steps")
    normalized: list[Any] = []
    for i, label in enumerate(labels):
        if label is None and allow_unlabelled:
            normalized.append(None)
            continue
        if label is None:
            raise RowError(f"labels[{i}]", "label is null")
        try:
            normalized.append(normalize_label(label, label_threshold))
        except ValueError as e:
            raise RowError(f"labels[{i}]", str(e)) from None
    out = {"prompt": prompt, "completions": steps, "labels": normalized}
    if "first_error" in row:
        out["first_error"] = row["first_error"]
    return out


def step_problem(step: Any) -> str | None:
    """Why ``step`` cannot be a step (data files and the Python API alike), or None."""
    if not isinstance(step, str):
        return f"expected a string, got {_kind(step)}"
    if not step.strip():
        # A whitespace-only step says nothing, just as an empty one: its label would sit on the separator alone.
        return "empty step" + (" (whitespace only)" if step else "")
    return None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_steps(name: str, steps: Any) -> list[Any]:
    """``steps`` when it is a non-empty list (its items are checked by the caller)."""
    if not isinstance(steps, list):
        raise RowError(name, f"expected a non-empty list of strings, got {_kind(steps)}")
    if not steps:
        raise RowError(name, "empty: expected a non-empty list of strings")
    return steps


def _check_texts(prompt: str, steps: list[str]) -> None:
    # One check over the joined text in C for the usual row; only a row that fails it is searched text by text.
    joined = prompt + "".join(steps)
    if "\0" not in joined:
        if joined.isascii():
            return
        try:
            joined.encode("utf-8")
            return
        except UnicodeEncodeError:
            pass
    text_problem = _tokenization().text_problem
    for name, text in (("prompt", prompt), *((f"completions[{i}]", step) for i, step in enumerate(steps))):
        problem = text_problem(text)
        if problem is not None:
            raise RowError(name, problem)


def _stepwise(record: dict) -> dict:
    for key in FORMATS[STEPWISE].signature:
        if key not in record:
            raise RowError(key, "missing")
    return {"prompt": record["prompt"], "completions": record["completions"], "labels": record["labels"]}


def _math_shepherd(record: dict) -> dict:
    text, label = record.get("input"), record.get("label")
    if not isinstance(text, str):
        raise RowError("input", f"expected a string, got {_kind(text)}")
    if not isinstance(label, str):
        raise RowError("label", f"expected a string, got {_kind(label)}")
    marked = text.replace(SHEPHERD_TAG, _SHEPHERD_MARK)
    # TRL reads `label` only at the tag positions, so a longer label converts there whatever follows. A tail of
    # whitespace changes nothing and converts as in TRL; anything else means the two texts do not line up (a '+' or
    # '-' there would be a label for a step without a tag, which TRL drops unseen), so it is refused.
    tail = label[len(marked) :]
    if len(label) < len(marked) or tail.strip():
        raise RowError(
            "label",
            f"length {len(label)} does not match input with tags as one character ({len(marked)})"
            + (f"; it ends with {tail!r} past the input" if tail.strip() else ""),
        )
    indexes = [m.start() for m in re.finditer(_SHEPHERD_MARK, marked)]
    if not indexes:
        raise RowError("input", f"no step tag {SHEPHERD_TAG!r} found")
    bad = [i for i in indexes if label[i] not in "+-"]
    if bad:
        raise RowError("label", f"expected '+' or '-' at character {bad[0]}, got {label[bad[0]]!r}")
    labels = [label[i] == "+" for i in indexes]
    pieces = [marked[i:j] for i, j in zip([0, *indexes], [*indexes, None])][:-1]
    prompt, completions = pieces[0], [p[1:].strip() for p in pieces[1:]]
    if prompt.startswith(_SHEPHERD_QUIRKS):
        labels = labels[1:]
    else:
        # The first step is not tagged at its start: it begins at 'Step 1:' (else 'step 1:', else after the '?').
        # Found twice, it could begin at either (the problem may quote 'Step 1:'), so the row is refused, where
        # TRL's converter raises and stops the whole conversion.
        marker = next((m for m in ("Step 1:", "step 1:") if m in prompt), None)
        if marker is None and "?" not in prompt:
            raise RowError("input", "cannot find where the first step starts (no 'Step 1:' and no '?')")
        if prompt.count(marker or "?") > 1:
            raise RowError(
                "input",
                f"{marker or '?'!r} appears {prompt.count(marker or '?')} times before the first step "
                "tag, so where the first step starts is ambiguous",
            )
        if marker is not None:
            prompt, first = prompt.split(marker, 1)
            completions = [(marker + first).strip(), *completions]
        else:
            prompt, first = prompt.split("?", 1)
            prompt += "?"
            completions = [first.strip(), *completions]
    return {"prompt": prompt.strip(), "completions": completions, "labels": labels}


def _rating_label(rating: Any, neutral: str) -> bool | None:
    """PRM800K rating -> label; None means the row is dropped (neutral under `drop`)."""
    if rating == 1:
        return True
    if rating == 0:
        return {"negative": False, "positive": True, "drop": None}[neutral]
    return False  # -1, and null (unrated) as in TRL's converter


def _prm800k(record: dict, neutral: str) -> list[dict]:
    question, label = record.get("question"), record.get("label")
    if not isinstance(question, dict) or not isinstance(question.get("problem"), str):
        raise RowError("question.problem", "expected a string")
    if not isinstance(label, dict) or not isinstance(label.get("steps"), list):
        raise RowError("label.steps", "expected a list")
    prompt = question["problem"]
    rows: list[dict] = []
    done: list[str] = []
    done_labels: list[bool] = []
    for n, step in enumerate(label["steps"]):
        if not isinstance(step, dict):
            raise RowError(f"label.steps[{n}]", "expected an object")
        completions = step.get("completions")
        chosen = step.get("chosen_completion")
        human = step.get("human_completion")
        if completions is None and human is None and chosen is None:
            break  # happens in the raw data; TRL's converter stops here too
        for i, completion in enumerate(completions or []):
            if i == chosen:
                continue
            verdict = _rating_label(completion.get("rating"), neutral)
            if verdict is None:
                continue
            rows.append(
                {"prompt": prompt, "completions": [*done, completion.get("text")], "labels": [*done_labels, verdict]}
            )
        if chosen is not None:
            if not isinstance(chosen, int) or not 0 <= chosen < len(completions or []):
                raise RowError(f"label.steps[{n}].chosen_completion", f"{chosen!r} is not an index into completions")
            picked = (completions or [])[chosen]  # a list here: the range check above failed otherwise
            verdict = _rating_label(picked.get("rating"), neutral)
        elif human is not None:
            picked, verdict = human, True
        else:
            break
        if verdict is None:
            break  # `drop`: a neutral step on the path ends it; nothing after it has a trustworthy prefix
        done.append(picked.get("text"))
        done_labels.append(verdict)
    if done:  # TRL appends the path even when empty; with no step it has no label (see the module docstring)
        rows.append({"prompt": prompt, "completions": done, "labels": done_labels})
    return rows


def _processbench(record: dict, is_eval: bool) -> dict:
    problem, steps, label = record.get("problem"), record.get("steps"), record.get("label")
    if "problem" not in record:
        raise RowError("problem", "missing")
    steps = _check_steps("steps", steps)
    if "label" not in record:
        raise RowError("label", "missing")
    if not isinstance(label, int) or isinstance(label, bool) or not -1 <= label < len(steps):
        raise RowError("label", f"expected -1 or a step index below {len(steps)}, got {label!r}")
    if label == -1:
        labels: list[Any] = [True] * len(steps)
    else:
        labels = [True] * label + [False] + [None] * (len(steps) - label - 1)
    if not is_eval and label != -1:
        # Training: after the first error nothing is known, so those steps are left out.
        steps, labels = steps[: label + 1], labels[: label + 1]
    return {"prompt": problem, "completions": steps, "labels": labels, "first_error": label}
