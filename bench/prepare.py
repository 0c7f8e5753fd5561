"""Benchmark: `prmkit prepare` against TRL 1.13's `PRMTrainer.tokenize_row` applied with `Dataset.map`.

Both run as whole processes on the same rows with the real Qwen2 tokenizer; the outputs must be identical.
The limit is the Rust tokenizer's bare `encode_batch` over the same texts (in-process, no assembly, no I/O).

    pip install -e ".[bench]"
    python bench/prepare.py --rows 20000
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

TRL_SCRIPT = r"""
import sys, os
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
from datasets import load_dataset, features
from transformers import AutoTokenizer
from trl.experimental.prm import PRMTrainer
src, tok_dir, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(tok_dir)
ds = load_dataset("json", data_files=src, split="train")
fn_kwargs = {"tokenizer": tok, "step_separator": "\n", "max_length": 1024, "max_completion_length": None,
             "train_on_last_step_only": False, "is_eval": False}
# Exactly what PRMTrainer.__init__ does with a raw train_dataset.
ds = ds.map(PRMTrainer.tokenize_row, fn_kwargs=fn_kwargs, remove_columns=ds.features,
            features=features.Features({"labels": features.Sequence(features.Value("int64")),
                                        "input_ids": features.Sequence(features.Value("int64"))}))
ds.save_to_disk(out)
"""


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return elapsed


def bare_limit(rows: list[dict]) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    texts = [r["prompt"] for r in rows] + [s for r in rows for s in r["completions"]] + ["\n"]
    start = time.perf_counter()
    tok._tokenizer.encode_batch(texts, add_special_tokens=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not QWEN2_TOKENIZER.exists():
        raise SystemExit(f"needs the Qwen2 tokenizer at {QWEN2_TOKENIZER} (../shared)")

    work = Path(tempfile.mkdtemp(prefix="prmkit-bench-prepare-"))
    rows = make_rows(args.rows)
    src = write_jsonl(rows, work / "rows.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf"), "PRMKIT_CACHE": str(work / "cache")}

    trl_times, ours_times = [], []
    for i in range(args.repeats):
        # A fresh datasets cache each time: TRL's load_dataset would otherwise reuse its Arrow conversion.
        env_i = {**env, "HF_HOME": str(work / f"hf{i}"), "PRMKIT_CACHE": str(work / f"cache{i}")}
        trl_times.append(
            timed([sys.executable, "-c", TRL_SCRIPT, str(src), str(QWEN2_TOKENIZER), str(work / f"trl{i}")], env_i)
        )
        ours_times.append(
            timed(
                [
                    sys.executable,
                    "-m",
                    "prmkit",
                    "prepare",
                    "--train",
                    str(src),
                    "--tokenizer",
                    str(QWEN2_TOKENIZER),
                    "-o",
                    str(work / f"ours{i}"),
                    "--json",
                    "--set",
                    "data.max_prompt_length=null",
                ],
                env_i,
            )
        )

    import datasets

    theirs = datasets.load_from_disk(str(work / "trl0"))
    ours = datasets.load_from_disk(str(work / "ours0"))["train"]
    identical = theirs["input_ids"] == ours["input_ids"] and theirs["labels"] == ours["labels"]
    limit = bare_limit(rows)

    trl_t, ours_t = sorted(trl_times)[len(trl_times) // 2], sorted(ours_times)[len(ours_times) // 2]
    result = {
        "rows": args.rows,
        "steps": sum(len(r["completions"]) for r in rows),
        "tokens": int(sum(ours["num_tokens"])),
        "trl_seconds": round(trl_t, 2),
        "prmkit_seconds": round(ours_t, 2),
        "speedup": round(trl_t / ours_t, 2),
        "trl_rows_per_s": round(args.rows / trl_t),
        "prmkit_rows_per_s": round(args.rows / ours_t),
        "encode_batch_rows_per_s": round(args.rows / limit),
        "identical": identical,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "repeats": args.repeats,
    }
    out = Path(__file__).resolve().parent / "results" / "prepare.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        "| rows | TRL map (s) | prmkit prepare (s) | speed-up | prmkit rows/s | bare encode_batch rows/s | identical |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {result['rows']} | {result['trl_seconds']} | {result['prmkit_seconds']} | {result['speedup']}x | "
        f"{result['prmkit_rows_per_s']} | {result['encode_batch_rows_per_s']} | {identical} |"
    )
    if not identical:
        raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
