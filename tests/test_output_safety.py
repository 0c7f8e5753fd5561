"""Nothing lost to an output: no input inside an output, --overwrite deletes nothing until the new run has something to
keep, and one run at a time per output (train and score), with the holder's PID in the refusal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fake_checkpoint, make_tiny_prm, write_train_rows
from typer.testing import CliRunner

from prmkit.cli.app import app

runner = CliRunner()


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file (hidden ones included) under ``directory`` with its bytes."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def old_run(directory: Path) -> dict[str, bytes]:
    """An output directory holding an earlier run: config, weights, a checkpoint, a note of the user's."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "prmkit_config.yaml").write_text("model: {name_or_path: old}\n")
    (directory / "model.safetensors").write_bytes(b"old weights")
    (directory / "notes.txt").write_text("the user's own notes")
    fake_checkpoint(directory / "checkpoint-3", 3)
    return snapshot(directory)


# ---------------------------------------------------------------------------------------------------------------------
# train --overwrite: an input inside the output is refused outright


@pytest.mark.parametrize(
    "case", ["train-data", "eval-data", "model", "tokenizer", "config", "cache", "linked-output", "linked-input"]
)
def test_train_overwrite_refuses_an_input_inside_the_output(tmp_path, tiny_qwen2_config_dir, case):
    victim = tmp_path / "victim"
    old_run(victim)
    args = ["train", "--example", "--overwrite", "-o", str(victim)]
    label = {
        "train-data": "data.train",
        "eval-data": "data.eval",
        "model": "model.name_or_path",
        "tokenizer": "model.tokenizer",
        "config": "--config",
        "cache": "the prepared-data cache",
        "linked-output": "data.train",
        "linked-input": "data.train",
    }[case]
    if case in ("train-data", "linked-output"):
        args += ["--train", str(write_train_rows(victim / "train.jsonl", n=4))]
    elif case == "eval-data":
        args += ["--eval", str(write_train_rows(victim / "eval.jsonl", n=4))]
    elif case == "model":  # -m runs/M -o runs/M --overwrite
        shutil.copytree(tiny_qwen2_config_dir, victim, dirs_exist_ok=True)
        args = [
            "train",
            "--overwrite",
            "-o",
            str(victim),
            "-m",
            str(victim),
            "--train",
            str(write_train_rows(tmp_path / "rows.jsonl", n=4)),
            "--set",
            "model.init_from_config=true",
        ]
    elif case == "tokenizer":
        shutil.copytree(tiny_qwen2_config_dir, victim / "tok")
        args += ["--set", f"model.tokenizer={victim / 'tok'}"]
    elif case == "config":
        (victim / "my.yaml").write_text("train:\n  learning_rate: 0.001\n")
        args += ["--config", str(victim / "my.yaml")]
    elif case == "cache":  # not with --example, which builds its model in the cache before any output is planned
        args = [
            "train",
            "--overwrite",
            "-o",
            str(victim),
            "-m",
            str(tiny_qwen2_config_dir),
            "--train",
            str(write_train_rows(tmp_path / "rows.jsonl", n=4)),
            "--set",
            "model.init_from_config=true",
            "--set",
            f"data.cache_dir={victim / 'cache'}",
        ]
    elif case == "linked-input":
        write_train_rows(victim / "train.jsonl", n=4)
        (tmp_path / "rows.jsonl").symlink_to(victim / "train.jsonl")
        args += ["--train", str(tmp_path / "rows.jsonl")]
    if case == "linked-output":
        (tmp_path / "link").symlink_to(victim, target_is_directory=True)
        args[args.index(str(victim))] = str(tmp_path / "link")
    before = snapshot(victim)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert label in result.stderr and "the output" in result.stderr and "--overwrite would replace" in result.stderr
    assert "Traceback" not in result.output
    assert snapshot(victim) == before


@pytest.mark.slow
def test_train_overwrite_refusal_as_a_real_process(tmp_path):
    victim = tmp_path / "victim"
    old_run(victim)
    write_train_rows(victim / "train.jsonl", n=4)
    before = snapshot(victim)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prmkit",
            "train",
            "--example",
            "-o",
            str(victim),
            "--overwrite",
            "--train",
            str(victim / "train.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"data.train {victim / 'train.jsonl'} lies inside the output {victim}" in proc.stderr
    assert snapshot(victim) == before


# ---------------------------------------------------------------------------------------------------------------------
# train --overwrite: nothing deleted before the new run has something to keep


def test_overwrite_that_fails_on_its_input_leaves_the_old_output_intact(tmp_path):
    victim = tmp_path / "victim"
    before = old_run(victim)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completions": ["a"], "labels": [true]}\n{"prompt": "p", "completions": 3}\n')
    result = runner.invoke(app, ["train", "--example", "-o", str(victim), "--overwrite", "--train", str(bad)])
    assert result.exit_code == 2, result.output
    assert "line 2" in result.stderr
    assert snapshot(victim) == before


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_overwrite_keeps_the_old_output_until_the_new_run_saves_a_checkpoint(tmp_path, tiny_qwen2_config_dir):
    from test_training import make_cfg
    from transformers import TrainerCallback

    from prmkit.core.checkpoints import checkpoint_problem
    from prmkit.training.recipe import train

    victim = tmp_path / "out"
    before = old_run(victim)
    rows = write_train_rows(tmp_path / "train.jsonl", n=16)
    keys = {"train__save_steps": 2}

    class CrashAt(TrainerCallback):
        def __init__(self, step: int, hook: str):
            self.step, self.hook = step, hook

        def on_step_begin(self, args, state, control, **kwargs):
            if self.hook == "step" and state.global_step == self.step:
                raise _Crash

        def on_save(self, args, state, control, **kwargs):
            if self.hook == "save" and state.global_step == self.step:
                raise _Crash

    # A crash in training before any checkpoint: the previous contents come back exactly, nothing new is left.
    with pytest.raises(_Crash):
        train(make_cfg(tmp_path, tiny_qwen2_config_dir, rows, **keys), overwrite=True, callbacks=[CrashAt(1, "step")])
    assert snapshot(victim) == before

    # A crash after the first complete checkpoint: the new run is kept (the user asked to replace the old one), and
    # resumes from that checkpoint.
    with pytest.raises(_Crash):
        train(make_cfg(tmp_path, tiny_qwen2_config_dir, rows, **keys), overwrite=True, callbacks=[CrashAt(2, "save")])
    assert sorted(p.name for p in victim.iterdir()) == ["checkpoint-2", "prmkit_config.yaml"]
    assert checkpoint_problem(victim / "checkpoint-2") is None
    done = train(make_cfg(tmp_path, tiny_qwen2_config_dir, rows, **keys), resume=True)
    assert done.global_step == 4 and done.resumed_from == str(victim / "checkpoint-2")
    assert (victim / "prmkit.json").is_file() and not (victim / "notes.txt").exists()


def test_a_killed_overwrite_is_settled_by_the_next_run(tmp_path, tiny_qwen2_config_dir):
    from test_training import make_cfg

    from prmkit.core.overwrite import REPLACED, _set_aside_contents, settle_overwrite
    from prmkit.training.run_dir import claim_output_dir

    # Killed after setting the old contents aside, before saving anything: they come back, the new files go.
    out = tmp_path / "out"
    before = old_run(out)
    _set_aside_contents(out)
    (out / "prmkit_config.yaml").write_text("the new run's config")
    fake_checkpoint(out / "checkpoint-1", marker=False).joinpath("trainer_state.json").unlink()
    rows = write_train_rows(tmp_path / "rows.jsonl", n=4)
    plan, lock = claim_output_dir(make_cfg(tmp_path, tiny_qwen2_config_dir, rows), overwrite=True)
    lock.release()
    assert plan.action == "overwrite" and snapshot(out) == before

    # Killed while setting them aside: some moved, some not yet; all come back.
    moving = out / ".prmkit-replacing"
    moving.mkdir()
    os.rename(out / "notes.txt", moving / "notes.txt")
    assert "put back the previous contents" in settle_overwrite(out)
    assert snapshot(out) == before

    # Killed after the new run saved a complete checkpoint: the new run stays, the old contents go.
    _set_aside_contents(out)
    fake_checkpoint(out / "checkpoint-2", 2)
    assert "had saved checkpoint-2; the previous contents are deleted" in settle_overwrite(out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    assert not (out / REPLACED).exists() and settle_overwrite(out) is None


class _Killed(BaseException):
    """A kill at a rename: nothing after it runs (a BaseException, so no `except Exception` carries on)."""


def kill_at_rename(monkeypatch, n: int) -> None:
    """Let ``n`` renames (os.rename, os.replace, an atomic exchange) happen; the process dies at the next one."""
    from prmkit.core import atomic

    calls = [0]

    def dying(real):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] > n:
                raise _Killed
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(os, "rename", dying(os.rename))
    monkeypatch.setattr(os, "replace", dying(os.replace))
    if hasattr(atomic, "exchange"):
        monkeypatch.setattr(atomic, "exchange", dying(atomic.exchange))


def test_every_kill_point_of_an_overwrite_is_settled_without_loss(tmp_path, monkeypatch):
    from prmkit.core.overwrite import _set_aside_contents, settle_overwrite

    def killed_at(n: int, step) -> bool:
        with monkeypatch.context() as m:
            kill_at_rename(m, n)
            try:
                step()
            except _Killed:
                return True
        return False

    # Killed while putting back the previous contents (the new run saved nothing), at each rename: the next run puts
    # back the rest. A prmkit.json already back must not read as a finished new model (and the rest be deleted).
    n, killed = 0, True
    while killed:
        out = tmp_path / f"restore-{n}"
        before = old_run(out)
        (out / "prmkit.json").write_text('{"old": "finished model"}')
        before = snapshot(out)
        _set_aside_contents(out)
        (out / "prmkit_config.yaml").write_text("the new run's config")
        fake_checkpoint(out / "checkpoint-1", marker=False).joinpath("trainer_state.json").unlink()  # incomplete
        killed = killed_at(n, lambda out=out: settle_overwrite(out))
        settle_overwrite(out)  # the next run
        assert snapshot(out) == before, f"killed at rename {n + 1} of the restore"
        n += 1
    assert n > 5  # every entry's rename was a kill point

    # Killed while setting them aside, at each rename: the next run puts them back.
    n, killed = 0, True
    while killed:
        out = tmp_path / f"aside-{n}"
        before = old_run(out)
        killed = killed_at(n, lambda out=out: _set_aside_contents(out))
        settle_overwrite(out)
        assert snapshot(out) == before, f"killed at rename {n + 1} of the set-aside"
        n += 1


@pytest.mark.parametrize("atomic_exchange", [True, False], ids=["renameat2", "two-renames"])
def test_every_kill_point_of_a_directory_swap_keeps_the_old_or_the_new(tmp_path, monkeypatch, atomic_exchange):
    import tempfile

    from prmkit.core import atomic
    from prmkit.data.prepare import _swap_in

    if not atomic_exchange:  # a system or file system without RENAME_EXCHANGE
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False, raising=False)
    else:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        if not getattr(atomic, "exchange", lambda a, b: True)(tmp_path / "a", tmp_path / "b"):
            pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or file system")
    n, killed = 0, True
    while killed:
        root = tmp_path / "swaps" / str(n)
        target = root / "prepared"
        target.mkdir(parents=True)
        (target / "data.arrow").write_text("old data")
        (target / "prmkit_prepared.json").write_text("old metadata")
        old = snapshot(target)
        new = Path(tempfile.mkdtemp(prefix=atomic.temp_prefix("prepared"), suffix=atomic.TEMP_SUFFIX, dir=root))
        (new / "data.arrow").write_text("new data, longer")
        (new / "prmkit_prepared.json").write_text("new metadata")
        fresh = snapshot(new)
        with monkeypatch.context() as m:
            kill_at_rename(m, n)
            try:
                _swap_in(new, target)
                killed = False
            except _Killed:
                pass
        with monkeypatch.context() as m:
            m.setattr(atomic, "_alive", lambda pid: False)  # the killed process is gone when the next run looks
            atomic.remove_leftovers(root, "prepared")  # what the next prepare does first
        assert [p.name for p in root.iterdir()] == ["prepared"], f"killed at rename {n + 1}"
        assert snapshot(target) in (old, fresh), f"killed at rename {n + 1}"
        assert snapshot(target) == (old if killed else fresh)
        n += 1


# ---------------------------------------------------------------------------------------------------------------------
# The same class in prepare, score and eval


def test_prepare_refuses_an_input_inside_its_output(tmp_path, train_tokenizer_dir):
    out = tmp_path / "prepared"
    out.mkdir()
    rows = write_train_rows(out / "rows.jsonl", n=4)
    before = snapshot(out)
    result = runner.invoke(
        app, ["prepare", "--train", str(rows), "--tokenizer", str(train_tokenizer_dir), "-o", str(out), "--overwrite"]
    )
    assert result.exit_code == 2, result.output
    assert f"data.train {rows} lies inside the output {out}, which prepare replaces" in result.stderr
    assert snapshot(out) == before
    # A tokenizer inside the output: the same.
    shutil.copytree(train_tokenizer_dir, out / "tok")
    result = runner.invoke(
        app,
        [
            "prepare",
            "--train",
            str(write_train_rows(tmp_path / "r.jsonl", n=4)),
            "--tokenizer",
            str(out / "tok"),
            "-o",
            str(out),
            "--overwrite",
        ],
    )
    assert result.exit_code == 2 and "tokenizer" in result.stderr and (out / "tok" / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, train_tokenizer_dir) -> Path:
    return make_tiny_prm(tmp_path_factory.mktemp("safety") / "prm", train_tokenizer_dir, seed=3)


def _rows(path: Path, n: int = 3) -> Path:
    path.write_text(
        "".join(
            json.dumps({"prompt": f"Q{i}?", "completions": ["1 plus 1.", "So 2."], "labels": [True, i % 2 == 0]}) + "\n"
            for i in range(n)
        )
    )
    return path


@pytest.mark.parametrize("case", ["output-in-model", "new-file-in-model", "input-is-rejects-file"])
def test_score_refuses_an_output_that_is_an_input_or_inside_the_model(tmp_path, prm_dir, case):
    model = tmp_path / "model"
    shutil.copytree(prm_dir, model)
    if case == "output-in-model":  # -o MODEL/model.safetensors --overwrite would delete the weights
        src, out = _rows(tmp_path / "in.jsonl"), model / "model.safetensors"
    elif case == "new-file-in-model":  # the model would change under a resumable job (and be published with it)
        src, out = _rows(tmp_path / "in.jsonl"), model / "scores.jsonl"
    else:  # the output's companion OUT.rejects.jsonl is the input
        src, out = _rows(tmp_path / "out.jsonl.rejects.jsonl"), tmp_path / "out.jsonl"
    before = {**snapshot(model), **{f"src:{src.name}": src.read_bytes()}}
    result = runner.invoke(app, ["score", str(model), str(src), "-o", str(out), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "the output" in result.stderr and ("model directory" in result.stderr or "is the input" in result.stderr)
    assert {**snapshot(model), **{f"src:{src.name}": src.read_bytes()}} == before


def test_eval_refuses_an_input_inside_its_output_dir(tmp_path, prm_dir):
    out = tmp_path / "eval"
    out.mkdir()
    data = _rows(out / "rejects.jsonl")  # a name the report owns: it would be deleted after the run
    before = data.read_bytes()
    result = runner.invoke(
        app, ["eval", str(prm_dir), "--data", str(data), "-o", str(out), "--overwrite", "--no-plots"]
    )
    assert result.exit_code == 2, result.output
    assert f"--data {data} lies inside the output {out}, which eval writes its report into" in result.stderr
    assert data.read_bytes() == before and not (out / "report.json").exists()
    model_as_output = runner.invoke(
        app,
        [
            "eval",
            str(prm_dir),
            "--data",
            str(_rows(tmp_path / "d.jsonl")),
            "-o",
            str(prm_dir),
            "--overwrite",
            "--no-plots",
        ],
    )
    assert model_as_output.exit_code == 2 and f"model {prm_dir} is the output" in model_as_output.stderr
    assert not (prm_dir / "report.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# One run per output


def _hold_lock(target: Path, command: str, seconds: float = 300) -> subprocess.Popen:
    """A separate process holding the output lock of ``target`` for ``seconds`` (or until killed)."""
    code = (
        "import sys, time; from prmkit.core.outputs import OutputLock; "
        "OutputLock(sys.argv[1], sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(float(sys.argv[3]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(target), command, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_holder_and_a_dead_holder_never_blocks(tmp_path):
    from prmkit.core.outputs import OutputBusy, OutputLock

    target = tmp_path / "runs" / "x"
    first = OutputLock(target, "prmkit train").acquire()
    assert first.path == tmp_path / "runs" / ".x.prmkit-lock" and first.path.is_file()
    with pytest.raises(
        OutputBusy, match=rf"{target} is in use by another prmkit run \(prmkit train, PID {os.getpid()}, started "
    ):
        OutputLock(target).acquire()
    # Another spelling of the same directory (a link) is the same lock.
    (tmp_path / "alias").symlink_to(tmp_path / "runs", target_is_directory=True)
    with pytest.raises(OutputBusy):
        OutputLock(tmp_path / "alias" / "x").acquire()
    first.release()
    assert not first.path.exists()
    with OutputLock(target) as again:
        assert again.held

    # A holder killed with SIGKILL leaves its lock file, with its PID, behind: it must not block.
    holder = _hold_lock(target, "prmkit score")
    with pytest.raises(OutputBusy, match=f"prmkit score, PID {holder.pid}"):
        OutputLock(target).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert json.loads((tmp_path / "runs" / ".x.prmkit-lock").read_text())["pid"] == holder.pid
    with OutputLock(target) as after:
        assert json.loads(after.path.read_text())["pid"] == os.getpid()


def test_a_second_train_into_the_same_output_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    holder = _hold_lock(out, "prmkit train")
    try:
        result = runner.invoke(app, ["train", "--example", "-o", str(out), "--max-steps", "1"])
        assert result.exit_code == 2, result.output
        assert f"{out} is in use by another prmkit run (prmkit train, PID {holder.pid}" in result.stderr
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_second_score_into_the_same_output_is_refused_naming_the_first(tmp_path, prm_dir):
    src, out = _rows(tmp_path / "in.jsonl"), tmp_path / "scored.jsonl"
    holder = _hold_lock(out, "prmkit score")
    try:
        result = runner.invoke(app, ["score", str(prm_dir), str(src), "-o", str(out)])
        assert result.exit_code == 2, result.output
        assert f"{out} is in use by another prmkit run (prmkit score, PID {holder.pid}" in result.stderr
        assert not out.exists() and not Path(str(out) + ".partial").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # Once the holder is gone (its lock file stays), scoring runs, and leaves no lock file behind.
    result = runner.invoke(app, ["score", str(prm_dir), str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 3 and not (tmp_path / ".scored.jsonl.prmkit-lock").exists()


@pytest.mark.slow
def test_two_evals_into_one_directory_write_one_whole_report_after_the_other(tmp_path):
    from eval_fixtures import write_json
    from test_eval import _fake, _pb

    from prmkit.evaluation import evaluate as evaluation
    from prmkit.evaluation import write as eval_write

    data = write_json(tmp_path / "d.json", [_pb("p1", ["ok", "bad"], 1), _pb("p2", ["ok"], -1)])
    result = evaluation.evaluate(["f"], [str(data)], load_scorer=_fake)
    out = tmp_path / "eval"
    holder = _hold_lock(out, "prmkit eval", seconds=2)  # another evaluation, in the middle of writing its report
    started = time.monotonic()
    files = eval_write.write_outputs(result, out, plots=False)
    waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert waited > 1.0  # it waited for the other writer instead of mixing its files with the other one's
    assert sorted(p.name for p in files) == ["report.json", "report.md"]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(result.report))
    assert not (tmp_path / ".eval.prmkit-lock").exists()


# ---------------------------------------------------------------------------------------------------------------------
# A model --overwrite set aside is named, with the way back


def test_score_and_eval_name_a_model_set_aside_by_overwrite(tmp_path, prm_dir, tiny_qwen2_config_dir):
    from prmkit.core.overwrite import REPLACED, _set_aside_contents

    model = tmp_path / "m"
    shutil.copytree(prm_dir, model)
    before = snapshot(model)
    aside = model / REPLACED
    src = _rows(tmp_path / "in.jsonl")
    _set_aside_contents(model)  # killed just after, or at any point before its first checkpoint
    for new_files in ([], ["prmkit_config.yaml"]):
        for name in new_files:
            (model / name).write_text("model: {name_or_path: new}\n")
        for args in (
            ["score", str(model), str(src), "-o", str(tmp_path / "out.jsonl")],
            ["eval", str(model), "--data", str(src), "-o", str(tmp_path / "eval"), "--no-plots"],
        ):
            result = runner.invoke(app, args)
            assert result.exit_code == 2, result.output
            assert (
                f"error: {model}: no finished model: `prmkit train --overwrite` set the previous model aside in "
                f"{aside}, and the new run has not finished (it is running, or was interrupted)"
            ) in result.stderr
            assert (
                f"hint: score it where it lies ({aside}); if that run was interrupted, run its `prmkit train` "
                "command again without --overwrite: that puts the previous model back, then stops"
            ) in result.stderr
    # Both ways the hint gives work: the set-aside model scores where it lies...
    result = runner.invoke(app, ["score", str(aside), str(src), "-o", str(tmp_path / "aside.jsonl")])
    assert result.exit_code == 0, result.output
    # ...and the train command, without --overwrite, puts it back, then stops.
    result = runner.invoke(
        app,
        [
            "train",
            "-m",
            str(tiny_qwen2_config_dir),
            "--train",
            str(src),
            "-o",
            str(model),
            "--set",
            "model.init_from_config=true",
            "--max-steps",
            "1",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "the previous contents are back as they were" in result.stderr
    assert snapshot(model) == before
