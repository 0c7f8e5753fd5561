"""Parts of a data source: `datasets`' split syntax on local files, and an eval split held out of the training data.

- ``data/rows.jsonl[:300]``, ``data/rows.json[10%:20%]``, ``saved_dir:test[:10%]``: the slice a Hub id takes
  (``org/name:train[:10%]``), parsed by `datasets`' own ``ReadInstruction`` so both mean the same rows. A file holds
  one split, ``train``, as `datasets` names it; a save_to_disk directory may hold several.
- ``data.eval_fraction``: a seeded share of ``data.train``'s problems becomes the eval split, grouped by prompt so
  no problem has solutions on both sides (axolotl's ``val_set_size``, without the leak).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prmkit.errors import ConfigError, DataError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger("prmkit")


"""The one split a local file holds, as `datasets` names it."""


@dataclass
class HeldOut:
    """Which rows went to each side, and the figures recorded in ``prmkit.json`` (``data.eval_split``)."""

    train: list[int]
    eval: list[int]
    record: dict[str, Any]


def check_eval_fraction(data_cfg: Any) -> None:
    """``data.eval`` and ``data.eval_fraction`` both name the eval rows: one of them, not both."""
    if data_cfg.eval_fraction is not None and data_cfg.eval:
        raise ConfigError(
            f"data.eval ({data_cfg.eval!r}) and data.eval_fraction ({data_cfg.eval_fraction}) both choose "
            "the eval rows",
            hint="set one of them (data.eval=null to hold out a share of data.train)",
        )


def hold_out(prompts: list[str], fraction: float, seed: int, spec: str) -> HeldOut:
    """Put ``fraction`` of the distinct prompts (at least one, never all) and every row with them on the eval side.

    The problems are shuffled with ``seed`` (numpy's PCG64), so the same data and seed give the same split anywhere;
    each side keeps the input order of its rows.
    """
    import numpy as np

    first: dict[str, int] = {}
    for p in prompts:
        first.setdefault(p, len(first))
    n_groups = len(first)
    if n_groups < 2:
        raise DataError(
            f"{spec}: data.eval_fraction needs at least 2 problems (distinct prompts) to hold some out; "
            f"found {n_groups}",
            hint="give eval data with data.eval instead",
        )
    n_eval = min(max(1, round(fraction * n_groups)), n_groups - 1)
    chosen = np.random.default_rng(seed).permutation(n_groups)[:n_eval]
    is_eval = np.zeros(n_groups, dtype=bool)
    is_eval[chosen] = True
    train_rows = [i for i, p in enumerate(prompts) if not is_eval[first[p]]]
    eval_rows = [i for i, p in enumerate(prompts) if is_eval[first[p]]]
    record = {
        "fraction": fraction,
        "seed": seed,
        "grouped_by": "prompt",
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "train_problems": n_groups - n_eval,
        "eval_problems": n_eval,
    }
    return HeldOut(train_rows, eval_rows, record)


def split_seed(cfg: Any) -> int:
    """``train.data_seed``, else ``train.seed``, else transformers' default 42: the seed TRL users know for data."""
    ta = getattr(cfg, "training_arguments", {}) or {}
    for key in ("data_seed", "seed"):
        if ta.get(key) is not None:
            return int(ta[key])
    return 42


@dataclass
class GivenInputs:
    """The splits that come from `prmkit prepare` outputs (checked), and the whole directory when it serves as it is."""

    splits: dict[str, Any]
    as_it_is: Any = None


def prepared_inputs(
    resolved: dict[str, Any], tok_fp: dict, params: Any, kind: dict | None, data_cfg: Any, held: dict | None
) -> GivenInputs:
    """Each prepared-directory source's split, checked against this run's tokenizer, tokenization, kind and labels."""
    from prmkit.core.filenames import REJECTS_FILE
    from prmkit.data.prepared_input import check_matches, load_split
    from prmkit.data.sources import SplitReport
    from prmkit.data.tokenized import Prepared

    splits = {}
    for name, src in resolved.items():
        if src.kind != "prepared":
            continue
        if name == "train" and held is not None:
            raise ConfigError(
                f"data.eval_fraction: {src.spec} is prepared data (token ids, no prompts to group by)",
                hint="hold the eval share out when preparing: prmkit prepare --set data.eval_fraction=...",
            )
        part = load_split(src, name)
        check_matches(
            src.spec,
            part.metadata,
            tokenizer_fp=tok_fp,
            params=params.to_dict(),
            kind=kind,
            labels={"label_threshold": data_cfg.label_threshold, "prm800k_neutral": data_cfg.prm800k_neutral},
        )
        splits[name] = part
    whole = None
    paths = {str(src.path.resolve()) for src in resolved.values() if src.kind == "prepared"}
    if (
        len(splits) == len(resolved)
        and len(paths) == 1
        and all(p.split == n and resolved[n].instruction is None for n, p in splits.items())
    ):
        part = next(iter(splits.values()))
        path = next(iter(resolved.values())).path
        reports = {n: SplitReport(**_known(p.report, SplitReport)) for n, p in splits.items()}
        rejects = path / REJECTS_FILE
        whole = Prepared(
            path, part.metadata, reports, cache_hit=True, rejects_path=rejects if rejects.exists() else None
        )
    return GivenInputs(splits, whole)


def _known(values: dict[str, Any], cls: type[DataclassInstance]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k in cls.__dataclass_fields__}


def build_splits(
    cfg: Any,
    specs: dict[str, str],
    given: dict[str, Any],
    held: dict | None,
    tokenizer: Any,
    params: Any,
    kind_encoder: Any,
    skip_invalid: bool,
    rejects: list[dict],
    on_progress: Any = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """``(datasets, reports, eval_split record)`` of each split: read and tokenized, taken from a prepared
    directory, or (``held``) divided out of data.train."""
    from prmkit.data.formats import Options
    from prmkit.data.sources import SplitReport, read_step_rows

    data = cfg.data
    splits: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    record = None
    for name, spec in specs.items():
        if name in given:
            part = given[name]
            reports[name] = SplitReport(
                **{**_known(part.report, SplitReport), "source": spec, "rows_kept": len(part.dataset)}
            )
            splits[name] = part.dataset
            continue
        opts = Options(
            prm800k_neutral=data.prm800k_neutral, label_threshold=data.label_threshold, is_eval=name == "eval"
        )
        rows, report = read_step_rows(spec, data.format, opts, data.step_separator, skip_invalid, rejects)
        parts = {name: (rows, report)}
        if name == "train" and held is not None:
            out = hold_out(rows.prompts, held["fraction"], held["seed"], spec)
            record = out.record
            parts = {
                "train": _part(rows, out.train, report, spec, data.step_separator),
                "eval": _part(
                    rows,
                    out.eval,
                    report,
                    f"{spec} (held out: data.eval_fraction={held['fraction']})",
                    data.step_separator,
                ),
            }
            parts["eval"][1].rows_rejected = 0
            parts["train"][1].rows_in = report.rows_in - parts["eval"][1].rows_in  # rejected records stay on train's
        for part_name, (part_rows, part_report) in parts.items():
            splits[part_name] = tokenize_split(
                part_name, part_rows, part_report, tokenizer, params, data.num_proc, kind_encoder, on_progress
            )
            reports[part_name] = part_report
    return splits, reports, record


def tokenize_split(
    name: str,
    rows: Any,
    report: Any,
    tokenizer: Any,
    params: Any,
    num_proc: int | None,
    kind_encoder: Any = None,
    on_progress: Any = None,
) -> Any:
    """One split's rows tokenized (``report`` completed), refused when none is left, truncation losses warned of."""
    from prmkit.data.tokenized import _check_rows_left, tokenize_step_rows

    progress = (lambda done, total: on_progress(name, done, total)) if on_progress else None
    ds = (
        tokenize_step_rows(rows, tokenizer, params, name == "eval", num_proc, report, progress, kind_encoder)
        if len(rows)
        else None
    )
    report.rows_kept = len(ds) if ds is not None else 0
    _check_rows_left(name, report, params)
    if report.rows_dropped_truncated:
        log.warning(
            f"{report.source}: {report.rows_dropped_truncated} rows lost every label to truncation and were dropped"
        )
    if report.steps_lost_to_truncation:
        log.warning(
            f"{report.source}: {report.steps_lost_to_truncation} labelled steps were cut by "
            "max_length/max_completion_length"
        )
    return ds


def _part(rows: Any, indexes: list[int], whole: Any, source: str, separator: str) -> tuple[Any, Any]:
    """Some of the rows, with a report of their own: the records they came from, their steps and labels."""
    from prmkit.data.sources import SplitReport, tally_rows

    taken = rows.take(indexes)
    report = SplitReport(
        source=source, format=whole.format, rows_in=len(set(taken.rows)), rows_rejected=whole.rows_rejected
    )
    tally_rows(report, taken, separator)
    return taken, report


def prepared_eval(spec: str | None) -> bool:
    """Whether ``spec`` is a `prmkit prepare` output, taken whole, that holds an eval split."""
    from prmkit.data.prepared_input import is_prepared

    if not spec:
        return False
    path = Path(spec).expanduser()
    return is_prepared(path) and (path / "eval").is_dir()
