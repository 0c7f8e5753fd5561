"""Benchmark: `prmkit train` against TRL 1.13's `PRMTrainer`, each as a whole process, same model, data and settings.

The model is a Qwen2 architecture built from a config (hidden 128, 4 layers, random weights, seed 42) with the real
Qwen2 tokenizer; the data are 1,024 rows of distinct text whose lengths vary like Math-Shepherd's. Both train one
epoch with batch 16, the same learning rate and seed, dropout off, float32, no gradient checkpointing (TRL's
PRMConfig turns it on by default; --trl-gradient-checkpointing measures that), and save the final model. Wall time
counts the
whole process (imports, tokenization, model build, training, save); peak memory is the process's max RSS.

    pip install -e ".[bench]"
    python bench/train.py                  # 1,024 rows; writes bench/results/train.json
    python bench/train.py --repeats 3      # median of 3 runs each, interleaved

Required: prmkit at least 1.5x faster, final training loss within 5% of TRL's.
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
from _data import QWEN2_TOKENIZER, make_rows, write_jsonl

SEED = 42
LEARNING_RATE = 1e-4
BATCH_SIZE = 16
LOGGING_STEPS = 8
MODEL = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "max_position_embeddings": 2048,
}

# TRL's PRMTrainer exactly as its docs use it, on a raw stepwise dataset (it tokenizes with tokenize_row).
TRL_SCRIPT = r"""
import json, os, resource, sys
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
from datasets import load_dataset
from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer, set_seed
from trl.experimental.prm import PRMConfig, PRMTrainer
data, model_dir, out, seed, lr, bs, log_steps, ckpt = sys.argv[1:9]
tok = AutoTokenizer.from_pretrained(model_dir)
config = AutoConfig.from_pretrained(model_dir)
set_seed(int(seed))
model = AutoModelForTokenClassification.from_config(config)
ds = load_dataset("json", data_files=data, split="train")
args = PRMConfig(output_dir=out, per_device_train_batch_size=int(bs), num_train_epochs=1, learning_rate=float(lr),
                 seed=int(seed), logging_steps=int(log_steps), save_strategy="no", report_to="none",
                 disable_tqdm=True, max_length=1024, step_separator="\n", bf16=False,
                 gradient_checkpointing=ckpt == "1")
trainer = PRMTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
result = trainer.train()
trainer.save_model(out)
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
json.dump({"train_loss": result.training_loss, "final_loss": losses[-1], "losses": losses,
           "global_step": trainer.state.global_step}, open(os.path.join(out, "bench.json"), "w"))
"""


def run(cmd: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds, peak RSS (MiB) of the process, and its output; ``run.cpu`` holds its CPU seconds (user + system,
    children included), which a shared machine inflates far less than wall time."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read().decode(), err.read().decode())
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} failed:\n{done.stderr[-4000:]}")
    run.cpu = usage.ru_utime + usage.ru_stime
    return elapsed, usage.ru_maxrss / 1024, done  # ru_maxrss is in KiB on Linux


def make_model_dir(path: Path) -> Path:
    from transformers import AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    config = Qwen2Config(
        **MODEL,
        vocab_size=len(tok),
        num_labels=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    config.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--trl-gradient-checkpointing",
        action="store_true",
        help="TRL's own default (PRMConfig turns it on); off by default so both sides do the same work",
    )
    args = ap.parse_args()
    if not QWEN2_TOKENIZER.exists():
        raise SystemExit(f"needs the Qwen2 tokenizer at {QWEN2_TOKENIZER} (../shared)")

    work = Path(tempfile.mkdtemp(prefix="prmkit-bench-train-"))
    rows = make_rows(args.rows, seed=1)
    data = write_jsonl(rows, work / "rows.jsonl")
    model_dir = make_model_dir(work / "model")
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    base_env.pop("PRMKIT_LAUNCHED", None)

    runs: dict[str, list[dict]] = {"trl": [], "prmkit": []}
    for i in range(args.repeats):
        # Fresh caches every time: neither side may reuse tokenized data from an earlier run.
        env = {**base_env, "HF_HOME": str(work / f"hf{i}"), "PRMKIT_CACHE": str(work / f"cache{i}")}
        out = work / f"trl{i}"
        t, rss, _ = run(
            [
                sys.executable,
                "-c",
                TRL_SCRIPT,
                str(data),
                str(model_dir),
                str(out),
                str(SEED),
                str(LEARNING_RATE),
                str(BATCH_SIZE),
                str(LOGGING_STEPS),
                "1" if args.trl_gradient_checkpointing else "0",
            ],
            env,
        )
        runs["trl"].append(
            {"seconds": t, "cpu_seconds": run.cpu, "peak_rss_mib": rss, **json.loads((out / "bench.json").read_text())}
        )

        out = work / f"prmkit{i}"
        t, rss, done = run(
            [
                sys.executable,
                "-m",
                "prmkit",
                "train",
                "--model",
                str(model_dir),
                "--train",
                str(data),
                "-o",
                str(out),
                "--json",
                "--set",
                "model.init_from_config=true",
                "--set",
                "data.max_prompt_length=null",
                "--set",
                f"train.seed={SEED}",
                "--set",
                f"train.learning_rate={LEARNING_RATE}",
                "--set",
                f"train.per_device_train_batch_size={BATCH_SIZE}",
                "--set",
                "train.num_train_epochs=1",
                "--set",
                f"train.logging_steps={LOGGING_STEPS}",
                "--set",
                "train.save_strategy=no",
            ],
            env,
        )
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        runs["prmkit"].append(
            {
                "seconds": t,
                "cpu_seconds": run.cpu,
                "peak_rss_mib": rss,
                "train_loss": summary["train_loss"],
                "final_loss": summary["final_loss"],
                "global_step": summary["global_step"],
                "batching": summary["batching"],
                "tokens": summary["tokens"],
            }
        )
        print(f"run {i + 1}/{args.repeats}: TRL {runs['trl'][-1]['seconds']:.1f} s, prmkit {t:.1f} s", file=sys.stderr)

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    trl_t, ours_t = med("trl", "seconds"), med("prmkit", "seconds")
    trl_loss, ours_loss = runs["trl"][0]["train_loss"], runs["prmkit"][0]["train_loss"]
    result = {
        "rows": args.rows,
        "steps": sum(len(r["completions"]) for r in rows),
        "tokens": runs["prmkit"][0]["tokens"],
        "optimizer_steps": runs["prmkit"][0]["global_step"],
        "model": {
            "architecture": "Qwen2ForTokenClassification (random init)",
            **MODEL,
            "tokenizer": "Qwen2 (../shared/fixtures/qwen2-tokenizer)",
        },
        "settings": {
            "batch_size": BATCH_SIZE,
            "epochs": 1,
            "learning_rate": LEARNING_RATE,
            "seed": SEED,
            "max_length": 1024,
            "dtype": "float32",
            "dropout": "off",
            "prmkit_batching": runs["prmkit"][0]["batching"],
            "prmkit_gradient_checkpointing": False,
            "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
        },
        "trl_seconds": round(trl_t, 2),
        "prmkit_seconds": round(ours_t, 2),
        "speedup": round(trl_t / ours_t, 2),
        "cpu_seconds": {"trl": round(med("trl", "cpu_seconds"), 1), "prmkit": round(med("prmkit", "cpu_seconds"), 1)},
        "cpu_speedup": round(med("trl", "cpu_seconds") / med("prmkit", "cpu_seconds"), 2),
        "trl_train_loss": round(trl_loss, 4),
        "prmkit_train_loss": round(ours_loss, 4),
        "train_loss_rel_diff": round(abs(ours_loss - trl_loss) / trl_loss, 4),
        "trl_last_logged_loss": round(runs["trl"][0]["final_loss"], 4),
        "prmkit_last_logged_loss": round(runs["prmkit"][0]["final_loss"], 4),
        "trl_peak_rss_mib": round(med("trl", "peak_rss_mib")),
        "prmkit_peak_rss_mib": round(med("prmkit", "peak_rss_mib")),
        "runs": runs,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "repeats": args.repeats,
    }
    result["passed"] = result["speedup"] >= 1.5 and result["train_loss_rel_diff"] <= 0.05
    out = Path(__file__).resolve().parent / "results" / "train.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        "| rows | tokens | TRL PRMTrainer (s) | prmkit train (s) | speed-up | TRL loss | prmkit loss | loss diff | "
        "TRL peak RSS (MiB) | prmkit peak RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {result['rows']} | {result['tokens']} | {result['trl_seconds']} | {result['prmkit_seconds']} | "
        f"{result['speedup']}x | {result['trl_train_loss']} | {result['prmkit_train_loss']} | "
        f"{100 * result['train_loss_rel_diff']:.1f}% | {result['trl_peak_rss_mib']} | {result['prmkit_peak_rss_mib']} |"
    )
    if not result["passed"]:
        raise SystemExit("requirement not met: speed-up >= 1.5x and loss within 5%")


if __name__ == "__main__":
    main()
