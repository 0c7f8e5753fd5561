"""The scoring engine: p(step correct) for every step of a solution.

A step's score is ``softmax(logits)[positive_label_id]`` at the LAST token of the separator after it, at the
positions :func:`prmkit.tokenization.encode_solutions` gives, the function training used, so a step is scored at the
very token it was trained on.

- A causal model scores every step of a solution in ONE forward pass: the token at a step's position sees exactly
  the prompt and the steps up to it, as it would prefix by prefix.
- A non-causal (BERT-like) model would let a step see later steps in one pass, so it is scored prefix by prefix
  (one sequence per step), which is slower; ``allow_bidirectional`` scores it in one pass, the way it was trained.

Throughput comes from sorting a window of solutions by length and cutting it into batches under a token budget
(padded length x rows), and from ``torch.inference_mode``. The budget is 2,048 tokens on a CPU and sized to the free
memory on a GPU (:mod:`prmkit.scoring.budget`); a batch that still runs out of memory is split in two and retried.
On CUDA, causal models are packed into one row with ``position_ids`` restarting at 0 and no padding at all, through
a varlen attention kernel (:mod:`prmkit.scoring.attention`). Results stay on the device until a window is done, so
the host prepares the next batch while the device computes. Under ``accelerate launch`` each process scores a share
of every window and the results are gathered, so every process returns them in input order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prmkit.data.formats import step_problem
from prmkit.errors import DataError, PrmkitError, UsageError, first_line
from prmkit.models.files import check_tokenizer_fits, embedding_rows
from prmkit.models.loading import resolve_dtype
from prmkit.models.memory import release_memory
from prmkit.models.model_dir import POSITIVE_LABEL_ID, resolve_tokenization
from prmkit.scoring import attention, budget
from prmkit.scoring import pretrained as steps
from prmkit.scoring.loading import OVERLAP_TOKENIZER_ON, model_identity, resolve_device
from prmkit.scoring.timings import Timings
from prmkit.tokenization import Encoded, TextEncoder, TokenizationParams, encode_solutions

log = logging.getLogger("prmkit")


@dataclass
class StepScores:
    """One solution's result: a score per step (None where truncation cut the step away)."""

    scores: list[float | None]
    truncated: bool = False
    """Some step lies beyond max_length (or max_completion_length) and has no score."""
    num_tokens: int = 0


@dataclass
class _Seq:
    ids: list[int]
    targets: list[tuple[int, int, int]]  # (solution index, step index, token position)


# ---------------------------------------------------------------------------------------------------------------------
# The engine


PAD_MULTIPLE = 16
"""Rows are padded to a multiple of this. Attention sums over the padded width, so a row's scores would move in the
last bits with the width of the batch it lands in; a width set by the row alone keeps them identical. (Matrix
products on a CPU are the same bits for any number of rows from 8 up, which a multiple of 16 always is.)"""


def padded_width(length: int) -> int:
    """The width a row of ``length`` tokens is padded to: the next multiple of :data:`PAD_MULTIPLE`."""
    return -(-length // PAD_MULTIPLE) * PAD_MULTIPLE


def default_batch_tokens(device_type: str) -> int:
    """The token budget of one forward batch when none is given and the device's memory is not consulted.

    A CPU runs small batches faster: with 2,048 tokens the activations and attention scores stay in cache, and the
    score benchmark's forward passes take 25% less time than with 16,384 (BENCHMARKS.md). A CUDA device's budget is
    sized to its free memory when a scorer is built (:func:`prmkit.scoring.budget.device_batch_tokens`); this is the
    figure for accelerators whose memory cannot be read.
    """
    return budget.CPU_BATCH_TOKENS if device_type == "cpu" else budget.FALLBACK_ACCELERATOR_BATCH_TOKENS


class StepScorer:
    """Scores solutions step by step with a token-classification PRM.

    Build it with :meth:`from_pretrained`, or wrap a model already in memory::

        scorer = StepScorer.from_pretrained("runs/prm")
        scorer.score("What is 2 + 3?", ["2 + 3 = 5.", "The answer is 5."])   # -> [0.93, 0.88]
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        params: TokenizationParams,
        *,
        batch_tokens: int | None = None,
        sort_window: int = 2048,
        positive_label_id: int = POSITIVE_LABEL_ID,
        causal: bool | None = None,
        allow_bidirectional: bool = False,
        packing: bool | None = None,
        identity: dict[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        kind_encoder: Any = None,
        timings: Timings | None = None,
    ):
        import torch

        self._torch = torch
        if batch_tokens is not None and batch_tokens < 1:
            raise UsageError(f"score.batch_tokens must be at least 1, got {batch_tokens}")
        if sort_window < 1:
            raise UsageError(f"score.sort_window must be at least 1, got {sort_window}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.params = params
        self.device = next(model.parameters()).device
        self.sort_window = int(sort_window)
        self.positive_label_id = positive_label_id
        self.num_labels = int(getattr(model.config, "num_labels", 2))
        if self.num_labels not in (1, 2) and positive_label_id >= self.num_labels:
            raise UsageError(
                f"model has {self.num_labels} labels; positive label id {positive_label_id} is out of range"
            )
        self.dtype = next(model.parameters()).dtype
        self.causal = _is_causal(model) if causal is None else causal
        self.allow_bidirectional = allow_bidirectional
        self.kind_encoder = kind_encoder
        """Another PRM kind's tokens and read positions (:class:`prmkit.kinds.encoder.KindEncoder`); None: TRL's
        tokenization."""
        self.prefix_mode = not self.causal and not allow_bidirectional and kind_encoder is None
        if self.prefix_mode:
            log.warning(
                f"{_model_name(model)} is not causal: scoring prefix by prefix (one forward pass per step), which is "
                "slower; set model.allow_bidirectional to score in one pass, the way it was trained"
            )
        self.kernel = attention.packing_kernel(model)
        if packing is None:
            # The varlen function reads packed rows only; other kernels pack by default where they pay: on CUDA.
            packing = self.causal and (
                self.kernel == "varlen" or (self.device.type == "cuda" and self.kernel is not None)
            )
        if self.kernel == "varlen" and not packing:
            raise UsageError(f"attention {attention.VARLEN!r} scores packed batches only", hint="leave packing on")
        self.packing = bool(packing)
        self.batch_tokens, self.batch_tokens_source = (
            (int(batch_tokens), "given") if batch_tokens is not None else self._device_budget()
        )
        self.timings = timings or Timings()
        self.identity = identity or {"name": _model_name(model)}
        self.rank, self.world_size = rank, world_size
        self._encoder = TextEncoder(tokenizer)
        pad = tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        self.differs_from_training: dict[str, tuple[Any, Any]] = {}
        """``{key: (trained, used)}``: settings the user chose that differ from what the model recorded."""
        self._spread_checked = False

    def _device_budget(self) -> tuple[int, str]:
        """The batch budget when none is given, and where it came from (the summary and the log say it)."""
        if self.device.type == "cpu":
            return budget.CPU_BATCH_TOKENS, "cpu default"
        from prmkit.models.memory import model_shape

        memory = budget.free_device_memory(self.device)
        shape = model_shape(self.model.config)
        if memory is None or not shape.hidden or not shape.intermediate:
            return default_batch_tokens(self.device.type), "default"
        if self.packing and self.kernel is None:
            # A pack through sdpa or eager attention carries a dense mask over the whole pack: keep it small.
            return default_batch_tokens(self.device.type), "default (packing without a varlen kernel)"
        free, total = memory
        eager = (getattr(self.model.config, "_attn_implementation", None) or "") == "eager"
        # Rows of a non-causal model carry a padding mask, and eager attention materialises its scores.
        width = (self.params.max_length or 4096) if (not self.causal or eager) else None
        tokens = budget.device_batch_tokens(
            free, total, shape, self._dtype_bytes, dense_attention_width=width, eager_attention=eager
        )
        source = f"{free / 2**30:.1f} GiB free on {self.device}"
        log.info(f"batch budget {tokens} tokens, sized to {source}")
        return tokens, source

    @property
    def _dtype_bytes(self) -> int:
        return self._torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point else 4

    # -- loading --------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        step_separator: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        batch_tokens: int | None = None,
        sort_window: int = 2048,
        trust_remote_code: bool = False,
        allow_bidirectional: bool = False,
        attn_implementation: str | None = None,
        revision: str | None = None,
        packing: bool | None = None,
        kind_settings: dict[str, Any] | None = None,
        tokenization: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        timings: Timings | None = None,
    ) -> StepScorer:
        """Load a PRM (a prmkit output dir, a local transformers dir, or a Hub id) with its tokenizer.

        The step separator and tokenization come from the model's ``prmkit.json``; without one (a model trained
        with TRL) the separator defaults to ``"\\n"`` with a warning. ``step_separator`` overrides it.
        ``tokenization`` (``data.*`` keys the user set) and ``tokenizer`` (a tokenizer to load instead of the model's
        own) are honoured over what the model recorded, with a warning where they differ from training; settings
        that cannot apply are refused (:func:`prmkit.models.model_dir.resolve_tokenization`).
        Under ``accelerate launch`` with several processes, each process takes its own device and scores a share.
        The config is read once and handed to the model, whose weights are read straight onto the device. On CUDA
        a causal model is loaded with a varlen attention kernel for packed batches (:mod:`prmkit.scoring.attention`)
        unless ``packing`` is False or ``attn_implementation`` is given. ``timings`` collects the seconds spent loading
        (``model_load``: the architecture's code, weights, tokenizer), tokenizing and in forward passes.

        (Over 100 lines with its keyword signature (one setting a line); the steps are in scoring/pretrained.py.)
        """
        timings = timings or Timings()
        source = steps.resolve_model(path_or_id, revision)  # before torch: a mistyped path is said at once

        import torch

        from prmkit.kinds.registry import get_kind
        from prmkit.models.loading import quiet_transformers
        from prmkit.scoring.kinds import resolve_kind

        name, metadata = source.name, source.metadata
        kind, settings, kind_tokenizer = resolve_kind(
            name, metadata, kind_settings, local=source.is_local, revision=revision, trust_remote_code=trust_remote_code
        )
        rank, world_size, dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev, key="dtype")
        if dev.type == "cuda":
            torch.cuda.init()  # the CUDA context is start-up, not model loading
        with timings.stage("model_load"), quiet_transformers():
            config = steps.read_config(source, trust_remote_code)
            attn_implementation, chosen = steps.pick_attention(config, dev, torch_dtype, attn_implementation, packing)
            load_kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
            if revision:
                load_kwargs["revision"] = revision
            if not get_kind(kind).uses_separator:
                return steps.kind_scorer(
                    cls,
                    source,
                    kind,
                    settings,
                    kind_tokenizer,
                    load_kwargs=load_kwargs,
                    attn_implementation=attn_implementation,
                    tokenization=tokenization,
                    step_separator=step_separator,
                    tokenizer=tokenizer,
                    trust_remote_code=trust_remote_code,
                    device=dev,
                    batch_tokens=batch_tokens,
                    sort_window=sort_window,
                    packing=packing,
                    rank=rank,
                    world_size=world_size,
                    timings=timings,
                )
            params, changes = resolve_tokenization(name, metadata, step_separator, tokenization)
            model, tok = steps.load_token_classifier(
                source,
                config,
                load_kwargs,
                device=dev,
                torch_dtype=torch_dtype,
                attn_implementation=attn_implementation,
                chosen=chosen,
                tokenizer=tokenizer,
                trust_remote_code=trust_remote_code,
                overlap_on=OVERLAP_TOKENIZER_ON,
            )
            check_tokenizer_fits(tok, embedding_rows(model), tokenizer or name, params.step_separator)
            steps.check_tokenizer(source, tok, tokenizer, changes)
            identity = model_identity(name, model)
        positive = int(((metadata or {}).get("labels") or {}).get("positive_label_id", POSITIVE_LABEL_ID))
        scorer = cls(
            model,
            tok,
            params,
            batch_tokens=batch_tokens,
            sort_window=sort_window,
            positive_label_id=positive,
            allow_bidirectional=allow_bidirectional,
            packing=packing,
            identity=identity,
            rank=rank,
            world_size=world_size,
            timings=timings,
        )
        scorer.differs_from_training = changes
        return scorer

    # -- public scoring API ---------------------------------------------------------------------------------------

    def score(self, prompt: str, steps: Sequence[str]) -> list[float | None]:
        """Score one solution: a probability per step, None for a step beyond max_length."""
        return self.score_solutions([(prompt, steps)])[0].scores

    def score_batch(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[list[float | None]]:
        """Score many solutions; results in input order."""
        return [r.scores for r in self.score_iter(items)]

    def score_iter(
        self, items: Iterable[tuple[str, Sequence[str]]], sort_window: int | None = None
    ) -> Iterator[StepScores]:
        """Stream results in input order, reading ahead only ``sort_window`` solutions at a time."""
        window: list[tuple[str, Sequence[str]]] = []
        size = sort_window or self.sort_window
        for item in items:
            window.append(item)
            if len(window) >= size:
                yield from self.score_solutions(window)
                window = []
        if window:
            yield from self.score_solutions(window)

    def truncated(self, prompt: str, steps: Sequence[str]) -> bool:
        """Whether truncation would cut a step of this solution away (tokenization only, no forward pass)."""
        enc = self.encode([(prompt, steps)])[0]
        return any(p < 0 for p in enc.step_positions)

    def encode(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[Encoded]:
        """The tokens and step positions the model reads, from the one tokenization training used."""
        if self.kind_encoder is not None:
            return self.kind_encoder.encode(items)
        return encode_solutions(
            self.tokenizer, [p for p, _ in items], [list(s) for _, s in items], self.params, self._encoder
        )

    def score_solutions(
        self,
        items: Sequence[tuple[str, Sequence[str]]],
        on_batch: Callable[[int], None] | None = None,
        batch_log: Any = None,
    ) -> list[StepScores]:
        """Score one window of solutions at once: sorted by length, batched by token budget.

        Under several processes every process must call this with the same items (they split the work and gather
        the results); ``on_batch(steps)`` is called after each forward pass's scores reach the host. ``batch_log``
        (see :class:`prmkit.scoring.resume.BatchJournal`) keeps each batch's scores as they reach the host and gives
        back those of batches an interrupted run already did: ``replay(index, targets)`` returns them or None,
        ``record(index, targets, scores)`` keeps them.
        """
        items = list(items)
        if not items:
            return []
        _check_items(items)
        with self.timings.stage("tokenize"):
            encoded, seqs = self._sequences(items)
        return self._results([len(steps) for _, steps in items], encoded, self._run(seqs, on_batch, batch_log))

    def score_encoded(self, encoded: Sequence[Encoded]) -> list[StepScores]:
        """Score solutions :meth:`encode` already tokenized (``prmkit serve`` tokenizes off the forward thread).

        The same sequences and batches as :meth:`score_solutions` for the same items, so the same scores. A model
        scored prefix by prefix needs the text of every prefix: give it to :meth:`score_solutions` instead.
        """
        if self.prefix_mode:
            raise UsageError(
                f"{self.identity.get('name')}: a model scored prefix by prefix needs the solutions' text",
                hint="use score_solutions",
            )
        encoded = list(encoded)
        seqs = self._one_pass_sequences(encoded)
        return self._results([len(enc.step_positions) for enc in encoded], encoded, self._run(seqs, None))

    def _results(self, n_steps: list[int], encoded: Sequence[Encoded], values: list) -> list[StepScores]:
        results = [
            StepScores([None] * n, any(p < 0 for p in enc.step_positions), len(enc.input_ids))
            for n, enc in zip(n_steps, encoded)
        ]
        for (i, k, _), value in values:
            results[i].scores[k] = value
        if not self._spread_checked:
            self._spread_checked = _warn_if_flat(results, self.identity.get("name", "the model"))
        return results

    def score_tokens(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[StepScores]:
        """Score solutions already tokenized: ``(input_ids, step positions)`` each, as a `prmkit prepare` dataset
        holds them (its labelled positions). The caller has checked that they were made with this model's tokenizer
        and tokenization (:func:`prmkit.data.prepared_input.check_matches`)."""
        if self.kind_encoder is not None or self.prefix_mode:
            raise UsageError(
                f"{self.identity.get('name')}: token ids can be scored by a causal (or bidirectional) "
                "token-classification PRM only",
                hint="give the text data instead",
            )
        seqs = []
        for i, (ids, positions) in enumerate(rows):
            if len(positions):
                end = max(positions) + 1 if self.causal else len(ids)
                seqs.append(_Seq(list(ids[:end]), [(i, k, int(p)) for k, p in enumerate(positions)]))
        values = self._run(seqs, None)
        results = [StepScores([None] * len(positions), False, len(ids)) for ids, positions in rows]
        for (i, k, _), value in values:
            results[i].scores[k] = value
        return results

    def _sequences(self, items: list[tuple[str, Sequence[str]]]) -> tuple[list[Encoded], list[_Seq]]:
        """Each solution's encoding, and the sequences the model reads with the positions scored in each."""
        encoded = self.encode(items)
        seqs: list[_Seq] = []
        if self.prefix_mode:
            # One sequence per step, each encoded from the steps up to it: step k sees nothing after itself.
            prompts, prefixes, owners = [], [], []
            for i, (prompt, steps) in enumerate(items):
                for k in range(len(steps)):
                    if encoded[i].step_positions[k] >= 0:
                        prompts.append(prompt)
                        prefixes.append(list(steps[: k + 1]))
                        owners.append((i, k))
            for (i, k), enc in zip(
                owners, encode_solutions(self.tokenizer, prompts, prefixes, self.params, self._encoder)
            ):
                pos = enc.step_positions[k]
                seqs.append(_Seq(enc.input_ids[: pos + 1], [(i, k, pos)]))
        else:
            seqs = self._one_pass_sequences(encoded)
        return encoded, seqs

    def _one_pass_sequences(self, encoded: Sequence[Encoded]) -> list[_Seq]:
        seqs: list[_Seq] = []
        for i, enc in enumerate(encoded):
            targets = [(i, k, p) for k, p in enumerate(enc.step_positions) if p >= 0]
            if not targets:
                continue
            ids = enc.input_ids
            if self.causal:
                # Tokens after the last scored position cannot change a causal model's scores.
                ids = ids[: max(p for _, _, p in targets) + 1]
            seqs.append(_Seq(ids, targets))
        return seqs

    # -- batching and forward passes ------------------------------------------------------------------------------

    def _plan(self, seqs: list[_Seq]) -> list[list[int]]:
        """Batches of sequence indexes: longest first (so memory trouble shows at once), under the token budget.

        Padded batches hold rows of one padded width (:func:`padded_width`), which depends on the row alone: a row is
        computed on the same shape whatever the budget, the batch it lands in, or an out-of-memory split, so its
        scores are the same to the last bit in float32 on a CPU.
        """
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))
        if self.world_size > 1:
            # Dealt round-robin after sorting, so every process gets about the same number of tokens.
            order = order[self.rank :: self.world_size]
        batches: list[list[int]] = []
        current: list[int] = []
        used = 0
        width = 0
        for i in order:
            n = len(seqs[i].ids)
            if self.packing:
                fits = used + n <= self.batch_tokens
            else:
                fits = padded_width(n) == width and width * (len(current) + 1) <= self.batch_tokens
            if current and not fits:
                batches.append(current)
                current, used = [], 0
            current.append(i)
            used += n
            width = padded_width(n)
        if current:
            batches.append(current)
        return batches

    def _tokens(self, seqs: list[_Seq], batch: list[int]) -> int:
        """What a batch costs against the budget: its tokens packed, or padded width x rows."""
        lengths = [len(seqs[i].ids) for i in batch]
        return sum(lengths) if self.packing else padded_width(max(lengths)) * len(lengths)

    def _run(
        self, seqs: list[_Seq], on_batch: Callable[[int], None] | None, batch_log: Any = None
    ) -> list[tuple[tuple[int, int, int], float]]:
        torch = self._torch
        plan = self._plan(seqs)
        targets = [[t for i in batch for t in seqs[i].targets] for batch in plan]
        values: list[list[float] | None] = [None] * len(plan)
        in_flight: list[tuple[int, Any, Any]] = []

        def settle(keep: int) -> None:
            # A batch's scores reach the host while the next batch computes: one batch stays in flight on a GPU.
            while len(in_flight) > keep:
                index, host, copied = in_flight.pop(0)
                if copied is not None:
                    copied.synchronize()
                values[index] = host.tolist()
                if batch_log is not None:
                    batch_log.record(index, targets[index], values[index])
                if on_batch is not None:
                    on_batch(len(targets[index]))

        with self.timings.stage("forward"), torch.inference_mode():
            for index, batch in enumerate(plan):
                replayed = batch_log.replay(index, targets[index]) if batch_log is not None else None
                if replayed is not None:
                    values[index] = list(replayed)
                    continue
                probs = torch.cat([p for _, p in self._forward_or_split(seqs, batch)])
                in_flight.append((index, *self._to_host(probs)))
                settle(keep=1 if self.device.type == "cuda" else 0)
            settle(keep=0)
        mine = [pair for index in range(len(plan)) for pair in zip(targets[index], values[index] or [])]
        gathered_values = mine
        if self.world_size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, mine)
            gathered_values = [pair for part in gathered for pair in part]
        # Checked after the gather, so every process raises together instead of leaving the others waiting.
        if any(value != value for _, value in gathered_values):
            raise PrmkitError(
                "the model produced NaN scores",
                hint="try --dtype float32; a half-precision overflow is the usual cause",
            )
        return gathered_values

    def _to_host(self, probs) -> tuple[Any, Any]:
        """(host tensor, event) for a batch's probabilities: on CUDA an asynchronous copy into pinned memory and the
        event that marks it done; elsewhere the tensor itself and None."""
        if self.device.type != "cuda":
            return probs, None
        host = self._torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
        host.copy_(probs, non_blocking=True)
        copied = self._torch.cuda.Event()
        copied.record()
        return host, copied

    def _forward_or_split(self, seqs: list[_Seq], batch: list[int]) -> list[tuple[list[int], Any]]:
        """(part, probabilities) for a batch: the batch whole, or, when the device runs out of memory, its halves.

        A failed half is halved again, down to single sequences; parts come back in the batch's order, so no row is
        lost or scored twice. The budget drops to half the failed batch, so later batches do not fail the same way.
        """
        done: list[tuple[list[int], Any]] = []
        pending = [batch]
        while pending:
            part = pending.pop(0)
            try:
                done.append((part, self._forward(seqs, part)))
                continue
            except Exception as e:
                if not _is_out_of_memory(e):
                    raise
                message = first_line(e)
            # Outside the except block, so the failed attempt's tensors are released before the retry.
            release_memory()
            tokens = self._tokens(seqs, part)
            if len(part) == 1:
                raise PrmkitError(
                    f"out of {self.device.type} memory scoring a single sequence of {tokens} tokens ({message})",
                    hint="lower data.max_length, score in bfloat16, or use a device with more free memory",
                )
            half = len(part) // 2
            pending[:0] = [part[:half], part[half:]]
            lowered = max(1, tokens // 2)
            if lowered < self.batch_tokens:
                self.batch_tokens = lowered
            log.warning(
                f"out of {self.device.type} memory on a batch of {len(part)} sequences ({tokens} tokens): "
                f"scoring it in two halves; batch budget now {self.batch_tokens} tokens"
            )
        return done

    def _forward(self, seqs: list[_Seq], batch: list[int]):
        return self._forward_packed(seqs, batch) if self.packing else self._forward_padded(seqs, batch)

    def _probabilities(self, logits):
        logits = logits.float()
        if self.num_labels == 1:
            return logits[:, 0].sigmoid()
        return logits.softmax(-1)[:, self.positive_label_id]

    def _forward_padded(self, seqs: list[_Seq], batch: list[int]):
        torch = self._torch
        width = padded_width(max(len(seqs[i].ids) for i in batch))
        ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long) if not self.causal else None
        rows, cols = [], []
        for r, i in enumerate(batch):
            seq = seqs[i].ids
            ids[r, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            if mask is not None:
                mask[r, : len(seq)] = 1
            for _, _, pos in seqs[i].targets:
                rows.append(r)
                cols.append(pos)
        kwargs: dict[str, Any] = {"input_ids": self._to_device(ids)}
        if mask is not None:
            kwargs["attention_mask"] = self._to_device(mask)
        # A causal model needs no attention mask with right padding: real tokens never look at the pads after them.
        logits = self.model(**kwargs, use_cache=False).logits
        picked = logits[self._to_device(torch.as_tensor(rows)), self._to_device(torch.as_tensor(cols))]
        return self._probabilities(picked)

    def _forward_packed(self, seqs: list[_Seq], batch: list[int]):
        torch = self._torch
        flat: list[int] = []
        cols: list[int] = []
        lengths = []
        for i in batch:
            offset = len(flat)
            flat.extend(seqs[i].ids)
            lengths.append(len(seqs[i].ids))
            cols.extend(offset + pos for _, _, pos in seqs[i].targets)
        filler = padded_width(len(flat)) - len(flat)
        if filler:
            # A sequence of pads of its own, so the pack's length is a multiple of PAD_MULTIPLE like a padded row's.
            flat.extend([self._pad_id] * filler)
            lengths.append(filler)
        ids = self._to_device(torch.as_tensor([flat], dtype=torch.long))
        extra = {
            k: self._to_device(v) if isinstance(v, torch.Tensor) else v
            for k, v in attention.packed_inputs(lengths, self.kernel).items()
        }
        # No attention mask and no cache: transformers reads the boundaries from position_ids (or cu_seq_lens_*).
        logits = self.model(input_ids=ids, **extra, use_cache=False).logits[0]
        return self._probabilities(logits[self._to_device(torch.as_tensor(cols))])

    def _to_device(self, tensor):
        # Pinned and asynchronous on CUDA: the host goes on to the next batch instead of waiting for this one.
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    # -- processes --------------------------------------------------------------------------------------------------

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process (identity with one process)."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# ---------------------------------------------------------------------------------------------------------------------
# Loading helpers


def _check_items(items: Sequence[tuple[str, Sequence[str]]]) -> None:
    """The library API refuses what the CLI refuses (:func:`prmkit.data.formats.step_problem`)."""
    for n, item in enumerate(items, 1):
        prompt, steps = item
        if not isinstance(prompt, str):
            raise DataError(f"solution {n}: prompt: expected a string, got {type(prompt).__name__}")
        if isinstance(steps, str):
            raise DataError(f"solution {n}: steps: expected a list of strings, got one string")
        for k, step in enumerate(steps):
            problem = step_problem(step)
            if problem:
                raise DataError(f"solution {n}: step {k + 1}: {problem}")


FLAT_MIN_STEPS = 8
FLAT_SPREAD = 0.02
"""A PRM's first scores that all lie within this of each other, over at least FLAT_MIN_STEPS steps, tell nothing apart:
a base model's random head, or a causal LM read as a kind it was not trained as, scores every step alike."""


def _warn_if_flat(results: Sequence[StepScores], name: str) -> bool:
    """Warn once when the first scores have almost no spread; True once enough steps were seen to judge."""
    values = [v for r in results for v in r.scores if v is not None]
    if len(values) < FLAT_MIN_STEPS:
        return False
    low, high = min(values), max(values)
    if high - low < FLAT_SPREAD:
        log.warning(
            f"{name}: the first {len(values)} step scores all lie within {low:.3f}-{high:.3f}: a trained PRM "
            "tells steps apart; check that this model is one (an untrained head, or a model read as a kind it "
            "was not trained as, scores every step alike)"
        )
    return True


def _model_name(model: Any) -> str:
    return str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or type(model).__name__)


def end_distributed() -> None:
    """Leave the process group together, if one was joined.

    A gloo group still alive at interpreter exit can abort a process in its C++ teardown ("terminate called without
    an active exception") after all the work is done; the barrier keeps a fast process from tearing down first.
    Called from a ``finally``: while an exception is on its way out there is no barrier, since the other processes
    may never reach it.
    """
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    oom: Any = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _is_causal(model: Any) -> bool:
    """Whether a token sees only what precedes it: prmkit's one rule for known architectures, else a probe."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    from prmkit.models.loading import is_causal

    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", None)
    known = (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        or getattr(text, "is_decoder", False)
        or getattr(config, "is_encoder_decoder", False)
    )
    return is_causal(config) if known else _probe_causal(model)


def _probe_causal(model: Any) -> bool:
    # Change only the last token: a causal model's earlier logits cannot move.
    import torch

    vocab = int(getattr(model.config, "vocab_size", 16) or 16)
    base = [(7 * i + 3) % vocab for i in range(8)]
    other = [*base[:-1], (base[-1] + 1) % vocab]
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([base, other], device=device), use_cache=False).logits.float()
    diff = (logits[0, :-1] - logits[1, :-1]).abs().max().item()
    return diff <= 1e-5 * (1.0 + logits.abs().max().item())
