"""A new user's first hour (issue 23): a separator in single quotes, resuming with a changed config, what `config show`
prints, the training flags and readable help, a SIGTERM's exit code, and what the bundled example's figures mean."""

from __future__ import annotations

import json
import re
import signal

import pytest
import yaml
from conftest import fake_checkpoint, prmkit_log, write_train_rows
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.config.load import dump_config, load_config
from prmkit.errors import ConfigError, UsageError

runner = CliRunner()


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --- 1. A separator's backslash escapes mean the same in YAML, --set and --step-separator ---------------------------


def test_a_single_quoted_separator_is_read_as_the_command_line_reads_it_with_a_warning(tmp_path, train_tokenizer_dir):
    single = write(tmp_path / "single.yaml", "data:\n  step_separator: '\\n'\n")  # a backslash and an n, in YAML
    with prmkit_log() as records:
        cfg = load_config(single)
    assert cfg.data.step_separator == "\n"
    [warning] = [r.getMessage() for r in records if "backslash escape" in r.getMessage()]
    assert f"{single}: data.step_separator: '\\n'" in warning and "read as a line break" in warning
    assert 'write it in double quotes: step_separator: "\\n"' in warning
    # --set spells it as a shell user types it; the fix names the quoting that YAML reads.
    with prmkit_log() as records:
        assert load_config(None, ["data.step_separator=\\t"]).data.step_separator == "\t"
    assert any("--set 'data.step_separator=\"\\t\"'" in r.getMessage() for r in records)
    # In double quotes YAML has read the escapes: the value stays as it is, without a word, and a separator holding a
    # backslash survives prmkit_config.yaml (written double-quoted) unchanged.
    with prmkit_log() as records:
        assert (
            load_config(write(tmp_path / "double.yaml", 'data:\n  step_separator: "\\n"\n')).data.step_separator == "\n"
        )
        literal = load_config(None, ['data.step_separator="a\\\\nb"'])
        assert literal.data.step_separator == "a\\nb"
        assert load_config(write(tmp_path / "saved.yaml", dump_config(literal))).data.step_separator == "a\\nb"
    assert not records

    # prepare builds the same dataset from the YAML file as from --step-separator '\n': steps are separated.
    rows = write(
        tmp_path / "rows.jsonl", json.dumps({"prompt": "p", "completions": ["a", "b"], "labels": [1, 0]}) + "\n"
    )
    metas = []
    for name, args in (("yaml", ["-c", single]), ("flag", ["--step-separator", "\\n"])):
        res = runner.invoke(
            app,
            [
                "prepare",
                "--train",
                str(rows),
                "--tokenizer",
                str(train_tokenizer_dir),
                "-o",
                str(tmp_path / name),
                *map(str, args),
            ],
        )
        assert res.exit_code == 0, res.output
        metas.append(json.loads((tmp_path / name / "prmkit_dataset.json").read_text()))
    assert metas[0]["tokenization"]["step_separator"] == metas[1]["tokenization"]["step_separator"] == "\n"
    assert metas[0]["cache_key"] == metas[1]["cache_key"]
    shown = runner.invoke(app, ["config", "show", "-c", str(single)])
    assert '  step_separator: "\\n"\n' in shown.stdout and "double quotes" in shown.stderr


# --- 2. Resuming with a changed config ------------------------------------------------------------------------------


def _run_dir(tmp_path, tiny_qwen2_config_dir, **train):
    rows = write_train_rows(tmp_path / "rows.jsonl", n=8)
    base = {
        "model.name_or_path": str(tiny_qwen2_config_dir),
        "model.init_from_config": True,
        "data.train": str(rows),
        "train.output_dir": str(tmp_path / "out"),
        "train.per_device_train_batch_size": 4,
    }
    cfg = load_config(None, None, {**base, **{f"train.{k}": v for k, v in train.items()}})
    return base, cfg


def test_resuming_with_a_changed_schedule_names_every_key_and_needs_resume_with_changes(
    tmp_path, tiny_qwen2_config_dir
):
    from prmkit.training.run_dir import plan_output_dir

    base, ran = _run_dir(tmp_path, tiny_qwen2_config_dir, num_train_epochs=10, logging_steps=5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "prmkit_config.yaml").write_text(dump_config(ran))
    fake_checkpoint(out / "checkpoint-114", 114)
    # The user resumes and leaves out the epochs (and changes the batch size and the logging cadence).
    again = load_config(None, None, {**base, "train.per_device_train_batch_size": 2, "train.logging_steps": 1})
    with pytest.raises(UsageError) as err:
        plan_output_dir(again, resume=True)
    assert err.value.message == (
        f"cannot resume {out} with a config that differs from its prmkit_config.yaml: "
        "train.num_train_epochs (was 10, now 1), train.per_device_train_batch_size (was 4, now 2)"
    )
    assert "--resume-with-changes" in err.value.hint
    with prmkit_log() as records:
        plan = plan_output_dir(again, resume=True, accept_changes=True)
    assert plan.action == "resume" and plan.checkpoint == str(out / "checkpoint-114")
    said = [r.getMessage() for r in records]
    assert any("train.num_train_epochs (was 10, now 1)" in m for m in said)
    assert any("logging" in m and "train.logging_steps (was 5, now 1)" in m for m in said)
    # A key that only says how often to log or save is a warning, never a refusal.
    cadence = load_config(None, None, {**base, "train.num_train_epochs": 10, "train.save_steps": 7})
    with prmkit_log() as records:
        assert plan_output_dir(cadence, resume=True).action == "resume"
    assert any(
        "train.save_steps (was 500, now 7)" in r.getMessage() and "train.logging_steps" in r.getMessage()
        for r in records
    )
    # The same key spelled out in one config and left to its default in the other is no change.
    spelled = load_config(
        None,
        None,
        {**base, "train.num_train_epochs": 10, "train.logging_steps": 5, "train.gradient_accumulation_steps": 1},
    )
    assert plan_output_dir(spelled, resume=True).action == "resume"
    # Another model's checkpoints cannot be resumed, whatever is accepted.
    other = load_config(None, None, {**base, "model.name_or_path": str(tmp_path), "train.num_train_epochs": 10})
    with pytest.raises(UsageError, match="checkpoints are of another model: model.name_or_path"):
        plan_output_dir(other, resume=True, accept_changes=True)

    res = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_qwen2_config_dir),
            "--set",
            "model.init_from_config=true",
            "--train",
            base["data.train"],
            "-o",
            str(out),
            "--set",
            "train.per_device_train_batch_size=4",
            "--resume",
        ],
    )
    assert res.exit_code == 2, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: cannot resume {out} with a config that differs from its prmkit_config.yaml: "
        "train.num_train_epochs (was 10, now 1)"
    ]


# --- 4. `config show` prints what a command will use; every config error at once ----------------------------------


def test_config_show_prints_what_train_will_use_marked_as_derived(tmp_path, train_tokenizer_dir):
    from prmkit.cli.config_show import BUILT, derived_settings
    from prmkit.training.recipe import resolve_config

    path = write(
        tmp_path / "tiny.yaml",
        f"model:\n  tiny: qwen2\n  tokenizer: {train_tokenizer_dir}\ndata:\n  train: rows.jsonl\n  eval: eval.jsonl\n",
    )
    res = runner.invoke(app, ["config", "show", "-c", str(path)])
    assert res.exit_code == 0, res.output
    assert "  learning_rate: 0.002  # derived: model.tiny\n" in res.stdout
    assert "  eval_strategy: steps  # derived: data.eval is set\n" in res.stdout
    assert yaml.safe_load(res.stdout)["train"]["learning_rate"] == 2e-3
    shown = json.loads(runner.invoke(app, ["config", "show", "-c", str(path), "--json"]).stdout)
    assert shown["train"]["learning_rate"] == 2e-3 and shown["derived"]["train.learning_rate"] == "model.tiny"
    # Every value shown as derived is the one train resolves (the example's as well; the evaluation schedule and a
    # kind's tag are derived later, when the Trainer and the kind are set up, from the same functions).
    for source, overrides in ((path, None), (None, ["train.example=true", "train.kind=lm-tag"])):
        derived = derived_settings(load_config(source, overrides))
        resolved = resolve_config(load_config(source, overrides)).to_dict()
        for dotted, value, _why in derived:
            section, _, key = dotted.partition(".")
            if value is not BUILT and key not in ("eval_strategy", "eval_steps", "step_tag"):
                assert resolved[section][key] == value, dotted
    assert ("model.step_tag", "ки", "train.kind lm-tag") in derived
    assert ("train.learning_rate", 2e-3, "train.example") in derived


def test_every_config_error_is_reported_at_once(tmp_path):
    path = write(tmp_path / "c.yaml", "modle: {}\ndata:\n  max_lenght: 5\ntrain:\n  learning_rate: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["eval.threshold=2"], {"score.batch_tokens": 0})
    assert err.value.message == "5 problems in the config:"
    assert err.value.problems == [
        f"{path}: unknown section 'modle' (did you mean 'model'?)",
        f"{path}: unknown key 'data.max_lenght' (did you mean 'max_length'?)",
        f"{path}: train.learning_rate: expected a number, got 'fast'",
        "--set: eval.threshold: 2.0 is out of range; expected in [0, 1]",
        "command line: score.batch_tokens: 0 is out of range; expected >= 1",
    ]
    res = runner.invoke(app, ["config", "show", "-c", str(path)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.count("error:") == 4 and "did you mean 'model'" in res.stderr and "got 'fast'" in res.stderr


# --- 9. Common training flags, one meaning of -m, help readable at 80 columns ---------------------------------------


def _capture_train(monkeypatch):
    import prmkit.training.recipe as training

    seen = {}

    def fake_train(cfg, **kwargs):
        seen.update(cfg=cfg, **kwargs)
        raise UsageError("stopped by the test")

    monkeypatch.setattr(training, "train", fake_train)
    return seen


def test_training_flags_set_their_keys_and_win_over_set(monkeypatch):
    seen = _capture_train(monkeypatch)
    res = runner.invoke(
        app,
        [
            "train",
            "--example",
            "--set",
            "train.learning_rate=1e-4",
            "--learning-rate",
            "3e-4",
            "--epochs",
            "2",
            "--seed",
            "7",
            "--max-length",
            "512",
            "--set",
            "data.max_length=64",
        ],
    )
    assert "stopped by the test" in res.stderr, res.output
    cfg = seen["cfg"]
    assert cfg.training_arguments["learning_rate"] == 3e-4  # a command's own flag beats --set, as the README says
    assert cfg.training_arguments["num_train_epochs"] == 2 and cfg.training_arguments["seed"] == 7
    assert cfg.data.max_length == 512
    assert {"train.learning_rate", "train.num_train_epochs", "train.seed", "data.max_length"} <= cfg.explicit
    res = runner.invoke(app, ["train", "--example", "--learning-rate", "0"])
    assert res.exit_code == 2 and "train.learning_rate: 0.0 is out of range; expected > 0" in res.stderr


def _all_commands():
    from typer.main import get_command

    def walk(group, path):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield [*path, name], cmd
                yield from walk(cmd, [*path, name])
            else:
                yield [*path, name], cmd

    root = get_command(app)
    return [([], root), *walk(root, [])]


def test_short_options_mean_one_thing_in_every_command():
    meaning: dict[str, set[str]] = {}
    for _path, cmd in _all_commands():
        for param in getattr(cmd, "params", []):
            longs = [o for o in param.opts if o.startswith("--")]
            for short in (o for o in param.opts if re.fullmatch(r"-\w", o)):
                meaning.setdefault(short, set()).update(longs)
    assert meaning["-m"] == {"--model"} and meaning["-c"] == {"--config"}
    assert all(len(longs) == 1 for short, longs in meaning.items() if short != "-o"), meaning
    assert meaning["-o"] <= {"--output", "--output-dir"}  # where the command writes: a file or a directory


def test_every_help_is_readable_at_80_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TERMINAL_WIDTH", "80")
    for path, cmd in _all_commands():
        res = runner.invoke(app, [*path, "--help"], terminal_width=80)
        assert res.exit_code == 0, (path, res.output)
        text = res.stdout
        where = f"prmkit {' '.join(path)} --help"
        cut = [
            line
            for line in text.splitlines()
            if "…" in line or (re.search(r"\S\.\.\.$", line) and not line.startswith("Usage:"))
        ]  # click ends a cut short help with "..."
        assert not cut, (where, cut)
        assert max(len(line) for line in text.splitlines()) <= 80, where
        for param in getattr(cmd, "params", []):
            for name in (*param.opts, *param.secondary_opts):
                if name.startswith("-"):
                    assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{where}: {name}"
            for key in re.findall(r"\b[a-z]+\.[a-z_]+\b", getattr(param, "help", None) or ""):
                if key.split(".")[0] in ("model", "data", "train", "eval", "score", "push"):
                    assert re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", text), f"{where}: {key}"


# --- 12. SIGTERM: named, and exit 143 ---------------------------------------------------------------------------------


def test_a_run_stopped_by_sigterm_exits_143_and_says_so(monkeypatch, tmp_path):
    import prmkit.training.recipe as training

    stopped = training.TrainResult(
        output_dir=str(tmp_path),
        model_dir=None,
        global_step=3,
        interrupted=True,
        signal="SIGTERM",
        checkpoint=str(tmp_path / "checkpoint-3"),
    )
    monkeypatch.setattr(training, "train", lambda cfg, **kwargs: stopped)
    res = runner.invoke(app, ["train", "--example", "-o", str(tmp_path)])
    assert res.exit_code == 143, res.output
    assert "stopped by SIGTERM at step 3" in res.stderr and "Ctrl-C" not in res.stderr
    stopped.signal = "SIGINT"
    assert runner.invoke(app, ["train", "--example", "-o", str(tmp_path)]).exit_code == 130


def test_a_second_signal_exits_with_its_own_code():
    import typer

    from prmkit.cli._errors import handle_errors
    from prmkit.errors import Interrupted

    @handle_errors
    def stopped_twice():
        raise Interrupted(signal.SIGTERM)

    with pytest.raises(typer.Exit) as e:
        stopped_twice()
    assert e.value.exit_code == 143


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_names_the_signal(tmp_path, tiny_qwen2_config_dir):
    import os

    from transformers import TrainerCallback

    from prmkit.training.recipe import train

    class Term(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    _base, cfg = _run_dir(tmp_path, tiny_qwen2_config_dir, max_steps=4, save_steps=100, logging_steps=1)
    before = signal.getsignal(signal.SIGTERM)
    with prmkit_log() as records:
        result = train(cfg, callbacks=[Term()])
    assert result.interrupted and result.signal == "SIGTERM" and result.global_step == 2
    assert result.checkpoint == str(tmp_path / "out" / "checkpoint-2")
    [said] = [r.getMessage() for r in records if "received" in r.getMessage()]
    assert (
        said == "SIGTERM received: saving a checkpoint after this step; a second SIGTERM or Ctrl-C stops without saving"
    )
    assert signal.getsignal(signal.SIGTERM) is before


# --- 13. The bundled example says what its figures mean ---------------------------------------------------------------


def test_the_example_data_warning_says_what_to_do():
    from prmkit.data.formats import Options
    from prmkit.data.sources import read_step_rows
    from prmkit.training.example import EXAMPLE_TRAIN

    with prmkit_log() as records:
        read_step_rows(str(EXAMPLE_TRAIN), "prm800k", Options(), "\n", skip_invalid=False)
    [said] = [r.getMessage() for r in records if "contain the separator" in r.getMessage()]
    assert re.search(r"prm800k_samples.jsonl: \d+ of \d+ steps contain the separator '\\n'", said)
    assert "Harmless where steps span lines on purpose" in said and "data.step_separator" in said


def test_the_example_verdict_explains_the_figures(tmp_path):
    from prmkit.cli.train_cmd import _example_verdict

    (tmp_path / "prmkit.json").write_text(
        json.dumps({"data": {"splits": {"eval": {"labels_positive": 437, "labels_negative": 60}}}})
    )
    summary = {
        "model_dir": str(tmp_path),
        "loss_history": [[5, 0.6223], [75, 0.3037]],
        "eval_metrics": {"accuracy": 0.8793, "wrong_f1": 0.0, "auroc": 0.5681, "steps": 497.0},
    }
    line = _example_verdict(summary)
    assert line.startswith("example: it worked: the model is saved and the loss fell (0.62 -> 0.30).")
    assert 'accuracy 0.879 on 497 steps is what answering "correct" for every step scores (0.879)' in line
    assert "wrong_f1 0 means it judged no step wrong, auroc 0.57 is near chance (0.5)" in line
    assert "\n" not in line
    flat = _example_verdict({**summary, "loss_history": [[5, 0.5], [75, 0.7]]})
    assert flat.startswith("example: the model is saved, but the loss did not fall (0.50 -> 0.70).")


@pytest.mark.slow
def test_the_example_ends_with_the_verdict(tmp_path):
    res = runner.invoke(
        app, ["train", "--example", "-o", str(tmp_path / "run"), "--max-steps", "4", "--set", "train.logging_steps=1"]
    )
    assert res.exit_code == 0, res.output
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("example: ") and "the model is saved" in last and "accuracy" in last and "auroc" in last
