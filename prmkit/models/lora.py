"""LoRA through peft: defaults, the head kept trainable and saved, the adapter applied."""

from __future__ import annotations

from typing import Any

from prmkit.kinds.registry import DEFAULT_KIND, get_kind

LORA_KEYS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None}


def head_module_name(model: Any) -> str:
    """Name of the classification head (`score` for Qwen2/Llama, `classifier` for BERT-likes): LoRA trains it fully."""
    import torch.nn as nn

    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    num_labels = getattr(model.config, "num_labels", 2)
    found = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not found:
        from prmkit.errors import UsageError

        raise UsageError(f"cannot find the classification head of {type(model).__name__} to train with LoRA")
    return found[-1]


def lora_config(lora: dict, model: Any, kind: str = DEFAULT_KIND):
    """A peft LoraConfig (task TOKEN_CLS) from `train.lora`, with the head in modules_to_save.

    For a causal-LM kind (lm-tag) the task is CAUSAL_LM and the LM head stays frozen: the adapted hidden states move
    the two reward-token logits, and a vocabulary-sized head is not copied into every adapter.
    """
    from peft import LoraConfig, TaskType

    from prmkit.config.schema import _did_you_mean
    from prmkit.errors import ConfigError

    unknown = [k for k in lora if k not in LORA_KEYS]
    if unknown:
        raise ConfigError(
            f"train.lora: unknown key {unknown[0]!r}{_did_you_mean(str(unknown[0]), LORA_KEYS)}",
            hint=f"train.lora takes {', '.join(LORA_KEYS)}",
        )
    opts = {**LORA_KEYS, **lora}
    target = opts["target_modules"]
    if isinstance(target, str) and target != "all-linear":
        target = [target]
    spec = get_kind(kind)
    return LoraConfig(
        task_type=TaskType[spec.lora_task],
        r=int(opts["r"]),
        # peft annotates int but only divides by r (or its root): a fractional alpha is valid and kept.
        lora_alpha=float(opts["alpha"]),  # type: ignore[arg-type]
        lora_dropout=float(opts["dropout"]),
        target_modules=target,
        modules_to_save=[head_module_name(model)] if spec.lora_trains_head else None,
    )


def apply_lora(model: Any, lora: dict, kind: str = DEFAULT_KIND):
    from peft import get_peft_model

    from prmkit.errors import ConfigError, first_line

    config = lora_config(lora, model, kind)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(
            f"train.lora: {first_line(e)}", hint="set train.lora.target_modules, e.g. [q_proj, v_proj] or all-linear"
        ) from None
