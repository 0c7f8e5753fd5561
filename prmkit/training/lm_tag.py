"""Training a reward-token kind such as lm-tag (OpenRLHF's design): a causal LM, a tag after each step,
cross-entropy over two tokens."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from prmkit.errors import UsageError
from prmkit.kinds.heads import reward_columns
from prmkit.kinds.registry import get_kind
from prmkit.kinds.spec import KindSettings, ensure_tag_token, reward_token_ids


def lm_tag_loss(reward_ids: tuple[int, int], label_smoothing: float = 0.0):
    """The Trainer's ``compute_loss_func``: prmkit's step loss (hard or soft labels, smoothed as
    :func:`prmkit.kinds.heads.step_loss` says: over the two reward tokens, not the vocabulary) on the two reward
    tokens."""
    from prmkit.kinds.heads import step_loss

    def loss(outputs: Any, labels: Any, num_items_in_batch: Any = None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return step_loss(reward_columns(logits, reward_ids), labels, num_items_in_batch, label_smoothing)

    return loss


def lm_tag_preprocess(reward_ids: tuple[int, int]):
    """``preprocess_logits_for_metrics``: keep two columns of the vocabulary, so eval holds no vocab-size logits."""
    from prmkit.kinds.heads import preprocess_logits_for_metrics

    def preprocess(logits: Any, labels: Any):
        if isinstance(logits, tuple):
            logits = logits[0]
        return preprocess_logits_for_metrics(reward_columns(logits, reward_ids), labels)

    return preprocess


@dataclass
class LMTag:
    """What `train` needs for a ``train.kind`` that reads reward tokens (lm-tag): the settings, the tokens it added,
    the loss on two tokens."""

    settings: KindSettings
    new_ids: list[int]
    reward_ids: tuple[int, int]

    @classmethod
    def setup(cls, cfg: Any, tokenizer: Any) -> LMTag:
        settings = KindSettings.from_sources({**cfg.model.kind_settings(), "kind": cfg.train.kind}, None)
        added = ensure_tag_token(tokenizer, settings.tag()) if get_kind(cfg.train.kind).uses_step_tag else None
        reward = reward_token_ids(tokenizer, settings, cfg.train.kind)
        settings = replace(settings, reward_token_ids=reward)
        if added is not None and added in reward:
            raise UsageError(f"step tag {settings.tag()!r} is one of the reward tokens", hint="set model.step_tag")
        if added is not None and cfg.train.lora is not None and not cfg.train.lora_merge:
            # An unmerged adapter does not carry the embedding of a token added for training.
            raise UsageError(
                f"train.lora_merge: false cannot keep the step tag {settings.tag()!r} that "
                f"{cfg.train.kind} adds to the tokenizer",
                hint="keep train.lora_merge: true, or set model.step_tag to a token the tokenizer already has",
            )
        return cls(settings, [added] if added is not None else [], reward)

    def loss(self, label_smoothing: float = 0.0):
        return lm_tag_loss(self.reward_ids, label_smoothing)

    @property
    def preprocess(self):
        return lm_tag_preprocess(self.reward_ids)
