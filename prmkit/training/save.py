"""The trained model's directory: weights, tokenizer and ``prmkit.json``, written beside the checkpoints.

:func:`save_final` builds the model in a hidden directory and moves it in, ``prmkit.json`` last (its presence says the
directory holds a finished model). A LoRA run saves the merged model and its adapter, or the adapter alone; a LoRA run
on a randomly initialised base keeps that base too, since it cannot be downloaded again.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from prmkit.config.schema import Config
from prmkit.core.filenames import PRMKIT_JSON
from prmkit.core.overwrite import FINAL_TMP
from prmkit.models.loading import BASE_MODEL_DIR
from prmkit.models.model_dir import build_metadata, write_metadata
from prmkit.tokenization import TokenizationParams
from prmkit.training.distributed import gathered_state_dict, merged_lora, save_lora_base, save_whole_model
from prmkit.training.result import TrainResult

log = logging.getLogger("prmkit")


def save_final(
    trainer: Any,
    cfg: Config,
    tokenizer: Any,
    prepared: Any,
    output_dir: Path,
    state: Any,
    result: TrainResult,
    lora_info: dict | None,
    batching: str,
) -> None:
    """Write the model beside the checkpoints: build it in a hidden directory, then move the files in.

    (Over 100 lines: the model, the adapter, the base and prmkit.json written in the order a reader finds them.)
    """
    tmp = output_dir / FINAL_TMP
    adapter_dir: str | None = None
    # FSDP and ZeRO-3 shard the weights: every process takes part in gathering them (None: they are whole in memory).
    full = (
        gathered_state_dict(trainer)
        if lora_info is not None and (cfg.train.lora_merge or cfg.model.init_from_config)
        else None
    )
    if lora_info is None:
        save_whole_model(trainer, str(tmp))  # gathers DeepSpeed/FSDP shards; writes on the main process only
    elif cfg.train.lora_merge:
        save_whole_model(trainer, str(tmp / "adapter"))
        if state.is_main_process:
            peft_model = trainer.accelerator.unwrap_model(trainer.model)
            merged = peft_model.merge_and_unload() if full is None else merged_lora(peft_model, full)
            merged.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        adapter_dir = "adapter"
    else:
        save_whole_model(trainer, str(tmp))
        adapter_dir = "."
        if cfg.model.init_from_config and state.is_main_process:
            # The random base cannot be downloaded again; keep it so the adapter can be loaded.
            base = trainer.accelerator.unwrap_model(trainer.model).get_base_model()
            if full is None:
                _save_base_without_lora(base, tmp / BASE_MODEL_DIR)
            else:
                save_lora_base(base, full, tmp / BASE_MODEL_DIR)
    if not state.is_main_process:
        state.wait_for_everyone()
        return
    for pickled in (tmp / "training_args.bin", tmp / "adapter" / "training_args.bin"):
        pickled.unlink(missing_ok=True)  # a pickle, not part of the model; checkpoints keep their own copy

    params = TokenizationParams.from_data_config(cfg.data)
    from prmkit.tokenization import tokenizer_fingerprint

    hyper = {k: v for k, v in cfg.training_arguments.items() if not k.startswith("hub_") and k != "output_dir"}
    training = {
        **hyper,
        "disable_dropout": cfg.train.disable_dropout,
        "world_size": state.num_processes,
        "strategy": result.strategy,
        "effective_batch_size": trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps
        * state.num_processes,
        "global_step": result.global_step,
        "epochs": result.epochs,
        "train_loss": result.train_loss,
        "final_loss": result.final_loss,
        "eval": result.eval_metrics,
        **({"eval_error": result.eval_error} if result.eval_error else {}),
        "seconds": result.seconds,
        "gradient_checkpointing": result.gradient_checkpointing,
        "gradient_checkpointing_reason": (result.memory or {}).get("reason"),
        "memory": result.memory,
        "attn_implementation": result.attn_implementation,
    }
    data = {
        **prepared.metadata.get("data", {}),
        "cache_key": prepared.metadata.get("cache_key"),
        "splits": prepared.metadata.get("splits", {}),
    }
    extra: dict[str, Any] = {
        "training": training,
        "lora": lora_info,
        "batching": batching,
        "model": {
            "init_from_config": cfg.model.init_from_config,
            "dtype": cfg.model.dtype,
            "attn_implementation": cfg.model.attn_implementation,
            "class": type(trainer.accelerator.unwrap_model(trainer.model)).__name__,
        },
    }
    if adapter_dir is not None:
        extra["adapter_dir"] = adapter_dir
    if prepared.metadata.get("kind"):
        extra["kind"] = prepared.metadata["kind"]  # score, eval and push read the lm-tag layout from here
    metadata = build_metadata(
        params, cfg.model.name_or_path, data=data, tokenizer=tokenizer_fingerprint(tokenizer), extra=extra
    )
    (output_dir / PRMKIT_JSON).unlink(
        missing_ok=True
    )  # a resumed run replaces a finished model: not finished meanwhile
    for item in tmp.iterdir():
        dest = output_dir / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(item, dest)
    tmp.rmdir()
    _check_tokenizer_round_trip(output_dir, tokenizer, cfg.model.trust_remote_code)
    # prmkit.json last: its presence says the directory holds a finished model.
    write_metadata(output_dir, metadata)
    state.wait_for_everyone()


def _check_tokenizer_round_trip(output_dir: Path, tokenizer: Any, trust_remote_code: bool) -> None:
    """Warn when the saved tokenizer loads back as something else (transformers 5 picks the tokenizer class from the
    model config's type, e.g. a plain BPE saved beside a Qwen2 config comes back as Qwen2Tokenizer)."""
    from transformers import AutoTokenizer

    if type(tokenizer).__name__ not in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return  # a model-specific class loads back as itself; only a generic one can be replaced on loading
    try:
        again = AutoTokenizer.from_pretrained(str(output_dir), trust_remote_code=trust_remote_code)
    except Exception as e:
        log.warning(f"the tokenizer saved in {output_dir} does not load back: {e}")
        return
    probes = [
        "The first equation is 3p + e = 124.\n",
        "  x\t\ty  \n\n  z",
        "Ünïcödé café 12345 ½ → ∑ 9.11 > 9.8",
        "Step 1: 40 * 0.25 = 10.ки\n",
    ]
    if len(again) != len(tokenizer) or any(
        again.encode(t, add_special_tokens=False) != tokenizer.encode(t, add_special_tokens=False) for t in probes
    ):
        log.warning(
            f"the tokenizer saved in {output_dir} loads back as {type(again).__name__}, which may tokenize "
            f"differently from the {type(tokenizer).__name__} used in training; check model.tokenizer"
        )


def _save_base_without_lora(peft_base: Any, path: Path) -> None:
    import copy

    from peft.utils import ModulesToSaveWrapper

    base = copy.deepcopy(peft_base)
    for name, module in list(base.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent = base.get_submodule(name.rsplit(".", 1)[0]) if "." in name else base
            setattr(parent, name.rsplit(".", 1)[-1], module.original_module)
    from peft.tuners.lora import LoraLayer

    for name, module in list(base.named_modules()):
        if isinstance(module, LoraLayer):
            parent = base.get_submodule(name.rsplit(".", 1)[0]) if "." in name else base
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    base.save_pretrained(str(path))
