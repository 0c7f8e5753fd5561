"""Loss, batching and step metrics for training: hard and soft step labels, padded/grouped/packed batches."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prmkit.tokenization import IGNORE_INDEX

if TYPE_CHECKING:  # pragma: no cover
    pass


log = logging.getLogger("prmkit")


class StepCollator:
    """Pads (``padded``/``grouped``) or concatenates (``packed``) tokenized rows into a batch.

    ``packed`` gives one row of all sequences with ``position_ids`` restarting at 0 and no attention mask; transformers
    then keeps each sequence to itself (a block-diagonal mask, or flash-attention's variable-length kernel).

    Padding goes on the right. For a ``causal`` model that makes the attention mask redundant: a real token attends
    only to earlier positions, and every pad comes after the last real token, so the outputs at real (and labelled)
    positions are the same with or without it. Leaving it out lets SDPA/flash-attention take the plain causal path
    (no mask tensor, upper triangle skipped). Bidirectional models keep the mask.

    ``n_tokens`` (real tokens in the batch) is for the token meter; the trainer removes it before the forward pass.
    """

    def __init__(self, pad_token_id: int, mode: str = "padded", soft_labels: bool = False, causal: bool = False):
        if mode not in ("padded", "grouped", "packed"):
            raise ValueError(f"unknown batching mode {mode!r}")
        self.pad_token_id = int(pad_token_id)
        self.packed = mode == "packed"
        self.soft_labels = soft_labels
        self.causal = causal

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        # Whole rows are copied at once (numpy slices, one concatenate); nothing loops over tokens in Python.
        import numpy as np
        import torch

        label_dtype = np.float32 if self.soft_labels else np.int64
        ids = [np.asarray(f["input_ids"], dtype=np.int64) for f in features]
        labels = [np.asarray(f["labels"], dtype=label_dtype) for f in features]
        lengths = np.fromiter((len(seq) for seq in ids), dtype=np.int64, count=len(ids))
        if self.packed:
            starts = np.cumsum(lengths) - lengths
            total = int(lengths.sum())
            positions = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
            batch = {
                "input_ids": torch.from_numpy(np.concatenate(ids)[None, :]),
                "position_ids": torch.from_numpy(positions[None, :]),
                "labels": torch.from_numpy(np.concatenate(labels)[None, :]),
            }
        else:
            width = int(lengths.max())
            input_ids = np.full((len(ids), width), self.pad_token_id, dtype=np.int64)
            label_array = np.full((len(ids), width), IGNORE_INDEX, dtype=label_dtype)
            for i, (seq, lab) in enumerate(zip(ids, labels)):
                input_ids[i, : len(seq)] = seq
                label_array[i, : len(lab)] = lab
            batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(label_array)}
            if not self.causal:
                batch["attention_mask"] = torch.from_numpy(
                    (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
                )
        batch["n_tokens"] = torch.tensor(int(lengths.sum()), dtype=torch.long)
        if features and "row" in features[0]:
            batch["row"] = torch.tensor([int(f["row"]) for f in features], dtype=torch.long)
        return batch


class LengthGroupedSampler:
    """Random batches of similar length: shuffle, sort within mega-batches of 50 batches, shuffle the batches.

    Unlike transformers' sampler it draws from its own generator seeded by (seed, epoch), so a resumed run replays
    exactly the order the interrupted one would have used, and every rank draws the same order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega_batches: int = 50):
        self.lengths = list(lengths)
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self.mega = self.batch_size * mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        import torch

        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        ordered: list[int] = []
        for start in range(0, len(perm), self.mega):
            ordered += sorted(perm[start : start + self.mega], key=self.lengths.__getitem__, reverse=True)
        batches = [ordered[i : i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
        last = batches.pop() if batches and len(batches[-1]) < self.batch_size else None
        order = torch.randperm(len(batches), generator=g).tolist()
        out = [i for b in order for i in batches[b]]
        if last:
            out += last  # the one short batch stays last, so every other batch keeps its boundaries
        return iter(out)


def resolve_batching(
    requested: str, attn_implementation: str | None, *, cuda: bool, causal: bool = True, kernels: Sequence[str] = ()
) -> tuple[str, str | None]:
    """(batching, attn_implementation) for a run: pack where a variable-length kernel makes packing pay.

    ``auto`` packs on CUDA when the model is causal and a kernel in ``kernels`` (see
    :func:`prmkit.training.kernels.varlen_kernels_available`)
    is chosen or can be; otherwise it groups by length (on CPU, padded length-sorted batches run faster than packs
    with a dense block mask). A packed run without a chosen kernel gets the best available one. An attention
    implementation the user chose is kept as it is.
    """
    varlen = attn_implementation is not None and attn_implementation.startswith(("flash_attention", "flex_attention"))
    if requested == "auto":
        if cuda and causal and (varlen or (attn_implementation is None and kernels)):
            requested = "packed"
        else:
            return "grouped", attn_implementation
    if requested == "packed" and attn_implementation is None and cuda and kernels:
        return "packed", kernels[0]
    return requested, attn_implementation


def make_compute_metrics(threshold: float = 0.5):
    """Step-level metrics over every labelled step of the eval set (prmkit.metrics.step_metrics)."""
    import numpy as np

    from prmkit.metrics import step_metrics

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        preds = np.asarray(eval_pred.predictions, dtype=np.float64)
        labels = np.asarray(eval_pred.label_ids, dtype=np.float64)
        mask = (labels != IGNORE_INDEX) & (preds != IGNORE_INDEX)
        if not mask.any():
            return {}
        m = step_metrics(preds[mask], labels[mask], threshold=threshold)
        keys = ("accuracy", "correct_f1", "wrong_f1", "prm_score", "auroc", "log_loss", "brier", "ece")
        out = {k: float(m[k]) for k in keys if m.get(k) is not None}
        out["steps"] = float(m["n"])
        return out

    return compute_metrics
