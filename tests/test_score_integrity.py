"""`prmkit score` checks its resume files before it builds on them (issue 24, item 6).

One interrupted run is made once (three windows of 8 lines: the first committed, two batches of the second in the
journal), and each test edits a copy of its files the way a person or a stray script would, then runs the same command
again. An edited state file or partial output is refused with one line naming the file; an edited journal record is
scored again. Either way the output is never silently wrong.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from conftest import make_tiny_prm
from test_score_cli import make_rows, write_jsonl
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.errors import UsageError
from prmkit.scoring import StepScorer, output_paths, score_file
from prmkit.scoring.resume import BatchJournal, journal_path

WINDOW = 8
BUDGET = 96
SETTINGS = ["--batch-tokens", str(BUDGET), "--set", f"score.sort_window={WINDOW}"]


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, train_tokenizer_dir) -> Path:
    return make_tiny_prm(tmp_path_factory.mktemp("score-integrity") / "prm", train_tokenizer_dir, seed=13)


@pytest.fixture(scope="module")
def scorer(prm_dir) -> StepScorer:
    return StepScorer.from_pretrained(prm_dir, batch_tokens=BUDGET)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, scorer) -> Path:
    """in.jsonl, ref.jsonl (an uninterrupted run, renamed, its state complete) and out.jsonl's files after a run
    stopped at the second journal record of its second window."""
    base = tmp_path_factory.mktemp("interrupted")
    src = write_jsonl(base / "in.jsonl", make_rows(3 * WINDOW, seed=41))
    score_file(scorer, str(src), str(base / "ref.jsonl"), sort_window=WINDOW)
    original, seen = BatchJournal.record, []

    def record(self, index, targets, scores):
        original(self, index, targets, scores)
        if self.header["window"] == [WINDOW + 1, 2 * WINDOW]:
            seen.append(index)
            if len(seen) == 2:
                raise Crash

    with pytest.MonkeyPatch.context() as m:
        m.setattr(BatchJournal, "record", record)
        with pytest.raises(Crash):
            score_file(scorer, str(src), str(base / "out.jsonl"), sort_window=WINDOW)
    return base


@pytest.fixture
def run(tmp_path, interrupted) -> Path:
    """A copy of the interrupted run's directory, for one test to edit."""
    return Path(shutil.copytree(interrupted, tmp_path / "run"))


def edit_state(out: Path, change) -> None:
    """Load the state file, change it, and save it as an editor would (pretty-printed, keys in their order)."""
    path = output_paths(out)["state"]
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state, indent=2) + "\n")


def edit_journal_score(out: Path, line: int, value) -> None:
    path = journal_path(output_paths(out), 0)
    lines = path.read_text().splitlines(keepends=True)
    entry = json.loads(lines[line])
    entry["scores"][0] = value
    lines[line] = json.dumps(entry) + "\n"
    path.write_text("".join(lines))


def resume(scorer: StepScorer, run: Path, **kwargs):
    return score_file(scorer, str(run / "in.jsonl"), str(run / "out.jsonl"), sort_window=WINDOW, **kwargs)


def refused(scorer: StepScorer, run: Path) -> str:
    with pytest.raises(UsageError) as err:
        resume(scorer, run)
    assert err.value.hint.startswith("pass --overwrite to score from the start")
    assert not (run / "out.jsonl").exists()
    return err.value.message


def score_cli(prm_dir: Path, run: Path, *extra: str):
    return CliRunner().invoke(
        app, ["score", str(prm_dir), str(run / "in.jsonl"), "-o", str(run / "out.jsonl"), *SETTINGS, *extra]
    )


def test_an_untouched_interrupted_run_resumes_byte_identical(run, scorer):
    state = json.loads(output_paths(run / "out.jsonl")["state"].read_text())
    assert state["status"] == "running" and state["progress"]["input_line"] == WINDOW
    assert len(journal_path(output_paths(run / "out.jsonl"), 0).read_text().splitlines()) == 1 + 2
    summary = resume(scorer, run)
    assert summary.resumed_at_line == WINDOW and summary.batches_reused == 2
    assert (run / "out.jsonl").read_bytes() == (run / "ref.jsonl").read_bytes()


def test_a_state_marked_complete_over_a_partial_output_is_refused(run, scorer):
    edit_state(run / "out.jsonl", lambda s: s.update(status="complete"))
    message = refused(scorer, run)
    assert message == (
        f"{run / 'out.jsonl.prmkit-state.json'}: changed outside prmkit (its content does not match "
        "the sha256 it was written with)"
    )
    assert (run / "out.jsonl.partial").exists()


def test_input_line_moved_forward_is_refused(run, scorer):
    lines = (run / "in.jsonl").read_bytes().splitlines(keepends=True)

    def skip_four_lines(state):
        state["progress"]["input_line"] = WINDOW + 4
        state["progress"]["input_offset"] = sum(map(len, lines[: WINDOW + 4]))

    edit_state(run / "out.jsonl", skip_four_lines)
    assert "changed outside prmkit" in refused(scorer, run)


def test_output_bytes_reduced_is_refused(run, scorer):
    partial = (run / "out.jsonl.partial").read_bytes().splitlines(keepends=True)
    edit_state(run / "out.jsonl", lambda s: s["progress"].update(output_bytes=sum(map(len, partial[:-1]))))
    assert "out.jsonl.prmkit-state.json: changed outside prmkit" in refused(scorer, run)


def test_a_flipped_digit_in_the_partial_output_is_refused(run, scorer):
    partial = run / "out.jsonl.partial"
    data = partial.read_text()
    at = re.search(r'"step_scores": \[0\.\d\d', data).end() - 1
    partial.write_text(data[:at] + str((int(data[at]) + 1) % 10) + data[at + 1 :])
    assert refused(scorer, run) == (
        f"{partial}: its first {len(data)} bytes differ from what "
        "out.jsonl.prmkit-state.json records (sha256); it was changed outside prmkit"
    )


def test_a_flipped_digit_in_a_finished_but_not_yet_renamed_output_is_refused(run, scorer):
    # A run killed between committing "complete" and renaming: the next run renames it, if it is what was written.
    ref, partial = run / "ref.jsonl", run / "ref.jsonl.partial"
    ref.rename(partial)
    data = partial.read_text()
    partial.write_text(data.replace('"step_scores": [0.', '"step_scores": [1.', 1))
    with pytest.raises(UsageError, match=re.escape(f"{partial}: its first {len(data)} bytes differ")):
        score_file(scorer, str(run / "in.jsonl"), str(ref), sort_window=WINDOW)
    assert not ref.exists()

    partial.write_text(data)
    summary = score_file(scorer, str(run / "in.jsonl"), str(ref), sort_window=WINDOW)
    assert summary.already_complete and ref.read_text() == data and not partial.exists()


@pytest.mark.parametrize("value", [7.5, -3, "0.25"])
def test_a_journal_score_changed_by_hand_is_scored_again(run, scorer, caplog, value):
    edit_journal_score(run / "out.jsonl", 2, value)
    caplog.set_level(logging.WARNING, logger="prmkit")
    summary = resume(scorer, run)
    assert (run / "out.jsonl").read_bytes() == (run / "ref.jsonl").read_bytes()
    assert summary.batches_reused == 1  # the first record; the edited one is scored again
    assert [r.getMessage() for r in caplog.records] == [
        f"{journal_path(output_paths(run / 'out.jsonl'), 0)}: line 3 was changed outside prmkit (it fails its "
        "checksum); scoring the batches from there again"
    ]


def test_a_word_in_the_journal_is_scored_again_without_a_traceback(run, prm_dir):
    edit_journal_score(run / "out.jsonl", 1, "abc")
    res = score_cli(prm_dir, run)
    assert res.exit_code == 0, res.output
    assert (
        "line 2 was changed outside prmkit (it fails its checksum); scoring the batches from there again" in res.stderr
    )
    assert (run / "out.jsonl").read_bytes() == (run / "ref.jsonl").read_bytes()


def test_a_string_in_progress_is_refused_in_one_line(run, prm_dir):
    edit_state(run / "out.jsonl", lambda s: s.update(progress="abc"))
    res = score_cli(prm_dir, run)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert [line for line in res.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {run / 'out.jsonl.prmkit-state.json'}: changed outside prmkit (its content does not match the sha256 "
        "it was written with)"
    ]
    assert "hint: pass --overwrite to score from the start" in res.stderr
    again = score_cli(prm_dir, run, "--overwrite")
    assert again.exit_code == 0, again.output
    assert (run / "out.jsonl").read_bytes() == (run / "ref.jsonl").read_bytes()


def test_a_state_from_before_the_digests_is_refused_unless_finished(run, scorer):
    def old_format(state):
        del state["sha256"]
        del state["progress"]["output_sha256"], state["progress"]["rejects_sha256"]

    edit_state(run / "out.jsonl", old_format)
    edit_state(run / "ref.jsonl", old_format)
    message = refused(scorer, run)
    assert message == (
        f"{run / 'out.jsonl.prmkit-state.json'}: written by a prmkit that did not record checksums, so "
        "out.jsonl.partial cannot be checked before it is used"
    )
    # A finished output is left as it is: nothing more is written to it.
    summary = score_file(scorer, str(run / "in.jsonl"), str(run / "ref.jsonl"), sort_window=WINDOW)
    assert summary.already_complete and summary.counts.rows_out == 3 * WINDOW


def test_an_edited_rejects_file_is_refused(tmp_path, scorer):
    rows = [json.dumps(r) + "\n" for r in make_rows(2 * WINDOW, seed=42)]
    rows[2] = '{"prompt": "no completions"}\n'
    src = tmp_path / "in.jsonl"
    src.write_text("".join(rows))
    out = tmp_path / "out.jsonl"
    stopped: list[int] = []

    def stop_after_first_window(info):
        stopped.append(info["line"])
        raise Crash

    with pytest.raises(Crash):
        score_file(
            scorer, str(src), str(out), sort_window=WINDOW, skip_invalid=True, on_progress=stop_after_first_window
        )
    rejects = output_paths(out)["rejects_partial"]
    assert stopped == [WINDOW + 1] and '"line": 3' in rejects.read_text()  # the bad line does not count as a row
    rejects.write_text(rejects.read_text().replace('"line": 3', '"line": 4'))
    with pytest.raises(UsageError, match=re.escape(f"{rejects}: its first")):
        score_file(scorer, str(src), str(out), sort_window=WINDOW, skip_invalid=True)


def test_a_journal_record_is_only_valid_in_its_own_journal(tmp_path):
    # The same batch and scores under another header (another window, job or version) fail their checksum.
    journal = BatchJournal(tmp_path / "j", {"window": [1, 2]})
    journal.record(0, [(0, 0, 5)], [0.25])
    journal.record(1, [(1, 0, 7)], [0.5])
    journal.close()
    lines = (tmp_path / "j").read_text().splitlines(keepends=True)
    assert BatchJournal(tmp_path / "j", {"window": [1, 2]}).replay(1, [(1, 0, 7)]) == [0.5]
    (tmp_path / "j").write_text(json.dumps({"window": [3, 4]}) + "\n" + "".join(lines[1:]))
    assert BatchJournal(tmp_path / "j", {"window": [3, 4]}).done == {}
