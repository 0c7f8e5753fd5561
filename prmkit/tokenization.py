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
import itertools
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
        self._split = _PieceSplitter.for_backend(self._backend) if self._backend is not None else None

    def _rust(self, texts: list[str]) -> list[list[int]]:
        encode = self._encode_fast or self._backend.encode_batch
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def encode_many(self, texts: Sequence[str]) -> dict[str, list[int]]:
        unique = list(dict.fromkeys(texts))
        if not unique:
            return {}
        if self._backend is None:
            return dict(zip(unique, self.tokenizer(unique, add_special_tokens=False)["input_ids"]))
        if self._split is None:
            return dict(zip(unique, self._rust(unique)))
        out: dict[str, list[int]] = {}
        slow: list[str] = []
        for text in unique:
            pieces = self._split.pieces(text)
            if pieces is None:
                slow.append(text)
            else:
                out[text] = pieces  # type: ignore[assignment]  # filled with ids below
        self._split.learn([p for pieces in out.values() for p in pieces])
        table = self._split.table
        lookup, flatten = table.__getitem__, itertools.chain.from_iterable
        for text, pieces in out.items():
            out[text] = list(flatten(map(lookup, pieces)))
        if slow:
            out.update(zip(slow, self._rust(slow)))
        return out

    def encode(self, text: str) -> list[int]:
        return self.encode_many([text])[text]


class _PieceSplitter:
    """Pre-tokenize in Python and encode each distinct piece once: the same ids as the Rust pipeline, faster.

    A byte-level BPE tokenizer (GPT-2, Llama 3, Qwen2, ...) splits text with one regex and encodes every piece on its
    own, so ids(text) = concat(ids(piece)). The Rust `Split` runs that regex with a backtracking engine and dominates
    tokenization time; the `regex` module finds the same pieces several times faster, and pieces repeat across texts
    far more than texts do. Used only where the equivalence is certain: the tokenizer has exactly that layout, the
    text is printable ASCII (so Unicode classes and NFC cannot differ between engines) and holds no added token.
    Everything else goes to the Rust tokenizer. The tests compare both paths on real data.
    """

    def __init__(self, pattern: str, piece_encoder: Any, added: list[str]):
        import regex

        self.rx = regex.compile(pattern)
        self.piece_encoder = piece_encoder
        # One scan finds anything that must go to Rust: a character outside printable ASCII, or an added token.
        unsafe = [r"[^\t\n\r\x20-\x7e]"] + [regex.escape(a) for a in sorted(added, key=len, reverse=True)]
        self.unsafe = regex.compile("|".join(unsafe))
        self.table: dict[str, list[int]] = {}

    @classmethod
    def for_backend(cls, backend: Any) -> "_PieceSplitter | None":
        import json

        try:
            import regex  # noqa: F401  (a transformers dependency)
            from tokenizers import Tokenizer, pre_tokenizers
        except ImportError:
            return None
        # The components' own state, not the whole tokenizer's JSON: parsing a 150k-entry vocabulary is slow.
        pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
        norm = json.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else None
        if norm is not None and norm.get("type") != "NFC":
            return None
        steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
        if not steps or len(steps) != 2:
            return None
        split, byte_level = steps
        if (
            split.get("type") != "Split"
            or "Regex" not in (split.get("pattern") or {})
            or split.get("behavior") != "Isolated"
            or split.get("invert")
            or byte_level.get("type") != "ByteLevel"
            or byte_level.get("use_regex")
            or byte_level.get("add_prefix_space")
        ):
            return None
        piece_encoder = Tokenizer.from_str(backend.to_str())
        piece_encoder.normalizer = None
        piece_encoder.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        piece_encoder.no_truncation()
        piece_encoder.no_padding()
        added = [t.content for t in backend.get_added_tokens_decoder().values()]
        splitter = cls(split["pattern"]["Regex"], piece_encoder, added)
        return None if splitter.rx.groups else splitter  # findall would return groups, not pieces

    def pieces(self, text: str) -> list[str] | None:
        if self.unsafe.search(text):
            return None
        pieces = self.rx.findall(text)
        # `Isolated` keeps unmatched gaps as pieces too; a pattern that leaves gaps goes to Rust.
        return pieces if sum(map(len, pieces)) == len(text) else None

    def learn(self, pieces: list[str]) -> None:
        new = [p for p in dict.fromkeys(pieces) if p not in self.table]
        if new:
            for piece, enc in zip(new, self.piece_encoder.encode_batch(new, add_special_tokens=False)):
                self.table[piece] = enc.ids


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
