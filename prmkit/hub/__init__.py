"""Publishing a model directory to the Hugging Face Hub: pick the files, check them, write the card, commit once.

``push_model`` is what `prmkit push` and ``train.push_to_hub`` call. It works in three steps:

1. ``plan_push`` (local only, no network): choose the files to upload (safetensors weights, config, tokenizer,
   ``prmkit.json``, the card; ``files``), run the pre-flight checks (``checks``), keep secrets and local paths out
   of what goes up (``sanitize``), and build the model card (``card``). Nothing outside the model directory is
   read, except an eval report named explicitly.
2. Compare with the remote branch (``list_repo_tree``): a file whose git blob sha1 (or LFS sha256) matches is not sent
   again, and a directory that matches completely is a no-op without a commit.
3. One ``create_commit`` with every changed file, so the repo never shows half a model.

The token comes from ``token=``, ``HF_TOKEN`` or the stored login (``huggingface_hub.get_token``); ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` are honoured by huggingface_hub itself. Hub and network failures become one-line ``PrmkitError``
messages in ``hub_error``; the token never appears in any of them.
"""

from prmkit.hub.card import build_card, is_template_card, load_eval_report
from prmkit.hub.checks import read_safetensors_header
from prmkit.hub.errors import hub_error, resolve_token
from prmkit.hub.files import PushFile, find_adapter_dir, human_size
from prmkit.hub.push import PushPlan, PushResult, plan_push, push_model, push_with_config
from prmkit.kinds.cards import transformers_snippet

__all__ = [
    "PushFile",
    "PushPlan",
    "PushResult",
    "build_card",
    "find_adapter_dir",
    "hub_error",
    "human_size",
    "is_template_card",
    "load_eval_report",
    "plan_push",
    "push_model",
    "push_with_config",
    "read_safetensors_header",
    "resolve_token",
    "transformers_snippet",
]
