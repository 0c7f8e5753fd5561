"""Models and model directories: loading and checking a base model, LoRA, and what `train` writes beside the weights.

A prmkit model directory is self-describing, like a transformers one: ``prmkit.json`` records the step separator and
every tokenization parameter, the label mapping, the base model and the data, so nobody repeats the separator.
:func:`load_trained_model` loads one back, whether it holds full weights or a LoRA adapter.

A PRM must be causal (:func:`is_causal`): one sequence holds the whole solution, so a bidirectional model judging a
step would also read the steps after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from prmkit import __version__
from prmkit.atomic import read_json, write_atomic
from prmkit.errors import UsageError, first_line, shown
from prmkit.jsonio import dumps
from prmkit.redact import redact
from prmkit.tokenization import TokenizationParams

log = logging.getLogger("prmkit")

PRMKIT_JSON = "prmkit.json"
CONFIG_YAML = "prmkit_config.yaml"
ID2LABEL = {0: "LABEL_0", 1: "LABEL_1"}
LABEL2ID = {"LABEL_0": 0, "LABEL_1": 1}
# transformers >= 5.2x swaps layers for kernels fetched from the Hub at load time unless told not to (5.0 did not).
# prmkit keeps the model's own layers: loading stays offline, and scores stay the same bits across versions.
# Faster kernels are asked for by name instead (train.use_liger_kernel, the attention kernels in prmkit.kernels).
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


POSITIVE_LABEL_ID = 1  # p(step correct) = softmax(logits)[..., 1]; TRL's docs map LABEL_1 -> True


def label_mapping() -> dict[str, Any]:
    return {
        "id2label": {str(k): v for k, v in ID2LABEL.items()},
        "positive_label_id": POSITIVE_LABEL_ID,
        "meaning": {"LABEL_0": "step is wrong", "LABEL_1": "step is correct"},
    }


def build_metadata(
    params: TokenizationParams,
    base_model: str | None,
    data: dict[str, Any] | None = None,
    tokenizer: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "prmkit_version": __version__,
        "tokenization": params.to_dict(),
        "labels": label_mapping(),
        "base_model": base_model,
        "data": data or {},
        "tokenizer": tokenizer or {},
        **(extra or {}),
    }


def write_json_atomic(path: Path, obj: Any) -> None:
    """Metadata as JSON, secrets redacted (prmkit.redact): nothing prmkit saves holds a token or password."""
    write_atomic(path, dumps(redact(obj), indent=2) + "\n")


def write_metadata(model_dir: str | Path, metadata: dict[str, Any]) -> Path:
    path = Path(model_dir) / PRMKIT_JSON
    write_json_atomic(path, metadata)
    return path


def read_metadata(model_dir: str | Path) -> dict[str, Any] | None:
    """`prmkit.json` of a local model directory, or None when there is none (e.g. a model trained with TRL)."""
    from prmkit.run_dir import set_aside_problem  # run_dir imports this module

    problem = set_aside_problem(model_dir)
    if problem is not None:
        raise problem
    path = Path(model_dir) / PRMKIT_JSON
    if not path.is_file():
        if (Path(model_dir) / CONFIG_YAML).is_file():
            # `prmkit train` writes prmkit.json last: without it the weights may be missing, partial or stale.
            raise UsageError(f"{model_dir}: a prmkit training run that has not finished (no {PRMKIT_JSON} yet)",
                             hint="finish it with the same `prmkit train` command plus --resume, or use one of its "
                                  "checkpoint-N directories")
        return None
    hint = f"the file is damaged: restore it, or copy {PRMKIT_JSON} from the training run's output"
    metadata = read_json(path, hint=hint)
    if not isinstance(metadata, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(metadata).__name__}", hint=hint)
    check_recorded_tokenization(metadata.get("tokenization"), str(path))
    return metadata


def check_recorded_tokenization(recorded: Any, origin: str) -> None:
    """The limits a model directory records go through the config's own type and range checks."""
    from prmkit.config import check_range

    if not isinstance(recorded, dict):
        return
    for key in ("max_length", "max_prompt_length", "max_completion_length"):
        value = recorded.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UsageError(f"{origin}: tokenization.{key}: expected an integer or null, got {shown(value)}")
        check_range(f"data.{key}", value, origin, name=f"tokenization.{key}")


TOKENIZATION_KEYS = tuple(f.name for f in fields(TokenizationParams))
# Keys that shape how a solution is tokenized for scoring. train_on_last_step_only only picks which steps TRAINING
# labels: score and eval always score every step, so it has nothing to apply to there.
SCORING_TOKENIZATION_KEYS = ("step_separator", "max_length", "max_prompt_length", "max_completion_length")


def explicit_tokenization(data: Any, is_set: Callable[[str], bool]) -> dict[str, Any]:
    """The ``data.*`` tokenization keys a user set (config file, ``--set``), for score and eval to apply over
    ``prmkit.json``; ``None`` values (no limit) are settings too."""
    return {k: getattr(data, k) for k in TOKENIZATION_KEYS if is_set(f"data.{k}")}


def resolve_tokenization(
    model: str | Path,
    metadata: dict[str, Any] | None,
    step_separator: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[TokenizationParams, dict[str, tuple[Any, Any]]]:
    """The tokenization to score ``model`` with, and what differs from its training: ``{key: (trained, used)}``.

    ``prmkit.json`` records the training tokenization. ``overrides`` (keys the user set) and ``step_separator`` (a
    command's flag, which wins over an override) are honoured, never dropped: where they contradict the record a
    warning says so, since a label may then sit where the model learned nothing. Without ``prmkit.json`` (a model
    trained with TRL) they state how it was trained, and the rest is TRL 1.13's defaults.
    """
    asked = dict(overrides or {})
    unknown = sorted(set(asked) - set(TOKENIZATION_KEYS))
    if unknown:
        raise UsageError(f"not a tokenization key: {', '.join(unknown)}", hint=f"use {', '.join(TOKENIZATION_KEYS)}")
    if step_separator is not None:
        asked["step_separator"] = step_separator
    if metadata is None:
        if "step_separator" not in asked:
            log.warning(f"{model}: no {PRMKIT_JSON}; assuming step separator '\\n' (TRL's default). Pass "
                        "--step-separator if it was trained with another")
        trained = TokenizationParams()
    else:
        trained = TokenizationParams.from_dict(metadata.get("tokenization", {}))
    if asked.get("train_on_last_step_only", trained.train_on_last_step_only) != trained.train_on_last_step_only:
        raise UsageError(
            f"data.train_on_last_step_only={_yaml(asked['train_on_last_step_only'])} cannot apply to scoring: it only "
            f"picks which steps training labels, and scoring scores every step ({model} was trained with "
            f"{_yaml(trained.train_on_last_step_only)})",
            hint="drop it from --set or the config for score and eval",
        )
    used = TokenizationParams(**{**trained.to_dict(), **asked})
    differs = {k: (getattr(trained, k), getattr(used, k)) for k in SCORING_TOKENIZATION_KEYS
               if getattr(trained, k) != getattr(used, k)}
    if metadata is not None:
        for key, (before, after) in differs.items():
            log.warning(f"{model}: trained with data.{key}={_yaml(before)} ({PRMKIT_JSON}); scoring with "
                        f"{_yaml(after)} as asked, so the tokens differ from training")
    return used, differs if metadata is not None else {}


def kind_tokenization(
    model: str | Path, kind: str, overrides: Mapping[str, Any] | None, step_separator: str | None = None
) -> int | None:
    """The ``max_length`` to score a PRM of another kind with (None: the model's own limit).

    Such a model has its own input layout (its kind's), so of the tokenization keys only ``max_length`` applies; a
    setting of another one that would change something is refused rather than dropped.
    """
    asked = dict(overrides or {})
    if step_separator is not None:
        asked["step_separator"] = step_separator
    default = TokenizationParams()
    moot = [k for k, v in asked.items() if k != "max_length" and v != getattr(default, k)]
    if moot:
        raise UsageError(
            f"{model} is a {kind} PRM, which lays out its input its own way: "
            + ", ".join(f"data.{k}={_yaml(asked[k])}" for k in moot) + " cannot apply to it",
            hint="drop the setting (or --step-separator) for this model, or score it in a run of its own",
        )
    return asked.get("max_length")


def _yaml(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if value is not None else "null"


# ---------------------------------------------------------------------------------------------------------------------
# Loading models for training and scoring

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
        log.warning(f"{name} ({kind}) is not a causal model; training it anyway because model.allow_bidirectional is "
                    f"true. {ENCODER_EXPLANATION}")
        return
    raise UsageError(
        f"{name} ({kind}) is not a causal (decoder-only) model. {ENCODER_EXPLANATION}",
        hint="use a decoder-only model (Qwen2, Llama, Mistral, ...), or set model.allow_bidirectional: true if you mean it",
    )


def resolve_dtype(name: str | None):
    """`model.dtype` as transformers takes it: 'auto' stays 'auto', names become torch dtypes."""
    import torch

    if name in (None, "auto"):
        return "auto"
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        from prmkit.errors import ConfigError

        raise ConfigError(f"model.dtype: expected auto, float32, bfloat16 or float16, got {name!r}")
    return table[name]


def ensure_pad_token(tokenizer: Any) -> None:
    """Batches need a pad id; a tokenizer without one pads with EOS (pad positions are masked, so any id works)."""
    from prmkit.errors import UsageError

    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise UsageError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an EOS token",
                         hint="use a tokenizer that defines pad_token or eos_token")
    tokenizer.pad_token = tokenizer.eos_token
    log.warning(f"the tokenizer has no pad token; padding with its EOS token {tokenizer.eos_token!r}")


def load_model_config(model_cfg: Any):
    """The base model's transformers config, checked: a causal model (or ``allow_bidirectional``). Cheap: no weights."""
    from transformers import AutoConfig

    from prmkit.errors import UsageError

    name = model_cfg.name_or_path
    if not name:
        raise UsageError("no model: set model.name_or_path", hint="e.g. --model Qwen/Qwen2-0.5B, or --example for a smoke run")
    from prmkit.locate import locate

    name = locate(name, "model")
    if Path(name).is_dir():
        from prmkit.model_files import check_model_dir

        # Config sizes and weight headers, before transformers trusts them (init_from_config reads no weights).
        check_model_dir(name, weights=not model_cfg.init_from_config)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - OSError for a missing model, others for a damaged config
        hint = ("its config.json is damaged: restore it" if Path(name).is_dir()
                else "set model.name_or_path to a local directory or a reachable Hub id")
        raise UsageError(f"model {name!r} could not be loaded: {first_line(e)}", hint=hint) from None
    check_causal(config, name, model_cfg.allow_bidirectional)
    return config


def load_model_for_training(model_cfg: Any, tokenizer: Any, seed: int | None = None, config: Any = None,
                            kind: str = "token-classification", new_tokens: list[int] | None = None,
                            attn_implementation: str | None = None):
    """A token-classification model with two labels (LABEL_0 = wrong step, LABEL_1 = correct step), or for
    ``kind="lm-tag"`` the causal LM itself (its step tag added to the embeddings when the tokenizer grew).

    ``model_cfg`` is the config's ``model`` section. With ``init_from_config`` the weights are random (seeded by
    ``seed``), built from ``name_or_path``'s config. ``config`` is :func:`load_model_config`'s result, if at hand.
    ``attn_implementation`` overrides ``model_cfg.attn_implementation`` (training picks a kernel for packing).
    """
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    from prmkit.errors import UsageError

    name = model_cfg.name_or_path
    common = {"trust_remote_code": model_cfg.trust_remote_code}
    config = config if config is not None else load_model_config(model_cfg)
    auto = AutoModelForCausalLM if kind == "lm-tag" else AutoModelForTokenClassification
    if kind != "lm-tag":
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
        except Exception as e:  # noqa: BLE001 - e.g. sizes that do not match the weights, a damaged file
            raise UsageError(f"model {name!r} could not be loaded: {first_line(e)}") from None
    if new_tokens:
        from prmkit.kinds import init_new_tokens

        init_new_tokens(model, tokenizer, new_tokens)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but {name} has only "
                         f"{model.get_input_embeddings().num_embeddings} embeddings",
                         hint="use the tokenizer the model was trained with (model.tokenizer)")
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


# ---------------------------------------------------------------------------------------------------------------------
# LoRA

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


def lora_config(lora: dict, model: Any, kind: str = "token-classification"):
    """A peft LoraConfig (task TOKEN_CLS) from `train.lora`, with the head in modules_to_save.

    For the lm-tag kind the task is CAUSAL_LM and the LM head stays frozen: the adapted hidden states move the two
    reward-token logits, and a vocabulary-sized head is not copied into every adapter.
    """
    from peft import LoraConfig, TaskType

    from prmkit.config import _did_you_mean
    from prmkit.errors import ConfigError

    unknown = [k for k in lora if k not in LORA_KEYS]
    if unknown:
        raise ConfigError(f"train.lora: unknown key {unknown[0]!r}{_did_you_mean(str(unknown[0]), LORA_KEYS)}",
                          hint=f"train.lora takes {', '.join(LORA_KEYS)}")
    opts = {**LORA_KEYS, **lora}
    target = opts["target_modules"]
    if isinstance(target, str) and target != "all-linear":
        target = [target]
    causal_lm = kind == "lm-tag"
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM if causal_lm else TaskType.TOKEN_CLS,
        r=int(opts["r"]),
        lora_alpha=float(opts["alpha"]),
        lora_dropout=float(opts["dropout"]),
        target_modules=target,
        modules_to_save=None if causal_lm else [head_module_name(model)],
    )


def apply_lora(model: Any, lora: dict, kind: str = "token-classification"):
    from peft import get_peft_model

    from prmkit.errors import ConfigError

    config = lora_config(lora, model, kind)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"train.lora: {str(e).splitlines()[0]}",
                          hint="set train.lora.target_modules, e.g. [q_proj, v_proj] or all-linear") from None


# Where an adapter-only output keeps a base model that cannot be downloaded again (random init from a config).
BASE_MODEL_DIR = "base_model"


def load_trained_model(path: str | Path, dtype: Any = "auto", trust_remote_code: bool = False, causal_lm: bool = False,
                       **kwargs: Any):
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
        head = {} if causal_lm else {"num_labels": 2, "id2label": dict(ID2LABEL), "label2id": dict(LABEL2ID)}
        model = auto.from_pretrained(base_name, **head, dtype=dtype, trust_remote_code=trust_remote_code,
                                     **{**MODEL_LOAD_DEFAULTS, **kwargs})
        model = PeftModel.from_pretrained(model, str(path))
    else:
        model = auto.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                     **{**MODEL_LOAD_DEFAULTS, **kwargs})
    model.eval()
    return model
