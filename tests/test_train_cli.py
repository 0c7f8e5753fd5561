"""`prmkit train` on the command line: the example smoke run, refusals, resuming, relaunching, example configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.config.load import load_config

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_help_is_fast_and_lists_the_options():
    proc = subprocess.run(
        [sys.executable, "-m", "prmkit", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    for option in (
        "--config",
        "--set",
        "--output-dir",
        "--max-steps",
        "--resume",
        "--overwrite",
        "--num-processes",
        "--accelerate-config",
        "--example",
        "--json",
        "--model",
        "--train",
        "--eval",
    ):
        assert option in proc.stdout, option


@pytest.mark.slow
def test_example_smoke_run_refusal_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--example", "-o", str(out), "--max-steps", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["model_dir"] == str(out) and summary["global_step"] == 2 and summary["world_size"] == 1
    assert summary["tokens_per_second"] > 0 and summary["train_loss"] > 0
    assert summary["eval_metrics"]["steps"] > 400  # the bundled ProcessBench sample, scored at the end
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    meta = json.loads((out / "prmkit.json").read_text())
    assert meta["data"]["formats"] == {"train": "prm800k", "eval": "processbench"}
    assert meta["model"]["init_from_config"] is True

    again = runner.invoke(app, ["train", "--example", "-o", str(out), "--max-steps", "2"])
    assert again.exit_code == 2
    assert "already holds this run" in again.stderr and "--resume" in again.stderr
    assert "Traceback" not in again.output

    # Inside a launched process, --num-processes must not launch again.
    import prmkit.cli.train_cmd as train_cmd

    monkeypatch.setenv("PRMKIT_LAUNCHED", "1")
    monkeypatch.setattr(train_cmd, "relaunch", lambda *a, **k: pytest.fail("relaunched twice"))
    longer = runner.invoke(app, ["train", "--example", "-o", str(out), "--max-steps", "3", "--resume"])
    assert longer.exit_code == 2 and "train.max_steps (was 2, now 3)" in longer.stderr  # a longer run is asked for
    resumed = runner.invoke(
        app,
        [
            "train",
            "--example",
            "-o",
            str(out),
            "--max-steps",
            "3",
            "--resume-with-changes",
            "--num-processes",
            "2",
            "--json",
        ],
    )
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == str(out / "checkpoint-2") and summary["global_step"] == 3


@pytest.mark.slow
def test_human_summary_goes_to_stdout_and_progress_to_stderr(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--example",
            "-o",
            str(out),
            "--max-steps",
            "2",
            "--set",
            "train.logging_steps=1",
            "--set",
            "data.eval=null",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.stdout and str(out) in result.stdout and "train loss" in result.stdout
    assert "step 1/2" in result.stderr and "step 2/2" in result.stderr and "tok/s" in result.stderr
    assert "step 1/2" not in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "train.learning_rate=fast"], "train.learning_rate: expected a number"),
        (["--model", "/nonexistent/model"], "model '/nonexistent/model': no such file or directory"),
        (["--set", "train.lora={rank: 8}"], "unknown key 'rank'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["train", "--example", "-o", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_launch_command():
    from prmkit.cli.train_cmd import launch_command

    cmd, env = launch_command(["--config", "c.yaml", "--json"], 2, None, cuda=False)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("--main_process_port") + 1].isdigit()
    assert cmd[-6:] == ["-m", "prmkit", "train", "--config", "c.yaml", "--json"]
    assert env == {"PRMKIT_LAUNCHED": "1", "ACCELERATE_USE_CPU": "true"}
    cmd, env = launch_command([], 4, Path("ds.yaml"), cuda=True)
    assert cmd[3:7] == ["--config_file", "ds.yaml", "--num_processes", "4"] and "--multi_gpu" not in cmd
    assert env == {"PRMKIT_LAUNCHED": "1"}
    # A config file on a machine without a GPU: the processes still form one gloo group (they used to train alone).
    fsdp = ROOT / "examples" / "accelerate" / "fsdp-cpu.yaml"
    cmd, env = launch_command([], 2, fsdp, cuda=False)
    assert cmd[3:5] == ["--config_file", str(fsdp)] and env["ACCELERATE_USE_CPU"] == "true"
    assert cmd[cmd.index("--main_process_port") + 1].isdigit()  # one machine, no port set: a free one


def test_relaunch_checks_the_output_dir_before_starting_processes(tmp_path, monkeypatch):
    import prmkit.cli.train_cmd as train_cmd

    monkeypatch.delenv("PRMKIT_LAUNCHED", raising=False)
    monkeypatch.setattr(train_cmd, "relaunch", lambda *a, **k: pytest.fail("launched despite a bad output dir"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    result = runner.invoke(app, ["train", "--example", "-o", str(out), "--num-processes", "2"])
    assert result.exit_code == 2 and "holds no prmkit run" in result.stderr
    assert (out / "thesis.tex").read_text() == "precious"


# ---------------------------------------------------------------------------------------------------------------------
# examples/


def test_every_example_config_is_valid():
    configs = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        cfg = load_config(path)
        assert cfg.model.name_or_path and cfg.data.train, path
        assert cfg.training_arguments["output_dir"].startswith("runs/"), path
        assert "accelerate launch" in path.read_text() or "--num-processes" in path.read_text(), path
    lora = load_config(ROOT / "examples" / "qwen2-0.5b-math-shepherd-lora.yaml")
    assert lora.train.lora["r"] == 32
    seed = load_config(ROOT / "examples" / "qwen2-0.5b-math-shepherd.yaml")
    assert seed.model.name_or_path == "Qwen/Qwen2-0.5B" and seed.data.train == "trl-lib/math_shepherd:train[:10%]"
    assert seed.training_arguments["num_train_epochs"] == 1


def test_every_example_accelerate_config_is_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    found = {}
    for path in sorted((ROOT / "examples" / "accelerate").glob("*.yaml")):
        assert isinstance(yaml.safe_load(path.read_text()), dict)
        found[path.stem] = load_config_from_file(str(path)).distributed_type.value
    assert found == {"deepspeed_zero3": "DEEPSPEED", "fsdp": "FSDP", "fsdp-cpu": "FSDP", "multi_gpu": "MULTI_GPU"}


def test_train_with_no_rows_left_is_one_line(tmp_path, tiny_qwen2_config_dir):
    from conftest import write_train_rows

    rows = write_train_rows(tmp_path / "rows.jsonl", n=6)
    res = runner.invoke(
        app,
        [
            "train",
            "-m",
            str(tiny_qwen2_config_dir),
            "--train",
            str(rows),
            "-o",
            str(tmp_path / "run"),
            "--set",
            "model.init_from_config=true",
            "--set",
            "data.max_length=3",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "no train rows left: all 6 rows lost every labelled step to truncation (data.max_length=3" in res.stderr
    assert "Traceback" not in res.output


# ---------------------------------------------------------------------------------------------------------------------
# TrainingArguments that prmkit's loss, collator, sampler or metrics would bypass: refused in one line


@pytest.mark.parametrize(
    "setting,message",
    [
        ("train.label_names=[label]", "train.label_names: ['label'] cannot apply: prmkit's collator"),
        ("train.include_for_metrics=[inputs]", "train.include_for_metrics: ['inputs'] has no effect"),
        ("train.batch_eval_metrics=true", "train.batch_eval_metrics: True is not supported"),
        ("train.eval_do_concat_batches=false", "train.eval_do_concat_batches: False is not supported"),
        ("train.length_column_name=len", "train.length_column_name: 'len' names no column of prmkit's prepared data"),
        (
            "train.train_sampling_strategy=sequential",
            "train.train_sampling_strategy: 'sequential' contradicts train.batching: grouped",
        ),
    ],
)
def test_training_arguments_prmkit_would_bypass_are_refused(tmp_path, setting, message):
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", "--example", "-o", str(out), "--set", "train.batching=grouped", "--set", setting]
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists()  # refused before anything is written


def test_hub_settings_prmkit_pushes_with(tmp_path, monkeypatch):
    import prmkit.hub
    from prmkit.training.recipe import _push

    result = runner.invoke(
        app,
        [
            "train",
            "--example",
            "-o",
            str(tmp_path / "run"),
            "--set",
            "train.push_to_hub=true",
            "--set",
            "train.hub_model_id=me/prm",
            "--set",
            "train.hub_strategy=checkpoint",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "train.hub_strategy: 'checkpoint' is not supported: prmkit pushes the finished model directory once" in (
        result.stderr
    )
    # hub_revision is where prmkit's own push goes when push.revision is not set.
    calls = []
    monkeypatch.setattr(prmkit.hub, "push_model", lambda *args, **kwargs: calls.append(kwargs))
    _push(load_config(None, ["train.hub_model_id=me/prm", "train.hub_revision=v2"]), tmp_path, None)
    _push(load_config(None, ["train.hub_model_id=me/prm", "train.hub_revision=v2", "push.revision=v3"]), tmp_path, None)
    assert [c["revision"] for c in calls] == ["v2", "v3"]


def test_a_past_index_is_refused():
    from prmkit.config.training_args import check_training_arguments
    from prmkit.errors import ConfigError

    check_training_arguments({"past_index": -1, "label_names": ["labels"]}, "grouped")
    with pytest.raises(ConfigError, match="train.past_index: 0 is not supported"):
        check_training_arguments({"past_index": 0}, "padded")


# ---------------------------------------------------------------------------------------------------------------------
# The environment failing a run: one line, no traceback


def test_report_to_a_missing_integration_is_one_line(tmp_path, monkeypatch):
    import transformers.integrations.integration_utils as integrations

    monkeypatch.setattr(integrations, "is_wandb_available", lambda: False)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--example", "-o", str(out), "--set", "train.report_to=wandb"])
    assert result.exit_code == 2, result.output
    assert "train.report_to: wandb: WandbCallback requires wandb to be installed" in result.stderr
    assert "Traceback" not in result.output and not out.exists()
    unknown = runner.invoke(app, ["train", "--example", "-o", str(out), "--set", "train.report_to=wandbb"])
    assert unknown.exit_code == 2 and "train.report_to: 'wandbb' is not an integration" in unknown.stderr


def test_a_deepspeed_config_without_deepspeed_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # not importable, installed or not
    config = tmp_path / "ds.json"
    config.write_text('{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}')
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--example", "-o", str(out), "--set", f"train.deepspeed={config}"])
    assert result.exit_code == 2, result.output
    assert "train.deepspeed is set but the deepspeed package is not installed" in result.stderr
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize("value", ["1e20", "100000000000000000000"])
def test_a_batch_size_of_1e20_is_out_of_range(tmp_path, value):
    result = runner.invoke(
        app, ["train", "--example", "-o", str(tmp_path / "run"), "--set", f"train.per_device_train_batch_size={value}"]
    )
    assert result.exit_code == 2, result.output
    assert (
        "train.per_device_train_batch_size: 100000000000000000000 is out of range; expected in [1, 2147483647]"
        in result.stderr
    ) and "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize("where", ["checkpoint-1", "checkpoint-2", "final"])
def test_a_full_disk_while_saving_is_one_line(tmp_path, tiny_qwen2_config_dir, monkeypatch, where):
    import torch
    import transformers.modeling_utils
    from conftest import write_train_rows
    from safetensors import SafetensorError

    # What safetensors and torch raise when the disk fills up (measured on a full tmpfs): not OSError.
    saves = []
    real_safetensors, real_torch = transformers.modeling_utils.safe_save_file, torch.save

    def safetensors_save(*args, **kwargs):
        saves.append("model")
        if where != "checkpoint-2" and (where == "checkpoint-1" or len(saves) > 2):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_safetensors(*args, **kwargs)

    def torch_save(obj, f, *args, **kwargs):
        if where == "checkpoint-2" and len(saves) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_torch(obj, f, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", safetensors_save)
    monkeypatch.setattr(torch, "save", torch_save)
    rows = write_train_rows(tmp_path / "rows.jsonl", n=8)
    out = tmp_path / "run"
    # No rotation: its warning goes to transformers' handler, which may hold an earlier CliRunner's closed stream.
    res = runner.invoke(
        app,
        [
            "train",
            "-m",
            str(tiny_qwen2_config_dir),
            "--train",
            str(rows),
            "-o",
            str(out),
            "--max-steps",
            "2",
            "--set",
            "model.init_from_config=true",
            "--set",
            "train.save_steps=1",
            "--set",
            "train.save_total_limit=null",
        ],
    )
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    error = next(line for line in res.stderr.splitlines() if line.startswith("error:"))
    hint = next(line for line in res.stderr.splitlines() if line.startswith("hint:"))
    if where == "checkpoint-1":
        assert error == f"error: cannot save checkpoint-1 in {out}: no space left on device"
        assert "--overwrite (no checkpoint is complete)" in hint
    elif where == "checkpoint-2":
        assert error == f"error: cannot save checkpoint-2 in {out}: a file could not be written (is the disk full?)"
        assert "--resume: it continues from checkpoint-1" in hint
    else:
        assert error == f"error: cannot save the trained model in {out}: no space left on device"
        assert "--resume: it continues from checkpoint-2" in hint
    assert not (out / "prmkit.json").exists()
