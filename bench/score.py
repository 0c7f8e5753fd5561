"""Benchmark: `prmkit score` against the seed's documented inference recipe and against bare forward passes.

One model (Qwen2 architecture built from a config: hidden 256, 4 layers, random weights, the real Qwen2 tokenizer)
and the same distinct rows for all three:

(a) recipe: ``transformers.pipeline("token-classification")`` called once per prefix on
    ``separator.join((prompt, *steps[:k])) + separator``, reading LABEL_1's probability at the last token
    (TRL's PRMTrainer docs). Besides being slow it scores at the wrong token whenever BPE merges the separator
    into the step's last token (``.\\n`` is one Qwen2 token): the agreement columns show how often.
(b) ``prmkit score`` as a whole process (a subprocess: startup and model loading included), and its engine time
    alone (the summary's ``seconds``: reading, tokenizing, scoring, writing).
(c) the limit: bare length-sorted padded forward passes over exactly prmkit's tokens under the same token budget,
    in-process, timing only the forward passes.

    python bench/score.py               # 1,000 rows; --rows 400 for a quicker run (start-up then weighs more)
    python bench/score.py --journal-cost   # only: what committing every batch (the resume journal) costs

``--journal-cost`` runs the engine in-process on the same rows with the batch journal as shipped and with a journal
that keeps nothing (score's behaviour before it: work committed only at window ends), alternating, and reports both,
with the time spent inside the journal's own methods (on a shared machine the A/B difference is mostly noise; the
time inside the journal is the cost itself), and the time spent keeping the running sha256 of the partial output that
the state file records (both modes keep it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import QWEN2_TOKENIZER, make_rows, write_jsonl
from _scoring import bare_limit, build_model, encode_rows, recipe

SHAPE = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 1024,
}


def forward_limit(model_dir: Path, rows: list[dict], batch_tokens: int) -> tuple[float, list[list[float]]]:
    """Seconds spent in forward passes alone, over the tokens and batches prmkit would use; and the scores."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForTokenClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    return bare_limit(model, encode_rows(tok, rows), batch_tokens, tok.pad_token_id)


def journal_cost(model_dir: Path, src: Path, work: Path, repeats: int) -> dict:
    """Engine seconds of `score_file` with the batch journal and without, alternating; outputs must be identical."""
    import statistics

    from prmkit.scoring import StepScorer, job, resumable, score_file

    class NoJournal(job.BatchJournal):
        """Keeps nothing: a killed run would redo the whole window, as before the journal."""

        def __init__(self, path: Path, header: dict) -> None:
            self.replayed = 0

        def replay(self, index: int, targets: list) -> None:
            return None

        def record(self, index: int, targets: list, scores: list) -> None:
            pass

        def close(self) -> None:
            pass

    shipped = job.BatchJournal
    inside: list[float] = []  # seconds spent in the journal's own methods, the direct measure of its cost

    class TimedJournal(shipped):
        def __init__(self, path: Path, header: dict) -> None:
            start = time.perf_counter()
            super().__init__(path, header)
            inside.append(time.perf_counter() - start)

        def replay(self, index: int, targets: list):
            start = time.perf_counter()
            try:
                return super().replay(index, targets)
            finally:
                inside.append(time.perf_counter() - start)

        def record(self, index: int, targets: list, scores: list) -> None:
            start = time.perf_counter()
            super().record(index, targets, scores)
            inside.append(time.perf_counter() - start)

        def close(self) -> None:
            start = time.perf_counter()
            super().close()
            inside.append(time.perf_counter() - start)

    hashed = resumable.HashedFile  # the output side of the job opens the partial file
    hashing: list[float] = []  # seconds spent keeping the partial output's running sha256 (both modes do it)

    class TimedHashedFile(hashed):
        def write(self, data: bytes) -> None:
            self._fh.write(data)
            start = time.perf_counter()
            self.sha.update(data)
            hashing.append(time.perf_counter() - start)

        def hexdigest(self) -> str:
            start = time.perf_counter()
            try:
                return super().hexdigest()
            finally:
                hashing.append(time.perf_counter() - start)

    scorer = StepScorer.from_pretrained(model_dir)
    hashing_seconds: list[float] = []
    journal_seconds: list[float] = []
    seconds: dict[str, list[float]] = {"journal": [], "none": []}
    batches: list[int] = []
    outputs: dict[str, bytes] = {}
    for i in range(repeats):
        for mode in ("journal", "none") if i % 2 == 0 else ("none", "journal"):
            out = work / f"journal-{mode}-{i}.jsonl"
            job.BatchJournal = TimedJournal if mode == "journal" else NoJournal
            resumable.HashedFile = TimedHashedFile
            counted: list[int] = []
            inside.clear()
            hashing.clear()
            try:
                summary = score_file(scorer, str(src), str(out), on_steps=counted.append)
            finally:
                job.BatchJournal = shipped
                resumable.HashedFile = hashed
            seconds[mode].append(summary.seconds)
            if mode == "journal":
                journal_seconds.append(sum(inside))
                hashing_seconds.append(sum(hashing))
            batches.append(len(counted))
            data = out.read_bytes()
            assert outputs.setdefault(mode, data) == data and outputs.get("journal", data) == outputs.get("none", data)
    with_j, without = statistics.median(seconds["journal"]), statistics.median(seconds["none"])
    return {
        "repeats": repeats,
        "forward_batches": batches[0],
        "windows": -(-sum(1 for _ in open(src)) // scorer.sort_window),
        "engine_seconds_with_journal": round(with_j, 3),
        "engine_seconds_without_journal": round(without, 3),
        "engine_seconds_runs": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "journal_overhead": round(with_j / without - 1, 4),
        "seconds_inside_the_journal_runs": [round(x, 4) for x in journal_seconds],
        "share_of_engine_time_inside_the_journal": round(
            statistics.median(j / e for j, e in zip(journal_seconds, seconds["journal"])), 5
        ),
        "seconds_hashing_the_output_runs": [round(x, 5) for x in hashing_seconds],
        "outputs_identical": True,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="token budget for prmkit and the limit alike (default: prmkit's own for a CPU)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for all three (the subprocess gets OMP_NUM_THREADS); on a machine shared with "
        "other work, 1 avoids OpenMP threads stalling on each other, which hurts the recipe's many "
        "small forward passes far more than batched ones",
    )
    ap.add_argument(
        "--journal-cost",
        action="store_true",
        help="only measure the engine with and without the batch journal (bench/results/score-journal.json)",
    )
    ap.add_argument("--repeats", type=int, default=5, help="runs of each for --journal-cost")
    args = ap.parse_args()
    if not QWEN2_TOKENIZER.exists():
        raise SystemExit(f"needs the Qwen2 tokenizer at {QWEN2_TOKENIZER} (../shared)")

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="prmkit-bench-score-"))
    model_dir = work / "model"
    from transformers import AutoTokenizer

    build_model(model_dir, AutoTokenizer.from_pretrained(QWEN2_TOKENIZER), SHAPE, seed=args.seed)
    rows = [{"prompt": r["prompt"], "completions": r["completions"]} for r in make_rows(args.rows, seed=args.seed + 1)]
    src = write_jsonl(rows, work / "rows.jsonl")
    steps = sum(len(r["completions"]) for r in rows)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    if args.journal_cost:
        os.environ["HF_HUB_OFFLINE"] = "1"
        result = {
            "rows": args.rows,
            "steps": steps,
            "threads": torch.get_num_threads(),
            **journal_cost(model_dir, src, work, args.repeats),
            "loadavg_1min": round(os.getloadavg()[0], 2),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, Python {platform.python_version()}",
        }
        out = Path(__file__).resolve().parent / "results" / "score-journal.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return

    from prmkit.scoring import default_batch_tokens

    budget = args.batch_tokens or default_batch_tokens("cpu")
    load_before = os.getloadavg()
    limit_1, limit_scores = forward_limit(model_dir, rows, budget)

    runs = []
    for i in range(2):  # twice, keeping the faster: a shared machine's neighbours come and go
        cmd = [
            sys.executable,
            "-m",
            "prmkit",
            "score",
            str(model_dir),
            str(src),
            "-o",
            str(work / f"scored{i}.jsonl"),
            "--json",
            *(["--batch-tokens", str(args.batch_tokens)] if args.batch_tokens else []),
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"prmkit score failed:\n{proc.stderr[-3000:]}")
        runs.append((elapsed, json.loads(proc.stdout.strip().splitlines()[-1])))
        assert runs[-1][1]["batch_tokens"] == budget, "prmkit and the limit must use the same budget"
    whole, summary = min(runs, key=lambda r: r[0])
    engine = min(r[1]["seconds"] for r in runs)
    ours = [json.loads(line)["step_scores"] for line in (work / "scored0.jsonl").read_text().splitlines()]

    base = recipe(model_dir, rows)
    recipe_t, recipe_scores, merged_share, recipe_tokens = (
        base["seconds"],
        base["scores"],
        base["merged_share"],
        base["tokens"],
    )
    # The limit again, after the others, keeping its faster run (the stricter ratio).
    limit_2, _ = forward_limit(model_dir, rows, budget)
    limit = min(limit_1, limit_2)

    pairs = [(a, b) for x, y in zip(ours, limit_scores) for a, b in zip(x, y)]
    max_vs_limit = max(abs(a - b) for a, b in pairs)
    rp = [(a, b) for x, y in zip(ours, recipe_scores) for a, b in zip(x, y)]
    max_vs_recipe = max(abs(a - b) for a, b in rp)
    verdict_differs = sum((a >= 0.5) != (b >= 0.5) for a, b in rp) / len(rp)

    rate = lambda seconds: steps / seconds  # noqa: E731
    result = {
        "rows": args.rows,
        "steps": steps,
        "tokens": summary.get("tokens"),
        "recipe_tokens": recipe_tokens,
        "recipe_token_ratio": round(recipe_tokens / summary["tokens"], 2),
        "batch_tokens": budget,
        "threads": torch.get_num_threads(),
        "recipe_seconds": round(recipe_t, 2),
        "prmkit_whole_process_seconds": round(whole, 2),
        "prmkit_engine_seconds": round(engine, 2),
        "prmkit_timings": summary.get("timings"),
        "prmkit_outside_forward_and_io_seconds": round(
            whole - summary["timings"]["forward"] - summary["timings"]["write"], 2
        ),
        "limit_seconds": round(limit, 2),
        "limit_seconds_runs": [round(limit_1, 2), round(limit_2, 2)],
        "recipe_steps_per_s": round(rate(recipe_t), 1),
        "prmkit_whole_process_steps_per_s": round(rate(whole), 1),
        "prmkit_engine_steps_per_s": round(rate(engine), 1),
        "limit_steps_per_s": round(rate(limit), 1),
        "speedup_vs_recipe_whole_process": round(recipe_t / whole, 2),
        "speedup_vs_recipe_engine": round(recipe_t / engine, 2),
        "share_of_limit_whole_process": round(limit / whole, 3),
        "share_of_limit_engine": round(limit / engine, 3),
        "max_abs_diff_vs_limit": max_vs_limit,
        "max_abs_diff_vs_recipe": max_vs_recipe,
        "recipe_steps_read_at_a_merged_token": round(merged_share, 3),
        "recipe_verdict_differs_at_0.5": round(verdict_differs, 3),
        "prmkit_whole_process_seconds_runs": [round(r[0], 2) for r in runs],
        "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
    }
    out = (
        Path(__file__).resolve().parent / "results" / ("score.json" if args.rows == 1000 else f"score-{args.rows}.json")
    )
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"{args.rows} solutions, {steps} steps, {summary.get('tokens')} tokens; Qwen2 h256 x 4 layers (random), "
        f"Qwen2 tokenizer, fp32 CPU, {torch.get_num_threads()} torch threads, batch_tokens {budget}\n"
    )
    print("| | seconds | steps/s | vs recipe | share of limit |")
    print("|---|---|---|---|---|")
    print(
        f"| (a) recipe: pipeline per prefix | {result['recipe_seconds']} | {result['recipe_steps_per_s']} | 1x | "
        f"{limit / recipe_t:.1%} |"
    )
    print(
        f"| (b) `prmkit score`, whole process | {result['prmkit_whole_process_seconds']} | "
        f"{result['prmkit_whole_process_steps_per_s']} | {result['speedup_vs_recipe_whole_process']}x | "
        f"{result['share_of_limit_whole_process']:.1%} |"
    )
    print(
        f"| (b) `prmkit score`, engine (summary seconds) | {result['prmkit_engine_seconds']} | "
        f"{result['prmkit_engine_steps_per_s']} | {result['speedup_vs_recipe_engine']}x | "
        f"{result['share_of_limit_engine']:.1%} |"
    )
    print(
        f"| (c) limit: bare padded forward passes | {result['limit_seconds']} | {result['limit_steps_per_s']} | "
        f"{recipe_t / limit:.2f}x | 100% |"
    )
    t = summary["timings"]
    print(
        f"\nprmkit's timings (the faster run): start-up {t['startup']} s (interpreter, imports), model load "
        f"{t['model_load']} s, tokenize {t['tokenize']} s, forward {t['forward']} s, write {t['write']} s; outside "
        f"forward passes and I/O {result['prmkit_outside_forward_and_io_seconds']} s"
    )
    print(
        f"\nprmkit vs bare forward: max |diff| {max_vs_limit:.2e}. The recipe reads {merged_share:.1%} of steps at a "
        f"token where BPE merged the separator into the step (max |diff| vs prmkit {max_vs_recipe:.3f}; verdict at "
        f"0.5 differs on {verdict_differs:.1%} of steps).\nThe recipe reads {recipe_tokens / summary['tokens']:.2f}x "
        "the tokens (every prefix again); the rest of the gain "
        f"({recipe_t / limit / (recipe_tokens / summary['tokens']):.2f}x) "
        "is cheaper tokens: cache-sized batches instead of one long sequence at a time."
    )


if __name__ == "__main__":
    main()
