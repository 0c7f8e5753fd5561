"""prmkit.evaluation.evaluate: every figure in the report checked against a computation that does not use prmkit's
metrics.

End-to-end tests run tiny random PRMs (conftest.make_tiny_prm) through the real scoring engine; the unit tests at the
bottom use a fake scorer whose scores are chosen by hand, so the expected figures are exact fractions.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import pytest
from conftest import prmkit_log
from eval_fixtures import (
    best_threshold_f1,
    binary_cross_entropy,
    median,
    processbench_first_error,
    processbench_records,
    read_records,
    write_json,
    write_jsonl,
)

from prmkit.errors import DataError, UsageError
from prmkit.evaluation import evaluate as evaluation
from prmkit.evaluation import write as eval_write

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "processbench" / "gsm8k.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SOFT_ROWS = [
    {
        "prompt": "What is 6 * 7?",
        "completions": ["We check: 6 * 7 = 42.", "So the answer is 42."],
        "labels": [0.9, 0.75],
    },
    {
        "prompt": "Is 11 greater than 8?",
        "completions": ["11 is greater than 8.", "Hence, 9.11 > 9.8."],
        "labels": [1.0, 0.2],
    },
    {"prompt": "Which number is larger, 9.8 or 9.11?", "completions": ["Hence, 9.11 > 9.8."], "labels": [0.35]},
    {
        "prompt": "What is p?",
        "completions": ["Let's call the price of a pencil p.", "So the answer is 42."],
        "labels": [0.6, 0.0],
    },
]

# Best-of-N: three problems with three candidates each, and one problem with a single candidate (not a group).
BON_ROWS = [
    # correct: T T F, answers 42 42 7 -> majority picks "42", a correct one
    {
        "prompt": "What is 6 * 7?",
        "completions": ["We check: 6 * 7 = 42.", "So the answer is 42."],
        "labels": [1, 1],
        "final_answer_correct": True,
        "answer": "42",
    },
    {
        "prompt": "What is 6 * 7?",
        "completions": ["Hence, 9.11 > 9.8.", "So the answer is 42."],
        "labels": [0, 1],
        "final_answer_correct": True,
        "answer": "42",
    },
    {
        "prompt": "What is 6 * 7?",
        "completions": ["11 is greater than 8.", "So the answer is 7."],
        "labels": [1, 0],
        "final_answer_correct": False,
        "answer": "7",
    },
    # correct: T F F, answers 5 6 6 -> majority picks "6", a wrong one
    {
        "prompt": "Is 11 greater than 8?",
        "completions": ["11 is greater than 8."],
        "labels": [1],
        "final_answer_correct": True,
        "answer": "5",
    },
    {
        "prompt": "Is 11 greater than 8?",
        "completions": ["Hence, 9.11 > 9.8.", "So 6."],
        "labels": [0, 0],
        "final_answer_correct": False,
        "answer": "6",
    },
    {
        "prompt": "Is 11 greater than 8?",
        "completions": ["We check: 6 * 7 = 42.", "So 6."],
        "labels": [1, 0],
        "final_answer_correct": False,
        "answer": "6",
    },
    # the last candidate has no final_answer_correct: every step labelled correct makes it correct
    {
        "prompt": "What is p?",
        "completions": ["Let's call the price of a pencil p.", "So 1."],
        "labels": [1, 0],
        "final_answer_correct": False,
        "answer": "1",
    },
    {
        "prompt": "What is p?",
        "completions": ["The first equation is 3p + e = 124.", "So 2."],
        "labels": [0, 1],
        "final_answer_correct": False,
        "answer": "2",
    },
    {
        "prompt": "What is p?",
        "completions": ["The first equation is 3p + e = 124.", "So 29."],
        "labels": [1, 1],
        "answer": "29",
    },
    {
        "prompt": "Alone?",
        "completions": ["So the answer is 42."],
        "labels": [1],
        "final_answer_correct": True,
        "answer": "42",
    },
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eval-data")
    return {
        "a": write_json(d / "a.json", processbench_records(16, seed=1)),
        "b": write_json(d / "b.json", processbench_records(7, seed=2)),
        "soft": write_jsonl(d / "soft.jsonl", SOFT_ROWS),
        "bon": write_jsonl(d / "bon.jsonl", BON_ROWS),
    }


@pytest.fixture(scope="module")
def reference(tiny_prm_pair, data):
    """Step scores straight from StepScorer, per model and data file, read without prmkit's data readers."""
    from prmkit.scoring import StepScorer

    out = {}
    for model in tiny_prm_pair:
        scorer = StepScorer.from_pretrained(model)
        out[model] = {}
        for name, path in data.items():
            records = read_records(path)
            items = [(r["problem"], r["steps"]) if "problem" in r else (r["prompt"], r["completions"]) for r in records]
            out[model][name] = scorer.score_batch(items)
    return out


def _labels(path: Path) -> list[int]:
    return [r["label"] for r in read_records(path)]


def _step_pairs(scores, records):
    """(score, target) of every labelled ProcessBench step: up to and including the first error."""
    pairs = []
    for s, r in zip(scores, records):
        last = len(r["steps"]) - 1 if r["label"] == -1 else r["label"]
        pairs += [(s[i], 0.0 if i == r["label"] else 1.0) for i in range(last + 1)]
    return pairs


# ---------------------------------------------------------------------------------------------------------------------
# End to end on tiny models


def test_first_error_and_mean_f1_match_processbench_definition(tiny_prm_pair, data, reference):
    model = tiny_prm_pair[0]
    ref = reference[model]
    threshold = median([s for row in ref["a"] for s in row])
    result = evaluation.evaluate([str(model)], [str(data["a"]), str(data["b"])], threshold=threshold)
    rep = result.report

    assert rep["model"] == str(model)
    assert rep["threshold"] == threshold
    assert rep["threshold_source"] == "given"
    assert rep["tokenization"]["step_separator"] == "\n"  # from the model's prmkit.json
    assert list(rep["subsets"]) == ["a", "b"]
    f1s = {}
    for name in ("a", "b"):
        expected = processbench_first_error(ref[name], _labels(data[name]), threshold)
        fe = rep["subsets"][name]["first_error"]
        for key, value in expected.items():
            assert fe[key] == pytest.approx(value, abs=1e-12), (name, key)
        assert fe["labels_from"] == "processbench"
        f1s[name] = expected["f1"]
    # The sample must exercise both kinds of prediction, or the check above proves little.
    assert (
        0 < rep["subsets"]["a"]["first_error"]["error_accuracy"] < 1
        or 0 < rep["subsets"]["a"]["first_error"]["correct_accuracy"] < 1
    )

    sizes = {n: rep["subsets"][n]["n_solutions"] for n in ("a", "b")}
    assert sizes == {"a": 16, "b": 7}
    assert rep["mean_f1"] == pytest.approx((f1s["a"] + f1s["b"]) / 2, abs=1e-12)
    if f1s["a"] != f1s["b"]:
        weighted = (f1s["a"] * 16 + f1s["b"] * 7) / 23
        assert rep["mean_f1"] != pytest.approx(weighted, abs=1e-9)

    # Step level: only steps up to and including the first error carry labels.
    records = read_records(data["a"])
    pairs = _step_pairs(ref["a"], records)
    step = rep["subsets"]["a"]["step"]
    assert step["n"] == len(pairs)
    assert step["n_wrong"] == sum(r["label"] != -1 for r in records)
    assert step["accuracy"] == pytest.approx(sum((s >= threshold) == (t >= 0.5) for s, t in pairs) / len(pairs))
    assert step["log_loss"] == pytest.approx(binary_cross_entropy([s for s, _ in pairs], [t for _, t in pairs]))
    assert step["soft_targets"] is False
    assert sum(r["n"] for r in rep["subsets"]["a"]["by_position"]) == len(pairs)

    # Outcome: a solution is judged correct when no step falls below the threshold.
    outcome = rep["subsets"]["a"]["outcome"]
    judged = [all(s >= threshold for s in row) for row in ref["a"]]
    actual = [r["final_answer_correct"] for r in records]
    assert outcome["n"] == 16
    assert outcome["accuracy"] == pytest.approx(sum(j == a for j, a in zip(judged, actual)) / 16)


def test_tuned_threshold_is_the_best_on_its_subset_and_applies_to_all(tiny_prm_pair, data, reference):
    model = tiny_prm_pair[0]
    ref = reference[model]
    result = evaluation.evaluate([str(model)], [str(data["a"]), str(data["b"])], tune_threshold="a")
    rep = result.report
    best = best_threshold_f1(ref["a"], _labels(data["a"]))
    assert best > 0
    assert rep["threshold_source"] == f"tuned on a (f1={best:.4f})"
    t = rep["threshold"]
    assert 0.0 <= t <= 1.0
    assert rep["subsets"]["a"]["first_error"]["f1"] == pytest.approx(best, abs=1e-12)
    expected_b = processbench_first_error(ref["b"], _labels(data["b"]), t)
    assert rep["subsets"]["b"]["first_error"]["f1"] == pytest.approx(expected_b["f1"], abs=1e-12)
    # The step figures use the tuned threshold too.
    pairs = _step_pairs(ref["b"], read_records(data["b"]))
    assert rep["subsets"]["b"]["step"]["accuracy"] == pytest.approx(
        sum((s >= t) == (y >= 0.5) for s, y in pairs) / len(pairs)
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not SHARED_GSM8K.exists(), reason="needs ../shared/data/processbench/gsm8k.json, absent from this clone"
)
def test_real_processbench_gsm8k(tiny_prm_pair, tmp_path):
    import shutil

    from prmkit.models.model_dir import build_metadata, write_metadata
    from prmkit.scoring import StepScorer
    from prmkit.tokenization import TokenizationParams

    # The same weights with max_length 256 in prmkit.json: 4x less compute than 1024, and many steps cut away, so
    # unscored steps are exercised on real data.
    model = shutil.copytree(tiny_prm_pair[0], tmp_path / "prm_short")
    write_metadata(model, build_metadata(TokenizationParams(step_separator="\n", max_length=256), base_model=None))
    records = json.loads(SHARED_GSM8K.read_text(encoding="utf-8"))
    result = evaluation.evaluate([str(model)], [str(SHARED_GSM8K)])
    scores = result.scores[str(model)]["gsm8k"]
    # Scoring 400 long solutions twice would double this test's time: spot-check that eval read and scored the
    # records as StepScorer does on the raw file, then derive the figures from the scores at an informative threshold.
    sample = [0, 1, 2, 57, 199, 398, 399]
    alone = StepScorer.from_pretrained(model).score_batch(
        [(records[i]["problem"], records[i]["steps"]) for i in sample]
    )
    for got, want in zip(alone, [scores[i] for i in sample]):
        # Other batch-mates change the float summation order, not the result beyond rounding.
        assert [s is None for s in got] == [s is None for s in want]
        assert [s for s in got if s is not None] == pytest.approx([s for s in want if s is not None], abs=1e-6)
    threshold = statistics.median(s for row in scores for s in row if s is not None)
    rep, _raw = evaluation.build_model_report(str(model), result.subsets, result.scores[str(model)], threshold)
    sub = rep["subsets"]["gsm8k"]
    expected = processbench_first_error(scores, [r["label"] for r in records], threshold)
    assert expected["n_error"] == 207 and expected["n_correct"] == 193
    for key, value in expected.items():
        assert sub["first_error"][key] == pytest.approx(value, abs=1e-12), key
    assert rep["mean_f1"] == pytest.approx(expected["f1"], abs=1e-12)
    assert result.report["tokenization"]["max_length"] == 256
    unscored = sum(s is None for row in scores for s in row)
    assert unscored > 0 and sub["n_steps_unscored"] == unscored
    assert sub["outcome"]["n"] == 400 and sub["outcome"]["n_correct"] == 200
    # 24 problems appear more than once (answers from several generators): those are the Best-of-N groups.
    assert sub["best_of_n"]["n_problems"] == 24
    assert result.report["subsets"]["gsm8k"]["best_of_n"]["n_problems"] == 24


def test_soft_labels_give_soft_log_loss(tiny_prm_pair, data, reference):
    model = tiny_prm_pair[0]
    rep = evaluation.evaluate([str(model)], [str(data["soft"])]).report
    assert rep["threshold_source"] == "default" and rep["threshold"] == 0.5
    step = rep["subsets"]["soft"]["step"]
    scores = [s for row in reference[model]["soft"] for s in row]
    targets = [t for r in SOFT_ROWS for t in r["labels"]]
    assert step["soft_targets"] is True
    assert step["n"] == len(targets) == 7
    assert step["log_loss"] == pytest.approx(binary_cross_entropy(scores, targets), rel=1e-9)
    assert step["brier"] == pytest.approx(sum((s - t) ** 2 for s, t in zip(scores, targets)) / 7, rel=1e-9)
    # Soft targets differ from their rounded versions, so the log-loss really used them as given.
    assert step["log_loss"] != pytest.approx(binary_cross_entropy(scores, [float(t >= 0.5) for t in targets]), rel=1e-6)
    # Soft labels define no "first wrong step".
    assert rep["subsets"]["soft"]["first_error"] is None
    assert rep["mean_f1"] is None


def test_best_of_n_from_grouped_candidates(tiny_prm_pair, data, reference):
    model = tiny_prm_pair[0]
    rep = evaluation.evaluate([str(model)], [str(data["bon"])]).report
    bon = rep["subsets"]["bon"]["best_of_n"]
    scores = reference[model]["bon"]
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    correct = [True, True, False, True, False, False, False, False, True]
    assert bon["n_problems"] == 3 and bon["n"] == 3

    def pick(key):
        hits = []
        for g in groups:
            values = [key(scores[i]) for i in g]
            hits.append(correct[g[values.index(max(values))]])
        return sum(hits) / len(groups)

    assert bon["min"] == pytest.approx(pick(min))
    assert bon["last"] == pytest.approx(pick(lambda s: s[-1]))
    assert bon["mean"] == pytest.approx(pick(lambda s: sum(s) / len(s)))
    assert bon["majority_vote"] == pytest.approx(1 / 3)  # "42" right, "6" wrong, tie -> first answer "1" wrong
    assert bon["random"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)
    assert bon["pass_at_n"] == 1.0
    # Outcome uses final_answer_correct only where the record has it: 9 of 10 rows.
    assert rep["subsets"]["bon"]["outcome"]["n"] == 9
    # Hard stepwise labels give first-error labels: the first 0, or -1.
    fe = rep["subsets"]["bon"]["first_error"]
    assert fe["labels_from"] == "step labels"
    assert (fe["n_error"], fe["n_correct"]) == (6, 4)


@pytest.mark.slow
def test_two_models_side_by_side(tiny_prm_pair, data, reference, tmp_path):
    a, b = (str(m) for m in tiny_prm_pair)
    threshold = 0.5
    result = evaluation.evaluate([a, b], [str(data["a"])], threshold=threshold)
    rep = result.report
    # One shape for one model and for many: the first model's figures on top, every model's under "models".
    assert rep["report_version"] == 1 and rep["model"] == a and list(rep["models"]) == [a, b]
    assert {k: rep[k] for k in ("threshold", "threshold_source", "subsets", "mean_f1")} == {
        k: rep["models"][a][k] for k in ("threshold", "threshold_source", "subsets", "mean_f1")
    }
    # Model b's prmkit.json says "\n\n": its own tokenization is used, and its figures follow from its own scores.
    assert rep["models"][b]["tokenization"]["step_separator"] == "\n\n"
    assert reference[tiny_prm_pair[0]]["a"] != reference[tiny_prm_pair[1]]["a"]
    for name, model in ((a, tiny_prm_pair[0]), (b, tiny_prm_pair[1])):
        expected = processbench_first_error(reference[model]["a"], _labels(data["a"]), threshold)
        fe = rep["models"][name]["subsets"]["a"]["first_error"]
        assert fe["f1"] == pytest.approx(expected["f1"], abs=1e-12)
        assert fe["error_accuracy"] == pytest.approx(expected["error_accuracy"], abs=1e-12)
    files = eval_write.write_outputs(result, tmp_path / "cmp", plots=False)
    assert {p.name for p in files} == {"report.json", "report.md"}
    md = (tmp_path / "cmp" / "report.md").read_text(encoding="utf-8")
    assert f"| Metric | {a} | {b} |" in md
    assert json.loads((tmp_path / "cmp" / "report.json").read_text())["models"][b]["threshold"] == 0.5


@pytest.mark.slow
def test_plots_are_valid_pngs(tiny_prm_pair, data, tmp_path):
    from matplotlib.image import imread

    result = evaluation.evaluate([str(tiny_prm_pair[0])], [str(data["a"]), str(data["bon"])])
    out = tmp_path / "report"
    files = eval_write.write_outputs(result, out, plots=True)
    names = {p.name for p in files}
    assert names == {
        "report.json",
        "report.md",
        "accuracy_by_position.png",
        "reliability.png",
        "score_histogram.png",
        "best_of_n.png",
    }
    for name in names - {"report.json", "report.md"}:
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(result.report))


def test_bad_row_is_named(tiny_prm_pair, tmp_path):
    records = processbench_records(5, seed=3)
    records[2]["label"] = 99
    path = write_json(tmp_path / "bad.json", records)
    with pytest.raises(DataError) as err:
        evaluation.evaluate([str(tiny_prm_pair[0])], [str(path)])
    assert err.value.exit_code == 2
    assert len(err.value.problems) == 1
    assert f"{path}: row 3: label: expected -1 or a step index below" in err.value.problems[0]


def test_skip_invalid_goes_on_and_records_rejects(tiny_prm_pair, tmp_path):
    records = processbench_records(6, seed=4)
    records[1]["steps"] = "not a list"
    path = write_json(tmp_path / "bad.json", records)
    result = evaluation.evaluate([str(tiny_prm_pair[0])], [str(path)], skip_invalid=True)
    sub = result.report["subsets"]["bad"]
    assert sub["n_solutions"] == 5 and sub["rows_rejected"] == 1
    assert [(r["row"], r["field"]) for r in result.rejects] == [(2, "steps")]
    eval_write.write_outputs(result, tmp_path / "out", plots=False)
    lines = (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["record"]["id"] == records[1]["id"]


# ---------------------------------------------------------------------------------------------------------------------
# Unit tests with a fake scorer: exact expected values


class FakeScorer:
    """A step containing "bad" scores 0.1, any other 0.9."""

    params = None

    def score_batch(self, items):
        return [[0.1 if "bad" in step else 0.9 for step in steps] for _, steps in items]


def _fake(*_args, **_kwargs):
    return FakeScorer()


def _pb(problem, steps, label):
    return {"problem": problem, "steps": steps, "label": label, "final_answer_correct": label == -1}


def test_mean_f1_is_unweighted(tmp_path):
    # Subset big: every prediction right (F1 1). Subset small: the error row's wrong step is not marked bad, so the
    # error is missed (error accuracy 0, F1 0). Unweighted mean 0.5; a size-weighted mean would be 4/6.
    big = write_json(
        tmp_path / "big.json",
        [_pb("p1", ["ok", "bad"], 1), _pb("p2", ["bad", "ok"], 0), _pb("p3", ["ok", "ok"], -1), _pb("p4", ["ok"], -1)],
    )
    small = write_json(tmp_path / "small.json", [_pb("q1", ["ok", "wrong"], 1), _pb("q2", ["ok"], -1)])
    rep = evaluation.evaluate(["fake"], [str(big), str(small)], load_scorer=_fake).report
    assert rep["subsets"]["big"]["first_error"]["f1"] == 1.0
    assert rep["subsets"]["small"]["first_error"] == {
        "error_accuracy": 0.0,
        "correct_accuracy": 1.0,
        "f1": 0.0,
        "f1_undefined": None,
        "n_error": 1,
        "n_correct": 1,
        "labels_from": "processbench",
    }
    assert rep["mean_f1"] == 0.5
    assert rep["mean_f1_subsets"] == ["big", "small"] and rep["mean_f1_left_out"] == {}
    assert "tokenization" not in rep  # the fake scorer has no params


def test_mean_f1_says_which_subsets_it_leaves_out_and_why(tmp_path):
    # mixed: F1 1. onlycorrect: no erroneous sample, so no error accuracy. bothzero: the error is missed and the
    # correct solution flagged, so both accuracies are 0 and F1 is 0/0 (run_eval.py prints nan; 0.0 would drag the
    # mean down as if it were a measured F1). stepwise rows with soft labels have no first-error label at all.
    mixed = write_json(tmp_path / "mixed.json", [_pb("p1", ["ok", "bad"], 1), _pb("p2", ["ok"], -1)])
    onlycorrect = write_json(tmp_path / "onlycorrect.json", [_pb("q1", ["ok"], -1), _pb("q2", ["ok", "ok"], -1)])
    bothzero = write_json(tmp_path / "bothzero.json", [_pb("r1", ["ok", "wrong"], 1), _pb("r2", ["bad"], -1)])
    soft = write_jsonl(tmp_path / "soft.jsonl", [{"prompt": "s", "completions": ["ok"], "labels": [0.7]}])
    with prmkit_log() as records:
        rep = evaluation.evaluate(
            ["fake"], [str(onlycorrect), str(mixed), str(bothzero), str(soft)], load_scorer=_fake
        ).report
    subs = rep["subsets"]
    assert subs["mixed"]["first_error"]["f1"] == 1.0 and subs["mixed"]["first_error"]["f1_undefined"] is None
    assert subs["onlycorrect"]["first_error"]["f1"] is None
    assert subs["onlycorrect"]["first_error"]["correct_accuracy"] == 1.0
    assert (
        subs["bothzero"]["first_error"]["error_accuracy"],
        subs["bothzero"]["first_error"]["correct_accuracy"],
        subs["bothzero"]["first_error"]["f1"],
    ) == (0.0, 0.0, None)
    assert rep["mean_f1"] == 1.0 and rep["mean_f1_subsets"] == ["mixed"]
    assert rep["mean_f1_left_out"] == {
        "onlycorrect": "no erroneous samples (label != -1), so the error accuracy is undefined",
        "bothzero": "error and correct accuracy are both 0, so F1 is 0/0 (nan in run_eval.py)",
        "soft": "no first-error labels (soft or missing step labels)",
    }
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any(
        w.startswith("fake: mean_f1 covers mixed only; left out: onlycorrect (no erroneous samples") for w in warnings
    ), warnings

    eval_write.write_outputs(evaluation.EvalResult(rep, {}), tmp_path / "out", plots=False)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "1.000 over mixed only; left out: onlycorrect (no erroneous samples" in md
    assert "F1 undefined: error and correct accuracy are both 0, so F1 is 0/0 (nan in run_eval.py)" in md
    assert json.loads((tmp_path / "out" / "report.json").read_text())["mean_f1_left_out"] == rep["mean_f1_left_out"]


def test_threshold_sources(tmp_path):
    path = write_json(tmp_path / "d.json", [_pb("p1", ["ok", "bad"], 1), _pb("p2", ["ok"], -1)])
    fake = {"load_scorer": _fake}
    assert evaluation.evaluate(["f"], [str(path)], **fake).report["threshold_source"] == "default"
    rep = evaluation.evaluate(["f"], [str(path)], threshold=0.05, **fake).report
    assert (rep["threshold"], rep["threshold_source"]) == (0.05, "given")
    assert rep["subsets"]["d"]["first_error"]["f1"] == 0.0  # nothing below 0.05: the error is missed
    rep = evaluation.evaluate(["f"], [str(path)], tune_threshold="d", **fake).report
    # Every threshold in (0.1, 0.9] is perfect; the one closest to 0.5 wins.
    assert (rep["threshold"], rep["threshold_source"]) == (0.5, "tuned on d (f1=1.0000)")
    with pytest.raises(UsageError, match="no such subset"):
        evaluation.evaluate(["f"], [str(path)], tune_threshold="nope", **fake)
    only_correct = write_json(tmp_path / "c.json", [_pb("p", ["ok"], -1)])
    with pytest.raises(UsageError, match="both with and without an error"):
        evaluation.evaluate(["f"], [str(only_correct)], tune_threshold="c", **fake)


def test_first_error_from_hard_step_labels_and_not_from_soft(tmp_path):
    path = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {"prompt": "p1", "completions": ["ok", "bad", "ok"], "labels": [True, False, True]},  # first error 1, found
            {"prompt": "p2", "completions": ["ok", "ok"], "labels": [1, 1]},  # -1, found
            {"prompt": "p3", "completions": ["ok", "ok"], "labels": [1, 0]},  # first error 1, missed
            {"prompt": "p4", "completions": ["bad"], "labels": [0.3]},  # soft: no first-error label
        ],
    )
    rep = evaluation.evaluate(["f"], [str(path)], load_scorer=_fake).report
    fe = rep["subsets"]["rows"]["first_error"]
    assert (fe["n_error"], fe["n_correct"], fe["error_accuracy"], fe["correct_accuracy"]) == (2, 1, 0.5, 1.0)
    assert fe["f1"] == pytest.approx(2 / 3)
    assert fe["labels_from"] == "step labels"
    assert rep["subsets"]["rows"]["outcome"] is None  # no final_answer_correct anywhere
    assert rep["subsets"]["rows"]["best_of_n"] is None  # every prompt appears once


def test_subset_names(tmp_path):
    path = write_json(tmp_path / "gsm8k.json", [_pb("p", ["ok"], -1)])
    assert evaluation.subset_name(str(path)) == ("gsm8k", str(path))
    assert evaluation.subset_name(f"mine={path}") == ("mine", str(path))
    # Hub ids are named by their split; nothing is downloaded to name them.
    assert evaluation.subset_name("Qwen/ProcessBench:math") == ("math", "Qwen/ProcessBench:math")
    assert evaluation.subset_name("org/data[:10%]") == ("train", "org/data[:10%]")
    other = tmp_path / "x"
    other.mkdir()
    twin = write_json(other / "gsm8k.json", [_pb("p", ["ok"], -1)])
    with pytest.raises(UsageError, match="both named 'gsm8k'"):
        evaluation.evaluate(["f"], [str(path), str(twin)], load_scorer=_fake)
    rep = evaluation.evaluate(["f"], [str(path), f"gsm8k_b={twin}"], load_scorer=_fake).report
    assert list(rep["subsets"]) == ["gsm8k", "gsm8k_b"]


def test_output_dir_rules(tmp_path):
    fresh = tmp_path / "fresh"
    assert eval_write.check_output_dir(fresh) is False
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        eval_write.check_output_dir(foreign)
    assert eval_write.check_output_dir(foreign, overwrite=True) is True
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "report.json").write_text(json.dumps({"model": "m", "subsets": {}}))
    (previous / "best_of_n.png").write_bytes(PNG_SIGNATURE)
    assert eval_write.check_output_dir(previous) is True  # only an earlier report: replaced without --overwrite
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        eval_write.check_output_dir(a_file, overwrite=True)

    # Writing into the previous report removes the plot this run no longer makes.
    data = write_json(tmp_path / "d.json", [_pb("p1", ["ok", "bad"], 1), _pb("p2", ["ok"], -1)])
    result = evaluation.evaluate(["f"], [str(data)], load_scorer=_fake)
    eval_write.write_outputs(result, previous, plots=False)
    assert sorted(p.name for p in previous.iterdir()) == ["report.json", "report.md"]
    eval_write.write_outputs(result, foreign, plots=False)
    assert (foreign / "notes.txt").read_text() == "mine"
