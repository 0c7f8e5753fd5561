"""Loading a PRM for scoring: the device and dtype, the weights (with the tokenizer read alongside on a GPU), the
metadata of a Hub model, and the identity a result file records."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prmkit.core.atomic import read_json
from prmkit.core.filenames import PRMKIT_JSON
from prmkit.errors import PrmkitError, UsageError, first_line
from prmkit.models.loading import MODEL_LOAD_DEFAULTS

log = logging.getLogger("prmkit")


def load_model(cls, name: str, kwargs: dict, attn_implementation: str | None, fall_back: bool = False):
    kwargs = {**MODEL_LOAD_DEFAULTS, **kwargs}
    try:
        return cls.from_pretrained(name, output_loading_info=True, attn_implementation=attn_implementation, **kwargs)
    except (ImportError, ValueError) as e:
        if not fall_back or attn_implementation is None:
            raise
        # The architecture (or this build) does not take the packing kernel prmkit chose: fall back to padded batches.
        log.info(f"{attn_implementation} unavailable for {name} ({first_line(e)}); using padded batches")
        return cls.from_pretrained(name, output_loading_info=True, **kwargs)


OVERLAP_TOKENIZER_ON = ("cuda",)
"""Devices whose weights load while the tokenizer is read in another thread. Copying weights to a GPU leaves the
interpreter lock free for the tokenizer's parsing; on a CPU the two only compete for the same cores."""


def architecture_imported(auto_class: Any, config: Any) -> bool:
    """Import the model's code now, in this thread (transformers imports it lazily at the first load), so that no
    two threads import modules at once; False when the class is not known to ``auto_class`` (remote code)."""
    if config is None:
        return False
    try:
        auto_class._model_mapping[type(config)]
    except (KeyError, ImportError, AttributeError, ValueError):
        return False
    return True


class Background:
    """``fn(*args)`` in a thread of its own while the ``with`` block runs, or at :meth:`result` when not ``enabled``.
    Its exception is raised by :meth:`result`; leaving the block waits for the thread."""

    def __init__(self, fn: Callable[..., Any], *args: Any, enabled: bool = True):
        self._call = lambda: fn(*args)
        self._enabled = enabled
        self._pool: Any = None
        self._future: Any = None

    def __enter__(self) -> Background:
        if self._enabled:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prmkit-load")
            self._future = self._pool.submit(self._call)
        return self

    def result(self) -> Any:
        return self._future.result() if self._future is not None else self._call()

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def load_error(name: str, e: Exception) -> UsageError:
    reason = first_line(e)
    if "out of memory" in reason.lower():
        hint = "free memory on the device, or load it in less (--dtype bfloat16)"
    elif Path(name).expanduser().is_dir():
        hint = "its files are damaged or do not belong together: restore them, or save the model again"
    else:
        hint = "give a prmkit output directory, a transformers model directory, or a reachable Hub id"
    return UsageError(f"model {name!r} could not be loaded: {reason}", hint=hint)


def hub_metadata(repo_id: str, revision: str | None) -> dict | None:
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
    return read_json(path, hint="the copy in the Hub cache is damaged: delete it (or pass --step-separator)")


def resolve_device(device: str):
    """(rank, world size, torch.device); under several processes accelerate assigns each its device."""
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        from accelerate import PartialState

        # PartialState joins CPU processes (gloo) only when told; accelerate's own Accelerator reads this variable.
        cpu = (
            os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
            or device == "cpu"
            or not torch.cuda.is_available()
        )
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
