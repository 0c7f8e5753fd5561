"""Each format converts to stepwise rows the way TRL's converters did, on real sample rows where we have them."""

from __future__ import annotations

import json

import pytest
from conftest import EXAMPLES, SHARED, requires_shared

from prmkit.data.formats import Options, RowError, convert, detect_format, validate
from prmkit.errors import DataError

# Look-alike Math-Shepherd lines written for prmkit (the real ones carry no licence we may bundle).
SHEPHERD = {
    "input": "Tom has 3 apples and buys 2 more. How many now? Step 1: 3 + 2 = 5. ки\nStep 2: The answer is 5. ки",
    "label": "Tom has 3 apples and buys 2 more. How many now? Step 1: 3 + 2 = 5. +\nStep 2: The answer is 5. -",
    "task": "GSM8K",
}


def test_math_shepherd_like_trl():
    [row] = convert("math-shepherd", SHEPHERD, Options())
    assert row == {
        "prompt": "Tom has 3 apples and buys 2 more. How many now?",
        "completions": ["Step 1: 3 + 2 = 5.", "Step 2: The answer is 5."],
        "labels": [1, 0],
    }


def test_math_shepherd_without_step_marker_splits_at_question_mark():
    rec = {"input": "How much is 2+2? It is 4. ки", "label": "How much is 2+2? It is 4. +"}
    [row] = convert("math-shepherd", rec, Options())
    assert row["prompt"] == "How much is 2+2?" and row["completions"] == ["It is 4."] and row["labels"] == [1]


@pytest.mark.parametrize(
    "rec, field",
    [
        ({"input": "no tags here", "label": "no tags here"}, "input"),
        ({"input": "Q? Step 1: a ки", "label": "Q? Step 1: a x"}, "label"),
        ({"input": "Q? Step 1: a ки", "label": "short"}, "label"),
        ({"input": 3, "label": "x"}, "input"),
    ],
)
def test_math_shepherd_bad_rows(rec, field):
    with pytest.raises(RowError) as e:
        convert("math-shepherd", rec, Options())
    assert e.value.field == field


@requires_shared
def test_math_shepherd_real_samples_match_their_tags():
    for line in (SHARED / "data" / "math-shepherd" / "samples.jsonl").read_text().splitlines():
        rec = json.loads(line)
        [row] = convert("math-shepherd", rec, Options())
        assert len(row["completions"]) == rec["input"].count("ки")
        assert row["labels"] == [1 if c == "+" else 0 for c in _tag_chars(rec)]
        assert row["completions"][0].startswith("Step 1:")
        assert "ки" not in row["prompt"] and "Step 1:" not in row["prompt"]


def _tag_chars(rec):
    marked = rec["input"].replace("ки", "\0")
    return [rec["label"][i] for i, ch in enumerate(marked) if ch == "\0"]


def _prm800k_line(steps):
    return {"question": {"problem": "P?"}, "label": {"steps": steps}}


def test_prm800k_expansion_like_trl():
    line = _prm800k_line(
        [
            {"completions": [{"text": "a", "rating": 1}], "chosen_completion": 0, "human_completion": None},
            {
                "completions": [{"text": "b1", "rating": -1}, {"text": "b2", "rating": 0}, {"text": "b3", "rating": 1}],
                "chosen_completion": 2,
                "human_completion": None,
            },
            {
                "completions": [{"text": "c1", "rating": -1}],
                "chosen_completion": None,
                "human_completion": {"text": "h", "rating": None},
            },
        ]
    )
    rows = convert("prm800k", line, Options())
    assert [(r["completions"], r["labels"]) for r in rows] == [
        (["a", "b1"], [1, 0]),
        (["a", "b2"], [1, 0]),  # neutral counts as wrong by default, as in TRL's converter
        (["a", "b3", "c1"], [1, 1, 0]),
        (["a", "b3", "h"], [1, 1, 1]),  # the full path; a human step counts as right
    ]
    positive = convert("prm800k", line, Options(prm800k_neutral="positive"))
    assert positive[1]["labels"] == [1, 1]
    dropped = convert("prm800k", line, Options(prm800k_neutral="drop"))
    assert [r["completions"] for r in dropped] == [["a", "b1"], ["a", "b3", "c1"], ["a", "b3", "h"]]


def test_prm800k_real_lines_expand():
    rows = []
    for line in (EXAMPLES / "prm800k_samples.jsonl").read_text().splitlines():
        rec = json.loads(line)
        expanded = convert("prm800k", rec, Options())
        # One row per non-chosen alternative plus the full path.
        alternatives = sum(
            len(s["completions"] or []) - (s["chosen_completion"] is not None) for s in rec["label"]["steps"]
        )
        assert len(expanded) <= alternatives + 1
        assert all(r["prompt"] == rec["question"]["problem"] for r in expanded)
        rows += expanded
    assert len(rows) == 201


def test_processbench_train_drops_steps_after_first_error_eval_keeps_them():
    rec = {"problem": "P", "steps": ["a", "b", "c", "d"], "label": 1}
    [train] = convert("processbench", rec, Options())
    assert train["completions"] == ["a", "b"] and train["labels"] == [1, 0] and train["first_error"] == 1
    [ev] = convert("processbench", rec, Options(is_eval=True))
    assert ev["completions"] == ["a", "b", "c", "d"] and ev["labels"] == [1, 0, None, None]
    [ok] = convert("processbench", {"problem": "P", "steps": ["a", "b"], "label": -1}, Options())
    assert ok["labels"] == [1, 1]


@pytest.mark.parametrize("label", [4, -2, "1", True])
def test_processbench_bad_label(label):
    with pytest.raises(RowError) as e:
        convert("processbench", {"problem": "P", "steps": ["a", "b"], "label": label}, Options())
    assert e.value.field == "label"


@pytest.mark.parametrize(
    "row, field",
    [
        ({"prompt": 1, "completions": ["a"], "labels": [1]}, "prompt"),
        ({"prompt": "p", "completions": [], "labels": []}, "completions"),
        ({"prompt": "p", "completions": "a", "labels": [1]}, "completions"),
        ({"prompt": "p", "completions": ["a", ""], "labels": [1, 1]}, "completions[1]"),
        ({"prompt": "p", "completions": ["a", 2], "labels": [1, 1]}, "completions[1]"),
        ({"prompt": "p", "completions": ["a"], "labels": [1, 0]}, "labels"),
        ({"prompt": "p", "completions": ["a"], "labels": [float("nan")]}, "labels[0]"),
        ({"prompt": "p", "completions": ["a"], "labels": [1.5]}, "labels[0]"),
        ({"prompt": "p", "completions": ["a"], "labels": [None]}, "labels[0]"),
    ],
)
def test_validation_names_the_field(row, field):
    with pytest.raises(RowError) as e:
        validate(row)
    assert e.value.field == field


def test_detect_format():
    assert detect_format(["prompt", "completions", "labels"], "x") == "stepwise"
    assert detect_format(["input", "label", "task"], "x") == "math-shepherd"
    assert detect_format(["question", "label", "labeler"], "x") == "prm800k"
    assert detect_format(["problem", "steps", "label", "id"], "x") == "processbench"
    with pytest.raises(DataError, match="cannot detect"):
        detect_format(["text"], "x")
    with pytest.raises(DataError, match="several formats"):
        detect_format(["prompt", "completions", "labels", "input", "label"], "x")


# --- edge cases where TRL 1.13's converters and prmkit part ways, each on an edited real line (issue #11) ------------


def _real_shepherd_line() -> dict:
    return json.loads((SHARED / "data" / "math-shepherd" / "samples.jsonl").read_text().splitlines()[0])


@requires_shared
def test_math_shepherd_label_longer_than_input_converts_only_when_the_tail_is_whitespace():
    rec = _real_shepherd_line()
    [expected] = convert("math-shepherd", rec, Options())
    # TRL reads the label at the tag positions only, so a longer label converts. A whitespace tail changes nothing.
    for tail in ("\n", " "):
        assert convert("math-shepherd", {**rec, "label": rec["label"] + tail}, Options()) == [expected]
    # Anything else past the input means the texts do not line up; a '+' there is a label for a step with no tag,
    # which TRL would drop without a word. Refused, naming what is there.
    for tail in ("+", "x"):
        with pytest.raises(
            RowError, match=rf"ends with '\{tail}' past the input" if tail == "+" else "ends with 'x'"
        ) as e:
            convert("math-shepherd", {**rec, "label": rec["label"] + tail}, Options())
        assert e.value.field == "label"
    with pytest.raises(RowError, match="does not match input"):  # shorter: TRL fails with an IndexError
        convert("math-shepherd", {**rec, "label": rec["label"][:-1]}, Options())


@requires_shared
def test_math_shepherd_step_1_twice_before_the_first_tag_is_refused():
    rec = _real_shepherd_line()
    assert rec["input"].count("Step 1:") == 1
    # The same edit in input and label keeps them aligned: now 'Step 1:' appears twice before the first tag. TRL's
    # `prompt.split("Step 1:")` then raises (and stops the whole conversion); splitting at the first occurrence, as
    # prmkit did, would guess. The row is refused with the reason, and --skip-invalid sets it aside.
    edited = {k: rec[k].replace("Step 1:", "Step 1: Step 1:", 1) for k in ("input", "label")}
    with pytest.raises(RowError, match="'Step 1:' appears 2 times before the first step tag") as e:
        convert("math-shepherd", edited, Options())
    assert e.value.field == "input"
    # The '?' fallback likewise (TRL's `prompt.split("?")` raises on two).
    with pytest.raises(RowError, match="'\\?' appears 2 times"):
        convert("math-shepherd", {"input": "Is it? Really? Yes. ки", "label": "Is it? Really? Yes. +"}, Options())


@requires_shared
def test_prm800k_first_step_in_error_gives_no_empty_path_row():
    # Real line 13 ends with a step rated by the labeller, none chosen and no human step (it found the error). With
    # its first step removed, that step is the first: TRL's converter emits a row per rated completion (5) and then
    # the path so far, which is empty: a row with no completion and no label, a 0/0 (NaN) loss alone in a batch.
    # prmkit deliberately emits only the 5 (README, PRM800K).
    rec = json.loads((SHARED / "data" / "prm800k" / "raw_samples.jsonl").read_text().splitlines()[13])
    rec["label"]["steps"] = rec["label"]["steps"][1:]
    [step] = rec["label"]["steps"]
    assert step["chosen_completion"] is None and step["human_completion"] is None and len(step["completions"]) == 5
    rows = convert("prm800k", rec, Options())
    assert [(r["completions"], r["labels"]) for r in rows] == [
        ([c["text"]], [int(c["rating"] == 1)]) for c in step["completions"]
    ]


@pytest.mark.parametrize(
    "fmt, record, reason",
    [
        ("stepwise", {"prompt": "p", "completions": ["a", " \n\t"], "labels": [1, 1]}, "empty step (whitespace only)"),
        ("processbench", {"problem": "p", "steps": ["a", "  "], "label": -1}, "empty step (whitespace only)"),
        # Math-Shepherd steps are stripped, as in TRL's converter: the step between the two tags is then empty.
        ("math-shepherd", {"input": "Q? Step 1: a ки \n ки", "label": "Q? Step 1: a + \n +"}, "empty step"),
    ],
)
def test_whitespace_only_step_is_an_empty_step(fmt, record, reason):
    with pytest.raises(RowError) as e:
        convert(fmt, record, Options(is_eval=True))
    assert (e.value.field, e.value.reason) == ("completions[1]", reason)


@pytest.mark.parametrize("missing", ["label", "problem"])
def test_processbench_missing_field_reads_missing(missing):
    """As every other format words it: `label: missing`, not "expected -1 or a step index below 2, got None"."""
    rec = {"problem": "P", "steps": ["a", "b"], "label": 0}
    del rec[missing]
    with pytest.raises(RowError) as e:
        convert("processbench", rec, Options())
    assert (e.value.field, e.value.reason) == (missing, "missing")
