"""Fast kernels for training: which variable-length attention kernel packs sequences, and Liger's fused kernels.

Both go through transformers: the attention kernel through ``attn_implementation``, Liger through the Trainer's
``use_liger_kernel`` / ``liger_kernel_config``. prmkit only chooses, and refuses what would be wrong for a PRM.
"""

from __future__ import annotations

import logging
from typing import Any

from prmkit.kinds.registry import DEFAULT_KIND, get_kind

log = logging.getLogger("prmkit")

VARLEN_KERNELS = ("flash_attention_3", "flash_attention_2", "flex_attention")
"""Attention kernels that keep packed sequences apart without a dense mask, best first."""


def varlen_kernels_available(model_class: Any = None) -> list[str]:
    """The variable-length attention kernels installed here (and supported by ``model_class``, when given)."""
    from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

    try:
        from transformers.utils import is_flash_attn_3_available
    except ImportError:  # pragma: no cover - older transformers

        def is_flash_attn_3_available() -> bool:
            return False

    found = {
        "flash_attention_3": is_flash_attn_3_available(),
        "flash_attention_2": is_flash_attn_2_available(),
        "flex_attention": is_torch_flex_attn_available(),
    }
    supports = {
        "flash_attention_3": "_supports_flash_attn",
        "flash_attention_2": "_supports_flash_attn",
        "flex_attention": "_supports_flex_attn",
    }
    return [k for k in VARLEN_KERNELS if found[k] and (model_class is None or getattr(model_class, supports[k], False))]


def model_class_for(config: Any, kind: str = DEFAULT_KIND) -> Any:
    """The transformers class training builds for ``config`` (token classification, or the causal LM for a
    causal-LM kind such as lm-tag); None when transformers cannot tell (remote code)."""
    try:
        from transformers.models.auto import modeling_auto

        mapping = (
            modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING
            if get_kind(kind).causal_lm
            else modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING
        )
        return mapping[type(config)]
    except (KeyError, ImportError):
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Liger

LIGER_LOSS_KEYS = ("fused_linear_cross_entropy", "cross_entropy")
LIGER_DEFAULTS = {
    "rope": True,
    "rms_norm": True,
    "swiglu": True,
    "fused_linear_cross_entropy": False,
    "cross_entropy": False,
}
"""What prmkit hands `liger_kernel_config`: the layer kernels on, the loss kernels off (see
:func:`liger_kernel_config`)."""


def liger_kernel_config(user: dict | None, cuda: bool, installed: bool | None = None) -> dict[str, Any]:
    """The ``liger_kernel_config`` for a PRM, or a ConfigError saying why Liger cannot be used.

    Liger has no token-classification path. Its loss kernels (fused linear cross-entropy, which is on by default,
    and its cross-entropy) replace a causal LM's forward with one that computes a vocabulary-sized loss from
    ``lm_head``; a token-classification model has no ``lm_head``, and a PRM's loss is a two-class cross-entropy at
    the labelled steps only, so there is nothing for them to fuse. What does apply are the layer kernels (RMSNorm,
    RoPE, SwiGLU), which patch the decoder layers whatever head sits on top. prmkit turns the loss kernels off and
    refuses a config that turns them on.
    """
    from prmkit.errors import ConfigError

    if installed is None:
        import importlib.util

        installed = importlib.util.find_spec("liger_kernel") is not None
    if not installed:
        raise ConfigError(
            "train.use_liger_kernel: liger-kernel is not installed",
            hint="pip install 'prmkit[liger]' (needs a CUDA GPU), or set train.use_liger_kernel: false",
        )
    if not cuda:
        raise ConfigError(
            "train.use_liger_kernel: Liger's kernels are Triton GPU kernels and need a CUDA device",
            hint="set train.use_liger_kernel: false on CPU",
        )
    user = dict(user or {})
    wrong = [k for k in LIGER_LOSS_KEYS if user.get(k)]
    if wrong:
        raise ConfigError(
            f"train.liger_kernel_config: {wrong[0]} has no token-classification path (it replaces a "
            f"causal LM's vocabulary loss; a PRM's loss is two-class, at labelled steps only)",
            hint=f"remove {wrong[0]}; rope, rms_norm and swiglu apply to a PRM",
        )
    return {**LIGER_DEFAULTS, **user}


def liger_supports(model_type: str | None) -> bool | None:
    """Whether Liger has kernels for this model type (None: Liger not installed, cannot tell)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return None
    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def check_forward_untouched(model: Any) -> None:
    """Fail loudly if a patch replaced the model's forward (Liger's loss kernels would: a causal-LM forward that
    returns a loss and no logits). Wrappers (DDP, peft) are looked through."""
    from transformers import PreTrainedModel

    from prmkit.errors import ConfigError

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and "forward" in vars(module):
            raise ConfigError(
                f"{type(module).__name__}.forward was replaced by a patch; a PRM needs the model's own "
                f"forward (its logits at every step)",
                hint="turn off Liger's loss kernels in train.liger_kernel_config",
            )
