import importlib.util
import json
import sys

import pytest

from prmkit.evaluation.render import build_markdown, rich_tables
from prmkit.evaluation.report import MissingExtraError, make_report
from prmkit.evaluation.write import write_report
from prmkit.metrics import accuracy_by_position, best_of_n, first_error_metrics, mean_f1, outcome_metrics, step_metrics

# matplotlib is the optional "plot" extra (installed by "test"); without it
# only the plotting tests are skipped.
needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = {"accuracy_by_position.png", "reliability.png", "score_histogram.png", "best_of_n.png"}

RAW = {
    # 3 correct steps (.9, .6, .3), 2 wrong (.6, .2): PRMScore 7/12 (see test_metrics)
    "gsm8k": {"scores": [0.9, 0.6, 0.3, 0.6, 0.2], "targets": [1, 1, 1, 0, 0]},
    # every step classified right at .5: PRMScore 1
    "math": {"scores": [0.8, 0.7, 0.1, 0.95], "targets": [1, 1, 0, 1]},
}


def _subset(raw, positions, first_error=None, bon=None):
    sub = {
        "step": step_metrics(raw["scores"], raw["targets"]),
        "by_position": accuracy_by_position(positions, raw["scores"], raw["targets"]),
    }
    if first_error is not None:
        sub["first_error"] = first_error
    if bon is not None:
        sub["best_of_n"] = bon
    return sub


def _report(model="org/prm-7b", math_fe=(0, -1)):
    return make_report({model: _model(model, math_fe)})


def _model(model="org/prm-7b", math_fe=(0, -1)):
    fe_gsm = first_error_metrics([1, 2, 1, -1, 3], [1, 2, 0, -1, -1])  # F1 4/7
    fe_math = first_error_metrics(list(math_fe), [0, -1])
    bon = best_of_n(
        [
            [{"step_scores": [0.9, 0.2], "correct": False}, {"step_scores": [0.6, 0.7], "correct": True}],
            [{"step_scores": [0.3], "correct": False}, {"step_scores": [0.8], "correct": True}],
        ]
    )
    return {
        "model": model,
        "threshold": 0.5,
        "threshold_source": "default",
        "subsets": {
            "gsm8k": _subset(RAW["gsm8k"], [1, 2, 3, 1, 2], fe_gsm, bon),
            "math": {
                **_subset(RAW["math"], [1, 2, 3, 1], fe_math),
                "outcome": outcome_metrics([[0.9, 0.8], [0.2]], [True, False]),
            },
        },
        "mean_f1": mean_f1({"gsm8k": fe_gsm["f1"], "math": fe_math["f1"]}),
    }


@needs_mpl
def test_write_report_files_and_round_trip(tmp_path):
    report = _report()
    paths = write_report(report, tmp_path / "out", raw=RAW)
    names = {p.name for p in paths}
    assert names == {"report.json", "report.md"} | PLOTS
    assert all(p.parent == tmp_path / "out" for p in paths)

    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    # no temp files left behind by the atomic writes
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)

    for name in PLOTS:
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 5_000


def test_markdown_contents():
    md = build_markdown(_report())
    assert md.startswith("# PRM evaluation report")
    assert "org/prm-7b" in md
    assert "## Subset: gsm8k" in md and "## Subset: math" in md
    assert "0.5 (chosen by: default)" in md
    # gsm8k PRMScore 7/12 = 0.583, first-error F1 4/7 = 0.571;
    # math first-error: both right -> F1 1; mean F1 = (4/7 + 1) / 2 = 0.786
    assert "0.583" in md
    assert "0.571" in md
    assert "0.786" in md
    # tables are well formed: every table row has the same number of cells as its header
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.count(" | ") for ln in lines}) == 1, block
    assert "Best-of-N" in md and "pass@N" in md
    assert "Outcome" in md


def test_markdown_escapes_pipes_in_table_cells():
    md = build_markdown(make_report({"weird|name": _model(), "b": _model()}))
    assert "| Metric | weird\\|name | b |" in md


@needs_mpl
def test_multi_model_side_by_side(tmp_path):
    multi = make_report(
        {
            "prm-a": _model("org/prm-a"),
            # prm-b misses the erroneous math sample: math F1 0, mean F1 (4/7 + 0) / 2
            "prm-b": {**_model("org/prm-b", math_fe=(1, -1)), "threshold": 0.42, "threshold_source": "tuned on gsm8k"},
        }
    )
    md = build_markdown(multi)
    assert "| Metric | prm-a | prm-b |" in md
    assert "tuned on gsm8k" in md and "0.42" in md
    # the better mean F1 (prm-a, 0.786 vs 0.286) is bold
    assert "**0.786**" in md and "0.286" in md and "**0.286**" not in md
    assert "## Details: prm-a" in md and "## Details: prm-b" in md

    raw = {"prm-a": RAW, "prm-b": RAW}
    paths = write_report(multi, tmp_path, raw=raw)
    assert {p.name for p in paths} == {"report.json", "report.md"} | PLOTS
    with pytest.raises(ValueError):
        write_report(multi, tmp_path / "bad", raw=RAW)  # raw must be keyed by model


@needs_mpl
def test_multi_model_with_missing_subset(tmp_path):
    partial = _model("org/prm-b")
    del partial["subsets"]["gsm8k"]
    multi = make_report({"prm-a": _model("org/prm-a"), "prm-b": partial})
    md = build_markdown(multi)
    assert "| Steps | 5 | n/a |" in md  # gsm8k row: prm-b has no figures
    raw = {"prm-a": RAW, "prm-b": {"math": RAW["math"]}}
    names = {p.name for p in write_report(multi, tmp_path, raw=raw)}
    assert names == {"report.json", "report.md"} | PLOTS


def test_plots_false_writes_no_png(tmp_path):
    paths = write_report(_report(), tmp_path, plots=False, raw=RAW)
    assert [p.name for p in paths] == ["report.json", "report.md"]
    assert not list(tmp_path.glob("*.png"))


@needs_mpl
def test_plots_without_raw_skip_distribution_plots(tmp_path):
    report = _report()
    del report["subsets"]["gsm8k"]["best_of_n"]
    names = {p.name for p in write_report(report, tmp_path)}
    assert names == {"report.json", "report.md", "accuracy_by_position.png"}


def test_missing_matplotlib_raises_before_writing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(MissingExtraError, match=r"pip install 'prmkit\[plot\]'"):
        write_report(_report(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert issubclass(MissingExtraError, RuntimeError)
    # the no-plot path does not need matplotlib
    assert len(write_report(_report(), tmp_path / "out", plots=False)) == 2


def test_json_nan_becomes_null(tmp_path):
    report = _report()
    report["mean_f1"] = float("nan")
    write_report(report, tmp_path, plots=False)
    assert json.loads((tmp_path / "report.json").read_text())["mean_f1"] is None


def test_rich_tables():
    from rich.console import Console
    from rich.table import Table

    tables = rich_tables(_report())
    assert all(isinstance(t, Table) for t in tables)
    titles = [str(t.title) for t in tables]
    assert titles[0].startswith("Step level")
    assert "First error (ProcessBench)" in titles
    assert "Best-of-N accuracy" in titles and "Outcome" in titles
    assert tables[0].row_count == 2  # one row per subset

    multi = rich_tables(make_report({"a": _model("a"), "b": _model("b")}))
    assert [str(t.title) for t in multi] == ["Models", "Subset: gsm8k", "Subset: math"]
    console = Console(record=True, width=160)
    for t in multi:
        console.print(t)
    text = console.export_text()
    assert "PRMScore" in text and "0.583" in text
