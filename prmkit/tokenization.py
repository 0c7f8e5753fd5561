"""The one tokenization that prepare, train, eval and score all call.

By default it reproduces TRL 1.13's ``PRMTrainer.tokenize_row`` token for token:

- the prompt is tokenized alone without special tokens, and BOS is prepended when the tokenizer has one;
- each step is tokenized alone without special tokens and followed by the separator's tokens;
- a step's label sits on the LAST token of its separator, every other position is -100;
- ``max_completion_length`` cuts the completion from the right, then ``max_length`` cuts the whole sequence.

Tokenizing steps alone is the point: joining ``prompt + sep + step`` into one string lets BPE merge across the
boundary (``.\\n`` is one Qwen2 token), so the label would land on a token training never saw. That is the bug in the
inference recipe TRL documented.

One difference from TRL, deliberate: soft labels (floats strictly between 0 and 1) are kept as probabilities instead
of being floored to 0 by ``int()``. ``max_prompt_length`` (from the seed's PRMConfig; TRL 1.13 has no prompt limit)
is off by default, as in TRL; when set, it keeps the END of a long prompt and keeps the BOS. Prompts within the limit
tokenize exactly as in TRL.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizationParams:
    step_separator: str = "\n"
    max_length: int | None = 1024
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    train_on_last_step_only: bool = False

    @classmethod
    def from_data_config(cls, data: Any) -> TokenizationParams:
        return cls(**{f.name: getattr(data, f.name) for f in fields(cls)})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizationParams:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Encoded:
    """One tokenized solution: its ids, and for each step the index of its label position (-1: truncated away)."""

    input_ids: list[int]
    step_positions: list[int]
    prompt_length: int


@dataclass
class EncodedBatch:
    """Tokenized solutions in flat arrays, assembled without a Python loop per token.

    Row ``i`` is ``input_ids[row_offsets[i]:row_offsets[i + 1]]``; its steps' label positions (relative to the row,
    -1 where truncation cut the step away) are ``step_positions[step_offsets[i]:step_offsets[i + 1]]``.
    """

    input_ids: np.ndarray  # int32
    row_offsets: np.ndarray  # int64, rows + 1
    step_positions: np.ndarray  # int64, one per step
    step_offsets: np.ndarray  # int64, rows + 1
    prompt_lengths: np.ndarray  # int64, one per row

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.row_offsets)

    @classmethod
    def from_rows(cls, rows: Sequence[Encoded]) -> EncodedBatch:
        """Flat arrays from per-row results (another PRM kind's tokenization, :mod:`prmkit.kinds.spec`)."""
        lengths = [len(r.input_ids) for r in rows]
        steps = [len(r.step_positions) for r in rows]
        flat = [t for r in rows for t in r.input_ids]
        return cls(
            np.asarray(flat, dtype=np.int32),
            np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
            np.asarray([p for r in rows for p in r.step_positions], dtype=np.int64),
            np.concatenate([[0], np.cumsum(steps, dtype=np.int64)]).astype(np.int64),
            np.asarray([r.prompt_length for r in rows], dtype=np.int64),
        )

    def rows(self) -> list[Encoded]:
        ids, pos = self.input_ids.tolist(), self.step_positions.tolist()
        ro, so, pl = self.row_offsets.tolist(), self.step_offsets.tolist(), self.prompt_lengths.tolist()
        return [Encoded(ids[ro[i] : ro[i + 1]], pos[so[i] : so[i + 1]], pl[i]) for i in range(len(self))]


@dataclass
class TokenPool:
    """The ids of a list of texts: text ``i`` is ``ids[starts[i]:starts[i] + lengths[i]]``."""

    ids: np.ndarray  # int32
    starts: np.ndarray  # int64
    lengths: np.ndarray  # int64

    def get(self, i: int) -> list[int]:
        return self.ids[self.starts[i] : self.starts[i] + self.lengths[i]].tolist()


def _flatten(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def _starts(lengths: np.ndarray) -> np.ndarray:
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _dedup(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The distinct texts in first-seen order, and where each input text sits among them."""
    index = dict.fromkeys(texts)
    for i, text in enumerate(index):
        index[text] = i
    inverse = np.fromiter(map(index.__getitem__, texts), dtype=np.int64, count=len(texts))
    return list(index), inverse


class TextEncoder:
    """Encodes strings without special tokens, each distinct string once, through the Rust tokenizer in batches.

    The output equals ``tokenizer(text, add_special_tokens=False)["input_ids"]`` (checked in the tests); the speed
    comes from batching, deduplication (a prompt repeats across its solutions, a step across PRM800K's expansions),
    skipping the Python-side ``BatchEncoding``, and for byte-level BPE a faster pre-tokenizer (:class:`_PieceSplitter`).
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

    def _lists(self, texts: list[str]) -> list[list[int]]:
        if self._backend is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        encode = self._encode_fast or self._backend.encode_batch
        try:
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        except TypeError:
            # Rows read by prmkit are checked before they get here; this names the text for direct library callers.
            bad = next(((i, p) for i, t in enumerate(texts) if isinstance(t, str) and (p := text_problem(t))), None)
            if bad is None:
                raise
            from prmkit.errors import DataError

            raise DataError(f"cannot tokenize {texts[bad[0]][:40]!r}: {bad[1]}") from None

    def encode_pools(
        self, batches: Iterable[tuple[Any, Sequence[str]]], processes: int = 1
    ) -> Iterator[tuple[Any, TokenPool]]:
        """Encode ``(tag, texts)`` batches in order, yielding ``(tag, pool)``; each distinct text once per batch.

        ``processes`` > 1 runs the byte-level pre-split in that many worker processes (it is the costly part).
        """
        if self._split is not None:
            yield from self._split.encode_pools(batches, processes, self._lists)
            return
        for tag, texts in batches:
            unique, inverse = _dedup(texts)
            flat, lengths = _flatten(self._lists(unique))
            yield tag, TokenPool(flat, _starts(lengths)[inverse], lengths[inverse])

    def encode_pool(self, texts: Sequence[str]) -> TokenPool:
        return next(self.encode_pools([(None, texts)]))[1]

    def encode_many(self, texts: Sequence[str]) -> dict[str, list[int]]:
        pool = self.encode_pool(texts)
        return {text: pool.get(i) for i, text in enumerate(texts)}

    def encode(self, text: str) -> list[int]:
        return self.encode_pool([text]).get(0)


_ASCII_CLASSES = {"L": "A-Za-z", "N": "0-9"}
_SAFE_ALPHABET = "\t\n\r" + "".join(map(chr, range(0x20, 0x7F)))


def _ascii_pattern(pattern: str) -> str | None:
    r"""The pattern for the stdlib ``re`` engine on printable ASCII: ``\p{L}`` is ``[A-Za-z]`` there, ``\p{N}``
    ``[0-9]``.

    None when the pattern uses anything else this translation does not know.
    """
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            m = re.match(r"\\p\{(\w+)\}", pattern[i:])
            if m:
                cls = _ASCII_CLASSES.get(m.group(1))
                if cls is None:
                    return None
                out.append(cls if in_class else f"[{cls}]")
                i += m.end()
                continue
            if pattern[i + 1 : i + 2] in ("p", "P"):
                return None
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            out.append(c)
            # A `]` right after `[` or `[^` is a literal, not the end of the class.
            for lead in ("^", "]"):
                if pattern[i + 1 : i + 2] == lead:
                    out.append(lead)
                    i += 1
            i += 1
            continue
        if c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def _fast_engine(pattern: str):
    """Compile the pre-tokenizer pattern with the stdlib ``re`` where it provably agrees with ``regex`` on safe text.

    ``re`` runs these patterns about 1.5x faster than ``regex``. Agreement is checked on a fixed probe of safe text
    (every character of the alphabet next to every class), so a translation that changed a match is never used.
    """
    import random

    import regex

    reference = regex.compile(pattern)
    translated = _ascii_pattern(pattern)
    if translated is None:
        return reference
    try:
        with warnings.catch_warnings():
            # "Possible nested set" and the like: `re` says the pattern's meaning may change, so `regex` it is.
            warnings.simplefilter("error", FutureWarning)
            fast = re.compile(translated)
    except (re.error, FutureWarning):
        return reference
    rng = random.Random(0)
    words = [
        "'s",
        "'S",
        "'ll",
        "'LL",
        "'re",
        "'ve",
        "'m",
        "'d",
        "'t",
        "ab",
        "Xy",
        "12",
        "3",
        "  ",
        "\n",
        "\r\n",
        "\t",
        " .",
        "!!",
        "<<",
        ">>",
        "a1",
        "_x",
        "-",
        "$",
        "\\frac",
        "{}",
        "   \n  ",
        "\n\n",
        " ",
    ]
    probes = [_SAFE_ALPHABET, *(a + b for a in _SAFE_ALPHABET for b in ("a", " ", "\n", "1", "'", "."))]
    probes += [
        "".join(rng.choice(words + list(_SAFE_ALPHABET)) for _ in range(rng.randint(1, 24))) for _ in range(3000)
    ]
    if any(fast.findall(p) != reference.findall(p) for p in probes):
        return reference
    return fast


class _PreSplitter:
    """The pure-Python half of :class:`_PieceSplitter`: find pre-tokens and number them. Picklable, for workers."""

    def __init__(self, pattern: str, added: list[str]):
        self.pattern, self.added = pattern, added
        self.rx = _fast_engine(pattern)
        self.unsafe = re.compile(r"[^\t\n\r\x20-\x7e]")
        self.added_rx = (
            re.compile("|".join(re.escape(a) for a in sorted(added, key=len, reverse=True))) if added else None
        )
        self.index: dict[str, int] = {}

    def __getstate__(self) -> dict:
        return {"pattern": self.pattern, "added": self.added, "index": self.index}

    def __setstate__(self, state: dict) -> None:
        _PreSplitter.__init__(self, state["pattern"], state["added"])
        self.index = state["index"]

    def safe(self, texts: Sequence[str]) -> np.ndarray:
        """Which texts are printable ASCII without an added token: the ones the split is certain for."""
        safe = np.ones(len(texts), dtype=bool)
        if not texts:
            return safe
        joined = "\n".join(texts)
        ends = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)) + 1) - 1
        for rx in (self.unsafe, self.added_rx):
            pos = 0
            while rx is not None and (m := rx.search(joined, pos)):
                k = int(np.searchsorted(ends, m.start(), side="right"))
                if k >= len(texts):
                    break
                safe[k] = False  # a match across the joining newline only costs a trip to Rust
                pos = int(ends[k]) + 1
        return safe

    def split(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """Each text's pre-tokens as indices into ``self.index`` (new pieces are added), the count per text, and
        the first index this call added."""
        first_new = len(self.index)
        per_text = list(map(self.rx.findall, texts))
        counts = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
        flat = list(itertools.chain.from_iterable(per_text))
        index = self.index
        for piece in dict.fromkeys(flat):
            if piece not in index:
                index[piece] = len(index)
        return np.fromiter(map(index.__getitem__, flat), dtype=np.int32, count=len(flat)), counts, first_new


_WORKER_SPLITTER: _PreSplitter | None = None


def _worker_init(splitter: _PreSplitter, parent: int, pdeathsig: bool) -> None:
    global _WORKER_SPLITTER
    from prmkit.core.workers import die_with_parent

    die_with_parent(parent, pdeathsig)
    _WORKER_SPLITTER = splitter


def _worker_split(texts: list[str]) -> tuple[int, int, list[str], np.ndarray, np.ndarray]:
    splitter = _WORKER_SPLITTER
    assert splitter is not None, "runs only in a worker that _worker_init set up"
    stream, counts, first_new = splitter.split(texts)
    return os.getpid(), first_new, list(itertools.islice(splitter.index, first_new, None)), stream, counts


def _worker_pool(processes: int, splitter: _PreSplitter):
    """Worker processes for the pre-split, or None where they are not available.

    Fork only (Linux): workers inherit the splitter and need no import of their own, and nothing they run (regex,
    dicts, numpy) touches the locks of the parent's other threads. Elsewhere the split runs in this process.
    ``ProcessPoolExecutor`` rather than ``Pool``: a worker that dies (killed, out of memory) raises here instead of
    leaving its task waiting forever. Each worker ends with this process however it ends (:mod:`prmkit.core.workers`).
    """
    import multiprocessing as mp
    import sys
    from concurrent.futures import ProcessPoolExecutor

    from prmkit.core.workers import forked_from_main_thread

    if processes <= 1 or not sys.platform.startswith("linux") or "fork" not in mp.get_all_start_methods():
        return None
    pool = ProcessPoolExecutor(
        processes,
        mp_context=mp.get_context("fork"),
        initializer=_worker_init,
        initargs=(splitter, os.getpid(), forked_from_main_thread()),
    )
    pool.submit(int)  # forks every worker now, from this thread, which is the one forked_from_main_thread() saw
    return pool


class _PieceSplitter:
    """Pre-tokenize in Python and encode each distinct piece once: the same ids as the Rust pipeline, faster.

    A byte-level BPE tokenizer (GPT-2, Llama 3, Qwen2, ...) splits text with one regex and encodes every piece on its
    own, so ids(text) = concat(ids(piece)). The Rust `Split` runs that regex with a backtracking engine and dominates
    tokenization time; Python's engines find the same pieces several times faster, pieces repeat across texts far
    more than texts do, and the split spreads over processes. The pieces' ids are then stitched together with numpy.
    Used only where the equivalence is certain: the tokenizer has exactly that layout, the text is printable ASCII
    (so Unicode classes and NFC cannot differ between engines) and holds no added token. Everything else goes to the
    Rust tokenizer. The tests compare both paths on real data.
    """

    def __init__(self, pattern: str, piece_encoder: Any, added: list[str]):
        self.pre = _PreSplitter(pattern, added)
        self.piece_encoder = piece_encoder
        self._encoded = 0  # pieces numbered so far whose ids are in the tables below
        self._tok_flat = np.zeros(0, dtype=np.int32)
        self._tok_start = np.zeros(0, dtype=np.int64)
        self._tok_len = np.zeros(0, dtype=np.int64)
        self._char_len = np.zeros(0, dtype=np.int64)
        self.worker_pids: set[int] = set()  # which processes have split text for this encoder (for diagnostics)

    @classmethod
    def for_backend(cls, backend: Any) -> _PieceSplitter | None:
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
        # The same BPE model (shared, not copied) behind a bare byte-level step: a piece is encoded as one word.
        piece_encoder = Tokenizer(backend.model)
        piece_encoder.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        added = [t.content for t in backend.get_added_tokens_decoder().values()]
        splitter = cls(split["pattern"]["Regex"], piece_encoder, added)
        return None if splitter.pre.rx.groups else splitter  # findall would return groups, not pieces

    def _learn(self) -> None:
        """Encode the pieces numbered since the last call, each alone, through the Rust BPE."""
        if self._encoded == len(self.pre.index):
            return
        new = list(itertools.islice(self.pre.index, self._encoded, None))
        flat, lengths = _flatten([e.ids for e in self.piece_encoder.encode_batch(new, add_special_tokens=False)])
        self._tok_start = np.concatenate([self._tok_start, _starts(lengths) + len(self._tok_flat)])
        self._tok_flat = np.concatenate([self._tok_flat, flat])
        self._tok_len = np.concatenate([self._tok_len, lengths])
        self._char_len = np.concatenate([self._char_len, np.fromiter(map(len, new), dtype=np.int64, count=len(new))])
        self._encoded += len(new)

    def _absorb(self, base: int, remaps: dict, result: tuple) -> tuple[np.ndarray, np.ndarray]:
        """Renumber a worker's stream: pieces it numbered itself (from ``base``) get this process's numbers."""
        pid, first_new, new, stream, counts = result
        self.worker_pids.add(pid)
        remap = remaps.setdefault(pid, [])
        assert first_new == base + len(remap), "worker results arrived out of order"
        index = self.pre.index
        for piece in new:
            remap.append(index.setdefault(piece, len(index)))
        if remap:
            theirs = stream >= base
            stream[theirs] = np.asarray(remap, dtype=np.int32)[stream[theirs] - base]
        return stream, counts

    def _expand(self, texts: list[str], stream: np.ndarray, counts: np.ndarray):
        """Token ids of texts given as piece streams; also which texts the pieces covered completely."""
        self._learn()
        piece_ends = np.cumsum(counts)
        piece_starts = piece_ends - counts
        text_chars = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        piece_chars = self._char_len[stream]
        # Pieces never overlap and never leave their text, so equal totals mean every text is covered.
        if int(piece_chars.sum()) == int(text_chars.sum()):
            covered = np.ones(len(texts), dtype=bool)
        else:
            char_cum = np.concatenate([[0], np.cumsum(piece_chars)])
            covered = (char_cum[piece_ends] - char_cum[piece_starts]) == text_chars
        tok_len = self._tok_len[stream]
        if len(stream) == 0 or int(tok_len.max()) == 1:
            # The usual case: every piece is one token, so the pieces' ids are the texts' ids.
            return self._tok_flat[self._tok_start[stream]], piece_starts, counts, covered
        tok_cum = np.concatenate([[0], np.cumsum(tok_len)])
        total = int(tok_cum[-1])
        gather = np.repeat(self._tok_start[stream] - tok_cum[:-1], tok_len) + np.arange(total, dtype=np.int64)
        return self._tok_flat[gather], tok_cum[piece_starts], tok_cum[piece_ends] - tok_cum[piece_starts], covered

    def encode_pools(
        self, batches: Iterable[tuple[Any, Sequence[str]]], processes: int, rust
    ) -> Iterator[tuple[Any, TokenPool]]:
        from collections import deque

        from prmkit.core.workers import stop_pool

        batches = iter(batches)
        pool = _worker_pool(processes, self.pre)
        base = len(self.pre.index)
        remaps: dict[int, list[int]] = {}  # worker pid -> its piece numbers' numbers here
        pending: deque = deque()
        finished = False
        try:
            while True:
                # Keep every worker busy: up to two batches each in flight while this process stitches results.
                while len(pending) < (2 * processes if pool else 1):
                    item = next(batches, None)
                    if item is None:
                        break
                    tag, texts = item
                    unique, inverse = _dedup(texts)
                    safe = self.pre.safe(unique)
                    safe_texts = [t for t, ok in zip(unique, safe) if ok]
                    job = pool.submit(_worker_split, safe_texts) if pool else self.pre.split(safe_texts)
                    pending.append((tag, unique, inverse, safe, safe_texts, job))
                if not pending:
                    finished = True
                    return
                tag, unique, inverse, safe, safe_texts, job = pending.popleft()
                stream, counts = self._absorb(base, remaps, job.result()) if pool else job[:2]
                ids, fast_starts, fast_lengths, covered = self._expand(safe_texts, stream, counts)
                starts = np.zeros(len(unique), dtype=np.int64)
                lengths = np.zeros(len(unique), dtype=np.int64)
                where_safe = np.flatnonzero(safe)
                starts[where_safe], lengths[where_safe] = fast_starts, fast_lengths
                slow = np.concatenate([np.flatnonzero(~safe), where_safe[~covered]])
                if len(slow):
                    slow_flat, slow_lengths = _flatten(rust([unique[i] for i in slow]))
                    starts[slow] = _starts(slow_lengths) + len(ids)
                    lengths[slow] = slow_lengths
                    ids = np.concatenate([ids, slow_flat])
                yield tag, TokenPool(ids, starts[inverse], lengths[inverse])
        finally:
            if pool is not None:
                stop_pool(pool, kill=not finished)


def encode_batches(
    tokenizer: Any,
    batches: Iterable[tuple[Sequence[str], Sequence[Sequence[str]]]],
    params: TokenizationParams,
    encoder: TextEncoder | None = None,
    processes: int = 1,
) -> Iterator[EncodedBatch]:
    """Tokenize batches of ``(prompts, completions)`` and locate each step's label position, in order.

    The single source of truth for ids and positions: prepare, train, eval and score all come through here.
    """
    encoder = encoder or TextEncoder(tokenizer)
    bos = tokenizer.bos_token_id

    def texts():
        for prompts, completions in batches:
            steps_per_row = np.fromiter(map(len, completions), dtype=np.int64, count=len(completions))
            flat = [*prompts, *itertools.chain.from_iterable(completions), params.step_separator]
            yield steps_per_row, flat

    for steps_per_row, pool in encoder.encode_pools(texts(), processes):
        yield _assemble(pool, steps_per_row, bos, params)


def encode_batch(
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    params: TokenizationParams,
    encoder: TextEncoder | None = None,
) -> EncodedBatch:
    return next(encode_batches(tokenizer, [(prompts, completions)], params, encoder))


def encode_solutions(
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    params: TokenizationParams,
    encoder: TextEncoder | None = None,
) -> list[Encoded]:
    """:func:`encode_batches` for one batch, as one :class:`Encoded` per solution."""
    return encode_batch(tokenizer, prompts, completions, params, encoder).rows()


def _assemble(pool: TokenPool, steps_per_row: np.ndarray, bos: int | None, params: TokenizationParams) -> EncodedBatch:
    """Lay out each row as [BOS] prompt (step sep)*, truncate as TRL does, and find the label positions.

    Pool texts are the prompts, then every step row by row, then the separator. Each row is a list of segments
    (slices of the pool); one gather builds all rows.
    """
    n = len(steps_per_row)
    n_steps = int(steps_per_row.sum())
    step_offsets = np.concatenate([[0], np.cumsum(steps_per_row)])
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return EncodedBatch(np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64), empty, step_offsets, empty)
    bos_at = len(pool.ids)
    pool_ids = np.concatenate([pool.ids, np.asarray([0 if bos is None else bos], dtype=np.int32)])
    p_start, p_len = pool.starts[:n].copy(), pool.lengths[:n].copy()
    bos_len = np.full(n, 0 if bos is None else 1, dtype=np.int64)
    max_prompt = params.max_prompt_length
    if max_prompt is not None:
        # Keep the end of the prompt (the question is usually last) and the BOS the model expects.
        over = bos_len + p_len > max_prompt
        keep = max(max_prompt - 1, 0) if bos is not None else max_prompt
        p_start[over] += p_len[over] - keep
        p_len[over] = keep
        if bos is not None and max_prompt <= 0:
            bos_len[over] = 0

    # Segments per row: BOS, prompt, then (step, separator) for each step.
    seg_per_row = 2 + 2 * steps_per_row
    row_seg = np.concatenate([[0], np.cumsum(seg_per_row)])
    seg_start = np.empty(int(row_seg[-1]), dtype=np.int64)
    seg_len = np.empty(int(row_seg[-1]), dtype=np.int64)
    seg_start[row_seg[:-1]], seg_len[row_seg[:-1]] = bos_at, bos_len
    seg_start[row_seg[:-1] + 1], seg_len[row_seg[:-1] + 1] = p_start, p_len
    step_row = np.repeat(np.arange(n), steps_per_row)
    step_seg = row_seg[:-1][step_row] + 2 + 2 * (np.arange(n_steps) - step_offsets[:-1][step_row])
    seg_start[step_seg], seg_len[step_seg] = pool.starts[n : n + n_steps], pool.lengths[n : n + n_steps]
    seg_start[step_seg + 1], seg_len[step_seg + 1] = pool.starts[n + n_steps], pool.lengths[n + n_steps]

    seg_end = np.cumsum(seg_len)
    row_end = seg_end[row_seg[1:] - 1]
    row_start = np.concatenate([[0], row_end[:-1]])
    lengths = row_end - row_start
    prompt_lengths = bos_len + p_len
    positions = seg_end[step_seg + 1] - 1 - row_start[step_row]
    limit = lengths.copy()
    if params.max_completion_length is not None:
        limit = np.minimum(limit, prompt_lengths + params.max_completion_length)
    if params.max_length is not None:
        limit = np.minimum(limit, params.max_length)
    limit = np.maximum(limit, 0)
    positions[positions >= limit[step_row]] = -1

    total = int(row_end[-1])
    gather = np.repeat(seg_start - (seg_end - seg_len), seg_len) + np.arange(total, dtype=np.int64)
    ids = pool_ids[gather]
    if (limit < lengths).any():
        in_row = np.arange(total, dtype=np.int64) - np.repeat(row_start, lengths)
        ids = ids[in_row < np.repeat(limit, lengths)]
    row_offsets = np.concatenate([[0], np.cumsum(limit)])
    return EncodedBatch(ids, row_offsets, positions, step_offsets, prompt_lengths)


def has_soft_labels(labels: Sequence[Sequence[int | float | None]]) -> bool:
    """Whether any label is a probability strictly between the classes (the labels column is then float)."""
    return any(isinstance(v, float) and v not in (0.0, 1.0) for v in itertools.chain.from_iterable(labels))


def step_label_array(labels: Sequence[Sequence[int | float | None]]) -> np.ndarray:
    """Every step's label in one float array, NaN for an unlabelled step."""
    flat = list(itertools.chain.from_iterable(labels))
    return np.fromiter((np.nan if v is None else v for v in flat), dtype=np.float64, count=len(flat))


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be tokenized as text, or None.

    A lone surrogate (a JSON ``"\\ud800"`` escape without its pair) is not Unicode: it has no UTF-8 form, and the
    Rust tokenizer refuses it. A NUL character is never text in step-labelled data, and C-based tools stop at it.
    """
    if "\0" in text:
        return f"NUL character (U+0000) at character {text.index(chr(0))}: not text"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"lone surrogate U+{ord(text[e.start]):04X} at character {e.start}: not valid Unicode"
    return None


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


@dataclass
class TokenizedBatch:
    """A training/eval batch in flat arrays: row ``i`` spans ``offsets[i]:offsets[i + 1]`` of ``input_ids`` and
    ``labels``."""

    input_ids: np.ndarray
    labels: np.ndarray  # int64 with IGNORE_INDEX, or float64 when soft labels are present
    offsets: np.ndarray
    num_tokens: np.ndarray
    steps_lost: np.ndarray  # labelled steps cut away by truncation, per row
    labels_kept: np.ndarray  # labels placed on tokens, per row


def label_tokens(
    encoded: EncodedBatch, step_labels: np.ndarray, soft: bool, train_on_last_step_only: bool, is_eval: bool
) -> TokenizedBatch:
    """Per-token labels: each step's label at its position, IGNORE_INDEX elsewhere (and for unlabelled steps).

    ``step_labels`` holds one value per step (see :func:`step_label_array`); ``train_on_last_step_only`` keeps only
    each row's last label, and applies to training only.
    """
    n = len(encoded)
    steps_per_row = np.diff(encoded.step_offsets)
    if len(step_labels) != len(encoded.step_positions):
        raise ValueError(f"{len(step_labels)} labels for {len(encoded.step_positions)} steps")
    step_row = np.repeat(np.arange(n), steps_per_row)
    positions = encoded.step_positions
    labelled = ~np.isnan(step_labels)
    keep = labelled & (positions >= 0)
    if train_on_last_step_only and not is_eval:
        keep &= np.arange(len(positions)) == encoded.step_offsets[1:][step_row] - 1
    labels = np.full(len(encoded.input_ids), IGNORE_INDEX, dtype=np.float64 if soft else np.int64)
    labels[encoded.row_offsets[:-1][step_row[keep]] + positions[keep]] = step_labels[keep]
    lost = np.bincount(step_row[labelled & (positions < 0)], minlength=n).astype(np.int64)
    kept = np.bincount(step_row[keep], minlength=n).astype(np.int64)
    return TokenizedBatch(encoded.input_ids, labels, encoded.row_offsets, encoded.lengths, lost, kept)


def tokenize_rows(
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    labels: Sequence[Sequence[int | float | None]],
    params: TokenizationParams,
    is_eval: bool = False,
    encoder: TextEncoder | None = None,
) -> dict[str, list]:
    """Tokenize stepwise rows for training or evaluation, as Python lists.

    Returns columns ``input_ids``, ``labels`` (TRL's layout), ``num_tokens`` and ``steps_lost`` (labelled steps cut
    away by truncation), one entry per row.
    """
    encoded = encode_batch(tokenizer, prompts, completions, params, encoder)
    soft = has_soft_labels(labels)
    batch = label_tokens(encoded, step_label_array(labels), soft, params.train_on_last_step_only, is_eval)
    offsets = batch.offsets.tolist()
    ids, token_labels = batch.input_ids.tolist(), batch.labels.tolist()
    if soft:
        token_labels = [IGNORE_INDEX if v == IGNORE_INDEX else v for v in token_labels]
    return {
        "input_ids": [ids[a:b] for a, b in itertools.pairwise(offsets)],
        "labels": [token_labels[a:b] for a, b in itertools.pairwise(offsets)],
        "num_tokens": batch.num_tokens.tolist(),
        "steps_lost": batch.steps_lost.tolist(),
    }


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Who the tokenizer is and a hash of everything that decides its ids (vocab, merges, normalizer, specials)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        for token, idx in sorted(tokenizer.get_vocab().items()):
            h.update(f"{token}\t{idx}\n".encode())
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
