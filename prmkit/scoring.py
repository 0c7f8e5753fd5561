"""The scoring engine: p(step correct) for every step of a solution, and `prmkit score`'s resumable file job.

A step's score is ``softmax(logits)[positive_label_id]`` at the LAST token of the separator after it, at the
positions :func:`prmkit.tokenization.encode_solutions` gives, the function training used, so a step is scored at the
very token it was trained on.

- A causal model scores every step of a solution in ONE forward pass: the token at a step's position sees exactly
  the prompt and the steps up to it, as it would prefix by prefix.
- A non-causal (BERT-like) model would let a step see later steps in one pass, so it is scored prefix by prefix
  (one sequence per step), which is slower; ``allow_bidirectional`` scores it in one pass, the way it was trained.

Throughput comes from sorting a window of solutions by length and cutting it into batches under a token budget
(padded length x rows), and from ``torch.inference_mode``. On CUDA with flash-attention installed, sequences are
packed into one row with ``position_ids`` restarting at 0 and no padding at all. Under ``accelerate launch`` each
process scores a share of every window and the results are gathered, so every process returns them in input order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from prmkit import __version__
from prmkit.atomic import write_atomic
from prmkit.errors import DataError, PrmkitError, UsageError
from prmkit.formats import Options, RowError, convert, detect_format, validate
from prmkit.metrics import aggregate, first_error_index
from prmkit.modeling import POSITIVE_LABEL_ID, PRMKIT_JSON, read_metadata, resolve_tokenization
from prmkit.tokenization import Encoded, TextEncoder, TokenizationParams, encode_solutions, tokenizer_fingerprint

log = logging.getLogger("prmkit")

DTYPES = ("auto", "float32", "bfloat16", "float16")


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


CPU_BATCH_TOKENS = 2048
ACCELERATOR_BATCH_TOKENS = 16384


def default_batch_tokens(device_type: str) -> int:
    """The token budget of one forward batch when none is given.

    A GPU wants big batches. A CPU runs small ones faster: with 2,048 tokens the activations and attention scores stay
    in cache, and the score benchmark's forward passes take 25% less time than with 16,384 (BENCHMARKS.md).
    """
    return CPU_BATCH_TOKENS if device_type == "cpu" else ACCELERATOR_BATCH_TOKENS


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
    ):
        import torch

        if batch_tokens is not None and batch_tokens < 1:
            raise UsageError(f"score.batch_tokens must be at least 1, got {batch_tokens}")
        if sort_window < 1:
            raise UsageError(f"score.sort_window must be at least 1, got {sort_window}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.params = params
        self.device = next(model.parameters()).device
        self.batch_tokens = int(batch_tokens) if batch_tokens is not None else default_batch_tokens(self.device.type)
        self.sort_window = int(sort_window)
        self.positive_label_id = positive_label_id
        self.num_labels = int(getattr(model.config, "num_labels", 2))
        if self.num_labels not in (1, 2) and positive_label_id >= self.num_labels:
            raise UsageError(f"model has {self.num_labels} labels; positive label id {positive_label_id} is out of range")
        self.dtype = next(model.parameters()).dtype
        self.causal = _is_causal(model) if causal is None else causal
        self.allow_bidirectional = allow_bidirectional
        self.prefix_mode = not self.causal and not allow_bidirectional
        if self.prefix_mode:
            log.warning(
                f"{_model_name(model)} is not causal: scoring prefix by prefix (one forward pass per step), which is "
                "slower; set model.allow_bidirectional to score in one pass, the way it was trained"
            )
        if packing is None:
            packing = self.device.type == "cuda" and self.causal and _uses_varlen_attention(model)
        self.packing = bool(packing)
        self.identity = identity or {"name": _model_name(model)}
        self.rank, self.world_size = rank, world_size
        self._encoder = TextEncoder(tokenizer)
        pad = tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        self._torch = torch

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
    ) -> "StepScorer":
        """Load a PRM (a prmkit output dir, a local transformers dir, or a Hub id) with its tokenizer.

        The step separator and tokenization come from the model's ``prmkit.json``; without one (a model trained
        with TRL) the separator defaults to ``"\\n"`` with a warning. ``step_separator`` overrides it.
        Under ``accelerate launch`` with several processes, each process takes its own device and scores a share.
        """
        import torch
        from transformers import AutoModelForTokenClassification

        from prmkit.dataset import load_tokenizer

        name = str(path_or_id)
        local = Path(name).expanduser()
        is_local = local.is_dir()
        if not is_local and (name.startswith((".", "/", "~")) or local.exists()):
            raise UsageError(f"model {name!r}: not a directory", hint="give a model directory or a Hub id")
        metadata = read_metadata(local) if is_local else _hub_metadata(name, revision)
        params, _assumed = resolve_tokenization(name, metadata, step_separator)
        positive = int(((metadata or {}).get("labels") or {}).get("positive_label_id", POSITIVE_LABEL_ID))

        rank, world_size, dev = _resolve_device(device)
        torch_dtype = _resolve_dtype(dtype, dev)
        load_kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if revision:
            load_kwargs["revision"] = revision
        if attn_implementation is None and packing is not False and dev.type == "cuda" and _flash_attn_available() \
                and torch_dtype in (torch.bfloat16, torch.float16):
            attn_implementation = "flash_attention_2"
        try:
            if is_local and (local / "adapter_config.json").is_file():
                # A LoRA adapter that `prmkit train` saved unmerged: its base, the adapter, and the trained head.
                from prmkit.modeling import load_trained_model

                extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
                model, info = load_trained_model(local, torch_dtype, trust_remote_code, **extra), {}
            else:
                model, info = _load_model(AutoModelForTokenClassification, name, load_kwargs, attn_implementation)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"model {name!r} could not be loaded: {first}",
                             hint="give a prmkit output directory, a transformers model directory, or a reachable Hub id") from None
        missing = [k for k in info.get("missing_keys", []) if k.split(".")[0] in ("score", "classifier")]
        if missing:
            raise UsageError(
                f"model {name!r} has no trained token-classification head ({', '.join(sorted(missing)[:2])} missing); "
                "its scores would be random",
                hint="score with a PRM trained by `prmkit train` (or TRL's PRMTrainer), not a base model",
            )
        model.to(dev)
        tokenizer = load_tokenizer(name, trust_remote_code)
        recorded = ((metadata or {}).get("tokenizer") or {}).get("sha256")
        if recorded and tokenizer_fingerprint(tokenizer)["sha256"] != recorded:
            # e.g. transformers picking the architecture's tokenizer class over the saved tokenizer.json
            log.warning(f"{name}: the tokenizer loaded now differs from the one recorded in {PRMKIT_JSON} at training; "
                        "steps may be tokenized differently from training")
        identity = model_identity(name, model)
        return cls(
            model, tokenizer, params, batch_tokens=batch_tokens, sort_window=sort_window, positive_label_id=positive,
            allow_bidirectional=allow_bidirectional, packing=packing, identity=identity, rank=rank,
            world_size=world_size,
        )

    # -- public scoring API ---------------------------------------------------------------------------------------

    def score(self, prompt: str, steps: Sequence[str]) -> list[float | None]:
        """Score one solution: a probability per step, None for a step beyond max_length."""
        return self.score_solutions([(prompt, steps)])[0].scores

    def score_batch(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[list[float | None]]:
        """Score many solutions; results in input order."""
        return [r.scores for r in self.score_iter(items)]

    def score_iter(self, items: Iterable[tuple[str, Sequence[str]]], sort_window: int | None = None) -> Iterator[StepScores]:
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
        enc = encode_solutions(self.tokenizer, [prompt], [list(steps)], self.params, self._encoder)[0]
        return any(p < 0 for p in enc.step_positions)

    def encode(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[Encoded]:
        """The tokens and step positions the model reads, from the one tokenization training used."""
        return encode_solutions(self.tokenizer, [p for p, _ in items], [list(s) for _, s in items], self.params,
                                self._encoder)

    def score_solutions(
        self, items: Sequence[tuple[str, Sequence[str]]], on_batch: Callable[[int], None] | None = None
    ) -> list[StepScores]:
        """Score one window of solutions at once: sorted by length, batched by token budget.

        Under several processes every process must call this with the same items (they split the work and gather
        the results); ``on_batch(steps)`` is called after each forward pass.
        """
        items = list(items)
        if not items:
            return []
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
            for (i, k), enc in zip(owners, encode_solutions(self.tokenizer, prompts, prefixes, self.params, self._encoder)):
                pos = enc.step_positions[k]
                seqs.append(_Seq(enc.input_ids[: pos + 1], [(i, k, pos)]))
        else:
            for i, enc in enumerate(encoded):
                targets = [(i, k, p) for k, p in enumerate(enc.step_positions) if p >= 0]
                if not targets:
                    continue
                ids = enc.input_ids
                if self.causal:
                    # Tokens after the last scored position cannot change a causal model's scores.
                    ids = ids[: max(p for _, _, p in targets) + 1]
                seqs.append(_Seq(ids, targets))

        values = self._run(seqs, on_batch)
        results = [StepScores([None] * len(steps), any(p < 0 for p in enc.step_positions), len(enc.input_ids))
                   for (_, steps), enc in zip(items, encoded)]
        for (i, k, _), value in values:
            results[i].scores[k] = value
        return results

    # -- batching and forward passes ------------------------------------------------------------------------------

    def _plan(self, seqs: list[_Seq]) -> list[list[int]]:
        """Batches of sequence indexes: longest first (so memory trouble shows at once), under the token budget."""
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
                fits = max(width, n) * (len(current) + 1) <= self.batch_tokens
            if current and not fits:
                batches.append(current)
                current, used, width = [], 0, 0
            current.append(i)
            used += n
            width = max(width, n)
        if current:
            batches.append(current)
        return batches

    def _run(self, seqs: list[_Seq], on_batch: Callable[[int], None] | None) -> list[tuple[tuple[int, int, int], float]]:
        torch = self._torch
        mine: list[tuple[tuple[int, int, int], float]] = []
        with torch.inference_mode():
            for batch in self._plan(seqs):
                probs = self._forward_packed(seqs, batch) if self.packing else self._forward_padded(seqs, batch)
                targets = [t for i in batch for t in seqs[i].targets]
                mine.extend(zip(targets, probs))
                if on_batch is not None:
                    on_batch(len(targets))
        values = mine
        if self.world_size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, mine)
            values = [pair for part in gathered for pair in part]
        # Checked after the gather, so every process raises together instead of leaving the others waiting.
        if any(value != value for _, value in values):
            raise PrmkitError("the model produced NaN scores",
                              hint="try --dtype float32; a half-precision overflow is the usual cause")
        return values

    def _probabilities(self, logits):
        logits = logits.float()
        if self.num_labels == 1:
            return logits[:, 0].sigmoid()
        return logits.softmax(-1)[:, self.positive_label_id]

    def _forward_padded(self, seqs: list[_Seq], batch: list[int]) -> list[float]:
        torch = self._torch
        width = max(len(seqs[i].ids) for i in batch)
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
        kwargs: dict[str, Any] = {"input_ids": ids.to(self.device)}
        if mask is not None:
            kwargs["attention_mask"] = mask.to(self.device)
        # A causal model needs no attention mask with right padding: real tokens never look at the pads after them.
        logits = self.model(**kwargs, use_cache=False).logits
        picked = logits[torch.as_tensor(rows, device=self.device), torch.as_tensor(cols, device=self.device)]
        return self._probabilities(picked).tolist()

    def _forward_packed(self, seqs: list[_Seq], batch: list[int]) -> list[float]:
        torch = self._torch
        flat: list[int] = []
        positions: list[int] = []
        cols: list[int] = []
        for i in batch:
            offset = len(flat)
            flat.extend(seqs[i].ids)
            positions.extend(range(len(seqs[i].ids)))
            cols.extend(offset + pos for _, _, pos in seqs[i].targets)
        ids = torch.as_tensor([flat], dtype=torch.long, device=self.device)
        pos_ids = torch.as_tensor([positions], dtype=torch.long, device=self.device)
        # No attention mask and no cache: transformers then reads sequence boundaries from position_ids (varlen).
        logits = self.model(input_ids=ids, position_ids=pos_ids, use_cache=False).logits[0]
        return self._probabilities(logits[torch.as_tensor(cols, device=self.device)]).tolist()

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


def _model_name(model: Any) -> str:
    return str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or type(model).__name__)


def _load_model(cls, name: str, kwargs: dict, attn_implementation: str | None):
    try:
        return cls.from_pretrained(name, output_loading_info=True, attn_implementation=attn_implementation, **kwargs)
    except (ImportError, ValueError) as e:
        if attn_implementation != "flash_attention_2":
            raise
        # The architecture (or this flash-attn build) does not take flash-attention: fall back to padded batches.
        log.info(f"flash-attention unavailable for {name} ({str(e).splitlines()[0]}); using padded batches")
        return cls.from_pretrained(name, output_loading_info=True, **kwargs)


def _hub_metadata(repo_id: str, revision: str | None) -> dict | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = hf_hub_download(repo_id, PRMKIT_JSON, revision=revision)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    except RepositoryNotFoundError:
        raise UsageError(f"model {repo_id!r}: no such local directory or Hub repository") from None
    except Exception as e:  # network errors come in many types; loading the weights will say more
        log.info(f"{repo_id}: could not fetch {PRMKIT_JSON} ({type(e).__name__})")
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


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


def _resolve_device(device: str):
    """(rank, world size, torch.device); under several processes accelerate assigns each its device."""
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        from accelerate import PartialState

        # PartialState joins CPU processes (gloo) only when told; accelerate's own Accelerator reads this variable.
        cpu = (os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or device == "cpu"
               or not torch.cuda.is_available())
        state = PartialState(cpu=cpu)
        if state.num_processes != world_size:
            raise PrmkitError(f"WORLD_SIZE is {world_size}, but accelerate joined {state.num_processes} processes")
        # A bare "cuda" means each process's own GPU, not all of them on GPU 0.
        dev = state.device if device in ("auto", None, "cuda") else torch.device(device)
        return state.process_index, state.num_processes, dev
    if device in ("auto", None):
        if torch.cuda.is_available():
            return 0, 1, torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return 0, 1, torch.device("mps")
        return 0, 1, torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}", hint="auto, cpu, cuda, cuda:1, mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but CUDA is not available", hint="use --device cpu or auto")
    return 0, 1, dev


def _resolve_dtype(dtype: str, device):
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", hint=f"one of {', '.join(DTYPES)}")
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # bf16 matmuls are slow on most CPUs, and fp32 is exact
    return getattr(torch, dtype)


def _flash_attn_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _uses_varlen_attention(model: Any) -> bool:
    impl = getattr(model.config, "_attn_implementation", None) or ""
    return "flash" in impl


def _is_causal(model: Any) -> bool:
    """Whether a token sees only what precedes it: prmkit's one rule for known architectures, else a probe."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from prmkit.modeling import is_causal

    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", None)
    known = (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
             or getattr(text, "is_decoder", False) or getattr(config, "is_encoder_decoder", False))
    return is_causal(config) if known else _probe_causal(model)


def _probe_causal(model: Any) -> bool:
    # Change only the last token: a causal model's earlier logits cannot move.
    import torch

    vocab = int(getattr(model.config, "vocab_size", 16) or 16)
    base = [(7 * i + 3) % vocab for i in range(8)]
    other = base[:-1] + [(base[-1] + 1) % vocab]
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([base, other], device=device), use_cache=False).logits.float()
    diff = (logits[0, :-1] - logits[1, :-1]).abs().max().item()
    return diff <= 1e-5 * (1.0 + logits.abs().max().item())


def model_identity(name: str, model: Any | None = None) -> dict[str, Any]:
    """What a result file records about the model, to refuse resuming with another one.

    A local directory is identified by a hash of its config, tokenizer and metadata files and a sampled hash of
    its weights (64 spread 64 KiB blocks, so retrained weights of the same shape differ without reading GBs);
    a Hub model by its id and commit.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.iterdir()):
            if not f.is_file() or f.suffix not in (".json", ".safetensors", ".bin", ".txt", ".model", ".tiktoken"):
                continue
            h.update(f.name.encode() + b"\0")
            size = f.stat().st_size
            h.update(str(size).encode() + b"\0")
            with open(f, "rb") as fh:
                if size <= 64 << 20:
                    h.update(fh.read())
                else:
                    for k in range(64):
                        fh.seek(size * k // 64)
                        h.update(fh.read(64 << 10))
        return {"name": str(path.resolve()), "sha256": h.hexdigest()}
    commit = getattr(getattr(model, "config", None), "_commit_hash", None) if model is not None else None
    return {"name": name, "revision": commit}


# ---------------------------------------------------------------------------------------------------------------------
# Reading records to score


SCORABLE = ("stepwise", "processbench")
STATE_SUFFIX = ".prmkit-state.json"
PARTIAL_SUFFIX = ".partial"
REJECTS_SUFFIX = ".rejects.jsonl"


@dataclass
class _Record:
    number: int
    record: Any
    problem: str | None
    offset: int | None  # byte offset just after this line (JSONL), for resuming with a seek


class InputSource:
    """A score input: a JSONL file or stdin read line by line with byte offsets, or any source `prepare` reads."""

    def __init__(self, spec: str):
        from prmkit.dataset import Source, resolve_source

        self.spec = spec
        self.stdin = spec == "-"
        self.source = Source("<stdin>", "jsonl", None, unit="line") if self.stdin else resolve_source(spec)
        self.unit = self.source.unit

    @property
    def name(self) -> str:
        return self.source.spec

    def where(self, number: int) -> str:
        return self.source.where(number)

    def fingerprint(self) -> str | None:
        """A hash of the content (not the path, so the same file named from elsewhere still matches)."""
        from prmkit.dataset import fingerprint_source

        if self.stdin:
            return None
        path = self.source.path
        if path is not None and path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            return h.hexdigest()
        return fingerprint_source(self.source)

    def total(self) -> int | None:
        """Number of lines when cheap to know (a JSONL file: counts newlines), else None."""
        if self.source.kind != "jsonl" or self.source.path is None:
            return None
        n = 0
        last = b"\n"
        with open(self.source.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                n += block.count(b"\n")
                last = block[-1:]
        return n + (last != b"\n")

    def records(self, after_line: int = 0, after_offset: int | None = None) -> Iterator[_Record]:
        if self.source.kind != "jsonl":
            from prmkit.dataset import iter_records

            for number, record, problem in iter_records(self.source):
                if number > after_line:
                    yield _Record(number, record, problem, None)
            return
        if self.stdin:
            import sys

            yield from _jsonl_lines(sys.stdin.buffer, 0, 0)
            return
        assert self.source.path is not None
        with open(self.source.path, "rb") as fh:
            if after_offset is not None:
                fh.seek(after_offset)
                yield from _jsonl_lines(fh, after_line, after_offset)
            else:
                for rec in _jsonl_lines(fh, 0, 0):
                    if rec.number > after_line:
                        yield rec


def _jsonl_lines(fh, number: int, offset: int) -> Iterator[_Record]:
    # The same parsing and messages as prmkit.dataset's JSONL reader, plus the offset needed to resume with a seek.
    for raw in fh:
        number += 1
        offset += len(raw)
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _Record(number, None, f"not UTF-8 ({e.reason} at byte {e.start})", offset)
            continue
        try:
            yield _Record(number, json.loads(text), None, offset)
        except json.JSONDecodeError as e:
            yield _Record(number, None, f"malformed JSON ({e.msg} at column {e.colno})", offset)


def detect_score_format(record: dict, source: str) -> str:
    """The format of records to score: labels are optional, so stepwise needs only prompt + completions."""
    keys = set(record)
    if {"prompt", "completions"} <= keys:
        return "stepwise"
    if {"problem", "steps"} <= keys:
        return "processbench"
    return detect_format(keys, source)


def rows_to_score(fmt: str, record: Any, unit: str, number: int, opts: Options) -> list[tuple[dict, str, list[str]]]:
    """(output object, prompt, steps) for each solution in a record. Raises RowError.

    Stepwise and ProcessBench records are scored as they are and written back whole; formats that need conversion
    (math-shepherd, prm800k) are written as their converted stepwise rows with the source line or row number.
    """
    if not isinstance(record, dict):
        raise RowError("row", f"expected a JSON object, got {'null' if record is None else type(record).__name__}")
    if fmt in SCORABLE:
        prompt_key, steps_key = ("prompt", "completions") if fmt == "stepwise" else ("problem", "steps")
        for key in (prompt_key, steps_key):
            if key not in record:
                raise RowError(key, "missing")
        steps = record[steps_key]
        labels = [None] * len(steps) if isinstance(steps, list) else None
        try:
            row = validate({"prompt": record[prompt_key], "completions": steps, "labels": labels}, allow_unlabelled=True)
        except RowError as e:
            # Name the field as the record spells it.
            name = {"prompt": prompt_key, "completions": steps_key}.get(e.field.split("[")[0], e.field.split("[")[0])
            raise RowError(name + e.field[len(e.field.split("[")[0]):], e.reason) from None
        return [(record, row["prompt"], row["completions"])]
    rows = convert(fmt, record, opts)
    return [({"prompt": r["prompt"], "completions": r["completions"], "labels": r["labels"], unit: number},
             r["prompt"], r["completions"]) for r in rows]


# ---------------------------------------------------------------------------------------------------------------------
# The file job: `prmkit score`


@dataclass
class ScoreCounts:
    lines_in: int = 0
    lines_scored: int = 0
    lines_rejected: int = 0
    rows_out: int = 0
    steps: int = 0
    tokens: int = 0
    steps_truncated: int = 0
    rows_truncated: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class ScoreSummary:
    input: str
    output: str
    model: str
    format: str
    counts: ScoreCounts = field(default_factory=ScoreCounts)
    rejects: str | None = None
    seconds: float = 0.0
    resumed_at_line: int | None = None
    already_complete: bool = False
    lines_this_run: int = 0
    steps_this_run: int = 0
    device: str = ""
    dtype: str = ""
    batch_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        c = self.counts
        return {
            "input": self.input,
            "output": self.output,
            "model": self.model,
            "format": self.format,
            "device": self.device,
            "dtype": self.dtype,
            "batch_tokens": self.batch_tokens,
            **c.to_dict(),
            "rejects": self.rejects,
            "resumed_at_line": self.resumed_at_line,
            "already_complete": self.already_complete,
            "seconds": round(self.seconds, 3),
            "lines_per_s": round(self.lines_this_run / self.seconds, 2) if self.seconds > 0 else None,
            "steps_per_s": round(self.steps_this_run / self.seconds, 2) if self.seconds > 0 else None,
        }


def output_paths(output: str | Path) -> dict[str, Path]:
    out = Path(output)
    return {
        "output": out,
        "partial": out.with_name(out.name + PARTIAL_SUFFIX),
        "state": out.with_name(out.name + STATE_SUFFIX),
        "rejects": out.with_name(out.name + REJECTS_SUFFIX),
        "rejects_partial": out.with_name(out.name + REJECTS_SUFFIX + PARTIAL_SUFFIX),
    }


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_state(path: Path, state: dict) -> None:
    write_atomic(path, json.dumps(state, indent=2, ensure_ascii=False) + "\n")
    _fsync_dir(path.parent)


def _read_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise UsageError(f"{path}: unreadable state file", hint="pass --overwrite to start over") from None


def _describe_mismatch(state: dict, job: dict) -> str | None:
    if state.get("input") != job["input"]:
        was = state.get("input_spec")
        return f"it was written for another input ({was!r}, or that file has changed since)"
    old_model, new_model = state.get("model") or {}, job["model"]
    same_model = (old_model.get("sha256") == new_model.get("sha256") if "sha256" in old_model and "sha256" in new_model
                  else old_model == new_model)  # a local directory may move; its content decides
    if not same_model:
        return f"it was written by another model ({state.get('model', {}).get('name')!r}, or its files have changed)"
    if state.get("settings") != job["settings"]:
        old, new = state.get("settings", {}), job["settings"]
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"it was written with other settings ({', '.join(keys)})"
    return None


def _remove(*paths: Path) -> None:
    for p in paths:
        if p.exists() or p.is_symlink():
            p.unlink()


def score_file(
    scorer: StepScorer,
    input_spec: str,
    output: str,
    *,
    fmt: str = "auto",
    threshold: float = 0.5,
    skip_invalid: bool = False,
    overwrite: bool = False,
    sort_window: int | None = None,
    on_progress: Callable[[dict[str, int]], None] | None = None,
    on_steps: Callable[[int], None] | None = None,
    stdout: Any = None,
    on_reject: Callable[[str], None] | None = None,
) -> ScoreSummary:
    """Score every solution of ``input_spec`` into JSONL ``output`` (``-``: the text stream ``stdout``), resumably.

    Each line is the input object with ``step_scores``, ``aggregates`` and ``first_error`` added (and
    ``"truncated": true`` when truncation cut a step away). A file output is built in ``OUT.partial`` beside a state
    file and renamed to ``OUT`` when complete. The state is committed only at window boundaries, after the output
    is fsync'd, so re-running the same command after any interruption, kill -9 included, truncates the partial file
    to the last commit (a half-written line goes with it) and goes on from there. The result equals an
    uninterrupted run byte for byte: the windows, hence the batches and the arithmetic, are the same.

    A bad line stops the job with its number and reason (:class:`DataError`), before its window is scored; with
    ``skip_invalid`` it goes to ``OUT.rejects.jsonl`` (``on_reject`` for stdout) and the job goes on.
    """
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"score.threshold must lie in [0, 1], got {threshold}")
    if fmt not in ("auto", "stepwise", "math-shepherd", "prm800k", "processbench"):
        raise UsageError(f"unknown format {fmt!r}", hint="auto, stepwise, math-shepherd, prm800k or processbench")
    window_rows = sort_window or scorer.sort_window
    src = InputSource(input_spec)
    if src.stdin and scorer.world_size > 1:
        raise UsageError("reading stdin needs a single process", hint="give the input as a file under accelerate launch")
    main = scorer.is_main_process
    paths = None if str(output) == "-" else output_paths(output)
    started = time.perf_counter()
    summary = ScoreSummary(input=src.name, output=str(output), model=str(scorer.identity.get("name")), format=fmt,
                           device=str(scorer.device), dtype=str(scorer.dtype).removeprefix("torch."),
                           batch_tokens=scorer.batch_tokens)

    # Process 0 alone decides where to start; the others follow its answer, refusals included.
    job: dict[str, Any] = {}
    plan: dict[str, Any] = {}
    if main:
        try:
            job = _job_identity(scorer, src, fmt, threshold)
            plan = _plan_output(paths, job, src, overwrite) if paths else {}
        except PrmkitError as e:
            plan = {"error": [isinstance(e, UsageError), e.message, e.hint]}
    plan = scorer.broadcast(plan)
    if "error" in plan:
        usage, message, hint = plan["error"]
        raise (UsageError if usage else PrmkitError)(message, hint=hint)
    known = ScoreCounts().to_dict()
    counts = summary.counts = ScoreCounts(**{k: v for k, v in plan.get("counts", {}).items() if k in known})
    if plan.get("complete"):
        summary.already_complete = True
        summary.format = plan.get("format") or fmt
        summary.rejects = str(paths["rejects"]) if paths and paths["rejects"].exists() else None
        summary.seconds = time.perf_counter() - started
        return summary
    after_line = int(plan.get("input_line", 0))
    after_offset = plan.get("input_offset")
    summary.resumed_at_line = after_line or None
    fmt_used: str | None = plan.get("format_detected")
    out_fh = rej_fh = None

    def commit(line: int, offset: int | None, final: bool = False) -> None:
        if paths is None:
            out_fh.flush()
            return
        out_fh.flush()
        os.fsync(out_fh.fileno())
        if rej_fh is not None:
            rej_fh.flush()
            os.fsync(rej_fh.fileno())
        _write_state(paths["state"], {
            "prmkit_version": __version__,
            "status": "complete" if final else "running",
            **job,
            "format_detected": fmt_used,
            "progress": {
                "input_line": line,
                "input_offset": offset,
                "output_bytes": out_fh.tell(),
                "rejects_bytes": rej_fh.tell() if rej_fh is not None else 0,
                "counts": counts.to_dict(),
            },
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })

    def write_reject(rec: _Record, field_name: str, reason: str) -> None:
        nonlocal rej_fh
        if paths is None:
            if on_reject is not None:
                on_reject(f"{src.where(rec.number)}: {field_name}: {reason}")
            return
        if rej_fh is None:
            rej_fh = open(paths["rejects_partial"], "wb")
        entry = {"source": src.name, src.unit: rec.number, "field": field_name, "reason": reason, "record": rec.record}
        rej_fh.write((json.dumps(entry, ensure_ascii=False, default=str) + "\n").encode("utf-8"))

    opts = Options(is_eval=True)
    lines_this_run = steps_this_run = 0
    last_line, last_offset = after_line, after_offset
    try:
        if main:
            if paths is None:
                out_fh = stdout
            else:
                if not plan.get("output_bytes") and not after_line:
                    # The state goes first: a partial file without one would be refused as somebody else's.
                    out_fh = open(paths["partial"], "wb")
                    commit(0, 0 if src.source.kind == "jsonl" else None)
                else:
                    out_fh = open(paths["partial"], "r+b")
                    out_fh.truncate(int(plan["output_bytes"]))
                    out_fh.seek(0, os.SEEK_END)
                if paths["rejects_partial"].exists():
                    rej_fh = open(paths["rejects_partial"], "r+b")
                    rej_fh.truncate(int(plan.get("rejects_bytes", 0)))
                    rej_fh.seek(0, os.SEEK_END)
        records = src.records(after_line, after_offset)
        exhausted = False
        while not exhausted:
            # One window of whole records, so a resumed run sees exactly the windows of an uninterrupted one.
            pending: list[tuple[_Record, list[tuple[dict, str, list[str]]] | None, tuple[str, str] | None]] = []
            n_rows = 0
            while n_rows < window_rows:
                rec = next(records, None)
                if rec is None:
                    exhausted = True
                    break
                problem: tuple[str, str] | None = ("row", rec.problem) if rec.problem is not None else None
                rows = None
                if problem is None:
                    if fmt_used is None and isinstance(rec.record, dict):
                        fmt_used = fmt if fmt != "auto" else detect_score_format(rec.record, src.name)
                        if fmt == "auto":
                            log.info(f"{src.name}: scoring {fmt_used} records")
                    try:
                        rows = rows_to_score(fmt_used or "stepwise", rec.record, src.unit, rec.number, opts)
                    except RowError as e:
                        problem = (e.field, e.reason)
                if problem is not None and not skip_invalid:
                    # Stop before scoring anything more; what is committed stays, resumable with --skip-invalid.
                    raise DataError(
                        f"{src.where(rec.number)}: {problem[0]}: {problem[1]}",
                        hint="fix the line and re-run with --overwrite, or pass --skip-invalid to write bad lines "
                             "to a rejects file and go on",
                    )
                pending.append((rec, rows, problem))
                n_rows += len(rows or ())
            if not pending:
                break
            items = [(prompt, steps) for _, rows, _ in pending for _, prompt, steps in rows or ()]
            results = iter(scorer.score_solutions(items, on_batch=on_steps))
            for rec, rows, problem in pending:
                counts.lines_in += 1
                lines_this_run += 1
                if problem is not None:
                    counts.lines_rejected += 1
                    if main:
                        write_reject(rec, *problem)
                    continue
                counts.lines_scored += 1
                for obj, _, steps in rows:
                    res = next(results)
                    counts.rows_out += 1
                    counts.steps += len(steps)
                    steps_this_run += len(steps)
                    counts.tokens += res.num_tokens
                    counts.steps_truncated += sum(s is None for s in res.scores)
                    counts.rows_truncated += bool(res.truncated)
                    if main:
                        line = json.dumps(_scored_object(obj, res, threshold), ensure_ascii=False) + "\n"
                        out_fh.write(line if paths is None else line.encode("utf-8"))
            last_line, last_offset = pending[-1][0].number, pending[-1][0].offset
            if main:
                commit(last_line, last_offset)
                if on_progress is not None:
                    on_progress({"line": last_line, "lines": counts.lines_in, "rows": counts.rows_out,
                                 "steps": counts.steps, "lines_this_run": lines_this_run,
                                 "steps_this_run": steps_this_run})
        summary.format = fmt_used or fmt
        if counts.lines_in == 0:
            if paths is not None:
                raise DataError(f"{src.name}: no lines to score")
            log.warning(f"{src.name}: no lines to score")
        if main:
            if paths is None:
                out_fh.flush()
            else:
                commit(last_line, last_offset, final=True)
                out_fh.close()
                out_fh = None
                if rej_fh is not None:
                    rej_fh.close()
                    rej_fh = None
                _finish(paths)
    finally:
        if paths is not None and out_fh is not None:
            out_fh.close()
        if rej_fh is not None:
            rej_fh.close()
    summary.rejects = str(paths["rejects"]) if paths and paths["rejects"].exists() else None
    summary.seconds = time.perf_counter() - started
    summary.lines_this_run = lines_this_run
    summary.steps_this_run = steps_this_run
    return summary


def _job_identity(scorer: StepScorer, src: InputSource, fmt: str, threshold: float) -> dict[str, Any]:
    """What must match for a run to continue an earlier one's output."""
    return {
        "input": {"sha256": src.fingerprint()},
        "input_spec": src.name,
        "model": scorer.identity,
        "settings": {
            "tokenization": scorer.params.to_dict(),
            "format": fmt,
            "threshold": threshold,
            "dtype": str(scorer.dtype).removeprefix("torch."),
            "positive_label_id": scorer.positive_label_id,
            "mode": "prefix" if scorer.prefix_mode else "one-pass",
        },
    }


def _finish(paths: dict[str, Path]) -> None:
    # The state already says complete; renaming is idempotent, so a crash in between is finished by the next run.
    if paths["rejects_partial"].exists():
        os.replace(paths["rejects_partial"], paths["rejects"])
    if paths["partial"].exists():
        os.replace(paths["partial"], paths["output"])
    _fsync_dir(paths["output"].parent)


def _plan_output(paths: dict[str, Path], job: dict, src: InputSource, overwrite: bool) -> dict[str, Any]:
    """Where a file job starts: fresh, resumed from the state file, already complete, or refused."""
    out = paths["output"]
    if out.is_dir():
        raise UsageError(f"{out} is a directory; --output takes a JSONL file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _remove(paths["output"], paths["partial"], paths["rejects"], paths["rejects_partial"], paths["state"])
        return {"fresh": True}
    state = _read_state(paths["state"])
    if state is None:
        existing = [p for p in (paths["output"], paths["partial"], paths["rejects"], paths["rejects_partial"]) if p.exists()]
        if existing:
            raise UsageError(f"{existing[0]} exists and no scoring state records how it was made",
                             hint="pass --overwrite to replace it, or choose another --output")
        return {"fresh": True}
    if src.stdin:
        raise UsageError(f"{out}: cannot check that stdin is the input an earlier run scored",
                         hint="pass --overwrite to start over, or give the input as a file to resume")
    why = _describe_mismatch(state, job)
    if why:
        raise UsageError(f"{out}: refusing to continue it: {why}",
                         hint="pass --overwrite to start over, or choose another --output")
    progress = state.get("progress", {})
    if state.get("status") == "complete":
        _finish(paths)
        if not out.exists():
            raise UsageError(f"{out}: the state file says complete but the output is missing",
                             hint="pass --overwrite to score again")
        return {"complete": True, "counts": progress.get("counts", {}), "format": state.get("format_detected")}
    committed = int(progress.get("output_bytes", 0))
    have = paths["partial"].stat().st_size if paths["partial"].exists() else 0
    if have < committed or (paths["rejects_partial"].stat().st_size if paths["rejects_partial"].exists() else 0) \
            < int(progress.get("rejects_bytes", 0)):
        raise UsageError(f"{paths['partial']}: shorter than the state file records; it was changed outside prmkit",
                         hint="pass --overwrite to start over")
    if progress.get("input_line"):
        log.info(f"resuming {out} after {src.unit} {progress['input_line']} "
                 f"({progress.get('counts', {}).get('rows_out', 0)} rows already scored)")
    return {
        "input_line": int(progress.get("input_line", 0)),
        "input_offset": progress.get("input_offset"),
        "output_bytes": committed,
        "rejects_bytes": int(progress.get("rejects_bytes", 0)),
        "counts": progress.get("counts", {}),
        "format_detected": state.get("format_detected"),
    }


PRMKIT_FIELDS = ("step_scores", "aggregates", "first_error", "truncated")


def _scored_object(obj: dict, res: StepScores, threshold: float) -> dict:
    out = dict(obj)
    if "step_scores" in out and "truncated" in out and not res.truncated:
        del out["truncated"]  # a stale flag from scoring an earlier output again
    out["step_scores"] = res.scores
    out["aggregates"] = aggregate(res.scores)
    out["first_error"] = first_error_index(res.scores, threshold)
    if res.truncated:
        out["truncated"] = True
    return out
