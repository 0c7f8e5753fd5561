"""Which attention kernel scores a batch, and packed (padding-free) forward passes with it.

A packed batch is one row: the solutions laid end to end, ``position_ids`` restarting at 0 for each, no padding.
It is only as fast as the attention kernel that reads the sequence boundaries:

- ``flash_attention_2`` (the flash-attn package): varlen kernel, boundaries from ``cu_seq_lens_*``.
- ``prmkit_varlen`` (registered here): torch's own flash varlen kernel (``torch.nn.attention.varlen``, torch >= 2.10,
  CUDA, half precision). No extra package and no compilation. On other devices it runs each sequence through
  ``scaled_dot_product_attention`` in turn: exact, and what the CPU tests check.
- ``flex_attention``: FlexAttention with a block mask built by transformers from ``position_ids``; compiled at the
  first batch.
- ``sdpa``/``eager``: transformers builds a dense block-diagonal mask, correct but quadratic in the pack length, so
  packing does not pay there (the default on a CPU is padded batches).
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import logging
from functools import lru_cache
from typing import Any

from prmkit.errors import named_first_line

log = logging.getLogger("prmkit")

VARLEN = "prmkit_varlen"
FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
HALF = ("float16", "bfloat16")


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@lru_cache(maxsize=1)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def torch_varlen_available() -> bool:
    """torch ships a flash varlen kernel (2.10 and later) and a CUDA device is there to run it."""
    import torch

    return torch.cuda.is_available() and _torch_varlen() is not None


def flex_available() -> bool:
    try:
        from transformers.utils import is_torch_flex_attn_available
    except ImportError:
        return False
    return bool(is_torch_flex_attn_available())


def has_sliding_window(config: Any) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or []
    return "sliding_attention" in layer_types or bool(getattr(text, "use_sliding_window", False))


def choose_attention(device_type: str, dtype_name: str, causal: bool, config: Any) -> str | None:
    """The attention implementation to load a causal model with for packed scoring on ``device_type``, or None
    (keep the model's default and score padded batches).

    Only CUDA gets packed batches by default: flash-attention when installed, else torch's own varlen kernel, else
    FlexAttention. Flash kernels take half precision only.
    """
    if device_type != "cuda" or not causal:
        return None
    half = dtype_name in HALF
    if half and flash_attn_installed():
        return "flash_attention_2"
    if half and torch_varlen_available() and not has_sliding_window(config):
        problem = probe_torch_varlen(config, dtype_name)
        if problem is None:
            register_varlen_attention()
            return VARLEN
        log.warning(f"torch's varlen attention kernel failed a check ({problem}); not using it")
    if flex_available():
        return "flex_attention"
    return None


def probe_torch_varlen(config: Any, dtype_name: str, device: str = "cuda", varlen: Any = None) -> str | None:
    """Run torch's varlen kernel once on random tensors of the model's head shape (three sequences, grouped-query
    heads as the model has them) and compare it with one scaled_dot_product_attention per sequence. None when it
    agrees within half-precision rounding; else what went wrong. Its signature changed between torch releases, so
    this is checked where it runs, before any scoring relies on it."""
    import torch

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    if heads <= 0:
        return "the config names no attention heads"
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or getattr(text, "hidden_size", 0) // heads)
    varlen = varlen or _torch_varlen()
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cpu").manual_seed(0)
    lengths = [37, 5, 90]
    total = sum(lengths)
    q = torch.randn(total, heads, head_dim, generator=gen).to(device, dtype)
    k, v = (torch.randn(total, kv_heads, head_dim, generator=gen).to(device, dtype) for _ in range(2))
    cu = torch.tensor([0, 37, 42, 132], dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    try:
        got = _torch_varlen_call(varlen, q, k, v, cu, max(lengths), scale).float()
    except Exception as e:
        return named_first_line(e)
    want = _per_sequence(q.float(), k.float(), v.float(), cu, scale)
    if tuple(got.shape) != tuple(want.shape):
        return f"output shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = float((got - want).norm() / want.norm())
    return None if err < 2e-2 else f"relative error {err:.3g} against per-sequence attention"


def packing_kernel(model: Any) -> str | None:
    """The kind of kernel the loaded model's attention is: 'flash', 'varlen', 'flex', or None (dense masks)."""
    impl = getattr(model.config, "_attn_implementation", None) or ""
    if impl in FLASH or "flash" in impl:
        return "flash"
    if impl == VARLEN:
        return "varlen"
    if impl == "flex_attention":
        return "flex"
    return None


def packed_inputs(lengths: list[int], kernel: str | None) -> dict[str, Any]:
    """Forward-pass keyword arguments (host tensors) for one packed row of sequences of ``lengths`` tokens.

    ``position_ids`` restart at 0 for each sequence: the rotary positions, and the boundaries transformers derives
    masks (flex) or cumulative lengths (flash-attention) from. prmkit's varlen function is handed the cumulative
    lengths as well.
    """
    import torch

    kwargs: dict[str, Any] = {"position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)}
    if kernel == "varlen":
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.as_tensor(lengths, dtype=torch.int32), 0)
        longest = max(lengths)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return kwargs


# ---------------------------------------------------------------------------------------------------------------------
# The registered varlen attention


def varlen_attention(
    module: Any, query, key, value, attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any
):
    """Causal attention over sequences packed in one row; a transformers attention function.

    ``query`` is (1, heads, tokens, head_dim), ``key``/``value`` (1, kv_heads, tokens, head_dim); the result is
    (1, tokens, heads, head_dim), as transformers' own attention functions return it.
    """
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        raise ValueError(f"{VARLEN} scores packed rows only: pass cu_seq_lens_q and a batch of one row")
    if dropout:
        raise ValueError(f"{VARLEN} is for inference: attention dropout must be 0")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
    varlen = _torch_varlen()
    if q.is_cuda and varlen is not None and q.dtype in (torch.float16, torch.bfloat16):
        out = _torch_varlen_call(varlen, q, k, v, cu, int(kwargs.get("max_length_q") or 0), scaling)
    else:
        out = _per_sequence(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def _per_sequence(q, k, v, cu, scaling):
    # One scaled_dot_product_attention call per sequence: exact, and memory linear in the pack (no dense mask).
    import torch
    import torch.nn.functional as F

    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, n, head_dim)
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling).transpose(0, 1)
    return out


@lru_cache(maxsize=8)
def _varlen_params(varlen: Any) -> frozenset[str]:
    return frozenset(inspect.signature(varlen).parameters)


def _torch_varlen_call(varlen, q, k, v, cu, longest: int, scaling):
    # The signature moved between torch releases: 2.10 takes is_causal; later ones a (left, right) window, a scale
    # and, from 2.12, native grouped-query attention. Each missing feature is done by hand.
    params = _varlen_params(varlen)
    if longest <= 0:
        longest = int((cu[1:] - cu[:-1]).max())
    kwargs: dict[str, Any] = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    default_scale = q.shape[-1] ** -0.5
    if scaling is not None and abs(scaling - default_scale) > 1e-12 * default_scale:
        if "scale" in params:
            kwargs["scale"] = scaling
        else:
            q = q * (scaling / default_scale)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return varlen(q, k.contiguous(), v.contiguous(), cu, cu, longest, longest, **kwargs)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    # Sequence boundaries travel in cu_seq_lens_*: no mask tensor is built.
    return None


_registered = False


def register_varlen_attention() -> None:
    """Make ``attn_implementation="prmkit_varlen"`` known to transformers (once per process)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, _no_mask)
    _registered = True
