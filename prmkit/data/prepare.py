"""Load step-labelled data, validate every row, tokenize it and cache the result.

`prepare`, `train` and `eval` all come through :func:`prepare_splits`, so running `prepare` first is optional: the
same inputs give the same cache key and the work is done once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prmkit.core.atomic import make_temp_dir, manifest, remove_leftovers, swap_in
from prmkit.core.filenames import METADATA_FILE, REJECTS_FILE
from prmkit.core.jsonio import dumps
from prmkit.core.outputs import refuse_inputs_inside
from prmkit.core.redact import redact
from prmkit.core.version import __version__
from prmkit.data.sources import SplitReport, fingerprint_source, resolve_source
from prmkit.data.tokenized import Prepared, _read_metadata, verify_prepared
from prmkit.errors import UsageError
from prmkit.kinds.registry import DEFAULT_KIND, get_kind
from prmkit.tokenization import TokenizationParams, tokenizer_fingerprint

log = logging.getLogger("prmkit")


def cache_root(cfg_cache_dir: str | None) -> Path:
    if cfg_cache_dir:
        return Path(cfg_cache_dir).expanduser()
    if os.environ.get("PRMKIT_CACHE"):
        return Path(os.environ["PRMKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prmkit"


def _train_kind_encoder(cfg, tokenizer):
    """The tokenization of ``train.kind`` when it has its own layout (lm-tag), else None (TRL's tokenization)."""
    train = getattr(cfg, "train", None)
    kind = get_kind(getattr(train, "kind", DEFAULT_KIND)) if train is not None else None
    if kind is None or kind.uses_separator:
        return None
    from prmkit.kinds.encoder import KindEncoder
    from prmkit.kinds.spec import KindSettings, ensure_tag_token

    settings = KindSettings.from_sources({**cfg.model.kind_settings(), "kind": kind.name}, None)
    if kind.uses_step_tag:
        ensure_tag_token(tokenizer, settings.tag())  # as train does (a no-op there): `prepare` alone works too
    return KindEncoder(kind.name, tokenizer, settings, cfg.data.max_length)


def cache_key(
    tok_fp: dict,
    params: TokenizationParams,
    data_cfg,
    sources: dict[str, str],
    kind: dict[str, Any] | None = None,
    held_out: dict[str, Any] | None = None,
) -> str:
    material = {
        **({"kind": kind} if kind else {}),
        **({"eval_fraction": held_out} if held_out else {}),
        "prmkit": __version__,
        "tokenizer": tok_fp["sha256"],
        "params": params.to_dict(),
        "format": data_cfg.format,
        "prm800k_neutral": data_cfg.prm800k_neutral,
        "label_threshold": data_cfg.label_threshold,
        "sources": sources,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def _reuse_existing(target: Path, key: str, output: str | Path | None, overwrite: bool) -> Prepared | None:
    """The entry already at ``target`` when it holds these inputs and is intact; else None, after clearing what an
    interrupted prepare left and refusing to replace a directory prepare did not write."""
    removed, size = remove_leftovers(target.parent, target.name)
    if removed:
        log.info(
            f"removed {removed} temporary director{'y' if removed == 1 else 'ies'} ({size / 1e6:.1f} MB) left in "
            f"{target.parent} by an interrupted prepare"
        )
    existing = _read_metadata(target)
    if existing is not None and existing.get("cache_key") == key and not overwrite:
        damage = verify_prepared(target, existing)
        if damage is None:
            log.info(f"reusing prepared data in {target} (inputs unchanged)")
            reports = {n: SplitReport(**r) for n, r in existing.get("splits", {}).items()}
            kept = target / REJECTS_FILE
            return Prepared(target, existing, reports, cache_hit=True, rejects_path=kept if kept.exists() else None)
        log.warning(f"{target}: {damage}; rebuilding it")
    elif existing is None and (target.is_file() or target.is_symlink() or (target.is_dir() and any(target.iterdir()))):
        if output is not None and not overwrite:
            raise UsageError(
                f"{target} exists and is not a prmkit prepared dataset (no readable {METADATA_FILE})",
                hint="pass --overwrite to replace it, or choose another output directory",
            )
        if output is None:
            # The cache is prmkit's own: an entry without its metadata is what an interrupted or damaged write leaves.
            log.warning(f"{target}: cache entry without a readable {METADATA_FILE}; rebuilding it")
    elif existing is not None and not overwrite:
        log.info(f"rebuilding {target}: inputs changed since it was prepared")
    return None


def prepare_splits(
    cfg,
    tokenizer,
    output: str | Path | None = None,
    skip_invalid: bool = False,
    overwrite: bool = False,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> Prepared:
    """Prepare `data.train` (split `train`) and `data.eval` (split `eval`) into a cached DatasetDict.

    With ``output`` the result goes there (a prepared directory with other inputs is rebuilt; any other existing
    directory is refused unless ``overwrite``); without it, into the cache under ``data.cache_dir``.
    ``on_progress(split, rows_done, rows_total)`` follows tokenization.
    """
    import datasets

    from prmkit.data.splits import build_splits, check_eval_fraction, prepared_inputs, split_seed

    data = cfg.data
    check_eval_fraction(data)
    skip_invalid = skip_invalid or data.skip_invalid
    specs = {name: spec for name, spec in (("train", data.train), ("eval", data.eval)) if spec}
    if not specs:
        raise UsageError("no data: set data.train (and optionally data.eval)", hint="e.g. --set data.train=rows.jsonl")
    params = TokenizationParams.from_data_config(data)
    # Before the fingerprint: lm-tag may add its step tag to the tokenizer, which changes its ids.
    kind_encoder = _train_kind_encoder(cfg, tokenizer)
    kind = kind_encoder.settings.to_dict() if kind_encoder is not None else None
    tok_fp = tokenizer_fingerprint(tokenizer)
    resolved = {name: resolve_source(spec) for name, spec in specs.items()}
    held = {"fraction": data.eval_fraction, "seed": split_seed(cfg)} if data.eval_fraction is not None else None
    given = prepared_inputs(resolved, tok_fp, params, kind, data, held)
    if given.as_it_is is not None and output is None:
        return given.as_it_is  # one prepared directory, whole, as prepare wrote it: nothing to copy
    sources = {name: fingerprint_source(src) for name, src in resolved.items()}
    key = cache_key(tok_fp, params, data, sources, kind, held)
    target = Path(output) if output else cache_root(data.cache_dir) / "prepared" / key
    if output:
        # A rebuild replaces the whole directory: an input inside it would be deleted with it.
        refuse_inputs_inside(
            target,
            [
                ("data.train", data.train),
                ("data.eval", data.eval),
                ("tokenizer", cfg.tokenizer_name),
                ("--config", getattr(cfg, "source", None)),
            ],
            "prepare replaces",
        )

    reused = _reuse_existing(target, key, output, overwrite)
    if reused is not None:
        return reused

    # The build directory comes first: an unwritable output fails now, not after every row has been tokenized.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, target.name)
    try:
        rejects: list[dict] = []
        splits, reports, held_record = build_splits(
            cfg, specs, given.splits, held, tokenizer, params, kind_encoder, skip_invalid, rejects, on_progress
        )
        metadata = {
            "prmkit_version": __version__,
            "cache_key": key,
            "tokenizer": tok_fp,
            "tokenization": params.to_dict(),
            **({"kind": kind} if kind else {}),
            "data": {
                "format": data.format,
                "formats": {n: r.format for n, r in reports.items()},
                "prm800k_neutral": data.prm800k_neutral,
                "label_threshold": data.label_threshold,
                "sources": specs,
                "fingerprints": sources,
                **({"eval_split": held_record} if held_record else {}),
            },
            "splits": {n: r.to_dict() for n, r in reports.items()},
        }
        _write_into(tmp, datasets.DatasetDict(splits), metadata, rejects)
        _swap_in(tmp, target)
        rejects_path = target / REJECTS_FILE
        return Prepared(target, metadata, reports, cache_hit=False, rejects_path=rejects_path if rejects else None)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_into(tmp: Path, dsd, metadata: dict, rejects: list[dict]) -> None:
    dsd.save_to_disk(str(tmp / "data"))
    for item in (tmp / "data").iterdir():
        item.rename(tmp / item.name)
    (tmp / "data").rmdir()
    if rejects:
        with open(tmp / REJECTS_FILE, "w", encoding="utf-8") as fh:
            for r in rejects:
                fh.write(dumps(r) + "\n")
    metadata["files"] = manifest(tmp, exclude=(METADATA_FILE,))
    (tmp / METADATA_FILE).write_text(dumps(redact(metadata), indent=2), encoding="utf-8")


def _swap_in(tmp: Path, target: Path) -> None:
    # Built beside the target and swapped into place, so an interrupted prepare never leaves a half-written dataset
    # and never loses the previous one (see swap_in).
    swap_in(tmp, target)
