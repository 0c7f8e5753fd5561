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
- ``train``, ``evaluation``: the recipes; ``api``: the functions above;
- ``cli``: the `prmkit` command.
"""

from __future__ import annotations

import sys
import types
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

    if name == "train":
        importlib.import_module("prmkit.train")  # the package, made callable as it is set here (_Prmkit)
        return globals()["train"]
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class _TrainPackage(types.ModuleType):
    """The package ``prmkit.train``, callable as :func:`prmkit.api.train`.

    ``prmkit.train`` names both the package and the function. Importing any of the package's modules (as
    ``prmkit.api`` does) sets the package as this module's attribute ``train``, in place of the function; so the
    package itself is made callable, and ``prmkit.train(cfg)`` and ``prmkit.train.recipe`` both work in any order.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from prmkit.api import train

        return train(*args, **kwargs)


class _Prmkit(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and type(value) is types.ModuleType:
            value.__class__ = _TrainPackage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Prmkit


def __dir__() -> list[str]:
    return sorted(__all__)
