"""How a config loads a scorer: the one mapping from a config to :meth:`StepScorer.from_pretrained`'s settings.

`prmkit score` reads the ``score`` section, `prmkit eval` the ``eval`` section; both read the model's loading
settings from ``model`` and the tokenization keys the user set from ``data``, and the Python API does the same
(:mod:`prmkit.api`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prmkit.config.schema import Config
from prmkit.models.model_dir import explicit_tokenization
from prmkit.scoring.engine import StepScorer

SECTIONS = ("score", "eval")


@dataclass(frozen=True)
class ScorerSettings:
    """The keywords of :meth:`prmkit.scoring.StepScorer.from_pretrained` that a config decides.

    They are also :func:`prmkit.evaluation.evaluate.evaluate`'s keywords of the same names, except ``sort_window``
    and ``packing``, which only the ``score`` section has (None: not set by the section, so not passed).
    """

    dtype: str = "auto"
    device: str = "auto"
    batch_tokens: int | None = None
    trust_remote_code: bool = False
    allow_bidirectional: bool = False
    attn_implementation: str | None = None
    kind_settings: dict[str, Any] = field(default_factory=dict)
    tokenization: dict[str, Any] = field(default_factory=dict)
    """The ``data.*`` tokenization keys the user set, applied over what the model recorded."""
    tokenizer: str | None = None
    sort_window: int | None = None
    packing: bool | None = None

    @classmethod
    def from_config(cls, cfg: Config, section: str) -> ScorerSettings:
        """The settings of ``cfg``'s ``section`` (``score`` or ``eval``); its dtype ``auto`` means ``model.dtype``."""
        if section not in SECTIONS:
            raise ValueError(f"section must be one of {', '.join(SECTIONS)}, got {section!r}")
        sec = getattr(cfg, section)
        model = cfg.model
        return cls(
            dtype=sec.dtype if sec.dtype != "auto" else model.dtype,
            device=sec.device,
            batch_tokens=sec.batch_tokens,
            trust_remote_code=model.trust_remote_code,
            allow_bidirectional=model.allow_bidirectional,
            attn_implementation=model.attn_implementation,
            kind_settings=cfg.kind_settings(),
            tokenization=explicit_tokenization(cfg.data, cfg.is_set),
            tokenizer=model.tokenizer,
            sort_window=getattr(sec, "sort_window", None),
            packing=getattr(sec, "packing", None),
        )

    def kwargs(self) -> dict[str, Any]:
        """As keyword arguments; ``sort_window`` and ``packing`` only when the section has them."""
        out = {
            "dtype": self.dtype,
            "device": self.device,
            "batch_tokens": self.batch_tokens,
            "trust_remote_code": self.trust_remote_code,
            "allow_bidirectional": self.allow_bidirectional,
            "attn_implementation": self.attn_implementation,
            "kind_settings": dict(self.kind_settings),
            "tokenization": dict(self.tokenization),
            "tokenizer": self.tokenizer,
        }
        if self.sort_window is not None:
            out["sort_window"] = self.sort_window
        if self.packing is not None:
            out["packing"] = self.packing
        return out

    def load(self, model: str, *, step_separator: str | None = None, timings: Any = None) -> StepScorer:
        """The scorer for ``model`` with these settings (``step_separator``: a command's flag, over the model's own
        and over ``data.step_separator``)."""
        return StepScorer.from_pretrained(model, step_separator=step_separator, timings=timings, **self.kwargs())
