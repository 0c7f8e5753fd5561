"""Benchmark: `prmkit eval` at a fixed threshold against `--tune-threshold`, which must cost no second scoring pass.

Tuning picks the threshold from the scores of the one scoring pass (a sweep over the prefix minima, milliseconds), so
both runs should take the same time within noise. The user's baseline is the fixed-threshold run of the same eval.

One model (bench/score.py's: Qwen2 architecture from a config, hidden 256, 4 layers, random weights with a widened
head, the real Qwen2 tokenizer), the real ProcessBench GSM8K subset from ../shared (400 solutions, 1,871 steps):

(a) whole processes, ``prmkit eval MODEL --data gsm8k=... --no-plots`` with ``--threshold 0.5`` and with
    ``--tune-threshold gsm8k``, alternated (fixed, tuned, fixed, tuned, ...) so that a shared machine's load hits both;
(b) in-process ``prmkit.evaluation.evaluate`` for each, counting the model's forward passes and solutions scored;
(c) the sweep alone: ``prmkit.metrics.tune_threshold`` on (b)'s scores.

    python bench/eval_threshold.py              # 3 runs of each; --repeats N
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import SHARED
from score import build_model

GSM8K = SHARED / "data" / "processbench" / "gsm8k.json"


def counted_eval(model_dir: Path, tune: bool) -> tuple[float, int, int, dict]:
    """Seconds, forward passes, solutions scored and the report of one in-process evaluation."""
    from prmkit.evaluation import evaluate as evaluation
    from prmkit.scoring import StepScorer

    counts = {"forward": 0, "solutions": 0}

    def load(model, **kwargs):
        scorer = StepScorer.from_pretrained(model, **kwargs)
        scorer.model.register_forward_hook(lambda *_: counts.__setitem__("forward", counts["forward"] + 1))
        real = scorer.score_batch

        def score_batch(items):
            counts["solutions"] += len(items)
            return real(items)

        scorer.score_batch = score_batch
        return scorer

    start = time.perf_counter()
    result = evaluation.evaluate(
        [str(model_dir)],
        [f"gsm8k={GSM8K}"],
        threshold=None if tune else 0.5,
        tune_threshold="gsm8k" if tune else None,
        load_scorer=load,
    )
    return time.perf_counter() - start, counts["forward"], counts["solutions"], result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not GSM8K.exists():
        raise SystemExit(f"needs {GSM8K} (../shared)")
    import torch

    from prmkit import metrics

    work = Path(tempfile.mkdtemp(prefix="prmkit-bench-eval-"))
    model_dir = work / "model"
    build_model(model_dir, args.seed)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf")}
    load_before = os.getloadavg()

    modes = {"fixed": ["--threshold", "0.5"], "tuned": ["--tune-threshold", "gsm8k"]}
    times: dict[str, list[float]] = {m: [] for m in modes}
    reports: dict[str, dict] = {}
    for i in range(args.repeats):
        for mode, flags in modes.items():
            out = work / f"{mode}{i}"
            cmd = [
                sys.executable,
                "-m",
                "prmkit",
                "eval",
                str(model_dir),
                "--data",
                f"gsm8k={GSM8K}",
                "-o",
                str(out),
                "--no-plots",
                "--json",
                *flags,
            ]
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            times[mode].append(time.perf_counter() - start)
            if proc.returncode != 0:
                raise SystemExit(f"prmkit eval failed:\n{proc.stderr[-3000:]}")
            reports[mode] = json.loads((out / "report.json").read_text())

    counted = {mode: counted_eval(model_dir, mode == "tuned") for mode in modes}
    fixed_scores = counted["fixed"][3].scores[str(model_dir)]["gsm8k"]
    assert counted["tuned"][3].scores[str(model_dir)]["gsm8k"] == fixed_scores, "tuning must not change the scores"
    subset = counted["fixed"][3].subsets[0]
    samples = [(s, fe) for s, fe in zip(fixed_scores, subset.first_errors) if fe is not None]
    start = time.perf_counter()
    for _ in range(10):
        value, f1 = metrics.tune_threshold(samples)
    sweep = (time.perf_counter() - start) / 10

    median = {m: statistics.median(t) for m, t in times.items()}
    result = {
        "solutions": len(subset),
        "steps": sum(len(c) for c in subset.completions),
        "repeats": args.repeats,
        "whole_process_seconds": {m: [round(t, 2) for t in ts] for m, ts in times.items()},
        "whole_process_median_seconds": {m: round(t, 2) for m, t in median.items()},
        "tuned_over_fixed": round(median["tuned"] / median["fixed"], 3),
        "in_process_seconds": {m: round(c[0], 2) for m, c in counted.items()},
        "forward_passes": {m: c[1] for m, c in counted.items()},
        "solutions_scored": {m: c[2] for m, c in counted.items()},
        "sweep_seconds": round(sweep, 4),
        "tuned_threshold": reports["tuned"]["threshold"],
        "threshold_source": reports["tuned"]["threshold_source"],
        "f1_fixed": reports["fixed"]["subsets"]["gsm8k"]["first_error"]["f1"],
        "f1_tuned": reports["tuned"]["subsets"]["gsm8k"]["first_error"]["f1"],
        "threads": torch.get_num_threads(),
        "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
    }
    out = Path(__file__).resolve().parent / "results" / "eval_threshold.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"ProcessBench GSM8K from ../shared: {result['solutions']} solutions, {result['steps']} steps; Qwen2 h256 x 4 "
        f"layers (random), Qwen2 tokenizer, fp32 CPU, {result['threads']} torch threads\n"
    )
    print(f"| | whole process, median of {args.repeats} (s) | runs (s) | forward passes | solutions scored |")
    print("|---|---|---|---|---|")
    for mode, label in (("fixed", "`--threshold 0.5` (baseline)"), ("tuned", "`--tune-threshold gsm8k`")):
        print(
            f"| {label} | {result['whole_process_median_seconds'][mode]} | "
            f"{', '.join(map(str, result['whole_process_seconds'][mode]))} | {result['forward_passes'][mode]} | "
            f"{result['solutions_scored'][mode]} |"
        )
    print(
        f"\ntuned / fixed: {result['tuned_over_fixed']}x; the sweep itself: {sweep * 1000:.1f} ms "
        f"(threshold {value:.4f}, F1 {f1:.4f} against {result['f1_fixed']:.4f} at 0.5)"
    )


if __name__ == "__main__":
    main()
