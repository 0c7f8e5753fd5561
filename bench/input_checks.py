"""Benchmark: what the input checks of issue #12 cost when reading rows (prepare, train and eval all read this way).

Timed: `read_step_rows` (read JSONL, parse, detect, convert, validate) on the prepare benchmark's rows, with the
checks on, against the same call with the two new per-row checks (text is valid Unicode without NUL; the row is in
the detected format) replaced by no-ops, which is prmkit's reading before them. In-process, alternated, median of
``--repeats``; no tokenizer is needed, since tokenization is not part of what changed.

    python bench/input_checks.py --rows 20000
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import make_rows, write_jsonl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import prmkit.data.formats as formats
    import prmkit.data.sources as dataset
    from prmkit.data.formats import Options

    src = write_jsonl(make_rows(args.rows), Path(tempfile.mkdtemp(prefix="prmkit-bench-inputs-")) / "rows.jsonl")
    real = formats._check_texts, dataset.check_format

    def read(checks: bool) -> float:
        formats._check_texts, dataset.check_format = real if checks else (lambda *a: None, lambda *a: None)
        try:
            start = time.perf_counter()
            rows, _ = dataset.read_step_rows(str(src), "auto", Options(), "\n", skip_invalid=False)
            elapsed = time.perf_counter() - start
        finally:
            formats._check_texts, dataset.check_format = real
        assert len(rows) == args.rows
        return elapsed

    read(True)  # warm-up: page cache, imports
    on, off = [], []
    for _ in range(args.repeats):
        off.append(read(False))
        on.append(read(True))
    result = {
        "rows": args.rows,
        "steps": sum(len(r["completions"]) for r in make_rows(args.rows)),
        "seconds_without_checks": round(statistics.median(off), 3),
        "seconds_with_checks": round(statistics.median(on), 3),
        "added_us_per_row": round((statistics.median(on) - statistics.median(off)) / args.rows * 1e6, 2),
        "ratio": round(statistics.median(on) / statistics.median(off), 3),
        "all_without": [round(x, 3) for x in off],
        "all_with": [round(x, 3) for x in on],
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.machine(),
        },
    }
    out = Path(__file__).resolve().parent / "results" / "input_checks.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
