"""report.json has one schema for one model and for several, written down in prmkit/schemas/report.schema.json."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from conftest import ROOT, _check_reports_under, validate_report
from eval_fixtures import processbench_records, write_json

from prmkit.evaluation import evaluate as evaluation
from prmkit.evaluation.report import REPORT_VERSION, make_report, report_schema


def test_the_schema_is_a_valid_json_schema_shipped_with_the_package():
    schema = report_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["report_version"]["const"] == REPORT_VERSION
    package_data = next(
        line for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("prmkit = [")
    )
    assert '"schemas/*.json"' in package_data


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    return write_json(tmp_path_factory.mktemp("schema-data") / "a.json", processbench_records(8, seed=3))


@pytest.mark.slow
def test_one_model_and_several_share_the_documented_top_level(tiny_prm_pair, subset):
    a, b = (str(m) for m in tiny_prm_pair)
    one = evaluation.evaluate([a], [str(subset)]).report
    two = evaluation.evaluate([a, b], [str(subset)]).report
    for report in (one, two):
        validate_report(json.loads(json.dumps(report)))
        assert report["report_version"] == 1 and report["model"] == a
        assert {"threshold", "threshold_source", "subsets", "mean_f1", "models"} <= set(report)
        assert report["models"][a]["subsets"] == report["subsets"]
    assert list(one["models"]) == [a] and list(two["models"]) == [a, b]
    assert one["subsets"] == two["subsets"]  # the first model's figures do not depend on what it is compared with


def _figures(model: str) -> dict:
    return {
        "model": model,
        "threshold": 0.5,
        "threshold_source": "default",
        "mean_f1": None,
        "subsets": {"s": {"step": None, "by_position": [], "first_error": None}},
    }


def test_what_the_schema_refuses():
    validate_report(make_report({"a": _figures("a"), "b": _figures("b")}))
    # The shape multi-model reports had before report_version 1: a list in "model", nothing else on top.
    with pytest.raises(jsonschema.ValidationError):
        validate_report({"model": ["a", "b"], "models": {"a": _figures("a"), "b": _figures("b")}})
    with pytest.raises(jsonschema.ValidationError, match="report_version"):
        validate_report({k: v for k, v in make_report({"a": _figures("a")}).items() if k != "report_version"})
    with pytest.raises(jsonschema.ValidationError, match="mean_f1"):
        validate_report(make_report({"a": {**_figures("a"), "mean_f1": 1.5}}))
    unknown = make_report({"a": _figures("a")})
    unknown["subsets"]["s"]["steps"] = {}
    with pytest.raises(jsonschema.ValidationError, match="steps"):
        validate_report(unknown)


def test_the_suite_checks_every_report_json_it_leaves(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text(json.dumps({"model": ["a", "b"], "models": {}}))
    with pytest.raises(AssertionError, match="does not follow prmkit/schemas/report.schema.json"):
        _check_reports_under(tmp_path)
    (tmp_path / "out" / "report.json").write_text(json.dumps(make_report({"a": _figures("a")})))
