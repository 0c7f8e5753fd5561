"""GPU benchmark: `prmkit train` under DDP, FSDP2 and DeepSpeed ZeRO-3 on every GPU of one machine, in one command of
a few minutes (issue #21): tokens/s, and peak memory per rank against prmkit's per-rank estimate.

The setting is bench/gpu_train.py's: the Qwen2-0.5B shape from a config (random init, seed 42), bf16 autocast, the
real Qwen2 tokenizer, Math-Shepherd-like rows (bench/_data.py). Each strategy is one `prmkit train --num-processes N
--accelerate-config CONFIG` (the user's command; N = the GPUs visible, one process each where one GPU is lent),
its own process tree with its own time limit, so a failure costs only that run:

    ddp     distributed_type MULTI_GPU: every rank holds the whole model, gradients and optimizer states
    fsdp    FSDP2, FULL_SHARD per decoder layer, FULL_STATE_DICT: weights, gradients and states sharded N ways
    zero3   DeepSpeed ZeRO-3 (needs deepspeed on the GPU machine): the same sharding, DeepSpeed's engine

Reported per run: the strategy prmkit recorded (what ran, and rank 0's share of the parameters), trainer seconds,
tokens/s (non-padding tokens, all ranks), peak memory per rank (NVML, each GPU's processes, CUDA context included;
and rank 0's torch.cuda.max_memory_reserved), prmkit's per-rank estimate, and the loss curve.

On the GPU machine (see ../shared/gpu/README.md):

    bash .whl/install-there.sh && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH && python3 bench/gpu_dist.py

Here, without a GPU: `--dry-run` prints each run's accelerate config, command and prmkit's per-rank memory plan for
an H200 (--gpus N), from the real token lengths.
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
from _data import make_rows, write_jsonl  # noqa: E402
from gpu_train import QWEN2_05B, SEED, default_tokenizer, make_model_dir  # noqa: E402

GIB = 1024**3
BATCH_SIZE = 8  # per rank
LEARNING_RATE = 1e-5
LOGGING_STEPS = 5
RUNS = ("ddp", "fsdp", "zero3")
H200_GIB = 139.0

_COMMON = {
    "compute_environment": "LOCAL_MACHINE",
    "num_machines": 1,
    "machine_rank": 0,
    "mixed_precision": "bf16",
    "dynamo_backend": "NO",
    "main_training_function": "main",
    "rdzv_backend": "static",
    "same_network": True,
    "use_cpu": False,
}


def accelerate_config(name: str, gpus: int) -> dict:
    """The accelerate config of one run (examples/accelerate/*.yaml, with the GPU count)."""
    if name == "ddp":
        return {**_COMMON, "distributed_type": "MULTI_GPU", "num_processes": gpus, "gpu_ids": "all"}
    if name == "fsdp":
        return {
            **_COMMON,
            "distributed_type": "FSDP",
            "num_processes": gpus,
            "fsdp_config": {
                "fsdp_version": 2,
                "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "fsdp_transformer_layer_cls_to_wrap": "Qwen2DecoderLayer",
                "fsdp_state_dict_type": "FULL_STATE_DICT",
                "fsdp_cpu_ram_efficient_loading": True,
                "fsdp_offload_params": False,
                "fsdp_reshard_after_forward": True,
                "fsdp_activation_checkpointing": False,
            },
        }
    if name == "zero3":
        return {
            **_COMMON,
            "distributed_type": "DEEPSPEED",
            "num_processes": gpus,
            "deepspeed_config": {
                "zero_stage": 3,
                "zero3_init_flag": True,
                "zero3_save_16bit_model": True,
                "offload_optimizer_device": "none",
                "offload_param_device": "none",
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 1.0,
            },
        }
    raise ValueError(name)


def expected_strategy(name: str, gpus: int):
    """prmkit's Strategy for a run, as the memory plan assumes it."""
    from prmkit.training.distributed import Strategy

    if name == "fsdp":
        return Strategy(
            name="fsdp", world_size=gpus, fsdp_version=2, sharding="FULL_SHARD", state_dict_type="FULL_STATE_DICT"
        )
    if name == "zero3":
        return Strategy(name="deepspeed", world_size=gpus, zero_stage=3)
    return Strategy(name="ddp" if gpus > 1 else "single", world_size=gpus)


def prmkit_argv(model: Path, data: Path, out: Path, config: Path, gpus: int, max_steps: int) -> list[str]:
    sets = [
        "model.init_from_config=true",
        f"train.seed={SEED}",
        f"train.learning_rate={LEARNING_RATE}",
        f"train.per_device_train_batch_size={BATCH_SIZE}",
        f"train.max_steps={max_steps}",
        f"train.logging_steps={LOGGING_STEPS}",
        "train.save_strategy=no",
        "train.bf16=true",
        "train.require_strategy=true",
    ]  # a replaced strategy is a failed run here, not a figure for the wrong one
    argv = [
        "train",
        "--model",
        str(model),
        "--train",
        str(data),
        "-o",
        str(out),
        "--overwrite",
        "--json",
        "--num-processes",
        str(gpus),
        "--accelerate-config",
        str(config),
    ]
    for s in sets:
        argv += ["--set", s]
    return argv


class GpuPeaks:
    """Peak memory on each GPU above what it held at the start, polled every 50 ms through NVML (one rank per GPU)."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.base = [pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles]
        except Exception:
            self.nvml = None
            return
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            for i, handle in enumerate(self.handles):
                try:
                    used = self.nvml.nvmlDeviceGetMemoryInfo(handle).used - self.base[i]
                except Exception:
                    continue
                self.peaks[i] = max(self.peaks.get(i, 0), used)

    def stop(self) -> list[float] | None:
        if self.nvml is None:
            return None
        self._stop.set()
        self.thread.join(timeout=1)
        return [round(self.peaks.get(i, 0) / GIB, 2) for i in range(len(self.handles))]


def run(name: str, argv: list[str], env: dict, timeout: float, gpus: int) -> dict:
    """One strategy's run; its summary is the JSON on the last line of stdout."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prmkit", *argv],
            env=env,
            cwd=str(ROOT),
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        peaks = GpuPeaks()
        try:
            proc.wait(timeout=timeout)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launcher and every rank
            proc.wait()
            status = f"timed out after {timeout:.0f} s"
        per_gpu = peaks.stop()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    result: dict = {
        "status": status,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "peak_per_rank_gib": per_gpu[:gpus] if per_gpu else None,
    }
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    if status != "ok" or not lines:
        result["stderr_tail"] = stderr[-3000:]
        return result
    summary = json.loads(lines[-1])
    memory = summary.get("memory") or {}
    result.update(
        {
            "strategy": summary.get("strategy"),
            "trainer_seconds": summary.get("seconds"),
            "tokens": summary.get("tokens"),
            "tokens_per_second": summary.get("tokens_per_second"),
            "tokens_per_second_per_rank": round((summary.get("tokens_per_second") or 0) / gpus, 1),
            "rank0_peak_reserved_gib": summary.get("peak_memory_gib"),
            "estimated_peak_per_rank_gib": (memory.get("estimate") or {}).get("total_gib"),
            "estimate_strategy": memory.get("strategy"),
            "gradient_checkpointing": summary.get("gradient_checkpointing"),
            "batching": summary.get("batching"),
            "attn_implementation": summary.get("attn_implementation"),
            "loss_history": summary.get("loss_history"),
        }
    )
    return result


def dry_run(rows: list[dict], tokenizer: Path, gpus: int, runs: list[str], work: Path) -> dict:
    """Each run's config and command, and prmkit's per-rank memory plan on H200s from the real token lengths."""
    from transformers import AutoTokenizer, Qwen2Config

    from prmkit.models.memory import Budget, model_shape, plan_memory
    from prmkit.tokenization import TokenizationParams, tokenize_rows

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cols = tokenize_rows(
        tok,
        [r["prompt"] for r in rows],
        [r["completions"] for r in rows],
        [r["labels"] for r in rows],
        TokenizationParams(),
    )
    lengths = [len(x) for x in cols["input_ids"]]
    shape = model_shape(Qwen2Config(**QWEN2_05B, num_labels=2))
    budget = Budget(int(H200_GIB * GIB), f"free memory of an H200 ({H200_GIB:g} GiB)")
    planned = {}
    for name in runs:
        plan = plan_memory(
            "auto",
            shape,
            lengths,
            BATCH_SIZE,
            "packed",
            budget,
            param_bytes=4,
            mixed=True,
            attention="flex_attention",
            sharding=expected_strategy(name, gpus).sharding_for_memory(),
        )
        config = work / f"{name}.yaml"
        planned[name] = {
            "accelerate_config": accelerate_config(name, gpus),
            "command": ["prmkit", *prmkit_argv(Path("MODEL"), Path("ROWS"), Path("OUT"), config, gpus, 40)],
            "estimate": plan.estimate.to_dict(),
            "preflight": plan.preflight(),
        }
    return {"gpus": gpus, "rows": len(lengths), "tokens": sum(lengths), "params": shape.total_params, "runs": planned}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, in order; known: {', '.join(RUNS)}")
    ap.add_argument(
        "--gpus", type=int, default=None, help="processes per run (default: every GPU visible; 8 for --dry-run)"
    )
    ap.add_argument("--max-steps", type=int, default=40, help="optimizer steps of each run")
    ap.add_argument("--timeout", type=float, default=150, help="seconds each run may take")
    ap.add_argument(
        "--budget",
        type=float,
        default=450,
        help="seconds for all runs, later ones skipped past it (the GPU machine's command limit is 600)",
    )
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/gpu-dist.json")
    ap.add_argument(
        "--dry-run", action="store_true", help="print the runs and prmkit's per-rank memory plans; train nothing"
    )
    args = ap.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        ap.error(f"unknown run {unknown[0]!r}")
    tokenizer = args.tokenizer or default_tokenizer()
    if not tokenizer.exists():
        raise SystemExit(f"needs the Qwen2 tokenizer at {tokenizer} (../shared, or .whl/qwen2-tokenizer there)")
    rows = make_rows(args.rows, seed=1)
    work = Path(tempfile.mkdtemp(prefix="prmkit-gpu-dist-"))

    if args.dry_run:
        plan = dry_run(rows, tokenizer, args.gpus or 8, runs, work)
        print(json.dumps(plan, indent=2))
        for name, p in plan["runs"].items():
            print(f"{name}: {p['preflight']}", file=sys.stderr)
        return

    import torch
    import yaml

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or use --dry-run here")
    gpus = args.gpus or torch.cuda.device_count()
    data = write_jsonl(rows, work / "rows.jsonl")
    model = make_model_dir(work / "model", tokenizer, QWEN2_05B)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PRMKIT_CACHE": str(work / "cache"),
        "HF_HOME": str(work / "hf"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PRMKIT_ALLOC_CONF_DEFAULT", "PRMKIT_LAUNCHED"):
        env.pop(name, None)
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for name in runs:
        left = args.budget - (time.perf_counter() - started)
        if left < 30:
            results[name] = {"status": f"skipped: {args.budget:.0f} s budget spent"}
            continue
        config = work / f"{name}.yaml"
        config.write_text(yaml.safe_dump(accelerate_config(name, gpus)))
        argv = prmkit_argv(model, data, work / name, config, gpus, args.max_steps)
        results[name] = r = run(name, argv, env, min(args.timeout, left), gpus)
        print(
            f"{name}: {r['status']}, {r.get('tokens_per_second', '-')} tok/s, peak per rank "
            f"{r.get('peak_per_rank_gib', '-')} GiB (estimated {r.get('estimated_peak_per_rank_gib', '-')}), "
            f"wall {r['wall_seconds']} s",
            file=sys.stderr,
        )

    import transformers

    report = {
        "device": f"{gpus} x {torch.cuda.get_device_name(0)}",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "setting": {
            "model": "Qwen2ForTokenClassification from a config (random init)",
            **QWEN2_05B,
            "rows": len(rows),
            "batch_size_per_rank": BATCH_SIZE,
            "max_steps": args.max_steps,
            "precision": "bf16 autocast",
            "processes": gpus,
        },
        "runs": results,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    out = args.out or HERE / "results" / "gpu-dist.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("| run | status | ran | tokens/s | tokens/s per rank | peak per rank GiB (NVML) | estimated GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['status']} | {(r.get('strategy') or {}).get('description', '-')} | "
            f"{r.get('tokens_per_second', '-')} | {r.get('tokens_per_second_per_rank', '-')} | "
            f"{r.get('peak_per_rank_gib', '-')} | {r.get('estimated_peak_per_rank_gib', '-')} |"
        )
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
