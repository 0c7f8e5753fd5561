"""Which files of a model directory go up: safetensors weights, config, tokenizer, prmkit metadata, the card.

Nothing outside the model directory is read: a file or directory link that resolves outside it is refused, and every
file is read through its resolved path, which is also what a dry run shows.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prmkit.core.filenames import CONFIG_YAML, PRMKIT_JSON
from prmkit.errors import UsageError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# The Trainer pickles its arguments beside the weights; they are not weights and are never pushed.
TRAINER_PICKLES = {"training_args.bin"}
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
# Files a tokenizer can be built from; tokenizer_config.json alone describes one but holds no vocabulary.
TOKENIZER_VOCAB_FILES = (
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
README = "README.md"
CHAT_TEMPLATES_DIR = "additional_chat_templates"
"""Where transformers saves a tokenizer's named chat templates beyond the default one (``NAME.jinja``); uploaded with
the tokenizer, since ``apply_chat_template(chat_template=NAME)`` reads them from there."""
# Read by transformers when the tokenizer is checked.
LOADER_DIRS = (CHAT_TEMPLATES_DIR,)
# The JSON and YAML files push parses (prmkit.json, configs, a shard index, report.json) are small; anything bigger
# is not a file prmkit or transformers wrote, and reading it whole could exhaust memory.
METADATA_MAX_BYTES = 16 << 20


@dataclass
class PushFile:
    path: str
    """Path in the repo."""
    size: int
    source: str
    """The local file it comes from (relative to the model directory), or "generated" for the model card."""
    status: str | None = None
    """new | changed | unchanged | deleted; None in a dry run (the Hub is not asked)."""
    content: bytes | None = field(default=None, repr=False)
    local: Path | None = field(default=None, repr=False)
    note: str | None = None
    """What push changed on the way up, e.g. local paths made relative; None when the file goes up as it is."""
    _hashes: tuple[str, str] | None = field(default=None, repr=False)

    def hashes(self) -> tuple[str, str]:
        """(sha256, git blob sha1): the Hub reports the first for LFS files and the second for regular ones."""
        if self._hashes is None:
            sha256, sha1 = hashlib.sha256(), hashlib.sha1()
            sha1.update(b"blob %d\0" % self.size)
            for chunk in self._chunks():
                sha256.update(chunk)
                sha1.update(chunk)
            self._hashes = (sha256.hexdigest(), sha1.hexdigest())
        return self._hashes

    def _chunks(self) -> Iterator[bytes]:
        if self.content is not None:
            yield self.content
            return
        assert self.local is not None
        with open(self.local, "rb") as fh:
            while chunk := fh.read(1 << 22):
                yield chunk

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "source": self.source, "status": self.status, "note": self.note}


def find_adapter_dir(model_dir: Path, metadata: dict | None = None) -> Path | None:
    """Where a LoRA adapter lives: prmkit.json's adapter_dir, else ``adapter/``, else the directory itself."""
    candidates = []
    if metadata and metadata.get("adapter_dir"):
        recorded = Path(metadata["adapter_dir"])
        candidates.append(recorded if recorded.is_absolute() else model_dir / recorded)
    candidates += [model_dir / "adapter", model_dir]
    for cand in candidates:
        if (cand / "adapter_config.json").is_file():
            return cand
    return None


def _top_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def is_weight(name: str) -> bool:
    return (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")) and not name.startswith(
        "adapter_"
    )


def select_files(
    model_dir: Path, adapter: bool, allow_pickle: bool, metadata: dict | None, warnings: list[str]
) -> tuple[list[tuple[str, Path]], list[str], Path, Path | None]:
    """(path in repo, local file) pairs, skipped names, the tokenizer's directory, and the adapter's directory."""
    chosen: dict[str, Path] = {}
    top = _top_files(model_dir)
    names = {p.name for p in top}
    adapter_dir = find_adapter_dir(model_dir, metadata)

    pickles = [p.name for p in top if p.suffix in PICKLE_SUFFIXES and p.name not in TRAINER_PICKLES]
    if pickles and not allow_pickle:
        raise UsageError(
            f"{model_dir} holds pickle files ({', '.join(pickles)}): loading them can run arbitrary code",
            hint="prmkit pushes safetensors only; delete or convert them, or pass --allow-pickle to upload them anyway",
        )

    if adapter:
        if adapter_dir is None:
            raise UsageError(
                f"--adapter: no adapter_config.json in {model_dir} or {model_dir / 'adapter'}",
                hint="train with train.lora set and train.lora_merge: false to get an adapter",
            )
        for name in ADAPTER_FILES:
            if not (adapter_dir / name).is_file():
                raise UsageError(f"{adapter_dir}: {name} is missing; an adapter needs {' and '.join(ADAPTER_FILES)}")
            chosen[name] = adapter_dir / name
    else:
        weights = [p for p in top if is_weight(p.name)]
        if not any(p.name.endswith(".safetensors") for p in weights):
            hint = None
            if adapter_dir is not None:
                hint = "this directory holds a LoRA adapter: push it with --adapter"
            elif pickles:
                hint = "convert the weights: model.save_pretrained(dir, safe_serialization=True)"
            raise UsageError(f"{model_dir}: no safetensors weights (model.safetensors or shards)", hint=hint)
        for p in weights:
            chosen[p.name] = p
        for name in CONFIG_FILES:
            if name in names:
                chosen[name] = model_dir / name
        if "config.json" not in chosen:
            raise UsageError(f"{model_dir}: config.json is missing; the weights cannot be loaded without it")

    tok_dir = model_dir
    if not any(n in names for n in TOKENIZER_VOCAB_FILES) and adapter_dir is not None:
        tok_dir = adapter_dir
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            chosen[name] = tok_dir / name
    templates = tok_dir / CHAT_TEMPLATES_DIR
    if templates.is_dir():
        for p in sorted(templates.iterdir()):
            if p.suffix == ".jinja" and p.is_file() and not p.name.startswith("."):
                chosen[f"{CHAT_TEMPLATES_DIR}/{p.name}"] = p

    for name in (PRMKIT_JSON, CONFIG_YAML):
        for where in (model_dir, adapter_dir):
            if where is not None and (where / name).is_file():
                chosen.setdefault(name, where / name)

    if allow_pickle:
        for name in pickles:
            chosen[name] = model_dir / name
            warnings.append(f"uploading pickle file {name} as asked (--allow-pickle)")

    if README in names:
        chosen[README] = model_dir / README
    resolved = _inside(model_dir, chosen, [d / sub for d in {model_dir, tok_dir} for sub in LOADER_DIRS])
    taken = set(resolved.values())
    parents = {d for p in taken for d in p.parents}
    skipped = sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in model_dir.iterdir()
        if not p.name.startswith(".") and p.resolve() not in taken and p.resolve() not in parents
    )
    return sorted(resolved.items()), skipped, tok_dir, adapter_dir if adapter else None


def _inside(model_dir: Path, chosen: dict[str, Path], also_read: list[Path]) -> dict[str, Path]:
    """``chosen`` with every path resolved; refuses, naming them, links that lead out of the model directory.

    ``also_read`` are directories the checks read through transformers without uploading them. Hard links are
    files of the directory like any other and need no check.
    """
    root = model_dir.resolve()
    resolved = {name: p.resolve() for name, p in chosen.items()}
    escapes = [(p, resolved[name]) for name, p in chosen.items() if not resolved[name].is_relative_to(root)]
    for d in also_read:
        if not d.exists():
            continue
        # os.walk lists a linked directory without entering it, so a link to / is caught, not walked.
        inner = (
            [Path(top) / n for top, dirs, files in os.walk(d) for n in dirs + files]
            if d.resolve().is_relative_to(root)
            else []
        )
        escapes += [(p, p.resolve()) for p in [d, *inner] if not p.resolve().is_relative_to(root)]
    _refuse_escapes(model_dir, escapes)
    return resolved


def inside(path: Path, model_dir: Path) -> Path:
    """``path`` resolved, after checking that it does not lead out of ``model_dir`` (see ``select_files``)."""
    real = path.resolve()
    if not real.is_relative_to(model_dir.resolve()):
        _refuse_escapes(model_dir, [(path, real)])
    return real


def _refuse_escapes(model_dir: Path, escapes: list[tuple[Path, Path]]) -> None:
    if escapes:
        shown = ", ".join(f"{relative_to_dir(p, model_dir)} -> {real}" for p, real in escapes)
        raise UsageError(
            f"{model_dir}: refusing to push links that lead outside the model directory: {shown}",
            hint="copy what you mean to publish into the directory, or remove the links",
        )


def read_text_capped(path: Path, limit: int = METADATA_MAX_BYTES) -> str:
    """A small text file's content, refusing one over ``limit`` bytes before reading it."""
    size = path.stat().st_size
    if size > limit:
        raise UsageError(
            f"{path}: {human_size(size)} is too large for this file (at most {human_size(limit)})",
            hint="this is not a file prmkit or transformers wrote; replace or remove it",
        )
    with open(path, encoding="utf-8") as fh:
        return fh.read(limit + 1)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def relative_to_dir(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
