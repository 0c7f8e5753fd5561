"""Synthetic step-labelled rows of distinct text whose lengths vary like Math-Shepherd's (shared by the benchmarks)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

WORDS = [
    "the",
    "number",
    "of",
    "apples",
    "oranges",
    "pencils",
    "erasers",
    "students",
    "books",
    "costs",
    "each",
    "total",
    "price",
    "per",
    "week",
    "hours",
    "minutes",
    "so",
    "we",
    "add",
    "subtract",
    "multiply",
    "divide",
    "twice",
    "half",
    "remaining",
    "left",
    "gives",
    "equals",
    "therefore",
    "answer",
    "first",
    "second",
    "third",
    "then",
    "after",
    "before",
    "more",
    "less",
    "than",
    "sum",
    "product",
    "difference",
    "ratio",
    "percent",
    "dollars",
    "cents",
    "meters",
    "kilometers",
]

# ../shared beside the repository; PRMKIT_SHARED points elsewhere (a git worktree kept apart from its clone, say).
SHARED = Path(os.environ.get("PRMKIT_SHARED") or Path(__file__).resolve().parents[2] / "shared")
QWEN2_TOKENIZER = SHARED / "fixtures" / "qwen2-tokenizer"


def _sentence(rng: random.Random, n_words: int, tag: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    # Numbers and a row tag make every text distinct, so no benchmark gains from repeated strings.
    return f"{' '.join(words).capitalize()} {a} + {b} = <<{a}+{b}={a + b}>>{a + b} (#{tag})."


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Math-Shepherd-like: a 30-120 word problem and 3-12 steps of 8-40 words, labels mostly + then -."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = _sentence(rng, rng.randint(30, 120), i) + " How many are there?"
        n_steps = rng.randint(3, 12)
        steps = [f"Step {k + 1}: " + _sentence(rng, rng.randint(8, 40), i * 100 + k) for k in range(n_steps)]
        first_bad = rng.choice([None, None, rng.randrange(n_steps)])
        labels = [first_bad is None or k < first_bad for k in range(n_steps)]
        rows.append({"prompt": prompt, "completions": steps, "labels": labels})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path
