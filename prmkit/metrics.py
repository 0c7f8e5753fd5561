"""Metrics for process reward models (PRMs).

A PRM gives every reasoning step a score, read as p(step is correct). The
functions here turn those scores into step-level classification and
calibration figures, ProcessBench-style first-error figures, outcome-level
figures and Best-of-N selection figures.

Everything is a pure function over plain Python sequences; results are dicts
of plain ``int``/``float``/``None`` so they can go straight into JSON.
Undefined quantities (e.g. AUROC when only one class is present) are ``None``
rather than NaN, because NaN is not valid JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "AGGREGATES",
    "accuracy_by_position",
    "aggregate",
    "best_of_n",
    "expected_calibration_curve",
    "first_error_index",
    "first_error_metrics",
    "mean_f1",
    "mean_f1_summary",
    "outcome_metrics",
    "step_metrics",
    "tune_threshold",
]

#: Names of the ways a solution's step scores are collapsed into one number,
#: in the order they are reported.
AGGREGATES: tuple[str, ...] = ("min", "prod", "last", "mean")

_LOG_LOSS_EPS = 1e-7


# --------------------------------------------------------------------------
# helpers


def _as_unit_array(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of numbers") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"{name} must lie in [0, 1]")
    return arr


def _scores_and_targets(
    scores: Sequence[float] | np.ndarray, targets: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    s = _as_unit_array(scores, "scores")
    t = _as_unit_array(targets, "targets")
    if s.shape != t.shape:
        raise ValueError(f"scores and targets differ in length: {s.size} != {t.size}")
    if s.size == 0:
        raise ValueError("scores and targets are empty")
    return s, t


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    return threshold


def _ratio(num: float, den: float) -> float:
    # 0/0 is reported as 0.0 rather than None so that F1 and PRMScore stay
    # defined (and comparable across models) when a class is never predicted.
    return float(num) / float(den) if den else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2.0 * precision * recall, precision + recall)


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = _ratio(tp, tp + fp)
    r = _ratio(tp, tp + fn)
    return p, r, _f1(p, r)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start index of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=float)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    # Mann-Whitney U: average ranks count a tied (pos, neg) pair as 1/2.
    ranks = _average_ranks(scores)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _bin_index(scores: np.ndarray, n_bins: int) -> np.ndarray:
    # floor(s * n) rather than searchsorted on linspace edges: linspace edges
    # carry rounding error (e.g. 0.30000000000000004), which would put a score
    # of exactly 0.3 into the bin below.
    return np.minimum((scores * n_bins).astype(int), n_bins - 1)


def _present(step_scores: Sequence[float | None]) -> list[float]:
    return [float(s) for s in step_scores if s is not None]


# --------------------------------------------------------------------------
# step level


def expected_calibration_curve(
    scores: Sequence[float] | np.ndarray, targets: Sequence[float] | np.ndarray, n_bins: int = 10
) -> list[dict[str, Any]]:
    """Reliability-diagram bins over ``[0, 1]``, equal width on the score.

    Returns one row per bin, including empty bins, so that rows line up across
    models: ``{"lo", "hi", "n", "mean_score", "mean_target"}``. Bins are
    half-open ``[lo, hi)`` except the last, which also holds a score of 1.0.
    ``mean_score`` and ``mean_target`` are ``None`` for empty bins.
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    n_bins = int(n_bins)
    s, t = _scores_and_targets(scores, targets)
    idx = _bin_index(s, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    sum_s = np.bincount(idx, weights=s, minlength=n_bins)
    sum_t = np.bincount(idx, weights=t, minlength=n_bins)
    rows = []
    for b in range(n_bins):
        n = int(counts[b])
        rows.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "n": n,
                "mean_score": float(sum_s[b] / n) if n else None,
                "mean_target": float(sum_t[b] / n) if n else None,
            }
        )
    return rows


def step_metrics(
    scores: Sequence[float], targets: Sequence[float], threshold: float = 0.5, n_bins: int = 10
) -> dict[str, Any]:
    """Step-level classification and calibration metrics.

    ``scores`` are predicted p(step correct); ``targets`` are in ``[0, 1]``,
    either hard 0/1 labels or soft probabilities. A step counts as correct
    (hard class) when its target is >= 0.5, and is *predicted* correct when its
    score is >= ``threshold``.

    Classification figures (accuracy, precision/recall/F1 for both the
    "correct" and the "wrong" class, ``prm_score``, ``auroc``, ``confusion``)
    use the hard classes. ``prm_score`` is PRMBench's PRMScore, the mean of the
    two F1s. Precision, recall and F1 are defined as 0.0 when their
    denominator is 0. ``auroc`` is the Mann-Whitney statistic with ties
    counted as 1/2, and ``None`` when only one class is present.

    Probabilistic figures use the targets as given, so soft targets stay
    soft: ``log_loss`` is binary cross-entropy with scores clipped to
    ``[1e-7, 1 - 1e-7]``, ``brier`` the mean squared error, and ``ece`` the
    expected calibration error over ``n_bins`` equal-width score bins
    (``|mean score - mean target|`` weighted by the bin's share of steps).
    ``soft_targets`` tells whether any target is strictly between 0 and 1.
    """
    threshold = _check_threshold(threshold)
    s, t = _scores_and_targets(scores, targets)
    curve = expected_calibration_curve(s, t, n_bins)

    actual = t >= 0.5
    predicted = s >= threshold
    tp = int(np.sum(predicted & actual))
    fp = int(np.sum(predicted & ~actual))
    tn = int(np.sum(~predicted & ~actual))
    fn = int(np.sum(~predicted & actual))
    n = int(s.size)

    c_p, c_r, c_f1 = _prf(tp, fp, fn)
    # The "wrong" class is the positive class with the roles swapped.
    w_p, w_r, w_f1 = _prf(tn, fn, fp)

    p = np.clip(s, _LOG_LOSS_EPS, 1.0 - _LOG_LOSS_EPS)
    log_loss = -np.mean(t * np.log(p) + (1.0 - t) * np.log1p(-p))
    ece = sum(row["n"] / n * abs(row["mean_score"] - row["mean_target"]) for row in curve if row["n"])

    return {
        "n": n,
        "n_correct": int(actual.sum()),
        "n_wrong": int(n - actual.sum()),
        "accuracy": (tp + tn) / n,
        "correct_precision": c_p,
        "correct_recall": c_r,
        "correct_f1": c_f1,
        "wrong_precision": w_p,
        "wrong_recall": w_r,
        "wrong_f1": w_f1,
        "prm_score": 0.5 * c_f1 + 0.5 * w_f1,
        "auroc": _auroc(s, actual),
        "log_loss": float(log_loss),
        "brier": float(np.mean((s - t) ** 2)),
        "ece": float(ece),
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "soft_targets": bool(np.any((t > 0.0) & (t < 1.0))),
    }


def accuracy_by_position(
    positions: Sequence[int],
    scores: Sequence[float],
    targets: Sequence[float],
    threshold: float = 0.5,
    max_position: int = 10,
) -> list[dict[str, Any]]:
    """Step accuracy split by 1-based step position.

    Positions >= ``max_position`` share one bucket labelled
    ``f"{max_position}+"`` because late steps are rare and would otherwise
    give noisy single-sample rows. Rows come in position order, as
    ``{"position": str, "n": int, "accuracy": float}``; empty buckets are
    left out.
    """
    threshold = _check_threshold(threshold)
    if int(max_position) != max_position or max_position < 1:
        raise ValueError(f"max_position must be a positive integer, got {max_position}")
    max_position = int(max_position)
    s, t = _scores_and_targets(scores, targets)
    pos = np.asarray(positions)
    if pos.shape != s.shape:
        raise ValueError(f"positions and scores differ in length: {pos.size} != {s.size}")
    if not np.issubdtype(pos.dtype, np.integer):
        if not np.issubdtype(pos.dtype, np.floating) or np.any(pos != np.round(pos)):
            raise ValueError("positions must be integers")
        pos = pos.astype(int)
    if pos.min() < 1:
        raise ValueError("positions are 1-based and must be >= 1")

    hit = (s >= threshold) == (t >= 0.5)
    bucket = np.minimum(pos, max_position)
    rows = []
    for b in range(1, max_position + 1):
        mask = bucket == b
        n = int(mask.sum())
        if not n:
            continue
        label = f"{max_position}+" if b == max_position else str(b)
        rows.append({"position": label, "n": n, "accuracy": float(hit[mask].mean())})
    return rows


# --------------------------------------------------------------------------
# first error (ProcessBench)


def first_error_index(step_scores: Sequence[float | None], threshold: float = 0.5) -> int:
    """0-based index of the first step scored below ``threshold``, or -1.

    ``None`` scores mark steps that were never scored (e.g. lost to
    truncation); they are skipped, i.e. treated as not an error, so that a
    truncated solution is judged only on what the model actually saw.
    """
    threshold = _check_threshold(threshold)
    for i, score in enumerate(step_scores):
        if score is not None and score < threshold:
            return i
    return -1


def first_error_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, Any]:
    """ProcessBench's first-error figures, as in QwenLM/ProcessBench ``code/run_eval.py``.

    ``labels`` hold the index of the first wrong step, or -1 when every step
    is correct; ``predictions`` use the same convention.

    - ``error_accuracy``: share of samples with ``label != -1`` whose
      prediction equals the label;
    - ``correct_accuracy``: the same over samples with ``label == -1``;
    - ``f1``: harmonic mean of the two.

    Unlike the paper, which prints percentages, these are fractions in
    ``[0, 1]``. When a group is empty its accuracy is ``None`` and so is
    ``f1``; when both accuracies are 0, ``f1`` is ``None`` too, where
    ``run_eval.py`` computes 0/0 = nan (0.0 would pass for a defined figure
    in an average). ``f1_undefined`` says why ``f1`` is ``None`` (else it is
    ``None`` itself). ``n_error`` and ``n_correct`` are the group sizes.
    """
    pred = np.asarray(predictions)
    lab = np.asarray(labels)
    if pred.shape != lab.shape or pred.ndim != 1:
        raise ValueError(f"predictions and labels must be 1-D and equally long: {pred.shape} vs {lab.shape}")
    if lab.size and np.any(lab < -1):
        raise ValueError("labels must be -1 (no error) or a 0-based step index")
    match = pred == lab
    is_error = lab != -1
    n_error = int(is_error.sum())
    n_correct = int(lab.size - n_error)
    ea = float(match[is_error].mean()) if n_error else None
    ca = float(match[~is_error].mean()) if n_correct else None
    f1 = why = None
    if ea is None:
        why = "no erroneous samples (label != -1), so the error accuracy is undefined"
    elif ca is None:
        why = "no correct samples (label == -1), so the correct accuracy is undefined"
    elif ea + ca == 0:
        why = "error and correct accuracy are both 0, so F1 is 0/0 (nan in run_eval.py)"
    else:
        f1 = _f1(ea, ca)
    return {
        "error_accuracy": ea,
        "correct_accuracy": ca,
        "f1": f1,
        "f1_undefined": why,
        "n_error": n_error,
        "n_correct": n_correct,
    }


def mean_f1(subset_f1s: Mapping[str, float | None]) -> float | None:
    """Unweighted mean of per-subset first-error F1s, ignoring ``None``.

    This is how ProcessBench's headline average is defined: every subset
    counts the same whatever its size.
    """
    # A fork of ProcessBench's evaluation code prints a mean weighted by
    # subset size under this same name. Never weight here: the figures would
    # silently stop being comparable with the paper's.
    values = [float(v) for v in subset_f1s.values() if v is not None]
    if not values:
        return None
    return sum(values) / len(values)


NO_FIRST_ERROR_LABELS = "no first-error labels (soft or missing step labels)"


def mean_f1_summary(first_errors: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """``mean_f1`` over the subsets that have a first-error F1, and which were left out and why.

    ``first_errors`` maps each subset to its ``first_error_metrics`` (or
    ``None`` when it has no first-error labels). Returns ``{"mean_f1",
    "subsets": [names averaged], "left_out": {name: reason}}``.
    ``run_eval.py`` would print nan for the mean as soon as one subset's F1 is
    nan; leaving such a subset out keeps a figure, and ``left_out`` keeps it
    honest.
    """
    f1s: dict[str, float] = {}
    left_out: dict[str, str] = {}
    for name, fe in first_errors.items():
        if fe is None:
            left_out[name] = NO_FIRST_ERROR_LABELS
        elif fe.get("f1") is None:
            left_out[name] = fe.get("f1_undefined") or "F1 undefined"
        else:
            f1s[name] = float(fe["f1"])
    return {"mean_f1": mean_f1(f1s), "subsets": list(f1s), "left_out": left_out}


def _default_grid(endpoints: np.ndarray) -> np.ndarray:
    base = np.round(np.arange(1, 100) / 100.0, 2)
    inner = endpoints[np.isfinite(endpoints)]
    inner = np.unique(inner[(inner >= 0.0) & (inner <= 1.0)])
    # The F1 only changes at interval endpoints, so one midpoint per gap
    # reaches every attainable value, with a margin on both sides.
    mids = (inner[1:] + inner[:-1]) / 2.0
    return np.unique(np.concatenate([base, mids]))


def tune_threshold(
    samples: Sequence[tuple[Sequence[float | None], int]], grid: Sequence[float] | None = None
) -> tuple[float, float]:
    """Threshold that maximises the first-error F1 (see ``first_error_metrics``).

    ``samples`` are ``(step_scores, first_error_label)`` pairs; ``None`` step
    scores are handled as in ``first_error_index``. The default grid is
    0.01..0.99 in steps of 0.01 plus the midpoints between consecutive
    distinct prefix-minimum scores that can change the outcome (so every
    attainable F1 is reached). On ties the threshold closest to 0.5 wins (the
    smaller one if two are equally close). Returns ``(threshold, f1)``.

    Needs at least one sample with an error and one without, since otherwise
    the F1 is undefined.
    """
    if not samples:
        raise ValueError("samples is empty")
    # For a threshold t, first_error_index is the first i with
    # prefix_min[i] < t. So a sample is judged right exactly when t falls in
    # one interval (lo, hi]: (prefix_min[k], prefix_min[k-1]] for label k,
    # and (-inf, min score] for label -1. Counting hits for every t is then
    # two sorted searches instead of a pass over every sample per t.
    lo = np.empty(len(samples))
    hi = np.empty(len(samples))
    is_error = np.empty(len(samples), dtype=bool)
    for j, sample in enumerate(samples):
        try:
            step_scores, label = sample
        except (TypeError, ValueError) as exc:
            raise ValueError("each sample must be a (step_scores, label) pair") from exc
        label = int(label)
        n_steps = len(step_scores)
        if label < -1 or label >= n_steps:
            raise ValueError(f"sample {j}: label {label} is not -1 or a step index below {n_steps}")
        # None never triggers an error, which +inf reproduces in the prefix min.
        vals = np.array([np.inf if v is None else float(v) for v in step_scores], dtype=float)
        if np.any(np.isnan(vals)):
            raise ValueError(f"sample {j}: step scores contain NaN")
        pm = np.minimum.accumulate(vals) if n_steps else vals
        if label == -1:
            lo[j] = -np.inf
            hi[j] = pm[-1] if n_steps else np.inf
            is_error[j] = False
        else:
            lo[j] = pm[label]
            hi[j] = pm[label - 1] if label > 0 else np.inf
            is_error[j] = True

    n_error = int(is_error.sum())
    n_correct = len(samples) - n_error
    if n_error == 0 or n_correct == 0:
        raise ValueError("need samples both with and without an error to tune a threshold")

    if grid is None:
        g = _default_grid(np.concatenate([lo, hi]))
    else:
        g = np.asarray(grid, dtype=float).ravel()
        if g.size == 0:
            raise ValueError("grid is empty")
        if not np.all(np.isfinite(g)):
            raise ValueError("grid contains NaN or infinite values")

    def hits(lo_g: np.ndarray, hi_g: np.ndarray) -> np.ndarray:
        # #{lo < t <= hi} = #{lo < t} - #{hi < t}, valid because lo <= hi.
        return np.searchsorted(np.sort(lo_g), g, side="left") - np.searchsorted(np.sort(hi_g), g, side="left")

    ea = hits(lo[is_error], hi[is_error]) / n_error
    ca = hits(lo[~is_error], hi[~is_error]) / n_correct
    den = ea + ca
    f1 = np.divide(2.0 * ea * ca, den, out=np.zeros_like(den), where=den > 0)

    best = f1.max()
    candidates = np.flatnonzero(f1 >= best - 1e-12)
    # lexsort sorts by its last key first: distance to 0.5, then the smaller
    # threshold, so the result does not depend on the grid's order.
    pick = candidates[np.lexsort((g[candidates], np.abs(g[candidates] - 0.5)))[0]]
    return float(g[pick]), float(f1[pick])


# --------------------------------------------------------------------------
# outcome level and Best-of-N


def aggregate(step_scores: Sequence[float | None]) -> dict[str, float | None]:
    """Collapse a solution's step scores into ``min``, ``prod``, ``last``, ``mean``.

    ``None`` scores are skipped; every value is ``None`` when no score is
    left. This is the single definition shared by evaluation and
    ``prmkit score``, so the two never disagree.
    """
    vals = _present(step_scores)
    if not vals:
        return dict.fromkeys(AGGREGATES)
    if any(math.isnan(v) for v in vals):
        raise ValueError("step scores contain NaN")
    return {"min": min(vals), "prod": float(np.prod(vals)), "last": vals[-1], "mean": float(np.mean(vals))}


def outcome_metrics(
    all_step_scores: Sequence[Sequence[float | None]], final_answer_correct: Sequence[bool], threshold: float = 0.5
) -> dict[str, Any]:
    """Solution-level verification: is the final answer right?

    A solution is judged correct when all of its scored (non-``None``) steps
    are >= ``threshold``; one without any scored step is therefore judged
    correct. Returns ``n``, ``n_correct`` (solutions whose answer is right),
    ``accuracy`` and ``precision``/``recall``/``f1`` for the "correct" class
    (0.0 when a denominator is 0), plus the confusion counts.
    """
    threshold = _check_threshold(threshold)
    if len(all_step_scores) != len(final_answer_correct):
        raise ValueError(
            "all_step_scores and final_answer_correct differ in length: "
            f"{len(all_step_scores)} != {len(final_answer_correct)}"
        )
    if not all_step_scores:
        raise ValueError("no solutions given")
    predicted = np.array([all(v >= threshold for v in _present(steps)) for steps in all_step_scores], dtype=bool)
    actual = np.array([bool(c) for c in final_answer_correct], dtype=bool)
    tp = int(np.sum(predicted & actual))
    fp = int(np.sum(predicted & ~actual))
    tn = int(np.sum(~predicted & ~actual))
    fn = int(np.sum(~predicted & actual))
    p, r, f1 = _prf(tp, fp, fn)
    n = int(actual.size)
    return {
        "n": n,
        "n_correct": int(actual.sum()),
        "accuracy": (tp + tn) / n,
        "precision": p,
        "recall": r,
        "f1": f1,
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


def _pick(values: list[float | None]) -> int:
    # Candidates without any score can only be picked when nobody has one;
    # strict ">" keeps the first candidate on ties.
    best_i, best_v = 0, -math.inf
    for i, v in enumerate(values):
        if v is not None and v > best_v:
            best_i, best_v = i, v
    return best_i


def _majority_pick(answers: list[str]) -> int:
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, i)
    # dicts keep insertion order and max() returns the first maximum, so a
    # tie goes to the answer that appeared first.
    winner = max(counts, key=counts.__getitem__)
    return first[winner]


def _bon_point(
    aggs: list[list[dict[str, float | None]]], correct: list[list[bool]], answers: list[list[str]] | None, k: int | None
) -> dict[str, float | None]:
    # k=None slices to the end, i.e. uses every candidate.
    out: dict[str, float | None] = {}
    for name in AGGREGATES:
        picked = [c[_pick([a[name] for a in ag[:k]])] for ag, c in zip(aggs, correct)]
        out[name] = float(np.mean(picked))
    if answers is None:
        out["majority_vote"] = None
    else:
        out["majority_vote"] = float(np.mean([c[_majority_pick(a[:k])] for a, c in zip(answers, correct)]))
    out["random"] = float(np.mean([np.mean(c[:k]) for c in correct]))
    out["pass"] = float(np.mean([any(c[:k]) for c in correct]))
    return out


def best_of_n(groups: Sequence[Sequence[Mapping[str, Any]]], seed: int = 0) -> dict[str, Any]:
    """Best-of-N reranking accuracy.

    ``groups`` holds one list of candidates per problem; a candidate is a
    mapping with ``"step_scores"``, ``"correct"`` (bool) and optionally
    ``"answer"`` (str).

    For each aggregate in ``AGGREGATES`` (see ``aggregate``) the candidate
    with the highest value is picked (first one on ties; candidates with no
    scored step lose to any scored one) and the share of problems where it is
    correct is reported under the aggregate's name. Also reported:

    - ``majority_vote``: the most common answer wins (ties to the answer seen
      first) and is judged by the first candidate giving it; ``None`` unless
      every candidate has an ``answer``;
    - ``random``: the exact expected accuracy of a uniform pick, i.e. the mean
      over problems of the share of correct candidates;
    - ``pass_at_n``: share of problems with at least one correct candidate;
    - ``n_problems`` and ``n``: candidates per problem (the mean, as a float,
      when it varies);
    - ``curve``: for k in 1, 2, 4, 8, ... below the largest N, and N itself,
      a row ``{"k", "min", "prod", "last", "mean", "majority_vote", "random",
      "pass"}`` computed on each problem's first k candidates (all of them
      when it has fewer), for Best-of-N plots.

    ``seed`` is accepted for API stability only: the random baseline is
    computed exactly, so nothing is sampled.
    """
    del seed
    if not groups:
        raise ValueError("groups is empty")
    aggs: list[list[dict[str, float | None]]] = []
    correct: list[list[bool]] = []
    answers: list[list[str]] | None = []
    for i, group in enumerate(groups):
        if not group:
            raise ValueError(f"problem {i} has no candidates")
        g_aggs, g_correct, g_answers = [], [], []
        for j, cand in enumerate(group):
            if not isinstance(cand, Mapping) or "step_scores" not in cand or "correct" not in cand:
                raise ValueError(f"problem {i}, candidate {j}: needs 'step_scores' and 'correct'")
            g_aggs.append(aggregate(cand["step_scores"]))
            g_correct.append(bool(cand["correct"]))
            g_answers.append(cand.get("answer"))
        aggs.append(g_aggs)
        correct.append(g_correct)
        if answers is not None:
            if any(a is None for a in g_answers):
                answers = None
            else:
                answers.append([str(a) for a in g_answers])

    sizes = [len(c) for c in correct]
    max_n = max(sizes)
    ks = []
    k = 1
    while k < max_n:
        ks.append(k)
        k *= 2
    ks.append(max_n)

    full = _bon_point(aggs, correct, answers, None)
    curve = [{"k": k, **_bon_point(aggs, correct, answers, k)} for k in ks]
    n: int | float = sizes[0] if len(set(sizes)) == 1 else float(np.mean(sizes))
    return {
        **{name: full[name] for name in AGGREGATES},
        "majority_vote": full["majority_vote"],
        "random": full["random"],
        "pass_at_n": full["pass"],
        "n_problems": len(groups),
        "n": n,
        "curve": curve,
    }
