import json
import math
import random

import pytest

from prmkit.metrics import (
    accuracy_by_position,
    aggregate,
    best_of_n,
    expected_calibration_curve,
    first_error_index,
    first_error_metrics,
    mean_f1,
    mean_f1_summary,
    outcome_metrics,
    step_metrics,
    tune_threshold,
)

approx = pytest.approx

# Fixture: 3 correct steps (0.9, 0.6, 0.3) and 2 wrong ones (0.6, 0.2).
SCORES = [0.9, 0.6, 0.3, 0.6, 0.2]
TARGETS = [1, 1, 1, 0, 0]


# ---------------------------------------------------------------- step level


def test_step_metrics_hand_computed():
    m = step_metrics(SCORES, TARGETS, threshold=0.5)
    # predicted correct (>= 0.5): [1, 1, 0, 1, 0]
    # tp = idx 0,1; fn = idx 2; fp = idx 3; tn = idx 4
    assert m["confusion"] == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
    assert (m["n"], m["n_correct"], m["n_wrong"]) == (5, 3, 2)
    assert m["accuracy"] == approx(3 / 5)
    # correct class: P = 2/(2+1), R = 2/(2+1), F1 = 2/3
    assert m["correct_precision"] == approx(2 / 3)
    assert m["correct_recall"] == approx(2 / 3)
    assert m["correct_f1"] == approx(2 / 3)
    # wrong class: P = tn/(tn+fn) = 1/2, R = tn/(tn+fp) = 1/2, F1 = 1/2
    assert m["wrong_precision"] == approx(1 / 2)
    assert m["wrong_recall"] == approx(1 / 2)
    assert m["wrong_f1"] == approx(1 / 2)
    # PRMScore = 0.5 * 2/3 + 0.5 * 1/2 = 7/12
    assert m["prm_score"] == approx(7 / 12)
    # AUROC over the 3x2 (pos, neg) pairs:
    # 0.9>0.6:1  0.9>0.2:1  0.6=0.6:1/2  0.6>0.2:1  0.3<0.6:0  0.3>0.2:1 -> 4.5/6
    assert m["auroc"] == approx(0.75)
    # log-loss = -(ln .9 + ln .6 + ln .3 + ln(1-.6) + ln(1-.2)) / 5
    assert m["log_loss"] == approx(-math.log(0.9 * 0.6 * 0.3 * 0.4 * 0.8) / 5)
    # Brier = (.1^2 + .4^2 + .7^2 + .6^2 + .2^2) / 5 = 1.06 / 5
    assert m["brier"] == approx(0.212)
    # ECE, 10 bins: bin9 {0.9|1} gap .1; bin6 {0.6|1, 0.6|0} gap |.6-.5| = .1;
    # bin3 {0.3|1} gap .7; bin2 {0.2|0} gap .2
    # -> (1*.1 + 2*.1 + 1*.7 + 1*.2) / 5 = 0.24
    assert m["ece"] == approx(0.24)
    assert m["soft_targets"] is False
    json.dumps(m, allow_nan=False)  # plain, JSON-serialisable values


def test_ece_two_bins():
    m = step_metrics(SCORES, TARGETS, n_bins=2)
    # [0, .5): {.3|1, .2|0}: |.25 - .5| = .25, weight 2/5 -> .1
    # [.5, 1]: {.9|1, .6|1, .6|0}: |.7 - 2/3| = 1/30, weight 3/5 -> .02
    assert m["ece"] == approx(0.12)


def test_threshold_changes_classification_not_probabilistic_scores():
    m = step_metrics(SCORES, TARGETS, threshold=0.25)
    # predicted correct: [1, 1, 1, 1, 0] -> tp 3, fp 1, tn 1, fn 0
    assert m["confusion"] == {"tp": 3, "fp": 1, "tn": 1, "fn": 0}
    assert m["accuracy"] == approx(4 / 5)
    assert m["brier"] == approx(0.212)
    assert m["auroc"] == approx(0.75)


def test_soft_targets_used_as_soft():
    m = step_metrics([0.8, 0.3], [0.7, 0.4])
    # log-loss = -[.7 ln .8 + .3 ln .2 + .4 ln .3 + .6 ln .7] / 2
    expected = -(0.7 * math.log(0.8) + 0.3 * math.log(0.2) + 0.4 * math.log(0.3) + 0.6 * math.log(0.7)) / 2
    assert m["log_loss"] == approx(expected)
    # Brier = ((.8-.7)^2 + (.3-.4)^2) / 2 = .01
    assert m["brier"] == approx(0.01)
    assert m["soft_targets"] is True
    # hard classes: .7 -> correct, .4 -> wrong; both predicted right
    assert (m["n_correct"], m["n_wrong"], m["accuracy"]) == (1, 1, 1.0)


def test_log_loss_clips_extreme_scores():
    m = step_metrics([0.0, 1.0], [1, 1])
    # score 0 for a correct step is clipped to 1e-7; score 1 contributes ~0
    assert m["log_loss"] == approx(-math.log(1e-7) / 2, rel=1e-6)
    assert math.isfinite(m["log_loss"])


def test_single_class_gives_none_auroc_and_zero_f1():
    m = step_metrics([0.9, 0.7], [1, 1])
    assert m["auroc"] is None
    # no wrong steps and none predicted wrong: every denominator is 0 -> 0.0
    assert m["wrong_precision"] == m["wrong_recall"] == m["wrong_f1"] == 0.0
    assert m["correct_f1"] == approx(1.0)
    assert m["prm_score"] == approx(0.5)


def test_auroc_all_tied_is_half():
    assert step_metrics([0.5] * 4, [1, 0, 1, 0])["auroc"] == approx(0.5)


@pytest.mark.parametrize(
    "scores, targets", [([0.5], [0.5, 1]), ([], []), ([1.2], [1]), ([0.5], [-0.1]), ([float("nan")], [1])]
)
def test_step_metrics_rejects_bad_input(scores, targets):
    with pytest.raises(ValueError):
        step_metrics(scores, targets)


def test_step_metrics_rejects_bad_threshold():
    with pytest.raises(ValueError):
        step_metrics(SCORES, TARGETS, threshold=1.5)


def test_calibration_curve_bins():
    rows = expected_calibration_curve([0.05, 0.5, 1.0, 0.55], [0, 1, 1, 0], n_bins=2)
    assert [(r["lo"], r["hi"], r["n"]) for r in rows] == [(0.0, 0.5, 1), (0.5, 1.0, 3)]
    # 1.0 lands in the last bin; mean score (.5+1+.55)/3, mean target 2/3
    assert rows[1]["mean_score"] == approx(2.05 / 3)
    assert rows[1]["mean_target"] == approx(2 / 3)
    empty = expected_calibration_curve([0.9], [1], n_bins=4)
    assert empty[0] == {"lo": 0.0, "hi": 0.25, "n": 0, "mean_score": None, "mean_target": None}


def test_accuracy_by_position_buckets_tail():
    positions = [1, 2, 2, 3, 10, 12]
    scores = [0.9, 0.9, 0.1, 0.2, 0.8, 0.1]
    targets = [1, 1, 1, 0, 0, 0]
    rows = accuracy_by_position(positions, scores, targets, max_position=10)
    # hits: [T, T, F, T, F, T]; 10 and 12 share "10+"
    assert rows == [
        {"position": "1", "n": 1, "accuracy": 1.0},
        {"position": "2", "n": 2, "accuracy": 0.5},
        {"position": "3", "n": 1, "accuracy": 1.0},
        {"position": "10+", "n": 2, "accuracy": 0.5},
    ]
    rows = accuracy_by_position(positions, scores, targets, max_position=2)
    assert [r["position"] for r in rows] == ["1", "2+"]
    assert rows[1]["n"] == 5
    with pytest.raises(ValueError):
        accuracy_by_position([0], [0.5], [1])


# ---------------------------------------------------------------- first error


def test_first_error_index_skips_none():
    assert first_error_index([0.9, None, 0.4, 0.1]) == 2
    assert first_error_index([0.9, None, None]) == -1
    assert first_error_index([]) == -1
    assert first_error_index([0.9, 0.3], threshold=0.2) == -1
    assert first_error_index([0.5]) == -1  # score == threshold is not an error


def test_processbench_formula_worked_example():
    # erroneous samples (label != -1): labels [1, 2, 0], predictions [1, 2, 1] -> 2/3
    # correct samples (label == -1): predictions [-1, 3] -> 1/2
    # f1 = 2 * (2/3) * (1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7
    m = first_error_metrics([1, 2, 1, -1, 3], [1, 2, 0, -1, -1])
    assert m["error_accuracy"] == approx(2 / 3)
    assert m["correct_accuracy"] == approx(1 / 2)
    assert m["f1"] == approx(4 / 7)
    assert (m["n_error"], m["n_correct"]) == (3, 2)


def test_first_error_metrics_edge_cases():
    # Both accuracies 0: run_eval.py computes 0/0 = nan. prmkit reports no F1 (JSON has no nan) and says why,
    # rather than a 0.0 that would pass for a measured figure in the mean.
    both_zero = first_error_metrics([0, 1], [1, -1])
    assert (both_zero["error_accuracy"], both_zero["correct_accuracy"], both_zero["f1"]) == (0.0, 0.0, None)
    assert both_zero["f1_undefined"] == "error and correct accuracy are both 0, so F1 is 0/0 (nan in run_eval.py)"
    no_correct = first_error_metrics([1], [1])
    assert no_correct["correct_accuracy"] is None and no_correct["f1"] is None
    assert no_correct["error_accuracy"] == 1.0
    assert no_correct["f1_undefined"] == "no correct samples (label == -1), so the correct accuracy is undefined"
    assert first_error_metrics([1, -1], [1, -1])["f1_undefined"] is None
    with pytest.raises(ValueError):
        first_error_metrics([1, 2], [1])


def test_mean_f1_is_unweighted():
    # gsm8k: 100 samples, F1 .8; math: 300 samples, F1 .4.
    # Size-weighted would be (100*.8 + 300*.4)/400 = .5; we want (.8+.4)/2 = .6.
    assert mean_f1({"gsm8k": 0.8, "math": 0.4, "olympiad": None}) == approx(0.6)
    assert mean_f1({"a": None}) is None
    assert mean_f1({}) is None


def test_mean_f1_summary_names_what_it_leaves_out():
    fe = {
        "gsm8k": first_error_metrics([1, -1, -1], [1, -1, 2]),  # ea 1/2, ca 1 -> 2/3
        "onlycorrect": first_error_metrics([-1], [-1]),
        "bothzero": first_error_metrics([0, 1], [1, -1]),
        "math": first_error_metrics([0, -1], [0, -1]),  # 1
        "soft": None,
    }
    got = mean_f1_summary(fe)
    assert got["mean_f1"] == approx((2 / 3 + 1) / 2)
    assert got["subsets"] == ["gsm8k", "math"]
    assert got["left_out"] == {
        "onlycorrect": "no erroneous samples (label != -1), so the error accuracy is undefined",
        "bothzero": "error and correct accuracy are both 0, so F1 is 0/0 (nan in run_eval.py)",
        "soft": "no first-error labels (soft or missing step labels)",
    }
    assert mean_f1_summary({"soft": None}) == {
        "mean_f1": None,
        "subsets": [],
        "left_out": {"soft": "no first-error labels (soft or missing step labels)"},
    }


# ---------------------------------------------------------------- tuning

# Each sample is judged right on one interval of thresholds t:
#   A [.9, .62, .2],  label 1: (.62, .9]
#   B [.8, .7, .35],  label 2: (.35, .7]
#   C [.95, .75],     label -1: t <= .75
#   D [.9, .68, .9],  label -1: t <= .68
# All four are right exactly for t in (.62, .68] -> F1 = 1.
TUNE = [([0.9, 0.62, 0.2], 1), ([0.8, 0.7, 0.35], 2), ([0.95, 0.75], -1), ([0.9, 0.68, 0.9], -1)]


def test_tune_threshold_finds_known_best():
    t, f1 = tune_threshold(TUNE)
    # best interval (.62, .68]; the grid point closest to .5 inside it is .63
    assert t == approx(0.63)
    assert f1 == approx(1.0)


def test_tune_threshold_explicit_grid_and_tie_break():
    # t=.5: A wrong (.62 < .5 fails), B, C, D right -> ea = 1/2, ca = 1 -> F1 2/3
    # t=.8: only A right -> ca = 0 -> F1 0
    assert tune_threshold(TUNE, grid=[0.8, 0.5]) == (0.5, approx(2 / 3))
    assert tune_threshold(TUNE, grid=[0.5, 0.65, 0.8]) == (0.65, approx(1.0))
    # .64 and .66 both give F1 1: .64 is closer to .5
    assert tune_threshold(TUNE, grid=[0.66, 0.64])[0] == 0.64


def test_tune_threshold_handles_none_and_matches_brute_force():
    rng = random.Random(0)
    samples = []
    for _ in range(60):
        n = rng.randint(1, 6)
        steps = [None if rng.random() < 0.15 else round(rng.random(), 2) for _ in range(n)]
        samples.append((steps, rng.choice([-1, *list(range(n))])))
    samples.append(([0.9, 0.1], 0))
    samples.append(([0.9, 0.9], -1))
    grid = [i / 20 for i in range(1, 20)]
    t, f1 = tune_threshold(samples, grid=grid)

    def slow_f1(th):
        preds = [first_error_index(s, th) for s, _ in samples]
        return first_error_metrics(preds, [lab for _, lab in samples])["f1"]

    assert f1 == approx(max(slow_f1(g) for g in grid))
    assert slow_f1(t) == approx(f1)
    # the default grid can only do as well or better
    assert tune_threshold(samples)[1] >= f1 - 1e-12


def test_tune_threshold_needs_both_groups():
    with pytest.raises(ValueError):
        tune_threshold([([0.9], -1)])
    with pytest.raises(ValueError):
        tune_threshold([])
    with pytest.raises(ValueError):
        tune_threshold([([0.9], 3), ([0.9], -1)])  # label past the last step


# ---------------------------------------------------------------- outcome and BoN


def test_aggregate():
    a = aggregate([0.5, None, 0.8])
    # min .5, prod .5*.8 = .4, last .8 (None skipped), mean 1.3/2
    assert a == {"min": 0.5, "prod": approx(0.4), "last": 0.8, "mean": approx(0.65)}
    assert aggregate([None]) == {"min": None, "prod": None, "last": None, "mean": None}
    assert aggregate([]) == {"min": None, "prod": None, "last": None, "mean": None}


def test_outcome_metrics():
    m = outcome_metrics([[0.9, 0.8], [0.9, 0.3], [0.6, None], [0.2]], [True, True, False, False])
    # judged correct: [T, F, T, F] -> tp 1, fn 1, fp 1, tn 1
    assert m["confusion"] == {"tp": 1, "fp": 1, "tn": 1, "fn": 1}
    assert m["accuracy"] == approx(0.5)
    assert m["precision"] == approx(0.5)
    assert m["recall"] == approx(0.5)
    assert m["f1"] == approx(0.5)
    assert (m["n"], m["n_correct"]) == (4, 2)
    with pytest.raises(ValueError):
        outcome_metrics([[0.5]], [True, False])


def _c(scores, correct, answer=None):
    c = {"step_scores": scores, "correct": correct}
    if answer is not None:
        c["answer"] = answer
    return c


BON = [
    # P1 aggregates (min, prod, last, mean):
    #   c0 (.2, .18, .2, .55)  c1 (.6, .42, .7, .65)  c2 (.3, .285, .95, .625)
    #   -> min/prod/mean pick c1 (right), last picks c2 (wrong)
    #   votes: "5" x2 vs "6" -> "5", first "5" is c0 (wrong)
    [_c([0.9, 0.2], False, "5"), _c([0.6, 0.7], True, "6"), _c([0.3, 0.95], False, "5")],
    # P2: c0 and c1 tie at .5 on every aggregate; c2 (.4, .36, .9, .65)
    #   -> min/prod keep the first of the tie, c0 (right); last/mean pick c2 (right)
    #   votes: "a" x2 -> first "a" is c0 (right)
    [_c([0.5], True, "a"), _c([0.5], False, "b"), _c([0.4, 0.9], True, "a")],
    # P3: only 2 candidates; every aggregate picks c0 (wrong);
    #   votes tie "x"/"y" -> "x" seen first -> c0 (wrong)
    [_c([0.9], False, "x"), _c([0.1], True, "y")],
]


def test_best_of_n_hand_computed():
    r = best_of_n(BON)
    # min: P1 right, P2 right, P3 wrong -> 2/3; same for prod and mean
    assert r["min"] == approx(2 / 3)
    assert r["prod"] == approx(2 / 3)
    assert r["mean"] == approx(2 / 3)
    # last: P1 wrong (c2), P2 right, P3 wrong -> 1/3
    assert r["last"] == approx(1 / 3)
    # majority: P1 wrong, P2 right, P3 wrong -> 1/3
    assert r["majority_vote"] == approx(1 / 3)
    # random: mean of (1/3, 2/3, 1/2) = 1/2
    assert r["random"] == approx(0.5)
    assert r["pass_at_n"] == 1.0
    assert r["n_problems"] == 3
    assert r["n"] == approx(8 / 3)  # 3, 3, 2 candidates
    json.dumps(r, allow_nan=False)


def test_best_of_n_curve():
    curve = best_of_n(BON)["curve"]
    assert [row["k"] for row in curve] == [1, 2, 3]
    # k=1: always c0 -> right only in P2
    for a in ("min", "prod", "last", "mean"):
        assert curve[0][a] == approx(1 / 3)
    assert curve[0]["random"] == approx(1 / 3)
    assert curve[0]["pass"] == approx(1 / 3)
    # k=2: P1 c1 beats c0 on every aggregate (right); P2 tie -> c0 (right); P3 c0 (wrong)
    for a in ("min", "prod", "last", "mean"):
        assert curve[1][a] == approx(2 / 3)
    # random at k=2: (1/2 + 1/2 + 1/2) / 3; pass@2: all three problems
    assert curve[1]["random"] == approx(0.5)
    assert curve[1]["pass"] == 1.0
    # k=3 is the full result
    assert curve[2]["last"] == approx(1 / 3)


def test_best_of_n_curve_powers_of_two():
    group = [_c([i / 10], i == 9) for i in range(10)]
    r = best_of_n([group])
    assert [row["k"] for row in r["curve"]] == [1, 2, 4, 8, 10]
    assert r["n"] == 10
    # the highest score is the last candidate, which is the only right one
    assert r["curve"][-1]["min"] == 1.0
    assert r["curve"][-2]["min"] == 0.0


def test_best_of_n_majority_needs_every_answer():
    groups = [[_c([0.9], True, "1"), _c([0.2], False)]]
    assert best_of_n(groups)["majority_vote"] is None


def test_best_of_n_unscored_candidate_loses():
    groups = [[_c([None], True), _c([0.1], False)]]
    assert best_of_n(groups)["min"] == 0.0


def test_best_of_n_rejects_bad_input():
    with pytest.raises(ValueError):
        best_of_n([])
    with pytest.raises(ValueError):
        best_of_n([[]])
    with pytest.raises(ValueError):
        best_of_n([[{"step_scores": [0.5]}]])
