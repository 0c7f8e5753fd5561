"""`prmkit score --group-by FIELD [--select best] [--aggregate AGG]`: Best-of-N in one command, streaming and
resumable, selecting exactly what a `jq 'group_by(.FIELD) | map(max_by(.aggregates.AGG))'` over the full output does."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from itertools import groupby
from pathlib import Path

import pytest
from conftest import make_tiny_prm
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.errors import DataError
from prmkit.metrics import aggregate
from prmkit.scoring import GroupSpec, StepScorer, output_paths, score_file

runner = CliRunner()
WORDS = [
    "apples",
    "pears",
    "plus",
    "minus",
    "equals",
    "twice",
    "half",
    "total",
    "left",
    "each",
    "so",
    "then",
    "we",
    "have",
    "the",
    "answer",
    "is",
]


def candidates(groups: int, seed: int = 0, sizes: tuple[int, int] = (1, 9), fixed: int | None = None) -> list[dict]:
    """Short stepwise candidates, each group's lines together; ``fixed`` gives every group that many."""
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        for c in range(fixed or rng.randint(*sizes)):
            steps = [f"{rng.randint(0, 99)} {rng.choice(WORDS)}" for _ in range(rng.randint(1, 3))]
            out.append({"problem_id": f"p{g}", "c": c, "prompt": f"Q{g}?", "completions": steps})
    return out


def write_jsonl(path: Path, items) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def jq_best(scored: list[dict], field: str, agg: str) -> list[dict]:
    """What `jq -c 'group_by(.FIELD)[] | max_by(.aggregates.AGG)'` picks (jq's max_by keeps the last maximum; the
    first is prmkit's rule, as in eval's Best-of-N), with the rank and group size prmkit adds."""
    best = []
    for _, group in groupby(scored, key=lambda r: r[field]):
        group = list(group)
        values = [r["aggregates"][agg] for r in group]
        top = max(range(len(group)), key=lambda i: (values[i] is not None, values[i] or 0.0, -i))
        best.append({**group[top], "rank": 1, "group_size": len(group)})
    return best


@pytest.fixture(scope="module")
def scorer(tmp_path_factory, train_tokenizer_dir) -> StepScorer:
    prm = make_tiny_prm(tmp_path_factory.mktemp("groups") / "prm", train_tokenizer_dir, seed=9)
    return StepScorer.from_pretrained(prm)


def test_rank_every_line_or_select_each_groups_best(tmp_path, scorer):
    src = write_jsonl(tmp_path / "in.jsonl", candidates(40))
    plain = tmp_path / "plain.jsonl"
    score_file(scorer, str(src), str(plain))
    full = read_jsonl(plain)
    assert all(r["aggregates"] == aggregate(r["step_scores"]) for r in full)  # prmkit.metrics.aggregate's values

    ranked = tmp_path / "ranked.jsonl"
    summary = score_file(scorer, str(src), str(ranked), group=GroupSpec("problem_id"))
    lines = read_jsonl(ranked)
    # Every line, in input order, as a run without grouping writes it, plus its rank (by min) and its group's size.
    assert [{k: v for k, v in r.items() if k not in ("rank", "group_size")} for r in lines] == full
    for _, group in groupby(lines, key=lambda r: r["problem_id"]):
        group = list(group)
        assert sorted(r["rank"] for r in group) == list(range(1, len(group) + 1))
        assert {r["group_size"] for r in group} == {len(group)}
        by_rank = sorted(group, key=lambda r: r["rank"])
        assert [r["aggregates"]["min"] for r in by_rank] == sorted(
            (r["aggregates"]["min"] for r in group), reverse=True
        )
    assert summary.group_by["groups_written"] == 40
    assert summary.group_by["max_group_lines"] == max(
        len(list(g)) for _, g in groupby(full, key=lambda r: r["problem_id"])
    )

    for agg in ("min", "last", "prod", "mean"):
        best = tmp_path / f"best-{agg}.jsonl"
        score_file(scorer, str(src), str(best), group=GroupSpec("problem_id", "best", agg))
        assert read_jsonl(best) == jq_best(full, "problem_id", agg), agg


def test_ties_go_to_the_first_line_and_unscored_lines_last():
    from prmkit.scoring.groups import ranks

    assert ranks([0.5, 0.9, 0.9, None, 0.1]) == [3, 1, 2, 5, 4]
    assert ranks([None, None]) == [1, 2]


def test_a_group_seen_again_is_one_line_naming_both_places(tmp_path, scorer):
    items = candidates(3, fixed=2)
    items.append(dict(items[0]))  # p0 again, after p1 and p2
    src = write_jsonl(tmp_path / "in.jsonl", items)
    with pytest.raises(
        DataError,
        match=r"in.jsonl: line 7: problem_id: group \"p0\" appears again after another "
        r"group; its lines 1-2 came earlier",
    ) as e:
        score_file(scorer, str(src), str(tmp_path / "out.jsonl"), group=GroupSpec("problem_id"))
    assert "sort_by(.problem_id)" in e.value.hint

    missing = [*items[:2], {k: v for k, v in items[2].items() if k != "problem_id"}, *items[3:6]]
    src = write_jsonl(tmp_path / "missing.jsonl", missing)
    with pytest.raises(DataError, match="line 3: problem_id: missing"):
        score_file(scorer, str(src), str(tmp_path / "m.jsonl"), group=GroupSpec("problem_id"))
    summary = score_file(
        scorer, str(src), str(tmp_path / "m2.jsonl"), group=GroupSpec("problem_id", "best"), skip_invalid=True
    )
    assert summary.counts.lines_rejected == 1 and len(read_jsonl(tmp_path / "m2.jsonl")) == 3


def test_the_command_line_flags(tmp_path, scorer):
    src = write_jsonl(tmp_path / "in.jsonl", candidates(4, fixed=3))
    model = scorer.identity["name"]
    res = runner.invoke(app, ["score", model, str(src), "-o", str(tmp_path / "out.jsonl"), "--select", "best"])
    assert res.exit_code == 2 and "--select needs --group-by FIELD" in res.stderr
    res = runner.invoke(
        app,
        [
            "score",
            model,
            str(src),
            "-o",
            str(tmp_path / "out.jsonl"),
            "--group-by",
            "problem_id",
            "--select",
            "best",
            "--aggregate",
            "last",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["group_by"] == {
        "field": "problem_id",
        "select": "best",
        "aggregate": "last",
        "groups_written": 4,
        "max_group_lines": 3,
    }
    assert [r["rank"] for r in read_jsonl(tmp_path / "out.jsonl")] == [1, 1, 1, 1]
    assert "wrote the best line of each 4 groups (problem_id, by last step score" in res.stderr


class Crash(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", [2, 3, 5])
def test_an_interrupted_grouped_run_resumes_to_the_same_bytes(tmp_path, scorer, monkeypatch, crash_at):
    import prmkit.scoring.job as job

    # Groups of 3-11 lines in windows of 8 rows: the open group is kept at every commit, some across several.
    src = write_jsonl(tmp_path / "in.jsonl", candidates(12, seed=3, sizes=(3, 11)))
    spec = GroupSpec("problem_id", None, "mean")
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    score_file(scorer, str(src), str(ref), sort_window=8, group=spec)

    calls = []
    real = job.write_state

    def write_state(path, state):
        calls.append(1)
        if len(calls) == crash_at:
            raise Crash  # after this commit's output and open group were written, before the state says so
        real(path, state)

    with monkeypatch.context() as m:
        m.setattr(job, "write_state", write_state)
        with pytest.raises(Crash):
            score_file(scorer, str(src), str(out), sort_window=8, group=spec)
    kept = sorted(p.name for p in tmp_path.glob("out.jsonl.prmkit-group.*"))
    assert kept, "an open group is kept beside the output"
    committed = json.loads(output_paths(out)["state"].read_text())["progress"]
    assert (committed.get("group") or {}).get("rows", 0) > 0 or crash_at == 2  # resuming takes an open group back
    summary = score_file(scorer, str(src), str(out), sort_window=8, group=spec)
    assert bool(summary.resumed_at_line) == (crash_at > 2)  # the 1st state is written before any window
    assert out.read_bytes() == ref.read_bytes()
    assert not list(tmp_path.glob("out.jsonl.prmkit-group*")) and not output_paths(out)["partial"].exists()

    # Other grouping settings are another job: refused, not mixed into the same output.
    with monkeypatch.context() as m:
        m.setattr(job, "write_state", write_state)
        calls.clear()
        with pytest.raises(Crash):
            score_file(scorer, str(src), str(tmp_path / "o2.jsonl"), sort_window=8, group=spec)
    with pytest.raises(Exception, match="group_by"):
        score_file(scorer, str(src), str(tmp_path / "o2.jsonl"), sort_window=8, group=GroupSpec("problem_id", "best"))


PEAK_RSS = """
import atexit, resource, sys
from prmkit.cli.app import main
sys.argv = ["prmkit", "score", *sys.argv[1:]]
# main() leaves through os._exit after the exit handlers: the peak is said by one of them.
atexit.register(lambda: print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))
main()
"""


def peak_run(args: list[str]) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *args, "--json"], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return peak, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_100k_candidates_in_10k_groups_stay_within_plain_scorings_memory(tmp_path, scorer):
    src = write_jsonl(tmp_path / "in.jsonl", candidates(10_000, seed=5, fixed=10))
    model = scorer.identity["name"]
    plain_peak, _ = peak_run([model, str(src), "-o", str(tmp_path / "plain.jsonl")])
    best_peak, summary = peak_run(
        [model, str(src), "-o", str(tmp_path / "best.jsonl"), "--group-by", "problem_id", "--select", "best"]
    )
    print(f"peak RSS: plain scoring {plain_peak / 1024:.1f} MiB, --group-by --select best {best_peak / 1024:.1f} MiB")
    assert summary["rows_out"] == 100_000 and summary["group_by"]["groups_written"] == 10_000
    assert summary["group_by"]["max_group_lines"] == 10  # one group held at a time
    # The keys of the groups already written (a 16-byte digest and two line numbers each) are all that grows.
    assert best_peak <= plain_peak + 16 * 1024, (best_peak, plain_peak)
    assert read_jsonl(tmp_path / "best.jsonl") == jq_best(read_jsonl(tmp_path / "plain.jsonl"), "problem_id", "min")
