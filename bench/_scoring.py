"""What the scoring benchmarks share: the model they score with, the seed's recipe and the bare padded limit.

- :func:`build_model`: a Qwen2-architecture token-classification PRM from a config (random weights, a scaled head so
  scores spread), saved as a prmkit model directory.
- :func:`recipe`: the seed's documented inference, ``pipeline("token-classification")`` once per prefix on
  ``separator.join((prompt, *steps[:k])) + separator``, reading LABEL_1's probability at the last token.
- :func:`bare_limit`: length-sorted padded forward passes over exactly prmkit's tokens under a token budget, timing
  only the forward passes (with device synchronisation on a GPU).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

SEP = "\n"


def build_model(
    path: Path, tokenizer: Any, shape: dict, seed: int = 0, dtype: str = "float32", device: str = "cpu"
) -> Path:
    """Save a random Qwen2 PRM of ``shape`` (hidden_size, num_hidden_layers, ...) beside ``tokenizer`` at ``path``."""
    import torch
    from transformers import AutoModelForTokenClassification, Qwen2Config

    from prmkit.models.model_dir import build_metadata, write_metadata
    from prmkit.tokenization import TokenizationParams, tokenizer_fingerprint

    cfg = Qwen2Config(**shape, vocab_size=len(tokenizer), num_labels=2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):  # a 0.5B model initialises in a second on a GPU, in many on a CPU
        model = AutoModelForTokenClassification.from_config(cfg, dtype=getattr(torch, dtype))
    # Random weights give scores near 0.5 everywhere; a larger head spreads them so comparisons mean something.
    with torch.no_grad():
        model.score.weight.mul_(20)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    params = TokenizationParams(step_separator=SEP)
    write_metadata(path, build_metadata(params, base_model="bench:qwen2", tokenizer=tokenizer_fingerprint(tokenizer)))
    del model
    return path


def recipe(
    model_dir: Path, rows: list[dict], device: str = "cpu", dtype: str = "float32", max_seconds: float | None = None
) -> dict[str, Any]:
    """The recipe over ``rows`` (or as many as ``max_seconds`` allows): seconds, steps, scores, tokens read, and
    the share of steps read at a token where BPE merged the separator into the step."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForTokenClassification.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    pipe = pipeline("token-classification", model=model, tokenizer=tok, device=torch.device(device))
    sep_ids = tok(SEP, add_special_tokens=False)["input_ids"]
    scores: list[list[float]] = []
    start = time.perf_counter()
    for r in rows:
        row_scores = []
        for k in range(1, len(r["completions"]) + 1):
            last = pipe(SEP.join((r["prompt"], *r["completions"][:k])) + SEP)[-1]
            p = float(last["score"])
            row_scores.append(p if last["entity"] == "LABEL_1" else 1.0 - p)
        scores.append(row_scores)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    elapsed = time.perf_counter() - start
    merged = total = tokens = 0
    for r in rows[: len(scores)]:  # outside the timing: where the recipe's last token is not the separator token
        for k in range(1, len(r["completions"]) + 1):
            ids = tok(SEP.join((r["prompt"], *r["completions"][:k])) + SEP, add_special_tokens=False)["input_ids"]
            merged += ids[-len(sep_ids) :] != sep_ids
            total += 1
            tokens += len(ids)
    return {
        "seconds": elapsed,
        "rows": len(scores),
        "steps": total,
        "scores": scores,
        "tokens": tokens,
        "merged_share": merged / max(total, 1),
    }


def encode_rows(tokenizer: Any, rows: list[dict]) -> list[Any]:
    from prmkit.tokenization import TokenizationParams, encode_solutions

    return encode_solutions(
        tokenizer, [r["prompt"] for r in rows], [r["completions"] for r in rows], TokenizationParams(step_separator=SEP)
    )


def padded_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Row indexes, longest first, cut into batches of at most ``batch_tokens`` padded tokens (length x rows)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        if cur and max(width, lengths[i]) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, width = [], 0
        cur.append(i)
        width = max(width, lengths[i])
    if cur:
        batches.append(cur)
    return batches


def bare_limit(
    model: Any,
    encoded: list[Any],
    batch_tokens: int,
    pad_id: int,
    device: Any = "cpu",
    max_seconds: float | None = None,
) -> tuple[float, list[list[float]]]:
    """Seconds spent in forward passes alone over ``encoded`` (prmkit's tokens) under ``batch_tokens``; the scores.

    The batches are built on the device before the clock starts. ``max_seconds`` stops early (the scores then cover
    the rows done, the others stay empty).
    """
    import torch

    device = torch.device(device)
    lengths = [len(e.input_ids) for e in encoded]
    tensors = []
    batches = padded_batches(lengths, batch_tokens)
    for b in batches:
        ids = torch.full((len(b), max(lengths[i] for i in b)), pad_id, dtype=torch.long)
        for r, i in enumerate(b):
            ids[r, : lengths[i]] = torch.tensor(encoded[i].input_ids)
        tensors.append(ids.to(device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    scores: list[list[float]] = [[] for _ in encoded]
    elapsed = 0.0
    with torch.inference_mode():
        for b, ids in zip(batches, tensors):
            sync()
            start = time.perf_counter()
            logits = model(input_ids=ids, use_cache=False).logits
            sync()
            elapsed += time.perf_counter() - start
            probs = logits.float().softmax(-1)[..., 1].cpu()
            for r, i in enumerate(b):
                scores[i] = [probs[r, p].item() for p in encoded[i].step_positions]
            if max_seconds is not None and elapsed > max_seconds:
                break
    return elapsed, scores
