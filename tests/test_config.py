"""One config schema: precedence, errors that name file, key and type, and the template."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import ROOT
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.config.load import load_config, render_template
from prmkit.config.schema import SECTIONS, Config
from prmkit.errors import ConfigError

runner = CliRunner()


def write(tmp_path, text):
    p = tmp_path / "prmkit.yaml"
    p.write_text(text)
    return p


def test_defaults_follow_the_contract():
    cfg = Config()
    assert cfg.data.step_separator == "\n"
    assert (cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.max_completion_length) == (1024, None, None)
    assert cfg.data.train_on_last_step_only is False and cfg.data.label_threshold is None
    assert cfg.data.format == "auto" and cfg.data.prm800k_neutral == "negative"
    assert cfg.model.trust_remote_code is False
    assert cfg.training_arguments["learning_rate"] == 1e-5 and cfg.training_arguments["report_to"] == "none"
    assert cfg.train.disable_dropout is True


def test_precedence_defaults_file_set_flags(tmp_path):
    path = write(tmp_path, 'data:\n  max_length: 2048\n  step_separator: "\\n\\n"\nmodel:\n  name_or_path: a\n')
    cfg = load_config(path)
    assert cfg.data.max_length == 2048 and cfg.data.step_separator == "\n\n" and cfg.model.name_or_path == "a"
    assert cfg.data.max_prompt_length is None  # untouched default (TRL 1.13 has no prompt limit)
    cfg = load_config(path, ["data.max_length=4096", "model.name_or_path=b"])
    assert cfg.data.max_length == 4096 and cfg.model.name_or_path == "b"
    cfg = load_config(path, ["model.name_or_path=b"], {"model.name_or_path": "c", "data.train": None})
    assert cfg.model.name_or_path == "c" and cfg.data.train is None


def test_null_disables_a_limit(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  max_length: null\n"), ["data.max_prompt_length=null"])
    assert cfg.data.max_length is None and cfg.data.max_prompt_length is None


def test_tokenizer_defaults_to_the_model():
    assert load_config(None, ["model.name_or_path=m"]).tokenizer_name == "m"
    assert load_config(None, ["model.name_or_path=m", "model.tokenizer=t"]).tokenizer_name == "t"


def test_train_section_takes_training_arguments(tmp_path):
    cfg = load_config(
        write(tmp_path, "train:\n  learning_rate: 2e-5\n  num_train_epochs: 3\n  bf16: false\n  batching: grouped\n")
    )
    assert cfg.training_arguments["learning_rate"] == pytest.approx(2e-5)
    assert cfg.training_arguments["num_train_epochs"] == 3
    assert cfg.train.batching == "grouped"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data:\n  max_lenght: 5\n", "unknown key 'data.max_lenght' (did you mean 'max_length'?)"),
        ("dta:\n  train: x\n", "unknown section 'dta' (did you mean 'data'?)"),
        ("train:\n  learnig_rate: 1\n", "unknown key 'train.learnig_rate' (did you mean 'learning_rate'?)"),
        ("data:\n  max_length: lots\n", "data.max_length: expected an integer or null, got 'lots' (str)"),
        ("model:\n  trust_remote_code: 1\n", "model.trust_remote_code: expected true or false, got 1 (int)"),
        ("data:\n  prm800k_neutral: maybe\n", "data.prm800k_neutral: expected one of negative, positive, drop"),
        ("train:\n  bf16: sometimes\n", "train.bf16: expected true or false"),
        ("data: [1, 2]\n", "section 'data': expected a mapping"),
        ("data:\n  train: [\n", "invalid YAML"),
    ],
)
def test_config_errors_name_file_key_and_type(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in e.value.message
    assert expected in e.value.message


def test_set_errors():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["data.max_length"])
    with pytest.raises(ConfigError, match=r"--set: unknown key 'score.treshold' \(did you mean 'threshold'\?\)"):
        load_config(None, ["score.treshold=0.4"])


def test_template_lists_every_key_and_parses_back(tmp_path):
    text = render_template()
    data = yaml.safe_load(text)
    assert set(data) == set(SECTIONS)
    for section, cls in SECTIONS.items():
        for name in cls.__dataclass_fields__:
            assert name in data[section], f"{section}.{name} missing from the template"
    assert "# Binarize soft labels" in text
    path = tmp_path / "t.yaml"
    path.write_text(text)
    assert load_config(path).to_dict()["data"] == Config().to_dict()["data"]


def test_config_init_and_show_cli(tmp_path):
    path = tmp_path / "c.yaml"
    res = runner.invoke(app, ["config", "init", str(path)])
    assert res.exit_code == 0 and path.exists()
    assert runner.invoke(app, ["config", "init", str(path)]).exit_code == 2  # never overwrite silently
    res = runner.invoke(app, ["config", "show", "-c", str(path), "--set", "data.max_length=77"])
    assert res.exit_code == 0
    assert yaml.safe_load(res.stdout)["data"]["max_length"] == 77
    res = runner.invoke(app, ["config", "show", "--set", "data.max_lenght=77"])
    assert res.exit_code == 2 and "did you mean 'max_length'" in res.stderr and "Traceback" not in res.output


def test_help_lists_every_subcommand_and_python_m_works():
    proc = subprocess.run(
        [sys.executable, "-m", "prmkit", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0
    for name in ("prepare", "train", "eval", "score", "push", "config"):
        assert name in proc.stdout


def test_yaml_no_for_strategies_and_epoch_default(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  save_strategy: no\n  eval_strategy: steps\n"))
    assert cfg.training_arguments["save_strategy"] == "no" and cfg.training_arguments["eval_strategy"] == "steps"
    assert cfg.training_arguments["num_train_epochs"] == 1


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.max_length=0", "data.max_length: 0 is out of range; expected in [1, 2147483647]"),
        ("data.max_length=-5", "data.max_length: -5 is out of range; expected in [1, 2147483647]"),
        ("data.max_prompt_length=-1", "data.max_prompt_length: -1 is out of range; expected in [0, 2147483647]"),
        ("data.max_completion_length=0", "data.max_completion_length: 0 is out of range; expected in [1, 2147483647]"),
        ("data.label_threshold=1.5", "data.label_threshold: 1.5 is out of range; expected in [0, 1]"),
        ("data.num_proc=0", "data.num_proc: 0 is out of range; expected >= 1"),
        ("eval.threshold=-0.1", "eval.threshold: -0.1 is out of range; expected in [0, 1]"),
        ("eval.batch_tokens=0", "eval.batch_tokens: 0 is out of range; expected >= 1"),
        ("score.threshold=2", "score.threshold: 2.0 is out of range; expected in [0, 1]"),
        ("score.batch_tokens=-8", "score.batch_tokens: -8 is out of range; expected >= 1"),
        ("score.sort_window=0", "score.sort_window: 0 is out of range; expected >= 1"),
        ("score.threshold=.nan", "score.threshold: nan is out of range"),
        ("train.learning_rate=-1e-5", "train.learning_rate: -1e-05 is out of range; expected > 0"),
        ("train.learning_rate=.inf", "train.learning_rate: inf is out of range; expected > 0"),
        ("train.num_train_epochs=0", "train.num_train_epochs: 0 is out of range; expected > 0"),
        ("train.max_steps=0", "train.max_steps: 0 is out of range; expected >= 1 or -1"),
        (
            "train.per_device_train_batch_size=0",
            "train.per_device_train_batch_size: 0 is out of range; expected in [1, 2147483647] (rows per device)",
        ),
        (
            "train.per_device_eval_batch_size=1e20",  # PyYAML reads 1e20 as a string
            "train.per_device_eval_batch_size: 100000000000000000000 is out of range; expected in [1, 2147483647]",
        ),
        (
            "train.per_device_train_batch_size=2.5e0",
            "train.per_device_train_batch_size: expected an integer, got '2.5e0'",
        ),
        ("train.per_device_train_batch_size=2.5", "train.per_device_train_batch_size: expected an integer, got 2.5"),
        ("train.gradient_accumulation_steps=-1", "train.gradient_accumulation_steps: -1 is out of range"),
        ("train.warmup_steps=-2", "train.warmup_steps: -2 is out of range; expected >= 0"),
        ("train.save_steps=0", "train.save_steps: 0 is out of range; expected > 0"),
        ("train.save_total_limit=0", "train.save_total_limit: 0 is out of range; expected >= 1"),
        ("train.adam_beta2=1", "train.adam_beta2: 1 is out of range; expected in [0, 1)"),
        ("train.seed=-1", "train.seed: -1 is out of range; expected in [0, 4294967295]"),
        ("train.lora={r: 0}", "train.lora.r: 0 is out of range; expected >= 1"),
        ("train.lora={r: 8, dropout: 1}", "train.lora.dropout: 1 is out of range; expected in [0, 1)"),
        ("train.lora={r: eight}", "train.lora.r: expected an integer, got 'eight' (str)"),
    ],
)
def test_numeric_keys_are_range_checked(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.message.startswith("--set: ") and expected in e.value.message
    assert "\n" not in e.value.message


def test_range_boundaries_and_null_are_accepted():
    cfg = load_config(
        None,
        [
            "data.max_length=1",
            "data.max_prompt_length=0",
            "data.max_completion_length=null",
            "data.label_threshold=0",
            "score.threshold=1",
            "train.max_steps=-1",
            "train.warmup_steps=0",
            "train.lora={r: 1, alpha: 0.5, dropout: 0}",
        ],
    )
    assert (cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.max_completion_length) == (1, 0, None)
    assert cfg.training_arguments["max_steps"] == -1 and cfg.train.lora == {"r": 1, "alpha": 0.5, "dropout": 0}


def test_every_numeric_key_has_a_range():
    import dataclasses

    from prmkit.config.load import _resolve
    from prmkit.config.schema import RANGES, training_argument_fields

    numeric = set()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if _resolve(f.type)[0] & {int, float} and not _resolve(f.type)[0] & {bool}:
                numeric.add(f"{section}.{f.name}")
    for name, f in training_argument_fields().items():
        kinds, _ = _resolve(f.type)
        if kinds & {int, float} and not kinds & {bool, str}:
            numeric.add(f"train.{name}")
    assert numeric - set(RANGES) == set()
    assert {"data.max_length", "train.learning_rate", "score.sort_window", "train.seed"} <= numeric


def test_range_error_from_a_file_and_on_the_command_line(tmp_path):
    path = write(tmp_path, "data:\n  max_length: -5\n")
    res = runner.invoke(app, ["config", "show", "-c", str(path)])
    assert res.exit_code == 2
    assert f"{path}: data.max_length: -5 is out of range; expected in [1, 2147483647]" in res.stderr
    assert "Traceback" not in res.output
    proc = subprocess.run(
        [sys.executable, "-m", "prmkit", "score", "m", "in.jsonl", "-o", "out.jsonl", "--batch-tokens", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2 and "score.batch_tokens: 0 is out of range" in proc.stderr
    assert "Traceback" not in proc.stderr


def alias_bomb(levels: int) -> str:
    """A YAML "billion laughs": each level's list holds nine aliases of the level before."""
    parts = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def test_yaml_alias_bomb_is_refused_on_the_line_it_is_on(tmp_path):
    # Six levels are 531,441 values from a 250-byte file (was: accepted, and a 4 MB error message).
    path = write(tmp_path, "data:\n  max_length: 8\nmodel:\n  system_prompt: " + alias_bomb(6) + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message == (
        f"{path}: line 4: too large (more than 100,000 values or 10,000,000 characters once its aliases are expanded)"
    )
    with pytest.raises(ConfigError, match=r"^--set model.system_prompt: more than 100,000 values"):
        load_config(None, ["model.system_prompt=" + alias_bomb(6)])
    with pytest.raises(ConfigError, match="an alias inside the value it refers to"):
        load_config(write(tmp_path, "model:\n  system_prompt: &a [x, *a]\n"))


def test_a_value_shown_in_a_message_is_cut(tmp_path):
    # Five levels (59,049 values) pass the alias limit; the message shows the start of the value only (was: 480 KB).
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "model:\n  system_prompt: " + alias_bomb(5) + "\n"))
    assert e.value.message.startswith(
        f"{tmp_path / 'prmkit.yaml'}: model.system_prompt: expected a string or null, got [['lol', 'lol', 'lol',"
    )
    assert e.value.message.endswith("... (list)") and len(e.value.message) < 300 + len(str(tmp_path)) + 100
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.max_length=" + "x" * 100_000])
    assert len(e.value.message) < 400 and e.value.message.startswith("--set: data.max_length: expected an integer")
    # PyYAML reads 100,000 digits as an integer, which Python refuses to convert (was: a ValueError traceback).
    with pytest.raises(ConfigError, match="data.max_length: expected an integer or null, got '99999"):
        load_config(None, ["data.max_length=" + "9" * 100_000])
    with pytest.raises(ConfigError, match=r"prmkit.yaml: invalid YAML \(Exceeds the limit"):
        load_config(write(tmp_path, "data:\n  max_length: " + "9" * 100_000 + "\n"))
