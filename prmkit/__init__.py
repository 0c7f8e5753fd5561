"""prmkit: train, evaluate, score and publish process-supervised reward models.

The public Python API, loaded on first use (importing torch and transformers takes seconds, and `prmkit --help`
should not pay for it)::

    import prmkit

    cfg = prmkit.load_config("prm.yaml", overrides=["train.num_train_epochs=1"])
    result = prmkit.train(cfg)
    report = prmkit.evaluate(cfg, models=[result.output_dir], data=["gsm8k.json"])
    summary = prmkit.score_file(cfg, "solutions.jsonl", "scored.jsonl", model=result.output_dir)
    scorer = prmkit.StepScorer.from_pretrained(result.output_dir)

The package is layered; each layer imports only the ones above it in this list (``tests/test_layers.py``):

- ``errors``, ``core`` (files, JSON, secrets), ``tokenization``, ``metrics``: shared and low;
- ``kinds``: the PRM kinds registry; ``data.formats``: the data formats registry;
- ``config``: the one config schema;
- ``data``: reading, splitting and preparing step-labelled data;
- ``models``: model directories and loading;
- ``scoring``: the engine and `prmkit score`'s job; ``hub``: publishing;
- ``training``, ``evaluation``: the recipes (``training``, so that ``prmkit.train`` stays the function);
- ``serve``: scores over HTTP; ``api``: the functions above;
- ``cli``: the `prmkit` command.
"""

from __future__ import annotations

from typing import Any

from prmkit.core.version import __version__

# name -> module that defines it; resolved by __getattr__ on first use
_API = {
    "StepScorer": "prmkit.scoring.engine",
    "load_config": "prmkit.config.load",
    "Config": "prmkit.config.schema",
    "train": "prmkit.api",
    "evaluate": "prmkit.api",
    "score_file": "prmkit.api",
    "push_model": "prmkit.api",
    "PrmkitError": "prmkit.errors",
    "ConfigError": "prmkit.errors",
    "DataError": "prmkit.errors",
    "UsageError": "prmkit.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'prmkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
