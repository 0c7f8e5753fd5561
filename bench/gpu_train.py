"""GPU benchmark: `prmkit train` against TRL 1.13's `PRMTrainer` on one GPU, unconstrained, memory-capped and with
gradient checkpointing forced on, in one command of a few minutes (issue #13).

The setting is the issue's: the Qwen2-0.5B shape built from a config (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4,864, Qwen2's vocabulary, random init, seed 42), bf16 (autocast over fp32 weights, TrainingArguments
bf16), batch 16, learning rate 1e-5, one epoch over 2,048 Math-Shepherd-like rows (bench/_data.py, the real Qwen2
tokenizer, max_length 1,024).

Every run is its own process with its own time limit, so one failure costs only that run:

    trl-default        TRL's PRMTrainer with PRMConfig's defaults (gradient checkpointing on, no allocator setting)
    prmkit-warmup      prmkit's default for a few steps: compiles the FlexAttention kernels into the inductor cache
    prmkit-default     prmkit's defaults (batching auto, gradient_checkpointing auto, expandable segments)
    prmkit-capped      the same, the process capped at --cap-gib with torch.cuda.set_per_process_memory_fraction
    prmkit-ckpt        prmkit's defaults with train.gradient_checkpointing: true
    prmkit-fp32-ref    fp32, length-grouped padding, SDPA, no packing: the loss reference, for --ref-steps steps
    optional (--runs): prmkit-grouped (bf16, grouped, SDPA: the old default), prmkit-liger, prmkit-compile

TRL's default fits in 11.4 GiB (issue #13), under the 16 GiB cap, so its one run is the baseline of all three
comparisons; the JSON records its peak so that stays checked. Reported per run: trainer seconds (the Trainer's own
train() time), tokens/s (non-padding tokens), MFU (6 x non-embedding parameters x tokens/s over the H200's dense
bf16 peak, 989 TFLOP/s by the datasheet; also against the 790 TFLOP/s measured for a bf16 matmul on that machine),
peak memory reserved (torch.cuda.max_memory_reserved in the process, and NVML's per-process figure, which adds the
CUDA context), the loss curve, and for prmkit the memory estimate it planned with.

On the GPU machine (see ../shared/gpu/README.md; prmkit itself is imported from this working tree):

    bash .whl/install-there.sh && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH && python3 bench/gpu_train.py

Here, without a GPU: `--dry-run` prints the runs and prmkit's memory plan for the H200 from the real token lengths,
and `--tiny` runs every stage end to end on the CPU with a tiny model (mechanics only: its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from _data import QWEN2_TOKENIZER, make_rows, write_jsonl  # noqa: E402

GIB = 1024**3
SEED = 42
BATCH_SIZE = 16
LEARNING_RATE = 1e-5
LOGGING_STEPS = 4
H200_BF16_PEAK = 989e12  # dense bf16, datasheet
H200_BF16_MEASURED = 790e12  # 8192^3 bf16 matmul through PyTorch on that machine (issue #13, device notes)
QWEN2_05B = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
}
DEFAULT_RUNS = ("prmkit-warmup", "prmkit-default", "trl-default", "prmkit-capped", "prmkit-ckpt", "prmkit-fp32-ref")
OPTIONAL_RUNS = ("prmkit-grouped", "prmkit-liger", "prmkit-compile")

# TRL's PRMTrainer as its docs use it, on the raw stepwise rows (it tokenizes with tokenize_row), bf16, PRMConfig's
# defaults otherwise (gradient checkpointing on).
TRL_CHILD = r"""
import json, os, sys, time
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
spec = json.loads(sys.argv[1])
import torch
cuda = torch.cuda.is_available()
if cuda and spec["cap_gib"]:
    torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gib"] * 2**30 /
    torch.cuda.get_device_properties(0).total_memory))
from datasets import load_dataset
from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer, set_seed
from trl.experimental.prm import PRMConfig, PRMTrainer
tok = AutoTokenizer.from_pretrained(spec["model"])
set_seed(spec["seed"])
model = AutoModelForTokenClassification.from_config(AutoConfig.from_pretrained(spec["model"]))
ds = load_dataset("json", data_files=spec["data"], split="train")
args = PRMConfig(output_dir=spec["out"], per_device_train_batch_size=spec["batch"], num_train_epochs=1,
                 learning_rate=spec["lr"], seed=spec["seed"], logging_steps=spec["log_steps"], save_strategy="no",
                 report_to="none", disable_tqdm=True, bf16=cuda, use_cpu=not cuda, **spec["extra"])
trainer = PRMTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
tokens = int(sum(len(x) for x in trainer.train_dataset["input_ids"]))
start = time.perf_counter()
result = trainer.train()
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tokens": tokens, "train_loss": result.training_loss,
                  "loss_history": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
                  "global_step": trainer.state.global_step,
                  "gradient_checkpointing": bool(args.gradient_checkpointing),
                  "peak_memory_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
                  "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}))
"""

# `prmkit train` exactly as the CLI runs it: prmkit's allocator default goes in before torch is imported (what the
# CLI entry does), then the cap, then the CLI itself; its --json summary is the last line of stdout.
PRMKIT_CHILD = r"""
import json, sys
spec = json.loads(sys.argv[1])
from prmkit.models.memory import use_expandable_segments
use_expandable_segments()
import torch
if torch.cuda.is_available() and spec["cap_gib"]:
    torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gib"] * 2**30 /
    torch.cuda.get_device_properties(0).total_memory))
sys.argv = ["prmkit", "train", *spec["argv"]]
from prmkit.cli.app import main
main()
"""


# ---------------------------------------------------------------------------------------------------------------------
# Setting up


def make_model_dir(path: Path, tokenizer: Path, shape: dict) -> Path:
    from transformers import AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tokenizer)
    vocab = shape.get("vocab_size", len(tok))
    config = Qwen2Config(
        **{**shape, "vocab_size": max(vocab, len(tok))},
        num_labels=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    config.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def default_tokenizer() -> Path:
    carried = ROOT / ".whl" / "qwen2-tokenizer"  # ../shared does not travel to the GPU machine
    return carried if carried.exists() else QWEN2_TOKENIZER


def prmkit_argv(
    name: str, model: Path, data: Path, out: Path, tiny: bool, ref_steps: int | None, warmup_steps: int, cap_gib: float
) -> list[str]:
    """The `prmkit train` arguments of one run (``ref_steps`` None: the reference runs the whole epoch)."""
    sets = [
        "model.init_from_config=true",
        f"train.seed={SEED}",
        f"train.learning_rate={LEARNING_RATE}",
        f"train.per_device_train_batch_size={BATCH_SIZE}",
        "train.num_train_epochs=1",
        f"train.logging_steps={LOGGING_STEPS}",
        "train.save_strategy=no",
    ]
    if not tiny:
        sets.append("train.bf16=true")
    if name == "prmkit-warmup":
        sets.append(f"train.max_steps={warmup_steps}")
    elif name == "prmkit-capped" and tiny:
        # A CPU process cannot be capped; the plan still can, with a budget the tiny model does not fit.
        sets.append("train.memory_budget_gb=0.001")
    elif name == "prmkit-ckpt":
        sets.append("train.gradient_checkpointing=true")
    elif name == "prmkit-fp32-ref":
        sets = [s for s in sets if s != "train.bf16=true"] + [
            "train.batching=grouped",
            "model.attn_implementation=sdpa",
        ]
        if ref_steps:
            sets.append(f"train.max_steps={ref_steps}")
        if not tiny:
            sets.append("train.tf32=false")  # a true fp32 reference, not TF32 matmuls
    elif name == "prmkit-grouped":
        sets += ["train.batching=grouped", "model.attn_implementation=sdpa"]
    elif name == "prmkit-liger":
        sets.append("train.use_liger_kernel=true")
    elif name == "prmkit-compile":
        sets.append("train.torch_compile=true")
    argv = ["--model", str(model), "--train", str(data), "-o", str(out), "--overwrite", "--json"]
    for s in sets:
        argv += ["--set", s]
    return argv


# ---------------------------------------------------------------------------------------------------------------------
# Running


class NvmlPeak:
    """Peak GPU memory of one process as NVML sees it (CUDA context included), polled every 50 ms; falls back to the
    device's used memory above what it was at the start when per-process figures are hidden (some sandboxes)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.how = pid, 0, None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.base = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        except Exception:
            self.nvml = None
            return
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            try:
                procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
                mine = [p.usedGpuMemory for p in procs if p.pid == self.pid and p.usedGpuMemory]
                if mine:
                    self.peak, self.how = max(self.peak, max(mine)), "per-process"
                elif self.how != "per-process":
                    used = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used - self.base
                    self.peak, self.how = max(self.peak, used), "device used above start"
            except Exception:
                pass

    def stop(self) -> float | None:
        if self.nvml is None:
            return None
        self._stop.set()
        self.thread.join(timeout=1)
        return round(self.peak / GIB, 2)


def run_child(script: str, spec: dict, env: dict, timeout: float) -> dict:
    """Run one stage; its result is the JSON on the last line of stdout (or why there is none)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(spec)], env=env, cwd=str(ROOT), stdout=out, stderr=err
        )
        nvml = NvmlPeak(proc.pid)
        try:
            proc.wait(timeout=timeout)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = f"timed out after {timeout:.0f} s"
        nvml_peak = nvml.stop()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    result: dict = {
        "status": status,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "nvml_peak_gib": nvml_peak,
        "nvml_how": nvml.how,
    }
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    if status == "ok" and lines:
        result.update(json.loads(lines[-1]))
    else:
        result["stderr_tail"] = stderr[-3000:]
    return result


def summarise(name: str, raw: dict, non_embedding: int) -> dict:
    """The figures the report compares, from a child's own summary."""
    out = {"status": raw["status"], "wall_seconds": raw["wall_seconds"]}
    if raw["status"] != "ok":
        out["stderr_tail"] = raw.get("stderr_tail")
        return out
    seconds, tokens = float(raw["seconds"]), int(raw["tokens"])
    tps = tokens / seconds if seconds else 0.0
    out.update(
        {
            "trainer_seconds": round(seconds, 2),
            "tokens": tokens,
            "tokens_per_second": round(tps, 1),
            "mfu": round(6 * non_embedding * tps / H200_BF16_PEAK, 4),
            "mfu_of_measured_matmul_peak": round(6 * non_embedding * tps / H200_BF16_MEASURED, 4),
            "peak_reserved_gib": None if raw.get("peak_memory_gib") is None else round(raw["peak_memory_gib"], 2),
            "nvml_peak_gib": raw.get("nvml_peak_gib"),
            "nvml_how": raw.get("nvml_how"),
            "train_loss": raw.get("train_loss"),
            "loss_history": raw.get("loss_history"),
            "global_step": raw.get("global_step"),
            "gradient_checkpointing": raw.get("gradient_checkpointing"),
            "allocator": raw.get("allocator"),
        }
    )
    if name.startswith("prmkit"):
        mem = raw.get("memory") or {}
        out.update(
            {
                "batching": raw.get("batching"),
                "attn_implementation": raw.get("attn_implementation"),
                "estimated_peak_gib": (mem.get("estimate") or {}).get("total_gib"),
                "checkpointing_reason": mem.get("reason"),
                "budget_source": mem.get("budget_source"),
            }
        )
    return out


def loss_gap(a: list | None, b: list | None) -> dict | None:
    """Mean and largest absolute difference of two loss curves over the steps both logged."""
    if not a or not b:
        return None
    other = {int(s): v for s, v in b}
    diffs = [abs(v - other[int(s)]) for s, v in a if int(s) in other]
    if not diffs:
        return None
    return {"steps": len(diffs), "mean_abs": round(sum(diffs) / len(diffs), 4), "max_abs": round(max(diffs), 4)}


def ratio(a: dict, b: dict, key: str = "trainer_seconds") -> float | None:
    if a.get(key) and b.get(key):
        return round(a[key] / b[key], 2)
    return None


def verdicts(runs: dict) -> dict:
    """The issue's targets, each as a measured ratio (None when a run is missing)."""
    trl, default, capped, ckpt = (
        runs.get(k, {}) for k in ("trl-default", "prmkit-default", "prmkit-capped", "prmkit-ckpt")
    )
    out = {
        "unconstrained_speedup": ratio(trl, default),
        "unconstrained_target": 3.0,
        "capped_speedup": ratio(trl, capped),
        "capped_target": 1.5,
        "capped_completed": capped.get("status") == "ok",
        "ckpt_speedup": ratio(trl, ckpt),
        "ckpt_target": 1.5,
        "ckpt_peak_vs_trl": ratio(ckpt, trl, "peak_reserved_gib"),
        "default_mfu": default.get("mfu"),
        "mfu_target": 0.20,
        "trl_peak_reserved_gib": trl.get("peak_reserved_gib"),
    }
    ref = runs.get("prmkit-fp32-ref", {})
    for name in ("prmkit-default", "prmkit-capped", "prmkit-ckpt"):
        out[f"loss_gap_{name}_vs_fp32_ref"] = loss_gap(runs.get(name, {}).get("loss_history"), ref.get("loss_history"))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Dry run: what prmkit will plan on the H200, from the real token lengths


def dry_run(data_rows: list[dict], tokenizer: Path, cap_gib: float, free_gib: float) -> dict:
    from transformers import AutoTokenizer, Qwen2Config

    from prmkit.models.memory import Budget, model_shape, plan_memory
    from prmkit.tokenization import TokenizationParams, tokenize_rows

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cols = tokenize_rows(
        tok,
        [r["prompt"] for r in data_rows],
        [r["completions"] for r in data_rows],
        [r["labels"] for r in data_rows],
        TokenizationParams(),
    )
    lengths = [len(x) for x in cols["input_ids"]]
    shape = model_shape(Qwen2Config(**QWEN2_05B, num_labels=2))
    plans = {}
    for name, budget, requested, batching in (
        ("prmkit-default", Budget(int(free_gib * GIB), f"free memory of an H200 ({free_gib:g} GiB)"), "auto", "packed"),
        (
            "prmkit-capped",
            Budget(int(cap_gib * GIB), f"per-process memory fraction ({cap_gib:g} GiB)"),
            "auto",
            "packed",
        ),
        ("prmkit-ckpt", Budget(int(free_gib * GIB), f"free memory of an H200 ({free_gib:g} GiB)"), True, "packed"),
        (
            "prmkit-grouped",
            Budget(int(free_gib * GIB), f"free memory of an H200 ({free_gib:g} GiB)"),
            "auto",
            "grouped",
        ),
    ):
        plan = plan_memory(
            requested,
            shape,
            lengths,
            BATCH_SIZE,
            batching,
            budget,
            param_bytes=4,
            mixed=True,
            attention="flex_attention" if batching == "packed" else "sdpa",
        )
        plans[name] = {
            "checkpointing": plan.checkpointing,
            "reason": plan.reason,
            "fits": plan.fits,
            "estimated_peak_gib": plan.estimate.to_dict()["total_gib"],
            "preflight": plan.preflight(),
        }
    return {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "min_tokens": min(lengths),
        "median_tokens": sorted(lengths)[len(lengths) // 2],
        "max_tokens": max(lengths),
        "params": shape.total_params,
        "non_embedding_params": shape.non_embedding_params,
        "plans": plans,
    }


# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument(
        "--runs",
        default=",".join(DEFAULT_RUNS),
        help=f"comma-separated, in order; known: {', '.join(DEFAULT_RUNS + OPTIONAL_RUNS)}",
    )
    ap.add_argument("--cap-gib", type=float, default=16.0, help="the memory-capped runs' per-process limit")
    ap.add_argument("--ref-steps", type=int, default=32, help="optimizer steps of the fp32 loss reference")
    ap.add_argument("--warmup-steps", type=int, default=4)
    ap.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds each run may take (TRL and the reference: 1.5x); default 150, --tiny 600",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for all runs, later ones skipped past it; "
        "default 450 (the GPU machine's command limit is 600), --tiny 3600",
    )
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument(
        "--out", type=Path, default=None, help="default: bench/results/gpu-train.json (--tiny: a temp file)"
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="print the runs and prmkit's memory plan for the H200; train nothing"
    )
    ap.add_argument(
        "--tiny", action="store_true", help="every stage on the CPU with a tiny model (checks the mechanics)"
    )
    args = ap.parse_args()
    args.timeout = args.timeout or (600 if args.tiny else 150)
    args.budget = args.budget or (3600 if args.tiny else 450)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in DEFAULT_RUNS + OPTIONAL_RUNS]
    if unknown:
        ap.error(f"unknown run {unknown[0]!r}")
    tokenizer = args.tokenizer or default_tokenizer()
    if not tokenizer.exists():
        raise SystemExit(
            f"needs the Qwen2 tokenizer at {tokenizer} (../shared, or .whl/qwen2-tokenizer on the GPU machine)"
        )
    rows = make_rows(args.rows if not args.tiny else min(args.rows, 64), seed=1)

    if args.dry_run:
        plan = dry_run(rows, tokenizer, args.cap_gib, free_gib=139.0)
        print(json.dumps({"runs": runs, **plan}, indent=2))
        for name, p in plan["plans"].items():
            print(f"{name}: {p['preflight']}", file=sys.stderr)
        return

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA device: run on the GPU machine, or use --dry-run / --tiny here")
    work = Path(tempfile.mkdtemp(prefix="prmkit-gpu-train-"))
    data = write_jsonl(rows, work / "rows.jsonl")
    shape = TINY if args.tiny else QWEN2_05B
    model = make_model_dir(work / "model", tokenizer, shape)
    from transformers import Qwen2Config

    from prmkit.models.memory import model_shape

    non_embedding = model_shape(Qwen2Config.from_pretrained(model)).non_embedding_params
    base_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "true",
        "PRMKIT_CACHE": str(work / "cache"),
        "HF_HOME": str(work / "hf"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PRMKIT_ALLOC_CONF_DEFAULT", "PRMKIT_LAUNCHED"):
        base_env.pop(name, None)  # every run starts from a user's plain environment

    steps_per_epoch = -(-len(rows) // BATCH_SIZE)
    ref_steps = args.ref_steps if args.ref_steps < steps_per_epoch else None
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for name in runs:
        left = args.budget - (time.perf_counter() - started)
        timeout = args.timeout * (1.5 if name in ("trl-default", "prmkit-fp32-ref") else 1.0)
        if left < 30:
            results[name] = {"status": f"skipped: {args.budget:.0f} s budget spent"}
            continue
        out = work / name
        if name == "trl-default":
            spec = {
                "data": str(data),
                "model": str(model),
                "out": str(out),
                "seed": SEED,
                "lr": LEARNING_RATE,
                "batch": BATCH_SIZE,
                "log_steps": LOGGING_STEPS,
                "cap_gib": 0,
                "extra": {},
            }
            raw = run_child(TRL_CHILD, spec, base_env, min(timeout, left))
        else:
            spec = {
                "cap_gib": args.cap_gib if name == "prmkit-capped" and not args.tiny else 0,
                "argv": prmkit_argv(name, model, data, out, args.tiny, ref_steps, args.warmup_steps, args.cap_gib),
            }
            raw = run_child(PRMKIT_CHILD, spec, base_env, min(timeout, left))
        results[name] = summarise(name, raw, non_embedding)
        r = results[name]
        print(
            f"{name}: {r['status']}, {r.get('trainer_seconds', '-')} s trainer, {r.get('tokens_per_second', '-')} "
            "tok/s, "
            f"peak reserved {r.get('peak_reserved_gib', '-')} GiB, wall {r['wall_seconds']} s",
            file=sys.stderr,
        )

    import transformers

    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    report = {
        "device": device,
        "tiny_cpu_mechanics_check": bool(args.tiny),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "setting": {
            "model": "Qwen2ForTokenClassification from a config (random init)",
            **shape,
            "rows": len(rows),
            "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
            "epochs": 1,
            "precision": "fp32" if args.tiny else "bf16 autocast",
            "cap_gib": args.cap_gib,
            "fp32_reference_steps": args.ref_steps,
            "non_embedding_params": non_embedding,
            "mfu_peak_flops": H200_BF16_PEAK,
        },
        "runs": results,
        "targets": verdicts(results),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    out = args.out or (
        Path(tempfile.mkdtemp()) / "gpu-train-tiny.json" if args.tiny else HERE / "results" / "gpu-train.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        "| run | status | trainer s | tokens/s | MFU | peak reserved GiB | NVML peak GiB | ckpt | batching | final "
        "loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        losses = r.get("loss_history") or []
        print(
            f"| {name} | {r['status']} | {r.get('trainer_seconds', '-')} | {r.get('tokens_per_second', '-')} | "
            f"{r.get('mfu', '-')} | {r.get('peak_reserved_gib', '-')} | {r.get('nvml_peak_gib', '-')} | "
            f"{r.get('gradient_checkpointing', '-')} | "
            f"{r.get('batching', 'padded (TRL)' if name.startswith('trl') else '-')} | "
            f"{round(losses[-1][1], 4) if losses else '-'} |"
        )
    print(json.dumps(report["targets"]))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
