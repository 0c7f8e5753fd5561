"""Benchmark: scoring the published PRM kinds with prmkit against each model card's own usage code.

For each kind, one model (random weights from a config: hidden 256, 4 layers, the real Qwen2 tokenizer with the kind's
special tokens and a chat template) and the same Math-Shepherd-like rows:

- ``chat-plus-minus`` (RLHFlow's card): one forward pass per assistant turn, reading logits at -3.
- ``lm-tag`` (Math-Shepherd's card): one forward pass per solution, batch size 1.
- ``qwen-prm`` (Qwen2.5-Math-PRM's card): one forward pass per solution, batch size 1.

prmkit scores every kind in one pass per solution, in length-sorted batches under its token budget. Both sides run
in this process on the CPU, in fp32; the scores are compared too (max absolute difference).

    python bench/kinds.py            # 40 rows; --rows 10 for a quick run
    python bench/kinds.py --long-row 25000,50000,100000   # one chat-plus-minus solution of that many steps

``--long-row`` scores ONE chat-plus-minus solution of N steps (a looping generation), with the model above (8,192
positions, so about 100 turns are read and the rest lie past max_length): the encoder alone in this process (and the
chat template renders it made), ``StepScorer.score_batch`` (encoding and the forward pass, the model loaded), then
``prmkit score`` as a whole process on a one-line JSONL (seconds and peak RSS; start-up and model load included).
With ``PYTHONPATH`` at an older checkout it times that one (before issue #24 it was quadratic: use N of 1,000-4,000).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import QWEN2_TOKENIZER, make_rows

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# RLHFlow's models use Llama 3.1's template, where the card's "-3" is the token before the assistant's "+".
LLAMA3 = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
DIMS = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 1024,
    "max_position_embeddings": 8192,
}


def build(kind: str, path: Path) -> tuple:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from prmkit.kinds.heads import qwen_prm_class

    tok = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<extra_0>", "ки", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]},
        replace_extra_special_tokens=False,
    )
    tok.chat_template = LLAMA3 if kind == "chat-plus-minus" else CHATML
    cfg = Qwen2Config(**DIMS, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if kind == "qwen-prm":
        cfg.architectures = ["Qwen2ForProcessRewardModel"]
        model = qwen_prm_class()(cfg)
    else:
        model = Qwen2ForCausalLM(cfg)
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path), model


def card_scores(kind: str, model, tok, rows: list[dict]) -> list[list[float]]:
    """Each model card's loop, as written there (no batching)."""
    import torch

    out = []
    with torch.inference_mode():
        for r in rows:
            q, steps = r["prompt"], r["completions"]
            if kind == "chat-plus-minus":
                cand = [tok.encode("+")[-1], tok.encode("-")[-1]]
                conv, scores = [], []
                for k, step in enumerate(steps):
                    conv += [
                        {"content": q + " " + step if k == 0 else step, "role": "user"},
                        {"content": "+", "role": "assistant"},
                    ]
                    ids = torch.tensor(
                        [tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]]
                    )
                    scores.append(model(ids).logits[:, -3, cand].softmax(dim=-1)[:, 0].item())
            elif kind == "lm-tag":
                cand, tag_id = tok.encode("+ -"), tok.encode("ки")[-1]
                ids = torch.tensor([tok.encode(f"{q} " + "\n".join(f"{s} ки" for s in steps))])
                probs = model(ids).logits[:, :, cand].softmax(dim=-1)[:, :, 0]
                scores = probs[ids == tag_id].tolist()
            else:
                msgs = [
                    {
                        "role": "system",
                        "content": "Please reason step by step, and put your final answer within \\boxed{}.",
                    },
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"},
                ]
                ids = torch.tensor([tok.encode(tok.apply_chat_template(msgs, tokenize=False))])
                probs = model(ids).logits.softmax(dim=-1)[0]
                scores = probs[ids[0] == tok.encode("<extra_0>")[0]][:, 1].tolist()
            out.append(scores)
    return out


LAUNCHER = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stderr=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def long_row(sizes: list[int], name: str) -> None:
    """One chat-plus-minus solution of each size: the encoder in-process, then `prmkit score` as a whole process."""
    import os
    import subprocess

    import torch

    from prmkit.kinds.encoder import KindEncoder
    from prmkit.scoring import StepScorer

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat-plus-minus"
        build("chat-plus-minus", path)
        scorer = StepScorer.from_pretrained(
            path, dtype="float32", device="cpu", kind_settings={"kind": "chat-plus-minus"}
        )
        encoder: KindEncoder = scorer.kind_encoder
        renders = []
        apply = type(encoder.tokenizer).apply_chat_template
        type(encoder.tokenizer).apply_chat_template = lambda self, c, *a, **k: (
            renders.append(len(c)) or apply(self, c, *a, **k)
        )
        for n in sizes:
            row = make_rows(1, seed=n)[0]
            steps = [row["completions"][k % len(row["completions"])] + f" (turn {k})" for k in range(n)]
            renders.clear()
            t0 = time.perf_counter()
            [encoded] = encoder.encode([(row["prompt"], steps)])
            seconds = time.perf_counter() - t0
            calls, messages = len(renders), sum(renders)
            read = sum(p >= 0 for p in encoded.step_positions)
            t0 = time.perf_counter()
            [in_process] = scorer.score_batch([(row["prompt"], steps)])
            engine = time.perf_counter() - t0
            src, out = Path(tmp) / f"row-{n}.jsonl", Path(tmp) / f"scored-{n}.jsonl"
            src.write_text(json.dumps({"prompt": row["prompt"], "completions": steps}) + "\n", encoding="utf-8")
            command = [
                sys.executable,
                "-m",
                "prmkit",
                "score",
                str(path),
                str(src),
                "-o",
                str(out),
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--set",
                "model.kind=chat-plus-minus",
            ]
            t0 = time.perf_counter()
            # Through a small launcher: a child forked from this (large) process would count its pages in its peak.
            # In tmp, so `-m prmkit` imports the prmkit PYTHONPATH names, not one in the working directory.
            peak = subprocess.run(
                [sys.executable, "-c", LAUNCHER, *command],
                cwd=tmp,
                capture_output=True,
                text=True,
                env={**os.environ, "PRMKIT_CACHE": str(Path(tmp) / "cache")},
                check=True,
            )
            whole = time.perf_counter() - t0
            rss_kib = int(peak.stdout.split()[-1])
            scores = json.loads(out.read_text(encoding="utf-8"))["step_scores"]
            assert len(scores) == n and sum(s is not None for s in scores) == read
            assert max(abs(a - b) for a, b in zip(scores[:read], in_process[:read])) < 1e-5
            results.append(
                {
                    "steps": n,
                    "line_mb": round(src.stat().st_size / 1e6, 1),
                    "encode_s": round(seconds, 3),
                    "renders": calls,
                    "messages_rendered": messages,
                    "turns_read": read,
                    "score_batch_s": round(engine, 2),
                    "score_process_s": round(whole, 2),
                    "score_peak_rss_mb": round(rss_kib / 1024),
                }
            )
            print(
                f"{n:7d} steps ({results[-1]['line_mb']} MB line)  encode {seconds:6.2f} s, {calls} renders "
                f"of {messages} messages, {read} turns read   score_batch {engine:5.2f} s   "
                f"prmkit score {whole:6.2f} s, peak RSS "
                f"{results[-1]['score_peak_rss_mb']} MB",
                flush=True,
            )
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads",
        "long_row": results,
    }
    print(json.dumps(report, indent=2))
    out = Path(__file__).resolve().parent / "results" / name
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--kinds", default="chat-plus-minus,lm-tag,qwen-prm")
    ap.add_argument("--long-row", metavar="N,N,...", help="one chat-plus-minus solution of each number of steps")
    ap.add_argument("--results", default="kinds-long-row.json", help="--long-row's file under bench/results/")
    args = ap.parse_args()
    if args.long_row:
        return long_row([int(n) for n in args.long_row.split(",")], args.results)
    import torch

    from prmkit.scoring import StepScorer

    rows = make_rows(args.rows, seed=7)
    steps = sum(len(r["completions"]) for r in rows)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            path = Path(tmp) / kind
            tok, model = build(kind, path)
            t0 = time.perf_counter()
            want = card_scores(kind, model, tok, rows)
            card = time.perf_counter() - t0
            scorer = StepScorer.from_pretrained(path, dtype="float32", device="cpu", kind_settings={"kind": kind})
            t0 = time.perf_counter()
            got = scorer.score_batch([(r["prompt"], r["completions"]) for r in rows])
            mine = time.perf_counter() - t0
            diff = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))
            results[kind] = {
                "card_s": round(card, 2),
                "prmkit_s": round(mine, 2),
                "speedup": round(card / mine, 2),
                "steps": steps,
                "max_abs_diff": diff,
            }
            print(
                f"{kind:16s} card {card:7.1f} s   prmkit {mine:6.1f} s   {card / mine:5.2f}x   "
                f"max |diff| {diff:.1e}   ({steps} steps)",
                flush=True,
            )
    print(
        json.dumps(
            {
                "rows": args.rows,
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
