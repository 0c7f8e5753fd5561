"""What a model card says about a trainable kind: where a step's score is read, and plain-transformers code that reads
it there. :mod:`prmkit.hub.card` builds the rest of the card; :mod:`prmkit.kinds.registry` names these builders."""

from __future__ import annotations

import json
from typing import Any

TRANSFORMERS_SNIPPET = """\
import torch
{imports}

repo = "{repo_id}"
tokenizer = AutoTokenizer.from_pretrained(repo)
model = {model_load}
separator = {separator}  # prmkit.json: tokenization.step_separator

prompt = "Tom has 3 apples and buys 2 more. How many apples does he have?"
steps = ["Tom starts with 3 apples.", "He buys 2 more, so 3 + 2 = 5.", "The answer is 5."]


def encode(text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# As in training: the prompt and each step are tokenized on their own, the separator's tokens follow each step,
# and a step is scored at the LAST token of its separator.
input_ids = encode(prompt)
if tokenizer.bos_token_id is not None:
    input_ids = [tokenizer.bos_token_id] + input_ids
separator_ids = encode(separator)
positions = []
for step in steps:
    input_ids += encode(step) + separator_ids
    positions.append(len(input_ids) - 1)

with torch.no_grad():
    logits = model(input_ids=torch.tensor([input_ids])).logits[0]
step_scores = logits[positions].softmax(dim=-1)[:, 1].tolist()  # p(step is correct): LABEL_1
print(step_scores)
"""

LM_TAG_SNIPPET = """\
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

repo = "{repo_id}"
tokenizer = AutoTokenizer.from_pretrained(repo)
model = AutoModelForCausalLM.from_pretrained(repo).eval()
tag, good, bad = {tag}, {good}, {bad}  # prmkit.json: kind.step_tag, kind.reward_tokens

prompt = "Tom has 3 apples and buys 2 more. How many apples does he have?"
steps = ["Tom starts with 3 apples.", "He buys 2 more, so 3 + 2 = 5.", "The answer is 5."]

# As in training: "{{prompt}} {{step 1}} {{tag}}\\n{{step 2}} {{tag}}...", tokenized as one text; each step is scored
# at its tag, by the LM's logits for the two reward tokens.
input_ids = tokenizer(prompt + " " + "\\n".join(f"{{step}} {{tag}}" for step in steps), return_tensors="pt").input_ids
reward_ids = {reward_ids}
tag_id = tokenizer.encode(tag, add_special_tokens=False)[-1]
with torch.no_grad():
    logits = model(input_ids=input_ids).logits[0][:, reward_ids]
step_scores = logits.softmax(dim=-1)[:, 0][input_ids[0] == tag_id].tolist()  # p(step is correct)
print(step_scores)
"""


def transformers_snippet(repo_id: str, separator: str, adapter: bool = False) -> str:
    """Plain-transformers scoring code that places labels exactly where ``encode_solutions`` does."""
    if adapter:
        imports = "from peft import AutoPeftModelForTokenClassification\nfrom transformers import AutoTokenizer"
        model_load = "AutoPeftModelForTokenClassification.from_pretrained(repo).eval()"
    else:
        imports = "from transformers import AutoModelForTokenClassification, AutoTokenizer"
        model_load = "AutoModelForTokenClassification.from_pretrained(repo).eval()"
    return TRANSFORMERS_SNIPPET.format(
        repo_id=repo_id, separator=repr(separator), imports=imports, model_load=model_load
    )


def lm_tag_snippet(repo_id: str, kind: dict) -> str:
    """Plain-transformers scoring code for an lm-tag PRM, reading each step where :mod:`prmkit.kinds.encoder` does."""
    good, bad = kind.get("reward_tokens") or ["+", "-"]
    ids = kind.get("reward_token_ids")
    if ids:
        reward_ids = f"{list(ids)!r}  # prmkit.json: kind.reward_token_ids, the ids of [good, bad] it was trained on"
    else:  # prmkit.json from before the ids were recorded: such a model was trained on the pair's encoding
        reward_ids = 'tokenizer.encode(f"{good} {bad}", add_special_tokens=False)  # [good, bad]'
    return LM_TAG_SNIPPET.format(
        repo_id=repo_id, tag=repr(kind.get("step_tag", "ки")), good=repr(good), bad=repr(bad), reward_ids=reward_ids
    )


# -- per kind: where a step's score is read, and the card's "### transformers" lines ----------------------------------
# ``kind`` is prmkit.json's ``kind`` record ({} for a token classifier); ``adapter``: the card is a LoRA adapter's.


def separator_reads(kind: dict[str, Any]) -> str:
    return "`softmax(logits)[..., 1]` (`LABEL_1`) at the last token of the step's separator"


def separator_usage(repo_id: str, kind: dict[str, Any], separator: str, adapter: bool) -> list[str]:
    return [
        "### transformers",
        "",
        f"The step separator is `{json.dumps(separator, ensure_ascii=False)}`. Tokenize the prompt and every step "
        "separately and put the separator's tokens after each step, exactly as training did. Do not join "
        "`prompt + separator + step + ...` into one string: BPE merges characters across the boundary (with "
        "Qwen2, `.\\n` is a single token), so the separator's last token is not where the model learned to "
        "score, and the scores are wrong without any error.",
        "",
        "```python",
        transformers_snippet(repo_id, separator, adapter).rstrip(),
        "```",
        "",
    ]


def lm_tag_reads(kind: dict[str, Any]) -> str:
    good, bad = kind.get("reward_tokens") or ["+", "-"]
    return (
        f"a causal LM's softmax over the reward tokens `{good}`/`{bad}` at the tag "
        f"`{kind.get('step_tag')}` that follows each step (prmkit's `{kind.get('kind')}` kind)"
    )


def lm_tag_usage(repo_id: str, kind: dict[str, Any], separator: str, adapter: bool) -> list[str]:
    return [
        "### transformers",
        "",
        "Follow each step with the tag and tokenize the whole text at once, as training did; read the two "
        "reward tokens' logits at every tag.",
        "",
        "```python",
        lm_tag_snippet(repo_id, kind).rstrip(),
        "```",
        "",
    ]
