"""Data files and reference computations shared by test_eval.py and test_eval_cli.py.

The reference functions re-derive the figures from the ProcessBench definition (QwenLM/ProcessBench
``code/run_eval.py``) without prmkit's metrics module, so the tests check prmkit against the definition.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

SENTENCES = [
    "Which number is larger, 9.8 or 9.11?",
    "11 is greater than 8.",
    "Hence, 9.11 > 9.8.",
    "Janet spends 3 hours + 5 hours = 8 hours per week on music lessons.",
    "The first equation is 3p + e = 124, and the second equation is 5p + e = 182.",
    "Let's call the price of a pencil p and the price of a jumbo eraser e.",
    "So the answer is 42.",
    "We check: 6 * 7 = 42.",
]
PROBLEMS = [
    "Which number is larger, 9.8 or 9.11?",
    "Janet spends 3 hours + 5 hours per week on music lessons. How many hours is that?",
    "A pencil and a jumbo eraser cost 124 cents; five pencils and an eraser cost 182. What is p?",
    "What is 6 * 7?",
    "Is 11 greater than 8?",
]


def processbench_records(n: int, seed: int) -> list[dict]:
    """ProcessBench-format records; problems repeat, so Best-of-N groups exist."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        steps = [rng.choice(SENTENCES) for _ in range(rng.randint(2, 5))]
        label = -1 if i % 2 == 0 else rng.randrange(len(steps))
        records.append(
            {
                "id": f"t-{seed}-{i}",
                "generator": "test",
                "problem": PROBLEMS[i % len(PROBLEMS)],
                "steps": steps,
                "final_answer_correct": label == -1,
                "label": label,
            }
        )
    return records


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_records(path: Path) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    return json.loads(text) if str(path).endswith(".json") else [json.loads(x) for x in text.splitlines() if x]


def processbench_first_error(step_scores: list[list[float | None]], labels: list[int], threshold: float) -> dict:
    """ProcessBench's run_eval.py: prediction = first step below the threshold, or -1; F1 of the two accuracies."""
    preds = []
    for scores in step_scores:
        pred = -1
        for i, s in enumerate(scores):
            if s is not None and s < threshold:
                pred = i
                break
        preds.append(pred)
    err = [p == lab for p, lab in zip(preds, labels) if lab != -1]
    cor = [p == lab for p, lab in zip(preds, labels) if lab == -1]
    acc1 = sum(err) / len(err)
    acc2 = sum(cor) / len(cor)
    f1 = 2 * acc1 * acc2 / (acc1 + acc2) if acc1 + acc2 else 0.0
    return {"error_accuracy": acc1, "correct_accuracy": acc2, "f1": f1, "n_error": len(err), "n_correct": len(cor)}


def best_threshold_f1(step_scores: list[list[float | None]], labels: list[int]) -> float:
    """The highest first-error F1 any threshold reaches, by trying every threshold where the F1 can change."""
    values = sorted({s for scores in step_scores for s in scores if s is not None})
    candidates = [0.0, 1.0, *values, *(min(1.0, v + 1e-9) for v in values)]
    return max(processbench_first_error(step_scores, labels, t)["f1"] for t in candidates)


def binary_cross_entropy(scores: list[float], targets: list[float]) -> float:
    eps = 1e-7
    total = 0.0
    for s, t in zip(scores, targets):
        p = min(max(s, eps), 1 - eps)
        total += -(t * math.log(p) + (1 - t) * math.log(1 - p))
    return total / len(scores)


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2]
