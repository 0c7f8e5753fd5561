"""How many tokens one forward batch may hold: sized to the device's free memory and the model's dimensions.

A CPU runs small batches fastest (they stay in cache), so it gets a fixed budget. A GPU runs big batches fastest
until memory runs out, so its budget is derived from the memory left once the weights are loaded:
:func:`device_batch_tokens` is a pure function of those numbers, and :func:`free_device_memory` reads them.

Scoring runs under ``torch.inference_mode``: no activation is kept for a backward pass, so memory peaks inside one
decoder layer and grows linearly with the tokens of a batch, as long as attention itself is linear in memory (flash or
memory-efficient sdpa kernels, flash-attention, FlexAttention, varlen kernels). Where a dense mask or eager attention
is used, a (width x width) term per row is added. The estimate is deliberately generous; a batch that still runs out
of memory is split and retried by the engine, so a wrong estimate costs time, never rows.
"""

from __future__ import annotations

from typing import Any

from prmkit.models.memory import ModelShape

CPU_BATCH_TOKENS = 2048
"""With 2,048 tokens the activations and attention scores stay in cache; the score benchmark's forward passes take 25%
less time than with 16,384 (BENCHMARKS.md)."""
FALLBACK_ACCELERATOR_BATCH_TOKENS = 16384
"""For an accelerator whose free memory cannot be read (MPS), or a model whose dimensions are unknown."""
MIN_DEVICE_BATCH_TOKENS = 1024
MAX_DEVICE_BATCH_TOKENS = 131072
"""Above this, bigger batches stop paying on an H200 (issue #14: 65,536 -> 131,072 tokens bought 15%); they only
lengthen the wait for the first results and the cost of an out-of-memory retry."""
RESERVED_FRACTION = 0.08
RESERVED_MIN_BYTES = 1 << 30
"""Left free for the allocator's fragmentation, cuBLAS workspaces and the CUDA context's growth: 8% of the device,
at least 1 GiB, but never more than half of what is free (a big card that another process mostly fills would
otherwise be left with the smallest budget, and run a hundred times slower than it can)."""
SAFETY = 1.5
"""The per-token estimate counts the largest live tensors only; this covers kernels' scratch and rounding."""
ROUND_TO = 1024


def bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """Peak activation bytes per token of a batch within one decoder layer, under inference mode.

    - The residual stream, the normalised input and the layer's output: 3 x hidden.
    - RMSNorm/LayerNorm compute in float32: 2 x hidden float32 temporaries.
    - Attention: q, k, v; their rotated copies and rotate_half's temporaries; k and v repeated to every head (GQA
      without a native kernel); the output: about 4 x q + 4 x kv + hidden.
    - MLP: gate activated, up, and their product alive at once: 3 x intermediate (a gated MLP; a plain one holds 2).
    Attention and the MLP never peak together, so the larger of the two counts.
    """
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_dim
    attention = 4 * q + 4 * kv + 2 * q + h
    mlp = 3 * shape.intermediate + h
    elements = 3 * h + max(attention, mlp)
    return elements * dtype_bytes + 2 * h * 4 + shape.outputs * 4


def quadratic_bytes_per_token(shape: ModelShape, dtype_bytes: int, width: int, eager: bool) -> int:
    """Extra bytes per token where attention is not linear in memory, for rows ``width`` tokens long.

    A dense mask (a bidirectional model's padding mask, or packing through sdpa) costs ``width`` mask values per
    token; eager attention also materialises the scores and their softmax in float32 for every head.
    """
    per_token = width * dtype_bytes
    if eager:
        per_token += 2 * shape.heads * width * 4
    return per_token


def device_batch_tokens(
    free_bytes: int,
    total_bytes: int,
    shape: ModelShape,
    dtype_bytes: int,
    *,
    dense_attention_width: int | None = None,
    eager_attention: bool = False,
) -> int:
    """The token budget of one forward batch for a device with ``free_bytes`` free (the weights already loaded).

    ``dense_attention_width`` is the longest row a batch may hold when attention needs a dense mask (None: linear
    attention). The result is a multiple of 1,024 between 1,024 and 131,072.
    """
    reserve = min(max(RESERVED_MIN_BYTES, int(RESERVED_FRACTION * total_bytes)), free_bytes // 2)
    usable = max(0, free_bytes - reserve)
    per_token = bytes_per_token(shape, dtype_bytes)
    if dense_attention_width:
        per_token += quadratic_bytes_per_token(shape, dtype_bytes, dense_attention_width, eager_attention)
    tokens = int(usable / (per_token * SAFETY))
    tokens = tokens // ROUND_TO * ROUND_TO
    return max(MIN_DEVICE_BATCH_TOKENS, min(MAX_DEVICE_BATCH_TOKENS, tokens))


def free_device_memory(device: Any) -> tuple[int, int] | None:
    """(bytes this process may still allocate, total bytes) on a CUDA device, after emptying the allocator's cache;
    None for other devices. The first figure is :func:`prmkit.models.memory.device_budget`'s, so a per-process memory
    fraction is honoured as in training."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    from prmkit.models.memory import device_budget

    torch.cuda.empty_cache()
    free = device_budget(device=device).bytes
    if free is None:
        return None
    return int(free), int(torch.cuda.get_device_properties(device).total_memory)
