"""Cheap checks of a model directory before transformers loads it, and of the tokenizer after.

transformers trusts a model directory: a truncated weights file, a header describing terabytes, a config.json whose
sizes do not match the weights (or are not sizes at all), each ends in a traceback from deep inside the loader, or
in a hang while a million layers are built. And a directory without tokenizer files loads a one-token tokenizer
that scores every step as null. These checks read only config.json and the safetensors headers (kilobytes), so a
broken directory is one line naming the file and the problem before anything heavy happens.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from prmkit.errors import UsageError, shown

SAFETENSORS_HEADER_MAX = 100 << 20
# Bits per element of each safetensors dtype (the sub-byte float formats are packed).
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# config.json keys that are sizes: a positive integer each, wherever they appear (also in text_config).
SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "head_dim",
    "n_layer",
    "n_embd",
    "n_head",
    "n_positions",
)
MAX_SIZE = 2**31 - 1
LAYERS_KEYS = ("num_hidden_layers", "n_layer")
# A decoder layer's tensors: model.layers.3.mlp..., transformer.h.3.attn..., gpt_neox.layers.3...
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
CONFIG_MAX_BYTES = 16 << 20


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking that it describes the data that follows it: every
    tensor's offsets lie in the file, its shape and dtype fill them exactly, and the file ends where the data does."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise UsageError(f"{path}: not a safetensors file (too short)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or n > min(size - 8, SAFETENSORS_HEADER_MAX):
            raise UsageError(f"{path}: not a safetensors file (bad header length {n})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UsageError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise UsageError(f"{path}: not a safetensors file (the header is not a JSON object)")
    data = size - 8 - n
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        problem = _tensor_problem(t)
        if problem:
            raise UsageError(
                f"{path}: tensor {shown(name)}: {problem}", hint="the file is damaged: copy or save the model again"
            )
        end = max(end, t["data_offsets"][1])
    if end != data:
        raise UsageError(
            f"{path}: truncated or corrupt ({size} bytes, the header describes {8 + n + end})",
            hint="the file is damaged: copy or save the model again",
        )
    return header


def _tensor_problem(t: Any) -> str | None:
    def count(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(t, dict):
        return "not a tensor entry"
    offsets, shape, dtype = t.get("data_offsets"), t.get("shape"), t.get("dtype")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(count, offsets)) and offsets[0] <= offsets[1]):
        return f"bad data_offsets {shown(offsets)}"
    if not (isinstance(shape, list) and all(map(count, shape))):
        return f"bad shape {shown(shape)}"
    bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is not None and math.ceil(math.prod(shape) * bits / 8) != offsets[1] - offsets[0]:
        return f"shape {shown(shape)} of {dtype} does not fill its {offsets[1] - offsets[0]:,} bytes"
    return None


def read_config(model_dir: Path) -> dict[str, Any] | None:
    """config.json as a dict (None when there is none), its sizes checked: positive integers of a sane magnitude."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    if path.stat().st_size > CONFIG_MAX_BYTES:
        raise UsageError(f"{path}: {path.stat().st_size:,} bytes is too large for a config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(config).__name__}")
    sections = [("", config)] + [
        (f"{k}.", v) for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)
    ]
    for prefix, section in sections:
        for key in SIZE_KEYS:
            value = section.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
                raise UsageError(
                    f"{path}: {prefix}{key}: expected a positive integer up to {MAX_SIZE:,}, got {shown(value)}",
                    hint="restore config.json from the model it belongs to",
                )
    return config


def check_model_dir(model_dir: str | Path, weights: bool = True) -> None:
    """Refuse a local model directory whose config.json or safetensors files cannot describe a loadable model.

    Checks the sizes in config.json, every ``*.safetensors`` header (an adapter's base model too), and that the
    config's layer count and embedding size are those of the weights. Reads no tensor. Without ``weights`` (a model
    built from its config alone) only config.json is checked.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    if not weights:
        return
    headers = {p: read_safetensors_header(p) for p in sorted(model_dir.glob("*.safetensors"))}
    base = model_dir / "base_model"  # where an adapter-only output keeps a base model built from a config
    if base.is_dir():
        check_model_dir(base)
    if config is None or not headers or (model_dir / "adapter_config.json").is_file():
        return
    tensors = {name: t for header in headers.values() for name, t in header.items() if name != "__metadata__"}
    _check_layers(model_dir, config, tensors)
    _check_embeddings(model_dir, config, tensors)


def _config_value(config: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, int] | None:
    text = config.get("text_config")
    if not isinstance(text, dict):
        text = {}
    for section in (config, text):
        for key in keys:
            if isinstance(section.get(key), int):
                return key, section[key]
    return None


def _check_layers(model_dir: Path, config: dict[str, Any], tensors: dict[str, Any]) -> None:
    found = [int(m.group(1)) for name in tensors for m in [_LAYER.search(name)] if m]
    layers = _config_value(config, LAYERS_KEYS)
    # More layers than the weights hold would be built and left random (a million of them take hours to build).
    if found and layers and layers[1] > max(found) + 1:
        raise UsageError(
            f"{model_dir / 'config.json'}: {layers[0]} is {layers[1]:,}, but the weights hold {max(found) + 1} layers",
            hint="restore config.json from the model it belongs to",
        )


def _check_embeddings(model_dir: Path, config: dict[str, Any], tensors: dict[str, Any]) -> None:
    table = next(
        (
            t
            for name, t in tensors.items()
            if name.endswith(_EMBEDDINGS) and len(t["shape"]) == 2 and t.get("dtype") in FLOAT_DTYPES
        ),
        None,
    )
    if table is None:
        return
    rows, width = table["shape"]
    for keys, actual in ((("vocab_size",), rows), (("hidden_size", "n_embd"), width)):
        value = _config_value(config, keys)
        if value is not None and value[1] != actual:
            raise UsageError(
                f"{model_dir / 'config.json'}: {value[0]} is {value[1]:,}, but the weights' embedding "
                f"table is {rows:,} x {width:,}",
                hint="restore config.json from the model it belongs to",
            )


def embedding_rows(model: Any) -> int | None:
    """The rows of a loaded model's input embedding table."""
    lm = getattr(model, "lm", model)  # an LM-kind PRM wraps the causal LM
    embeddings = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def check_tokenizer_fits(tokenizer: Any, rows: int | None, name: str, separator: str | None = None) -> None:
    """Refuse a tokenizer that cannot be the model's: a vocabulary far smaller than the model's ``rows`` of
    embeddings (what transformers falls back to when a directory has no tokenizer files: one token), or one that
    cannot encode the step separator."""
    vocab = len(tokenizer)
    hint = (
        "save the model's tokenizer beside it (tokenizer.save_pretrained(dir)), or set model.tokenizer to the "
        "tokenizer it was trained with"
    )
    if isinstance(rows, int) and vocab * 2 < rows:
        raise UsageError(
            f"{name}: the tokenizer loaded there has {vocab:,} tokens for the model's {rows:,} "
            "embeddings: not the model's tokenizer (are its tokenizer files missing?)",
            hint=hint,
        )
    if separator:
        ids = tokenizer.encode(separator, add_special_tokens=False)
        unk = getattr(tokenizer, "unk_token_id", None)
        if not ids or (unk is not None and all(i == unk for i in ids)):
            raise UsageError(
                f"{name}: the tokenizer loaded there cannot encode the step separator "
                f"{json.dumps(separator)} (got {ids})",
                hint=hint,
            )
