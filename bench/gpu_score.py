"""Benchmark `prmkit score` on the lent GPU machine (issue #14): recipe, prmkit's defaults, the bare padded limit.

On the GPU machine, from the project root, with .whl/ filled by ../shared/gpu/fetch-wheels.sh (see its README):

    bash .whl/install-there.sh && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH && python3 bench/gpu_score.py

Here, to check the script itself in about a minute (a tiny model on the CPU; nothing from ../shared):

    python bench/gpu_score.py --tiny

What it runs, each stage under its own time limit so a failure costs that stage only (the error is recorded):

1. a model of Qwen2-0.5B's shape from a config (hidden 896, 24 layers, 14 heads, 2 key/value heads, intermediate 4864,
   the Qwen2 vocabulary; random weights, a scaled head), bf16, saved as a prmkit model directory; 3,000
   Math-Shepherd-like rows (bench/_data.py);
2. the recipe: ``pipeline("token-classification")`` per prefix, bf16 on the GPU, for ``--recipe-seconds``;
3. ``prmkit score`` with its defaults as a whole process, twice (compile and file caches warm the second): wall
   seconds, the summary's engine seconds, its ``timings``, the budget it chose and the kernel that read packed rows;
4. ``prmkit score`` with padded batches (``score.packing=false``), and with FlexAttention packing;
5. where start-up goes: one more run on 50 rows under ``python -X importtime`` (the costliest imports);
   the bare padded limit: length-sorted padded forward passes over prmkit's tokens at several budgets, timed with
   device synchronisation, and its best budget;
6. agreement: the largest difference between prmkit's scores and the bare forward passes'.

Writes bench/results/gpu-score.json (gpu-score-tiny.json with --tiny) and prints a table last.
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
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _data import QWEN2_TOKENIZER, make_rows, write_jsonl  # noqa: E402
from _scoring import bare_limit, build_model, encode_rows, recipe  # noqa: E402

QWEN2_05B = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
WHL_TOKENIZER = HERE.parent / ".whl" / "qwen2-tokenizer"

# Issue #14's targets on the H200.
TARGET_ENGINE_SHARE_OF_BEST_LIMIT = 1.0
TARGET_STARTUP_SECONDS = 5.0
TARGET_WHOLE_PROCESS_STEPS_PER_S = 2000.0


def stage(results: dict, name: str, fn: Callable[[], Any]) -> Any:
    """Run one stage; record its seconds, or its error, and go on."""
    start = time.perf_counter()
    try:
        value = fn()
        results["stages"][name] = {"ok": True, "seconds": round(time.perf_counter() - start, 2)}
        return value
    except Exception as e:
        results["stages"][name] = {
            "ok": False,
            "seconds": round(time.perf_counter() - start, 2),
            "error": f"{type(e).__name__}: {str(e)[:500]}",
            "traceback": traceback.format_exc()[-2000:],
        }
        print(f"stage {name} failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
        return None


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    from prmkit.scoring import attention

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "flash_attn": attention.flash_attn_installed(),
        "torch_varlen": attention._torch_varlen() is not None,
        "flex_attention": attention.flex_available(),
    }
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        env.update(
            gpu=torch.cuda.get_device_name(), gpu_free_gib=round(free / 2**30, 1), gpu_total_gib=round(total / 2**30, 1)
        )
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def run_prmkit(model_dir: Path, src: Path, out: Path, extra: list[str], env: dict, timeout: float) -> dict[str, Any]:
    """`prmkit score` as a whole process: wall seconds and its --json summary."""
    cmd = [
        sys.executable,
        "-m",
        "prmkit",
        "score",
        str(model_dir),
        str(src),
        "-o",
        str(out),
        "--json",
        "--overwrite",
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"prmkit score {' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    t = summary.get("timings") or {}
    steps = summary["steps"]
    return {
        "args": extra,
        "wall_seconds": round(wall, 2),
        "engine_seconds": summary["seconds"],
        "timings": t,
        "outside_forward_and_io_seconds": round(wall - t.get("forward", 0.0) - t.get("write", 0.0), 2),
        "batch_tokens": summary["batch_tokens"],
        "packing": summary.get("packing"),
        "device": summary["device"],
        "dtype": summary["dtype"],
        "steps": steps,
        "tokens": summary["tokens"],
        "whole_process_steps_per_s": round(steps / wall, 1),
        "engine_steps_per_s": round(steps / summary["seconds"], 1),
        "forward_steps_per_s": round(steps / t["forward"], 1) if t.get("forward") else None,
        "log_tail": proc.stderr[-1500:],
    }


def import_profile(model_dir: Path, src: Path, out: Path, extra: list[str], env: dict, timeout: float) -> dict:
    """`prmkit score` once more under ``python -X importtime``: the imports that cost most, outermost first."""
    cmd = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "prmkit",
        "score",
        str(model_dir),
        str(src),
        "-o",
        str(out),
        "--json",
        "--overwrite",
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"prmkit score under -X importtime failed:\n{proc.stderr[-2000:]}")
    entries = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue  # the header
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        entries.append((int(parts[1]), depth, name.strip()))
    top = sorted((e for e in entries if e[1] <= 1), reverse=True)[:20]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "rows": sum(1 for _ in src.open()),
        "timings": summary.get("timings"),
        "imports_total_seconds": round(sum(c for c, d, _ in entries if d == 0) / 1e6, 3),
        # torch at whatever depth: transformers 5.0-5.1 import it deep inside `import transformers`.
        "torch_import_seconds": round(sum(c for c, _, name in entries if name == "torch") / 1e6, 3),
        "top_imports_seconds": [[name, depth, round(c / 1e6, 3)] for c, depth, name in top],
    }


def scores_of(path: Path) -> list[list[float]]:
    return [json.loads(line)["step_scores"] for line in path.read_text(encoding="utf-8").splitlines()]


def max_diff(a: list[list[float]], b: list[list[float]]) -> float | None:
    pairs = [(x, y) for ra, rb in zip(a, b) if ra and rb for x, y in zip(ra, rb) if x is not None and y is not None]
    return max((abs(x - y) for x, y in pairs), default=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, to check the script (no GPU needed)")
    ap.add_argument("--rows", type=int, default=None, help="rows to score (default 3000; 12 with --tiny)")
    ap.add_argument(
        "--tokenizer", default=None, help="Qwen2 tokenizer directory (default .whl/qwen2-tokenizer, else ../shared's)"
    )
    ap.add_argument(
        "--budgets",
        default=None,
        help="bare padded budgets, comma-separated (default 16384,32768,65536,131072; 1024,2048 tiny)",
    )
    ap.add_argument("--recipe-seconds", type=float, default=None, help="time given to the recipe (default 45; 5 tiny)")
    ap.add_argument("--stage-timeout", type=float, default=240, help="seconds each prmkit run may take")
    ap.add_argument("--no-flex", action="store_true", help="skip the FlexAttention run (it compiles its kernel)")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/gpu-score[-tiny].json)")
    args = ap.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tiny = args.tiny
    if tiny:
        # One thread: on a CPU shared with other work, OpenMP threads waiting on each other would dominate.
        torch.set_num_threads(1)
    device = "cpu" if tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --tiny to check the script on a CPU")
    dtype = "float32" if tiny else "bfloat16"
    n_rows = args.rows or (12 if tiny else 3000)
    budgets = [int(b) for b in (args.budgets or ("1024,2048" if tiny else "16384,32768,65536,131072")).split(",")]
    recipe_seconds = args.recipe_seconds if args.recipe_seconds is not None else (5.0 if tiny else 45.0)
    out_path = Path(args.out) if args.out else HERE / "results" / ("gpu-score-tiny.json" if tiny else "gpu-score.json")

    results: dict[str, Any] = {
        "mode": "tiny-cpu" if tiny else "gpu",
        "stages": {},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    results["environment"] = stage(results, "environment", lambda: environment(device))
    work = Path(tempfile.mkdtemp(prefix="prmkit-gpu-score-"))
    model_dir = work / "model"

    def make_model() -> dict[str, Any]:
        from transformers import AutoTokenizer

        if tiny:
            from prmkit.training.example import build_example_tokenizer

            tok = build_example_tokenizer()
        else:
            path = (
                Path(args.tokenizer)
                if args.tokenizer
                else (WHL_TOKENIZER if WHL_TOKENIZER.exists() else QWEN2_TOKENIZER)
            )
            tok = AutoTokenizer.from_pretrained(path)
        build_model(model_dir, tok, TINY if tiny else QWEN2_05B, dtype=dtype, device=device)
        return {"shape": TINY if tiny else QWEN2_05B, "vocab": len(tok), "dtype": dtype}

    results["model"] = stage(results, "model", make_model)
    if results["model"] is None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2) + "\n")
        raise SystemExit(f"could not build the model; see {out_path}")
    rows = [{"prompt": r["prompt"], "completions": r["completions"]} for r in make_rows(n_rows, seed=1)]
    src = write_jsonl(rows, work / "rows.jsonl")
    steps = sum(len(r["completions"]) for r in rows)
    results["data"] = {"rows": n_rows, "steps": steps}
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(work / "hf"),
        **({"OMP_NUM_THREADS": "1"} if tiny else {}),
    }

    # 2. the recipe
    def run_recipe() -> dict[str, Any]:
        r = recipe(model_dir, rows, device=device, dtype=dtype, max_seconds=recipe_seconds)
        r["steps_per_s"] = round(r["steps"] / r["seconds"], 1)
        return r

    base = stage(results, "recipe", run_recipe)
    if base is not None:
        results["recipe"] = {k: v for k, v in base.items() if k != "scores"}

    # 3.-4. prmkit as a whole process
    device_args = ["--device", "cpu"] if tiny else []
    runs: dict[str, dict] = {}
    variants = [("defaults", []), ("defaults_again", [])] if not tiny else [("defaults", [])]
    variants.append(("padded", ["--set", "score.packing=false"]))
    if tiny:
        # On a CPU the defaults are padded: pack through prmkit's varlen function so the packed path runs too.
        variants.append(("packed_varlen", ["--set", "model.attn_implementation=prmkit_varlen"]))
    if not args.no_flex and not tiny:
        variants.append(
            ("packed_flex", ["--set", "model.attn_implementation=flex_attention", "--set", "score.packing=true"])
        )
    for label, extra in variants:
        res = stage(
            results,
            f"prmkit_{label}",
            lambda extra=extra, label=label: run_prmkit(
                model_dir, src, work / f"{label}.jsonl", [*extra, *device_args], env, args.stage_timeout
            ),
        )
        if res is not None:
            runs[label] = res
    results["prmkit"] = runs

    small = write_jsonl(rows[:50], work / "rows50.jsonl")
    results["startup_profile"] = stage(
        results,
        "startup_profile",
        lambda: import_profile(model_dir, small, work / "profile.jsonl", device_args, env, args.stage_timeout),
    )

    # 5. the bare padded limit, in this process
    limit: dict[str, Any] = {}

    def run_limit() -> dict[str, Any]:
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForTokenClassification.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), device_map=device
        ).eval()
        encoded = encode_rows(tok, rows)
        bare_limit(model, encoded[: max(1, len(encoded) // 20)], budgets[0], tok.pad_token_id, device)  # warm-up
        for b in budgets:
            seconds, scores = bare_limit(model, encoded, b, tok.pad_token_id, device, max_seconds=120)
            limit[str(b)] = {"seconds": round(seconds, 3), "steps_per_s": round(steps / seconds, 1)}
            limit.setdefault("_scores", scores)
        best = min((k for k in limit if not k.startswith("_")), key=lambda k: limit[k]["seconds"])
        return {"best_budget": int(best), **limit[best]}

    best = stage(results, "bare_limit", run_limit)
    limit_scores = limit.pop("_scores", None)
    results["bare_limit"] = {"by_budget": limit, "best": best}

    # 6. agreement and the targets
    agreement: dict[str, Any] = {}
    for label in runs:
        ours = scores_of(work / f"{label}.jsonl")
        if limit_scores is not None:
            agreement[f"{label}_vs_bare_limit"] = max_diff(ours, limit_scores)
        if base is not None:
            agreement[f"{label}_vs_recipe"] = max_diff(ours, base["scores"])
    if "padded" in runs and "defaults" in runs:
        agreement["defaults_vs_padded"] = max_diff(scores_of(work / "defaults.jsonl"), scores_of(work / "padded.jsonl"))
    results["agreement_max_abs_diff"] = agreement

    main_run = runs.get("defaults_again") or runs.get("defaults")
    if main_run is not None:
        ratios: dict[str, Any] = {
            "whole_process_steps_per_s": main_run["whole_process_steps_per_s"],
            "outside_forward_and_io_seconds": main_run["outside_forward_and_io_seconds"],
        }
        if best is not None:
            ratios["engine_share_of_best_limit"] = round(best["seconds"] / main_run["engine_seconds"], 3)
            ratios["forward_share_of_best_limit"] = round(best["seconds"] / main_run["timings"]["forward"], 3)
        if base is not None:
            ratios["whole_process_vs_recipe"] = round(
                main_run["whole_process_steps_per_s"] / results["recipe"]["steps_per_s"], 1
            )
        if not tiny:
            ratios["targets_met"] = {
                "engine_at_least_best_limit": ratios.get("engine_share_of_best_limit", 0)
                >= TARGET_ENGINE_SHARE_OF_BEST_LIMIT,
                "startup_at_most_5_s": main_run["outside_forward_and_io_seconds"] <= TARGET_STARTUP_SECONDS,
                "whole_process_at_least_2000_steps_per_s": main_run["whole_process_steps_per_s"]
                >= TARGET_WHOLE_PROCESS_STEPS_PER_S,
            }
        results["summary"] = ratios
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{results['mode']}: {n_rows} rows, {steps} steps; {results.get('environment') or ''}")
    print(
        "| run | wall s | engine s | forward s | outside forward+I/O s | budget | packing | steps/s wall | steps/s "
        "engine |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    if base is not None:
        print(
            f"| recipe ({results['recipe']['rows']} rows) | {results['recipe']['seconds']:.1f} | | | | | | "
            f"{results['recipe']['steps_per_s']} | |"
        )
    for label, r in runs.items():
        print(
            f"| prmkit {label} | {r['wall_seconds']} | {r['engine_seconds']} | {r['timings'].get('forward')} | "
            f"{r['outside_forward_and_io_seconds']} | {r['batch_tokens']} | {r['packing']} | "
            f"{r['whole_process_steps_per_s']} | {r['engine_steps_per_s']} |"
        )
    for b, v in limit.items():
        print(f"| bare padded, {b} tokens | | | {v['seconds']} | | {b} | | | {v['steps_per_s']} |")
    print(f"\nagreement (max |diff|): {json.dumps(agreement)}")
    print(f"summary: {json.dumps(results.get('summary'))}")
    failed = [k for k, v in results["stages"].items() if not v["ok"]]
    print(f"failed stages: {failed or 'none'}; wrote {out_path}")


if __name__ == "__main__":
    main()
