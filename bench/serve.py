"""Benchmark: `prmkit serve` under concurrent clients against the offline engine, on the same rows, in one run.

One model (the score benchmark's Qwen2 shape: hidden 256, 4 layers, random weights, the real Qwen2 tokenizer) and
2,000 synthetic solutions (bench/_data.py). The server is a real `prmkit serve` process (uvicorn); the clients are
asyncio tasks in this process, each sending one solution per request to /get_reward, as OpenRLHF does.

- Throughput: 64 clients over all the rows; steps/s against the offline engine's (`StepScorer.score_solutions` over
  the same rows in `score.sort_window` windows, as `prmkit score` batches them), measured before and after the server
  runs, keeping the faster (the stricter ratio). Target: at least 85%.
- Latency: p50 and p99 at 1, 8 and 64 clients. Target: a lone request's p50 at most the engine's own time for the
  same items (each scored alone, in process) plus 15 ms. Also each lone request's latency less the engine call that
  scored it in the server (its ``Server-Timing`` header): the server's own overhead, free of the neighbours' noise
  between two separate measurements.
- Batching: the mean number of requests per engine call at 64 clients, from /metrics. Target: at least 16.
- Scores: the server's step scores against the offline engine's (the same bits are expected in float32 on a CPU).

    python bench/serve.py                      # 2,000 rows; latency at 1 and 8 clients over 200 of them
    python bench/serve.py --rows 400 --latency-requests 100   # quicker

The clients share the machine with the server: on a 2-core CPU their HTTP and JSON work takes time the server would
otherwise have, so the throughput ratio is a lower bound for clients on other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import QWEN2_TOKENIZER, make_rows
from _scoring import SEP, build_model

SHAPE = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 1024,
}  # bench/score.py's
ROOT = Path(__file__).resolve().parents[1]


def offline(scorer, items: list[tuple[str, list[str]]]) -> tuple[float, list[list[float | None]]]:
    """Seconds for the engine over ``items`` in sort_window windows (prmkit score's batching), and the scores."""
    start = time.perf_counter()
    scores = [r.scores for r in scorer.score_iter(items)]
    return time.perf_counter() - start, scores


def alone(scorer, items: list[tuple[str, list[str]]]) -> list[float]:
    """The engine's own seconds for each item scored alone: what a lone request cannot beat."""
    times = []
    for item in items:
        start = time.perf_counter()
        scorer.score_solutions([item])
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def metric_sums(text: str, name: str) -> tuple[float, float]:
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_sum "):
            total = float(line.split()[1])
        elif line.startswith(f"{name}_count "):
            count = float(line.split()[1])
    return total, count


async def drive(base: str, rows: list[dict], clients: int) -> dict:
    """``clients`` tasks sending one row per request until the rows run out; latencies, wall time, scores."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i, row in enumerate(rows):
        queue.put_nowait((i, row))
    latencies: list[float] = []
    engine: list[float] = []  # the server's own engine seconds for each request (its Server-Timing header)
    scores: list[list[float] | None] = [None] * len(rows)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=600) as client:
        before = (await client.get("/metrics")).text

        async def worker() -> None:
            while not queue.empty():
                i, row = queue.get_nowait()
                body = {"query": [row["prompt"] + SEP + SEP.join(row["completions"])], "prompts": [row["prompt"]]}
                start = time.perf_counter()
                answer = await client.post("/get_reward", json=body)
                latencies.append(time.perf_counter() - start)
                answer.raise_for_status()
                timing = dict(part.strip().split(";dur=") for part in answer.headers["Server-Timing"].split(","))
                engine.append(float(timing["engine"]) / 1000)
                scores[i] = answer.json()["step_rewards"][0]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
        after = (await client.get("/metrics")).text
    (s0, c0), (s1, c1) = metric_sums(before, "prmkit_batch_requests"), metric_sums(after, "prmkit_batch_requests")
    return {
        "clients": clients,
        "requests": len(rows),
        "seconds": wall,
        "latencies": latencies,
        "scores": scores,
        "overheads": [a - b for a, b in zip(latencies, engine, strict=True)],
        "engine_calls": c1 - c0,
        "mean_batch_requests": (s1 - s0) / (c1 - c0) if c1 > c0 else None,
    }


def start_server(model_dir: Path, port: int, env: dict, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "prmkit", "serve", str(model_dir), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import urllib.request

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"prmkit serve exited with {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("prmkit serve did not become ready in 300 s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--latency-requests", type=int, default=200, help="requests at 1 and at 8 clients")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the engine and the server (OMP_NUM_THREADS); default: torch's own",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        dest="sets",
        metavar="KEY=VALUE",
        help="serve settings for the server (e.g. serve.max_wait_ms=5)",
    )
    args = ap.parse_args()
    if not QWEN2_TOKENIZER.exists():
        raise SystemExit(f"needs the Qwen2 tokenizer at {QWEN2_TOKENIZER} (../shared)")
    os.environ["HF_HUB_OFFLINE"] = "1"

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from prmkit.scoring import StepScorer

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="prmkit-bench-serve-"))
    model_dir = build_model(work / "model", AutoTokenizer.from_pretrained(QWEN2_TOKENIZER), SHAPE, seed=args.seed)
    rows = [{"prompt": r["prompt"], "completions": r["completions"]} for r in make_rows(args.rows, seed=args.seed + 1)]
    items = [(r["prompt"], r["completions"]) for r in rows]
    steps = sum(len(s) for _, s in items)
    few = rows[: args.latency_requests]
    load_before = os.getloadavg()

    scorer = StepScorer.from_pretrained(model_dir, dtype="float32", device="cpu")
    scorer.score_solutions(items[:8])  # warm-up
    offline_1, offline_scores = offline(scorer, items)
    alone_times = alone(scorer, [(r["prompt"], r["completions"]) for r in few])

    port = _free_port()
    env = {**os.environ, "HF_HOME": str(work / "hf"), "PYTHONPATH": str(ROOT)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    extra = [x for s in args.sets for x in ("--set", s)]
    server = start_server(model_dir, port, env, ["--dtype", "float32", "--device", "cpu", *extra])
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(drive(base, rows[:8], 1))  # warm-up
        one = asyncio.run(drive(base, few, 1))
        eight = asyncio.run(drive(base, few, 8))
        many = asyncio.run(drive(base, rows, args.clients))
    finally:
        server.terminate()
        server.wait(60)
    offline_2, _ = offline(scorer, items)
    engine = min(offline_1, offline_2)

    diffs = [abs(a - b) for x, y in zip(many["scores"], offline_scores, strict=True) for a, b in zip(x, y, strict=True)]
    lone_engine_p50 = statistics.median(alone_times)
    runs = {}
    for run in (one, eight, many):
        runs[str(run["clients"])] = {
            "requests": run["requests"],
            "seconds": round(run["seconds"], 2),
            "requests_per_s": round(run["requests"] / run["seconds"], 1),
            "p50_ms": round(percentile(run["latencies"], 50) * 1000, 1),
            "p99_ms": round(percentile(run["latencies"], 99) * 1000, 1),
            "engine_calls": run["engine_calls"],
            "mean_batch_requests": round(run["mean_batch_requests"], 2) if run["mean_batch_requests"] else None,
        }
    served_rate = steps / many["seconds"]
    result = {
        "rows": args.rows,
        "steps": steps,
        "clients": args.clients,
        "threads": torch.get_num_threads(),
        "serve_settings": args.sets,
        "offline_engine_seconds_runs": [round(offline_1, 2), round(offline_2, 2)],
        "offline_engine_steps_per_s": round(steps / engine, 1),
        "served_steps_per_s": round(served_rate, 1),
        "throughput_ratio": round(served_rate * engine / steps, 3),
        "lone_request_p50_ms": runs["1"]["p50_ms"],
        "engine_alone_p50_ms": round(lone_engine_p50 * 1000, 1),
        "lone_request_overhead_p50_ms": round(runs["1"]["p50_ms"] - lone_engine_p50 * 1000, 1),
        "lone_request_minus_its_engine_call_p50_ms": round(statistics.median(one["overheads"]) * 1000, 1),
        "lone_request_minus_its_engine_call_p99_ms": round(percentile(one["overheads"], 99) * 1000, 1),
        "mean_batch_requests_at_max_clients": runs[str(args.clients)]["mean_batch_requests"],
        "latency": runs,
        "max_abs_score_diff_vs_offline": max(diffs),
        "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
    }
    out = (
        Path(__file__).resolve().parent / "results" / ("serve.json" if args.rows == 2000 else f"serve-{args.rows}.json")
    )
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"{args.rows} solutions, {steps} steps; Qwen2 h256 x 4 layers (random), Qwen2 tokenizer, fp32 CPU, "
        f"{result['threads']} torch threads; {result['machine']}\n"
    )
    print(
        f"throughput at {args.clients} clients: {result['served_steps_per_s']} steps/s, offline engine "
        f"{result['offline_engine_steps_per_s']} steps/s: {result['throughput_ratio']:.1%} (target >= 85%)"
    )
    print(
        f"lone request p50 {result['lone_request_p50_ms']} ms; the engine alone on the same items "
        f"{result['engine_alone_p50_ms']} ms: +{result['lone_request_overhead_p50_ms']} ms (target <= +15 ms)"
    )
    print(
        f"lone request minus the server's own engine call for it (Server-Timing): p50 "
        f"{result['lone_request_minus_its_engine_call_p50_ms']} ms, "
        f"p99 {result['lone_request_minus_its_engine_call_p99_ms']} ms"
    )
    print(
        f"mean batch at {args.clients} clients: {result['mean_batch_requests_at_max_clients']} requests per engine "
        "call (target >= 16)"
    )
    print(f"max |score difference| vs the offline engine: {result['max_abs_score_diff_vs_offline']}\n")
    print("| clients | requests | req/s | p50 ms | p99 ms | mean batch (requests) |")
    print("|---|---|---|---|---|---|")
    for clients, run in runs.items():
        print(
            f"| {clients} | {run['requests']} | {run['requests_per_s']} | {run['p50_ms']} | {run['p99_ms']} | "
            f"{run['mean_batch_requests']} |"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
