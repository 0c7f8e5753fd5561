"""The one tokenization that prepare, train, eval and score all call.

By default it reproduces TRL 1.13's ``PRMTrainer.tokenize_row`` token for token:

- the prompt is tokenized alone without special tokens, and BOS is prepended when the tokenizer has one;
- each step is tokenized alone without special tokens and followed by the separator's tokens;
- a step's label sits on the LAST token of its separator, every other position is -100;
- ``max_completion_length`` cuts the completion from the right, then ``max_length`` cuts the whole sequence.

Tokenizing steps alone is the point: joining ``prompt + sep + step`` into one string lets BPE merge across the
boundary (``.\\n`` is one Qwen2 token), so the label would land on a token training never saw. That is the bug in the
inference recipe TRL documented.

Two differences from TRL, both deliberate: soft labels (floats strictly between 0 and 1) are kept as probabilities
instead of being floored to 0 by ``int()``, and ``max_prompt_length`` (from the seed's PRMConfig, dropped by TRL 1.13)
keeps the END of a long prompt and keeps the BOS. Prompts within the limit tokenize exactly as in TRL.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizationParams:
    step_separator: str = "\n"
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    max_completion_length: int | None = None
    train_on_last_step_only: bool = False

    @classmethod
    def from_data_config(cls, data: Any) -> "TokenizationParams":
        return cls(**{f.name: getattr(data, f.name) for f in fields(cls)})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenizationParams":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Encoded:
    """One tokenized solution: its ids, and for each step the index of its label position (-1: truncated away)."""

    input_ids: list[int]
    step_positions: list[int]
    prompt_length: int


class TextEncoder:
    """Encodes strings without special tokens, each distinct string once, through the Rust tokenizer in batches.

    The output equals ``tokenizer(text, add_special_tokens=False)["input_ids"]`` (checked in the tests); the speed
    comes from batching, deduplication (a prompt repeats across its solutions, a step across PRM800K's expansions)
    and skipping the Python-side ``BatchEncoding`` for fast tokenizers.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._backend = None
        backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is not None:
            if backend.truncation is not None or backend.padding is not None:
                # A tokenizer.json may carry truncation or padding; they must not touch single-string encoding.
                from tokenizers import Tokenizer

                backend = Tokenizer.from_str(backend.to_str())
                backend.no_truncation()
                backend.no_padding()
            self._backend = backend
        self._encode_fast = getattr(self._backend, "encode_batch_fast", None) if self._backend is not None else None

    def encode_many(self, texts: Sequence[str]) -> dict[str, list[int]]:
        unique = list(dict.fromkeys(texts))
        if not unique:
            return {}
        if self._backend is not None:
            encode = self._encode_fast or self._backend.encode_batch
            encodings = encode(unique, add_special_tokens=False)
            ids = [e.ids for e in encodings]
        else:
            ids = self.tokenizer(unique, add_special_tokens=False)["input_ids"]
        return dict(zip(unique, ids))

    def encode(self, text: str) -> list[int]:
        return self.encode_many([text])[text]


def encode_solutions(
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    params: TokenizationParams,
    encoder: TextEncoder | None = None,
) -> list[Encoded]:
    """Tokenize solutions and locate each step's label position; the single source of truth for positions."""
    encoder = encoder or TextEncoder(tokenizer)
    texts: list[str] = list(prompts)
    for steps in completions:
        texts.extend(steps)
    texts.append(params.step_separator)
    table = encoder.encode_many(texts)
    sep_ids = table[params.step_separator] if params.step_separator else []
    bos = tokenizer.bos_token_id
    max_prompt = params.max_prompt_length
    max_completion = params.max_completion_length
    max_length = params.max_length

    out: list[Encoded] = []
    for prompt, steps in zip(prompts, completions):
        prompt_ids = table[prompt]
        if bos is not None:
            prompt_ids = [bos, *prompt_ids]
        if max_prompt is not None and len(prompt_ids) > max_prompt:
            # Keep the end of the prompt (the question is usually last) and the BOS the model expects.
            if bos is not None:
                prompt_ids = [bos, *prompt_ids[len(prompt_ids) - max_prompt + 1 :]] if max_prompt > 0 else []
            else:
                prompt_ids = prompt_ids[len(prompt_ids) - max_prompt :]
        ids = list(prompt_ids)
        n_prompt = len(ids)
        positions: list[int] = []
        for step in steps:
            ids += table[step]
            ids += sep_ids
            positions.append(len(ids) - 1)
        limit = len(ids)
        if max_completion is not None:
            limit = min(limit, n_prompt + max_completion)
        if max_length is not None:
            limit = min(limit, max_length)
        if limit < len(ids):
            del ids[limit:]
            positions = [p if p < limit else -1 for p in positions]
        out.append(Encoded(ids, positions, n_prompt))
    return out


def normalize_label(value: Any, label_threshold: float | None = None) -> int | float | None:
    """A label as stored: 0/1 for hard labels, a probability for soft ones, None for an unlabelled step.

    Raises ValueError with the reason for anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        if value in (0, 1):
            return value
        raise ValueError(f"label {value} is not 0 or 1")
    if isinstance(value, float):
        if value != value:
            raise ValueError("label is NaN")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"label {value} is outside [0, 1]")
        if label_threshold is not None:
            return int(value >= label_threshold)
        if value in (0.0, 1.0):
            return int(value)
        return value
    raise ValueError(f"label {value!r} is a {type(value).__name__}, expected a bool, 0/1 or a float in [0, 1]")


def build_labels(
    encoded: Encoded, labels: Sequence[int | float | None], train_on_last_step_only: bool, is_eval: bool
) -> list[int | float]:
    """Per-token labels: the step's label at its position, IGNORE_INDEX elsewhere (and for unlabelled steps)."""
    out: list[int | float] = [IGNORE_INDEX] * len(encoded.input_ids)
    last_only = train_on_last_step_only and not is_eval
    n = len(labels)
    for i, (pos, label) in enumerate(zip(encoded.step_positions, labels)):
        if pos < 0 or label is None or (last_only and i != n - 1):
            continue
        out[pos] = label
    return out


def tokenize_rows(
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    labels: Sequence[Sequence[int | float | None]],
    params: TokenizationParams,
    is_eval: bool = False,
    encoder: TextEncoder | None = None,
) -> dict[str, list]:
    """Tokenize stepwise rows for training or evaluation.

    Returns columns ``input_ids``, ``labels`` (TRL's layout), ``num_tokens`` and ``steps_lost`` (labelled steps cut
    away by truncation), one entry per row.
    """
    encoded = encode_solutions(tokenizer, prompts, completions, params, encoder)
    input_ids, token_labels, lengths, lost = [], [], [], []
    for enc, row_labels in zip(encoded, labels):
        input_ids.append(enc.input_ids)
        token_labels.append(build_labels(enc, row_labels, params.train_on_last_step_only, is_eval))
        lengths.append(len(enc.input_ids))
        lost.append(sum(1 for p, lab in zip(enc.step_positions, row_labels) if p < 0 and lab is not None))
    return {"input_ids": input_ids, "labels": token_labels, "num_tokens": lengths, "steps_lost": lost}


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Who the tokenizer is and a hash of everything that decides its ids (vocab, merges, normalizer, specials)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        for token, idx in sorted(tokenizer.get_vocab().items()):
            h.update(f"{token}\t{idx}\n".encode("utf-8"))
    h.update(f"bos={tokenizer.bos_token_id}".encode())
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "sha256": h.hexdigest(),
    }
