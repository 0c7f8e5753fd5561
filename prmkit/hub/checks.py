"""Pre-flight checks before a push: the weights are whole, the model and tokenizer load, an adapter is valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prmkit.core import jsonio
from prmkit.core.filenames import CONFIG_YAML
from prmkit.errors import UsageError, first_line
from prmkit.hub.card import hub_id
from prmkit.hub.files import TOKENIZER_VOCAB_FILES, read_text_capped
from prmkit.models.files import read_safetensors_header
from prmkit.models.loading import MODEL_LOAD_DEFAULTS, quiet_transformers


def check_weights(model_dir: Path, files: list[tuple[str, Path]]) -> None:
    headers = {name: read_safetensors_header(p) for name, p in files if name.endswith(".safetensors")}
    for name, p in files:
        if not name.endswith(".safetensors.index.json"):
            continue
        try:
            weight_map: dict[str, str] = jsonio.loads(read_text_capped(p))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            raise UsageError(f"{p}: not a valid safetensors index (no weight_map)") from None
        for shard in sorted(set(weight_map.values())):
            if shard not in headers:
                raise UsageError(f"{p}: refers to {shard}, which is not in {model_dir}")
            listed = {k for k, v in weight_map.items() if v == shard}
            present = set(headers[shard]) - {"__metadata__"}
            if listed - present:
                raise UsageError(
                    f"{model_dir / shard}: lacks {len(listed - present)} tensor(s) the index lists, "
                    f"e.g. {sorted(listed - present)[0]}"
                )


def trust_remote_code(model_dir: Path) -> bool:
    path = model_dir / CONFIG_YAML
    if not path.is_file():
        return False
    import yaml

    from prmkit.config.load import load_yaml

    try:
        cfg = load_yaml(read_text_capped(path)) or {}
        return bool((cfg.get("model") or {}).get("trust_remote_code", False))
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
        return False


def check_model_loads(model_dir: Path, warnings: list[str], causal_lm: bool = False) -> Any:
    """Instantiate the model on the meta device from config.json and the checkpoint's headers; returns it.

    This runs transformers' own key matching (renames, tied weights, shapes) without reading a tensor, so it takes
    about a second whatever the model's size. An lm-tag PRM (``causal_lm``) is the causal LM itself.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

    auto = AutoModelForCausalLM if causal_lm else AutoModelForTokenClassification

    trust = trust_remote_code(model_dir)
    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"{model_dir / 'config.json'}: does not load: {first_line(e)}") from None
        if not causal_lm and getattr(config, "num_labels", 2) != 2:
            warnings.append(f"config.json has num_labels={config.num_labels}; a prmkit PRM has 2 (wrong, correct)")
        try:
            # Hub kernels off: transformers >= 5.2x kernelizes by default, and no kernel takes the meta device.
            # transformers annotates the model as the return; output_loading_info=True returns (model, info).
            model, info = auto.from_pretrained(
                model_dir,
                device_map="meta",  # type: ignore[misc]
                output_loading_info=True,
                trust_remote_code=trust,
                **MODEL_LOAD_DEFAULTS,
            )
        except Exception as e:  # whatever stops it loading is the finding
            raise UsageError(f"{model_dir}: the model does not load with {auto.__name__}: {first_line(e)}") from None
    problems = [
        ("missing", sorted(info.get("missing_keys") or [])),
        ("with the wrong shape", sorted(str(k) for k in info.get("mismatched_keys") or [])),
    ]
    for what, keys in problems:
        if keys:
            raise UsageError(
                f"{model_dir}: {len(keys)} weight(s) {what} in the checkpoint, e.g. {keys[0]}",
                hint="the weights do not match config.json; re-save the model with save_pretrained",
            )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        warnings.append(f"the checkpoint has {len(unexpected)} weight(s) the model does not use, e.g. {unexpected[0]}")
    return model


def check_adapter(adapter_dir: Path, warnings: list[str]) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    try:
        cfg = jsonio.loads(read_text_capped(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise UsageError(f"{path}: not a PEFT adapter config (no peft_type)")
    read_safetensors_header(adapter_dir / "adapter_model.safetensors")
    base = cfg.get("base_model_name_or_path")
    if not base:
        warnings.append("adapter_config.json names no base model; users must load the base model themselves")
    elif hub_id(base) is None:
        warnings.append(
            f"the adapter's base model {base!r} is a local path: it is published as its name only, and "
            "others cannot load the adapter from the Hub until base_model_name_or_path names a Hub model"
        )
    return cfg


def check_tokenizer(tok_dir: Path, names: set[str], trust: bool) -> None:
    if not any(n in names for n in TOKENIZER_VOCAB_FILES):
        raise UsageError(
            f"{tok_dir}: no tokenizer files (expected one of {', '.join(TOKENIZER_VOCAB_FILES)})",
            hint="save the tokenizer beside the model: tokenizer.save_pretrained(dir)",
        )
    from transformers import AutoTokenizer

    with quiet_transformers():
        try:
            AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust)
        except Exception as e:  # whatever stops it loading is the finding
            raise UsageError(f"{tok_dir}: the tokenizer does not load: {first_line(e)}") from None
