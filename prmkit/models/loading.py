"""Loading: the tokenizer, a base model for training, a trained model back (full weights or a LoRA adapter).

A PRM must be causal (:func:`is_causal`): one sequence holds the whole solution, so a bidirectional model judging a
step would also read the steps after it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prmkit.core.atomic import read_json
from prmkit.errors import UsageError, first_line
from prmkit.kinds.registry import DEFAULT_KIND, get_kind
from prmkit.models.model_dir import ID2LABEL, LABEL2ID

log = logging.getLogger(__name__)


def init_new_tokens(model: Any, tokenizer: Any, new_ids: Sequence[int]) -> None:
    """Give tokens added for training an embedding: grow the matrices if needed, start each at the mean embedding.

    Models often have spare rows beyond the tokenizer (Qwen2: 151,936 rows for 151,665 tokens); an added token can
    land on one, untrained, so it is initialised whether or not the matrix grew.
    """
    import torch

    if not new_ids:
        return
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    known = min(new_ids)  # the rows before the first added token are the trained vocabulary
    with torch.no_grad():
        for emb in {
            id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None
        }.values():
            mean = emb.weight[:known].mean(dim=0)
            for i in new_ids:
                emb.weight[i] = mean


# transformers >= 5.2x swaps layers for kernels fetched from the Hub at load time unless told not to (5.0 did not).
# prmkit keeps the model's own layers: loading stays offline, and scores stay the same bits across versions.
# Faster kernels are asked for by name instead (train.use_liger_kernel, the attention kernels in
# prmkit.training.kernels).
MODEL_LOAD_DEFAULTS: dict[str, Any] = {"use_kernels": False}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' loading report and progress bars off for the block: prmkit says what matters (a missing head,
    a refused kind) in its own words, and library users get no progress bar on their stderr."""
    from transformers.utils import logging as tlog

    level, bar = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bar:
            tlog.enable_progress_bar()


ENCODER_EXPLANATION = (
    "prmkit reads a whole solution as one sequence and labels every step in it, so a bidirectional model judging "
    "step 2 also sees steps 3, 4, ... (and the final answer): it learns from the future instead of judging the step"
)


def is_causal(config: Any) -> bool:
    """Whether a model with this `transformers` config attends only to earlier tokens.

    Encoder-decoder models and masked-LM encoders (BERT, RoBERTa, DeBERTa, ModernBERT, ...) are not causal unless
    their config runs them as a decoder (``is_decoder``); a model type transformers knows as a causal LM is.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        return False
    if getattr(text, "is_decoder", False):
        return True
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    architectures = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def check_causal(config: Any, name: str, allow_bidirectional: bool) -> None:
    """Refuse a bidirectional model unless the user said they know (`model.allow_bidirectional: true`)."""
    from prmkit.errors import UsageError

    if is_causal(config):
        return
    kind = getattr(config, "model_type", "unknown")
    if allow_bidirectional:
        log.warning(
            f"{name} ({kind}) is not a causal model; training it anyway because model.allow_bidirectional is "
            f"true. {ENCODER_EXPLANATION}"
        )
        return
    raise UsageError(
        f"{name} ({kind}) is not a causal (decoder-only) model. {ENCODER_EXPLANATION}",
        hint="use a decoder-only model (Qwen2, Llama, Mistral, ...), or set model.allow_bidirectional: true if you "
        "mean it",
    )


DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_dtype(name: str | None, device: Any = None, key: str = "model.dtype"):
    """A dtype name as a torch dtype; the one function train, eval and score use.

    ``auto`` (or None) is decided by transformers from the checkpoint when no ``device`` is given (loading a model to
    train it); for a ``device`` it is bfloat16 (or float16 where bf16 is unsupported) on CUDA and float32 elsewhere,
    where bf16 matmuls are slow and float32 is exact (scoring).
    """
    import torch

    name = _DTYPE_ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in (None, *DTYPES):
        from prmkit.errors import ConfigError

        raise ConfigError(f"{key}: expected {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {name!r}")
    if name in (None, "auto"):
        if device is None:
            return "auto"
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def ensure_pad_token(tokenizer: Any) -> None:
    """Batches need a pad id; a tokenizer without one pads with EOS (pad positions are masked, so any id works)."""
    from prmkit.errors import UsageError

    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise UsageError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an EOS token",
            hint="use a tokenizer that defines pad_token or eos_token",
        )
    tokenizer.pad_token = tokenizer.eos_token
    log.warning(f"the tokenizer has no pad token; padding with its EOS token {tokenizer.eos_token!r}")


def load_model_config(model_cfg: Any):
    """The base model's transformers config, checked: a causal model (or ``allow_bidirectional``). Cheap: no weights."""
    from transformers import AutoConfig

    from prmkit.errors import UsageError

    name = model_cfg.name_or_path
    if not name:
        raise UsageError(
            "no model: set model.name_or_path", hint="e.g. --model Qwen/Qwen2-0.5B, or --example for a smoke run"
        )
    from prmkit.core.locate import locate

    name = locate(name, "model")
    if Path(name).is_dir():
        from prmkit.models.files import check_model_dir

        # Config sizes and weight headers, before transformers trusts them (init_from_config reads no weights).
        check_model_dir(name, weights=not model_cfg.init_from_config)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as e:
        hint = (
            "its config.json is damaged: restore it"
            if Path(name).is_dir()
            else "set model.name_or_path to a local directory or a reachable Hub id"
        )
        raise UsageError(f"model {name!r} could not be loaded: {first_line(e)}", hint=hint) from None
    check_causal(config, name, model_cfg.allow_bidirectional)
    return config


def load_model_for_training(
    model_cfg: Any,
    tokenizer: Any,
    seed: int | None = None,
    config: Any = None,
    kind: str = DEFAULT_KIND,
    new_tokens: list[int] | None = None,
    attn_implementation: str | None = None,
):
    """A token-classification model with two labels (LABEL_0 = wrong step, LABEL_1 = correct step), or for
    a causal-LM ``kind`` (lm-tag) the causal LM itself (its step tag added to the embeddings when the tokenizer grew).

    ``model_cfg`` is the config's ``model`` section. With ``init_from_config`` the weights are random (seeded by
    ``seed``), built from ``name_or_path``'s config. ``config`` is :func:`load_model_config`'s result, if at hand.
    ``attn_implementation`` overrides ``model_cfg.attn_implementation`` (training picks a kernel for packing).
    """
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    from prmkit.errors import UsageError

    name = model_cfg.name_or_path
    common = {"trust_remote_code": model_cfg.trust_remote_code}
    config = config if config is not None else load_model_config(model_cfg)
    causal_lm = get_kind(kind).causal_lm
    auto = AutoModelForCausalLM if causal_lm else AutoModelForTokenClassification
    if not causal_lm:
        config.num_labels = 2
        config.id2label = dict(ID2LABEL)
        config.label2id = dict(LABEL2ID)
    config.pad_token_id = tokenizer.pad_token_id
    # Training never generates; a KV cache object would also stop transformers building the packed-sequence mask.
    config.use_cache = False
    dtype = resolve_dtype(model_cfg.dtype)
    kwargs: dict[str, Any] = {}
    attn = attn_implementation or model_cfg.attn_implementation
    if attn:
        kwargs["attn_implementation"] = attn
    if model_cfg.init_from_config:
        import torch
        from transformers import set_seed

        if seed is not None:
            set_seed(seed)
        model = auto.from_config(config, dtype=torch.float32 if dtype == "auto" else dtype, **common, **kwargs)
    else:
        try:
            model = auto.from_pretrained(name, config=config, dtype=dtype, **common, **kwargs, **MODEL_LOAD_DEFAULTS)
        except Exception as e:
            raise UsageError(f"model {name!r} could not be loaded: {first_line(e)}") from None
    if new_tokens:
        from prmkit.models.loading import init_new_tokens

        init_new_tokens(model, tokenizer, new_tokens)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UsageError(
            f"the tokenizer has {len(tokenizer)} tokens but {name} has only "
            f"{model.get_input_embeddings().num_embeddings} embeddings",
            hint="use the tokenizer the model was trained with (model.tokenizer)",
        )
    return model


def disable_dropout(model: Any) -> int:
    """Set every dropout probability to 0 (modules and config); returns how many modules were changed.

    A PRM is trained on few labels per sequence; dropout mostly adds noise between the train and eval passes.
    """
    import torch.nn as nn

    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p != 0:
            module.p = 0.0
            changed += 1
        # Attention dropout is often a float handed to the attention kernel, not a module.
        for attr in ("attention_dropout", "attn_dropout", "dropout_p"):
            if isinstance(getattr(module, attr, None), float) and getattr(module, attr):
                setattr(module, attr, 0.0)
                changed += 1
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(vars(config).items()):
            if "dropout" in key and isinstance(value, float) and value:
                setattr(config, key, 0.0)
    return changed


# Where an adapter-only output keeps a base model that cannot be downloaded again (random init from a config).
BASE_MODEL_DIR = "base_model"


def load_trained_model(
    path: str | Path, dtype: Any = "auto", trust_remote_code: bool = False, causal_lm: bool = False, **kwargs: Any
):
    """Load what `prmkit train` wrote: a full model, or a LoRA adapter over its base. Returns the model (eval mode).

    An adapter directory is recognised by ``adapter_config.json``; its base is ``base_model/`` inside it when
    present, else the adapter config's ``base_model_name_or_path``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    path = Path(path)
    auto = AutoModelForCausalLM if causal_lm else AutoModelForTokenClassification  # lm-tag: the LM itself
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    adapter_cfg = path / "adapter_config.json"
    if path.is_dir() and adapter_cfg.is_file():
        from peft import PeftModel

        base = path / BASE_MODEL_DIR
        base_name = str(base) if (base / "config.json").is_file() else read_json(adapter_cfg)["base_model_name_or_path"]
        head: dict[str, Any] = (
            {} if causal_lm else {"num_labels": 2, "id2label": dict(ID2LABEL), "label2id": dict(LABEL2ID)}
        )
        model = auto.from_pretrained(
            base_name, **head, dtype=dtype, trust_remote_code=trust_remote_code, **{**MODEL_LOAD_DEFAULTS, **kwargs}
        )
        model = PeftModel.from_pretrained(model, str(path))
    else:
        model = auto.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=trust_remote_code, **{**MODEL_LOAD_DEFAULTS, **kwargs}
        )
    model.eval()
    return model


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load only the tokenizer (never weights); a directory holding just tokenizer files works."""
    from transformers import AutoTokenizer

    from prmkit.core.locate import locate

    name_or_path = locate(name_or_path, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UsageError(
            f"tokenizer {name_or_path!r} could not be loaded: {first_line(e)}",
            hint="set model.tokenizer (or model.name_or_path) to a local directory or a reachable Hub id",
        ) from None
    except Exception as e:
        raise UsageError(
            f"tokenizer {name_or_path!r} could not be loaded: {first_line(e)}",
            hint="its tokenizer files are damaged: restore them, or save the tokenizer again",
        ) from None
