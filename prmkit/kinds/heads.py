"""The torch side of the kinds: the step loss (hard or soft labels), the Qwen-PRM head, the two-reward-token head.

torch is imported inside each function, so that naming a kind never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prmkit.tokenization import IGNORE_INDEX

if TYPE_CHECKING:  # pragma: no cover
    import torch


def reward_token_head(lm: Any, reward_ids: tuple[int, int]):
    """A causal LM seen as a 2-label token classifier: logits ``[wrong, correct]`` from just those two LM-head rows."""
    import torch

    class RewardTokenHead(torch.nn.Module):
        def __init__(self, lm: Any, ids: tuple[int, int]):
            super().__init__()
            self.lm = lm
            self.config = lm.config
            self.register_buffer("rows", torch.tensor([ids[1], ids[0]], dtype=torch.long), persistent=False)

        @property
        def name_or_path(self) -> str:
            return getattr(self.lm, "name_or_path", "")

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=False, **kwargs):
            from transformers.modeling_outputs import TokenClassifierOutput

            hidden = self.lm.get_decoder()(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **kwargs,
            )[0]
            head = self.lm.get_output_embeddings()
            weight = head.weight.index_select(0, self.rows)
            bias = head.bias.index_select(0, self.rows) if getattr(head, "bias", None) is not None else None
            logits = torch.nn.functional.linear(hidden, weight, bias)
            cap = getattr(self.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            return TokenClassifierOutput(logits=logits)

    return RewardTokenHead(lm, reward_ids)


def qwen_prm_class():
    """``Qwen2ForProcessRewardModel``: Qwen2.5-Math-PRM's remote-code architecture, without remote code."""
    import torch
    from transformers.modeling_outputs import TokenClassifierOutput
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2PreTrainedModel

    class Qwen2ForProcessRewardModel(Qwen2PreTrainedModel):
        # The published checkpoints also hold an unused lm_head.
        _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # noqa: RUF012 - transformers reads it as is

        def __init__(self, config):
            super().__init__(config)
            self.num_labels = 2
            self.model = Qwen2Model(config)
            self.score = torch.nn.Sequential(
                torch.nn.Linear(config.hidden_size, config.hidden_size),
                torch.nn.ReLU(),
                torch.nn.Linear(config.hidden_size, self.num_labels),
            )
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=False, **kwargs):
            hidden = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **kwargs,
            )[0]
            return TokenClassifierOutput(logits=self.score(hidden))

    return Qwen2ForProcessRewardModel


def reward_columns(logits: Any, reward_ids: tuple[int, int]) -> Any:
    """LM logits over the vocabulary -> ``[wrong, correct]`` logits, the token-classification layout."""
    return logits[..., [reward_ids[1], reward_ids[0]]]


def step_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy at labelled positions; a label is a probability that the step is correct (0/1 or soft).

    ``-(p * log q1 + (1 - p) * log q0)``, which for p in {0, 1} is exactly the usual two-class cross-entropy. The
    sum is divided by ``num_items_in_batch`` (labelled steps in the whole accumulated batch) when the Trainer gives
    it, else by the steps in this batch.

    ``label_smoothing`` (``train.label_smoothing_factor``, eps) mixes the target with the uniform one over the two
    classes: ``p' = (1 - eps) * p + eps / 2``. For a hard label that is exactly torch's
    ``cross_entropy(..., label_smoothing=eps)``; a soft label is mixed the same way.
    """
    import torch

    if hasattr(logits, "logits"):
        logits = logits.logits
    elif isinstance(logits, (tuple, list)):
        logits = logits[0]
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits[mask].float(), dim=-1)
    target = labels[mask].to(logp.dtype)
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / 2
    total = -(target * logp[:, 1] + (1.0 - target) * logp[:, 0]).sum()
    if num_items_in_batch is None:
        return total / mask.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def step_loss_func(label_smoothing: float = 0.0):
    """The Trainer's ``compute_loss_func`` for a token-classification PRM: :func:`step_loss` with this smoothing."""

    def loss_func(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        return step_loss(outputs, labels, num_items_in_batch, label_smoothing)

    return loss_func


def preprocess_logits_for_metrics(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """Keep only p(step correct) at labelled positions, -100 elsewhere: the shape of ``labels``, a fixed shape per
    batch, so gathering across ranks never waits on a rank that has a different number of steps."""
    import torch

    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    probs = torch.softmax(logits.float(), dim=-1)[..., 1]
    return torch.where(labels != IGNORE_INDEX, probs, torch.full_like(probs, float(IGNORE_INDEX)))
