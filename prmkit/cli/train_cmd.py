"""`prmkit train`: fine-tune a token-classification PRM with transformers' Trainer (on accelerate)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from prmkit.cli._errors import handle_errors
from prmkit.cli._options import (
    ConfigOpt,
    FormatOpt,
    JsonOpt,
    OverwriteOpt,
    SetOpt,
    SkipInvalidOpt,
    StepSeparatorOpt,
    unescape,
)
from prmkit.cli._output import Output, attach_logging, stderr
from prmkit.config.load import load_config

ENV_LAUNCHED = "PRMKIT_LAUNCHED"  # same value as prmkit.training.recipe.ENV_LAUNCHED; kept here so --help stays fast


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def _in_distributed_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or ENV_LAUNCHED in os.environ


@handle_errors
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", "-o", help="Where the model and checkpoints go (sets train.output_dir)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Base model: a Hub id or a local directory (sets model.name_or_path)."),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer", help="Tokenizer, if not the model's: a Hub id or a local directory (sets model.tokenizer)."
        ),
    ] = None,
    tiny: Annotated[
        str | None,
        typer.Option(
            "--tiny",
            metavar="ARCH",
            help="Train a tiny random model of this architecture (qwen2, llama, mistral, gpt2, ...) for --tokenizer "
            "instead of --model: an offline smoke run on your own data (sets model.tiny).",
        ),
    ] = None,
    train_data: Annotated[str | None, typer.Option("--train", help="Training data (sets data.train).")] = None,
    eval_data: Annotated[
        str | None, typer.Option("--eval", help="Evaluation data, scored during training (sets data.eval).")
    ] = None,
    format_: FormatOpt = None,
    step_separator: StepSeparatorOpt = None,
    skip_invalid: SkipInvalidOpt = None,
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps", help="Stop after this many optimizer steps (sets train.max_steps).", min=1),
    ] = None,
    learning_rate: Annotated[
        float | None,
        typer.Option(
            "--learning-rate",
            help="Peak learning rate (sets train.learning_rate; default 1e-5, 2e-3 for --tiny and --example).",
        ),
    ] = None,
    epochs: Annotated[
        float | None,
        typer.Option("--epochs", help="Passes over the training data (sets train.num_train_epochs; default 1)."),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Random seed for weights and data order (sets train.seed; default 42).", min=0),
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(
            "--max-length", help="Longest tokenized row, prompt included (sets data.max_length; default 1024).", min=1
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue this run from the last checkpoint in --output-dir.")
    ] = False,
    resume_with_changes: Annotated[
        bool,
        typer.Option(
            "--resume-with-changes",
            help="Like --resume, but continue even when the config differs from the run's in epochs, steps, batch "
            "sizes, data or other training keys.",
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
    num_processes: Annotated[
        int | None,
        typer.Option(
            "--num-processes",
            help="Relaunch through `accelerate launch` with this many processes (GPUs; CPU processes when there is "
            "no GPU).",
            min=1,
        ),
    ] = None,
    accelerate_config: Annotated[
        Path | None,
        typer.Option(
            "--accelerate-config",
            help="An accelerate config file (multi-GPU, DeepSpeed, FSDP; see examples/) for the relaunch.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    example: Annotated[
        bool,
        typer.Option(
            "--example", help="Train offline on the bundled example data with a tiny model (a smoke run in seconds)."
        ),
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Train a process reward model and write a self-describing model directory.

    The output directory gets safetensors weights, config, tokenizer, prmkit.json (separator, tokenization, labels,
    data, hyperparameters) and prmkit_config.yaml. Checkpoints follow train.save_steps; Ctrl-C saves one first.

    Examples:

      prmkit train --example -o runs/example

      prmkit train --tiny qwen2 --tokenizer path/to/tokenizer --train my.jsonl -o runs/tiny

      prmkit train -c examples/qwen2-0.5b-math-shepherd.yaml

      prmkit train -c cfg.yaml --num-processes 4 --accelerate-config examples/accelerate/deepspeed_zero3.yaml

      accelerate launch -m prmkit train -c cfg.yaml

      prmkit train -c cfg.yaml --resume

    (Over 100 lines because its signature declares the command's options, one per parameter.)
    """
    out = Output(json_)
    main_rank = _rank() == 0
    attach_logging(out, verbose=main_rank)
    flags = {
        "train.output_dir": str(output_dir) if output_dir is not None else None,
        "model.name_or_path": model,
        "model.tokenizer": tokenizer,
        "model.tiny": tiny,
        "data.train": train_data,
        "data.eval": eval_data,
        "train.max_steps": max_steps,
        "train.learning_rate": learning_rate,
        # 2, not 2.0, in prmkit_config.yaml and `config show`, as the config file would spell it
        "train.num_train_epochs": int(epochs) if epochs is not None and float(epochs).is_integer() else epochs,
        "train.seed": seed,
        "data.max_length": max_length,
        "train.example": True if example else None,
        "data.format": format_,
        "data.step_separator": unescape(step_separator),
        "data.skip_invalid": skip_invalid,
    }
    cfg = load_config(config, set_, flags)
    resume = resume or resume_with_changes

    if ((num_processes or 1) > 1 or accelerate_config is not None) and not _in_distributed_launch():
        # Check what can be checked here, so a bad config is one clear line, not one traceback per process.
        from prmkit.models.loading import load_model_config
        from prmkit.training import recipe as training

        cfg = training.resolve_config(cfg)
        load_model_config(cfg.model)
        _plan, lock = training.claim_output_dir(
            cfg,
            overwrite=overwrite,
            resume=resume or None,
            extra_inputs=[("--accelerate-config", accelerate_config)],
            accept_changes=resume_with_changes,
        )
        lock.release()  # the launched main process takes it again
        child = _child_args(
            config,
            set_,
            output_dir,
            model,
            train_data,
            eval_data,
            max_steps,
            resume,
            overwrite,
            example,
            json_,
            tokenizer,
            tiny,
            data_flags={"--format": format_, "--step-separator": step_separator, "--skip-invalid": skip_invalid},
        )
        child += _more_child_args(flags, resume_with_changes)
        raise typer.Exit(relaunch(child, num_processes, accelerate_config))

    _quiet_libraries(main_rank)
    from prmkit import api
    from prmkit.scoring import end_distributed

    try:
        # stdout is for the result alone; a library that logs to it (DeepSpeed's logger does, whenever deepspeed is
        # installed, as soon as the Trainer starts) writes to stderr meanwhile.
        with contextlib.redirect_stdout(sys.stderr):
            result = api.train(
                cfg,
                overwrite=overwrite,
                resume=True if resume else None,
                console=stderr() if main_rank else None,
                accept_changes=resume_with_changes,
            )
    finally:
        end_distributed()
    if not main_rank:
        return
    if result.interrupted:
        where = result.checkpoint or "(no checkpoint)"
        received = result.signal or "SIGINT"
        out.warn(f"stopped by {received} at step {result.global_step}; checkpoint saved in {where}")
        out.hint(f"continue with the same command plus --resume (output directory {result.output_dir})")
        if json_:
            out.result(result.to_dict())
        raise typer.Exit(128 + signal.Signals[received].value)  # 130 for SIGINT, 143 for SIGTERM, as schedulers expect
    summary = result.to_dict()
    out.result(summary, *_tables(summary), *([_example_verdict(summary)] if cfg.train.example else []))


def _example_verdict(summary: dict[str, Any]) -> str:
    """What the example's figures mean: a newcomer cannot tell from "wrong_f1 0.0000" whether it worked."""
    history = summary.get("loss_history") or []
    worked = "it worked: the model is saved"
    if len(history) >= 2:
        first, last = history[0][1], history[-1][1]
        worked = (
            f"it worked: the model is saved and the loss fell ({first:.2f} -> {last:.2f})"
            if last < first
            else f"the model is saved, but the loss did not fall ({first:.2f} -> {last:.2f})"
        )
    metrics = summary.get("eval_metrics") or {}
    if not {"accuracy", "wrong_f1", "steps"} <= set(metrics):
        return f"example: {worked}. It is a smoke run of a tiny random model, not a useful PRM."
    share = _correct_share(summary.get("model_dir"))
    always = f' is what answering "correct" for every step scores ({share:.3f})' if share is not None else ""
    wrong = "0 means it judged no step wrong" if metrics["wrong_f1"] == 0 else f"{metrics['wrong_f1']:.2f} is low"
    auroc = f", auroc {metrics['auroc']:.2f} is near chance (0.5)" if metrics.get("auroc") is not None else ""
    return (
        f"example: {worked}. The eval figures are a tiny random model's after seconds of training, not a PRM's: "
        f"accuracy {metrics['accuracy']:.3f} on {int(metrics['steps'])} steps{always}, wrong_f1 {wrong}{auroc}. "
        "A real base model on real data (examples/*.yaml) is what lifts wrong_f1 and auroc above these."
    )


def _correct_share(model_dir: str | None) -> float | None:
    """The share of correct steps among the eval steps, from the model's prmkit.json (None when unknown)."""
    import json

    if model_dir is None:
        return None
    try:
        split = json.loads((Path(model_dir) / "prmkit.json").read_text(encoding="utf-8"))["data"]["splits"]["eval"]
        return split["labels_positive"] / (split["labels_positive"] + split["labels_negative"])
    except (OSError, TypeError, KeyError, ValueError, ZeroDivisionError):
        return None


def _quiet_libraries(main_rank: bool) -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error() if not main_rank else transformers.logging.set_verbosity_warning()


def _child_args(
    config,
    set_,
    output_dir,
    model,
    train_data,
    eval_data,
    max_steps,
    resume,
    overwrite,
    example,
    json_,
    tokenizer=None,
    tiny=None,
    data_flags: dict[str, Any] | None = None,
) -> list[str]:
    args: list[str] = []
    if config is not None:
        args += ["--config", str(config)]
    for item in set_ or []:
        args += ["--set", item]
    for flag, value in (
        ("--output-dir", output_dir),
        ("--model", model),
        ("--tokenizer", tokenizer),
        ("--tiny", tiny),
        ("--train", train_data),
        ("--eval", eval_data),
        ("--max-steps", max_steps),
    ):
        if value is not None:
            args += [flag, str(value)]
    for flag, value in (data_flags or {}).items():
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            args += [flag, str(value)]  # as typed: the child unescapes a separator again
    for flag, on in (("--resume", resume), ("--overwrite", overwrite), ("--example", example), ("--json", json_)):
        if on:
            args.append(flag)
    return args


# The training flags that _child_args does not pass on, by the config key each sets.
_MORE_FLAGS = {
    "train.learning_rate": "--learning-rate",
    "train.num_train_epochs": "--epochs",
    "train.seed": "--seed",
    "data.max_length": "--max-length",
}


def _more_child_args(flags: dict[str, Any], resume_with_changes: bool) -> list[str]:
    args = [item for key, flag in _MORE_FLAGS.items() if flags.get(key) is not None for item in (flag, str(flags[key]))]
    return args + (["--resume-with-changes"] if resume_with_changes else [])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    child_args: list[str], num_processes: int | None, accelerate_config: Path | None, cuda: bool | None = None
) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line (and extra environment) that runs `prmkit train` in N processes."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    env = {ENV_LAUNCHED: "1"}
    if accelerate_config is not None:
        cmd += ["--config_file", str(accelerate_config)]
        if num_processes is not None:
            cmd += ["--num_processes", str(num_processes)]
        if _one_machine_without_port(accelerate_config):
            # accelerate's default port, 29500, is taken by any other run on this machine: a free one instead.
            cmd += ["--main_process_port", str(_free_port())]
    else:
        n = num_processes or 1
        cmd += [
            "--num_processes",
            str(n),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
        ]
        if n > 1:
            # Without a GPU, `--cpu` would start only one process; --multi_gpu with ACCELERATE_USE_CPU gives N gloo
            # ranks.
            cmd.append("--multi_gpu")
    if not cuda:
        # Without it, processes started from a config file (FSDP, DeepSpeed) on a machine with no GPU form no process
        # group: each would train alone, all of them writing the same output.
        env["ACCELERATE_USE_CPU"] = "true"
    cmd += ["-m", "prmkit", "train", *child_args]
    return cmd, env


def _one_machine_without_port(accelerate_config: Path) -> bool:
    import yaml

    try:
        settings = yaml.safe_load(accelerate_config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return False  # accelerate reads it next, and says what is wrong with it
    return (
        isinstance(settings, dict)
        and int(settings.get("num_machines") or 1) <= 1
        and not settings.get("main_process_port")
    )


def relaunch(child_args: list[str], num_processes: int | None, accelerate_config: Path | None) -> int:
    cmd, env = launch_command(child_args, num_processes, accelerate_config)
    Output().info("launching: " + " ".join(cmd[1:]))
    try:
        return subprocess.call(cmd, env={**os.environ, **env})
    except KeyboardInterrupt:
        return 130


def _loss_text(mean: float | None, last: float | None) -> str:
    parts = [f"{mean:.4f} (mean)"] if mean is not None else []
    if last is not None:
        parts.append(f"{last:.4f} (last logged)")
    return ", ".join(parts) or "-"


def _tables(summary: dict[str, Any]) -> list:
    table = Table(title="trained" if summary["model_dir"] else "training stopped", show_header=False)
    table.add_column("")
    table.add_column("", overflow="fold")
    loss = summary.get("final_loss")
    rows = [
        ("model", summary["model_dir"]),
        (
            "steps",
            f"{summary['global_step']}/{summary['max_steps']} ({summary['epochs']:.2f} epochs, "
            f"{summary['train_rows']} rows, "
            f"{summary['world_size']} process{'es' if summary['world_size'] > 1 else ''})",
        ),
        ("time", f"{summary['seconds']:.1f} s"),
        (
            "tokens/s",
            f"{summary['tokens_per_second']:,.0f} ({summary['tokens']:,} tokens, batching {summary['batching']}"
            + (f", {summary['attn_implementation']} attention" if summary.get("attn_implementation") else "")
            + ")",
        ),
        ("train loss", _loss_text(summary.get("train_loss"), loss)),
    ]
    if summary.get("memory"):
        mem = summary["memory"]
        peak = (
            f", peak reserved {summary['peak_memory_gib']:.1f} GiB"
            if summary.get("peak_memory_gib") is not None
            else ""
        )
        rows.append(
            (
                "memory",
                f"estimated {mem['estimate']['total_gib']:.1f} GiB{peak}; gradient checkpointing "
                f"{'on' if summary.get('gradient_checkpointing') else 'off'} ({mem['reason']})",
            )
        )
    strategy = summary.get("strategy") or {}
    if strategy.get("name", "single") != "single":
        rows.append(
            (
                "strategy",
                strategy.get("description", strategy["name"])
                + (f"; asked for something else: {strategy['replaced']}" if strategy.get("replaced") else ""),
            )
        )
    if summary.get("resumed_from"):
        rows.append(("resumed from", summary["resumed_from"]))
    if summary.get("lora"):
        lora = summary["lora"]
        rows.append(("LoRA", f"r={lora['r']} alpha={lora['alpha']} {'merged' if lora['merged'] else 'adapter'}"))
    metrics = summary.get("eval_metrics") or {}
    if metrics:
        shown = [
            f"{k} {metrics[k]:.4f}" for k in ("loss", "accuracy", "correct_f1", "wrong_f1", "auroc") if k in metrics
        ]
        rows.append((f"eval ({int(metrics.get('steps', 0))} steps)", "  ".join(shown)))
    elif summary.get("eval_error"):
        rows.append(("eval", f"not run: {summary['eval_error']}"))
    if summary.get("pushed"):
        rows.append(("pushed", str(summary["pushed"].get("url") or summary["pushed"].get("repo_id"))))
    for key, value in rows:
        table.add_row(key, str(value))
    items: list = [table]
    if summary["model_dir"]:
        items.append(f"score with: prmkit score {summary['model_dir']} INPUT -o OUTPUT")
    return items
