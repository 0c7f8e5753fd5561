"""Checkpoints: written so that an incomplete one is recognisable, checked before use, skipped (and named) on resume."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fake_checkpoint, write_train_rows

from prmkit.core.checkpoints import (
    INCOMPLETE_PREFIX,
    MARKER,
    checkpoint_problem,
    latest_complete_checkpoint,
    safetensors_problem,
)


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(keep)


# ---------------------------------------------------------------------------------------------------------------------
# Recognising an incomplete checkpoint (no training)


def test_a_complete_checkpoint_passes_and_each_kind_of_damage_is_named(tmp_path):
    good = fake_checkpoint(tmp_path / "checkpoint-1")
    assert checkpoint_problem(good) is None
    recorded = json.loads((good / MARKER).read_text())["files"]
    assert set(recorded) == {"model.safetensors", "optimizer.pt", "trainer_state.json"}
    assert recorded["model.safetensors"] == (good / "model.safetensors").stat().st_size

    # Killed while transformers was still writing: no trainer_state.json (written last), no marker.
    partial = fake_checkpoint(tmp_path / "checkpoint-2", marker=False)
    (partial / "trainer_state.json").unlink()
    assert "no trainer_state.json and no completion marker" in checkpoint_problem(partial)

    # A file cut short after the marker was written (or a copy that lost its tail).
    cut = fake_checkpoint(tmp_path / "checkpoint-3")
    size = (cut / "model.safetensors").stat().st_size
    _truncate(cut / "model.safetensors", size - 5)
    assert checkpoint_problem(cut) == f"model.safetensors has {size - 5} bytes, not the {size} it was written with"

    missing = fake_checkpoint(tmp_path / "checkpoint-4")
    (missing / "optimizer.pt").unlink()
    assert checkpoint_problem(missing) == "optimizer.pt is missing"

    # Without a marker (written by TRL or by hand) the files themselves are checked.
    legacy = fake_checkpoint(tmp_path / "checkpoint-5", marker=False)
    assert checkpoint_problem(legacy) is None
    _truncate(legacy / "optimizer.pt", 40)
    assert checkpoint_problem(legacy) == "optimizer.pt is truncated"
    weights = fake_checkpoint(tmp_path / "checkpoint-6", marker=False)
    _truncate(weights / "model.safetensors", (weights / "model.safetensors").stat().st_size - 1)
    assert "model.safetensors is truncated" in checkpoint_problem(weights)
    state = fake_checkpoint(tmp_path / "checkpoint-7", marker=False)
    (state / "trainer_state.json").write_text('{"global_step": ')
    assert checkpoint_problem(state) == "trainer_state.json is not valid JSON"
    bad_marker = fake_checkpoint(tmp_path / "checkpoint-8")
    (bad_marker / MARKER).write_text("[]")
    assert checkpoint_problem(bad_marker) == f"its {MARKER} is unreadable"


def test_safetensors_header_check_reads_only_the_header(tmp_path):
    path = fake_checkpoint(tmp_path / "c") / "model.safetensors"
    assert safetensors_problem(path) is None
    _truncate(path, 6)
    assert safetensors_problem(path) == "model.safetensors is truncated (6 bytes)"
    path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    assert "its header alone needs 1000008 bytes" in safetensors_problem(path)
    path.write_bytes((4).to_bytes(8, "little") + b"nope")
    assert safetensors_problem(path) == "model.safetensors is unreadable (JSONDecodeError)"


def test_the_newest_complete_checkpoint_is_chosen_and_newer_ones_are_named(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint-4", 4)
    fake_checkpoint(tmp_path / "checkpoint-10", 10)
    broken = fake_checkpoint(tmp_path / "checkpoint-12", 12, marker=False)
    (broken / "trainer_state.json").unlink()
    (tmp_path / "checkpoint-9").mkdir()  # older than the complete one: never looked at
    (tmp_path / "checkpoint-x").mkdir()
    last, skipped = latest_complete_checkpoint(tmp_path)
    assert last == tmp_path / "checkpoint-10"
    assert [(p.name, "trainer_state.json" in why) for p, why in skipped] == [("checkpoint-12", True)]
    assert latest_complete_checkpoint(tmp_path / "absent") == (None, [])


# ---------------------------------------------------------------------------------------------------------------------
# Training writes markers, rotates after them, and resumes past a partial checkpoint


@pytest.mark.slow
def test_resume_skips_a_partial_checkpoint_says_why_and_sets_it_aside(tmp_path, tiny_qwen2_config_dir, caplog):
    from test_training import make_cfg

    from prmkit.training.recipe import train

    rows = write_train_rows(tmp_path / "train.jsonl", n=16)
    keys = {"train__max_steps": 4, "train__save_steps": 1, "train__save_total_limit": 2}
    train(make_cfg(tmp_path, tiny_qwen2_config_dir, rows, **keys))
    out = tmp_path / "out"
    # Rotation still keeps two, and only after the newest is marked complete.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    listed = json.loads((out / "checkpoint-4" / MARKER).read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(listed)

    # What a kill while checkpoint-6 was being written leaves: weights cut short, no state, no marker.
    partial = out / "checkpoint-6"
    shutil.copytree(out / "checkpoint-4", partial)
    (partial / MARKER).unlink()
    (partial / "trainer_state.json").unlink()
    _truncate(partial / "model.safetensors", 1000)

    caplog.set_level(logging.WARNING, logger="prmkit")
    longer = {**keys, "train__max_steps": 6}
    # A longer schedule on purpose: said with accept_changes (the CLI's --resume-with-changes).
    result = train(make_cfg(tmp_path, tiny_qwen2_config_dir, rows, **longer), resume=True, accept_changes=True)
    assert result.resumed_from == str(out / "checkpoint-4") and result.global_step == 6
    assert result.skipped_checkpoints == [
        {
            "checkpoint": str(partial),
            "reason": "no trainer_state.json and no completion marker: the run stopped while writing it",
        }
    ]
    assert any("skipping checkpoint-6: incomplete" in r.getMessage() for r in caplog.records)
    # Set aside under a name transformers ignores, and step 6 written afresh, complete.
    assert (out / f"{INCOMPLETE_PREFIX}checkpoint-6" / "model.safetensors").stat().st_size == 1000
    assert checkpoint_problem(out / "checkpoint-6") is None
    assert (out / "prmkit.json").is_file()


@pytest.mark.slow
def test_resume_with_no_complete_checkpoint_is_one_line_not_a_traceback(tmp_path):
    from prmkit.config.load import dump_config, load_config
    from prmkit.training.recipe import resolve_config

    out = tmp_path / "run"
    cfg = resolve_config(load_config(None, None, {"train.output_dir": str(out), "train.example": True}))
    out.mkdir()
    (out / "prmkit_config.yaml").write_text(dump_config(cfg))
    partial = fake_checkpoint(out / "checkpoint-2", 2, marker=False)
    _truncate(partial / "model.safetensors", 20)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # The example model was built in this test's cache (PRMKIT_CACHE), which the subprocess inherits.
    proc = subprocess.run(
        [sys.executable, "-m", "prmkit", "train", "--example", "-o", str(out), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        "nothing to resume: no complete checkpoint (checkpoint-2; checkpoint-2: model.safetensors is truncated"
        in proc.stderr
    )
    assert "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched


def test_an_explicit_resume_path_is_checked(tmp_path, tiny_qwen2_config_dir):
    from test_training import make_cfg

    from prmkit.errors import UsageError
    from prmkit.training.run_dir import plan_output_dir

    rows = write_train_rows(tmp_path / "rows.jsonl", n=4)
    cfg = make_cfg(tmp_path, tiny_qwen2_config_dir, rows)
    partial = fake_checkpoint(tmp_path / "elsewhere" / "checkpoint-5", marker=False)
    (partial / "optimizer.pt").write_bytes(b"PK\x03\x04 half")
    with pytest.raises(UsageError, match="cannot resume from .*checkpoint-5: optimizer.pt is truncated"):
        plan_output_dir(cfg, resume=str(partial))


def test_an_unfinished_training_output_is_not_scored_as_a_model(tmp_path, tiny_prm_pair):
    """A run killed during its final save (or still training) has prmkit_config.yaml but no prmkit.json yet: its
    weights may be partial or stale, so score and eval refuse it instead of guessing its separator."""
    from typer.testing import CliRunner

    from prmkit.cli.app import app

    run = tmp_path / "run"
    shutil.copytree(tiny_prm_pair[0], run)
    (run / "prmkit.json").unlink()
    (run / "prmkit_config.yaml").write_text("model: {name_or_path: base}\n")
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"prompt": "Q?", "completions": ["a.", "b."]}) + "\n")
    result = CliRunner().invoke(app, ["score", str(run), str(rows), "-o", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 2, result.output
    assert f"{run}: a prmkit training run that has not finished (no prmkit.json yet)" in result.stderr
    assert "--resume" in result.stderr and not (tmp_path / "out.jsonl").exists()
