"""Writing an evaluation's outputs: the output directory's rules, the report set written whole or not at all."""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prmkit.core import jsonio
from prmkit.core.atomic import make_temp_dir, remove_leftovers, swap_in, write_atomic
from prmkit.core.filenames import REJECTS_FILE
from prmkit.core.jsonio import dumps, finite
from prmkit.core.outputs import OutputLock, refuse_inputs_inside
from prmkit.core.redact import mask, redact
from prmkit.errors import UsageError
from prmkit.evaluation.evaluate import EvalResult
from prmkit.evaluation.render import build_markdown
from prmkit.evaluation.report import MissingExtraError, _is_multi

log = logging.getLogger(__name__)


def _is_raw_leaf(value: Any) -> bool:
    return isinstance(value, Mapping) and "scores" in value and not isinstance(value["scores"], Mapping)


def _raw_by_model(
    report: Mapping[str, Any], raw: Mapping[str, Any] | None
) -> dict[str | None, Mapping[str, Mapping[str, Sequence[float]]]]:
    if not raw:
        return {}
    out: dict[str | None, Mapping[str, Mapping[str, Sequence[float]]]]
    if _is_multi(report):
        if any(_is_raw_leaf(v) for v in raw.values()):
            raise ValueError("for a multi-model report, raw must map model -> subset -> {scores, targets}")
        out = {str(m): v for m, v in raw.items()}
    else:
        out = {None: raw}
    for per_subset in out.values():
        for subset, leaf in per_subset.items():
            if not _is_raw_leaf(leaf) or "targets" not in leaf:
                raise ValueError(f"raw[{subset!r}] must be a mapping with 'scores' and 'targets'")
            if len(leaf["scores"]) != len(leaf["targets"]):
                raise ValueError(f"raw[{subset!r}]: scores and targets differ in length")
    return out


def write_report(
    report: Mapping[str, Any], out_dir: Path, plots: bool = True, raw: Mapping[str, Any] | None = None
) -> list[Path]:
    """Write ``report.json``, ``report.md`` and (with ``plots``) PNG plots.

    ``raw`` carries the step scores the distribution plots need and the JSON
    leaves out: ``{subset: {"scores": [...], "targets": [...]}}``, or for a
    multi-model report ``{model: {subset: {...}}}``. Plots written:

    - ``accuracy_by_position.png`` when any subset has ``by_position`` rows;
    - ``reliability.png`` and ``score_histogram.png`` when ``raw`` is given;
    - ``best_of_n.png`` when any subset has ``best_of_n``.

    Every file is written atomically. Returns the written paths. Raises
    ``MissingExtraError`` before writing anything when ``plots`` is true and
    matplotlib is not installed; ``plots=False`` needs no matplotlib.
    """
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise MissingExtraError() from exc
    out_dir = Path(out_dir)
    raw_models = _raw_by_model(report, raw)  # validate before touching the disk
    report = redact(finite(report))  # a model or data spec may be a URL with credentials in it
    markdown = build_markdown(report)
    payload = dumps(report, indent=2) + "\n"

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("report.json", payload), ("report.md", markdown)):
        path = out_dir / name
        write_atomic(path, text.encode("utf-8"))
        written.append(path)
    if plots:
        from prmkit.evaluation.plots import write_plots

        # The plots show the saved (redacted) model names; raw scores follow them.
        raw_models = {mask(k) if isinstance(k, str) else k: v for k, v in raw_models.items()}
        written.extend(write_plots(report, out_dir, raw_models))
    return written


REPORT_FILES = ("report.json", "report.md")


PLOT_FILES = ("accuracy_by_position.png", "reliability.png", "score_histogram.png", "best_of_n.png")


OWN_FILES = frozenset((*REPORT_FILES, *PLOT_FILES, REJECTS_FILE))


_STAGING = "report"  # the report set is written into .report.PID@HOST.XXXX.tmp inside an output dir shared with others


def _only_own_files(path: Path) -> bool:
    for entry in path.iterdir():
        # Leftovers of an interrupted write (a temporary file, a staging directory) are ours too.
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            continue
        if entry.name not in OWN_FILES or not entry.is_file() or entry.is_symlink():
            return False
    return True


def _is_previous_report(path: Path) -> bool:
    if not _only_own_files(path):
        return False
    try:
        previous = jsonio.loads((path / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(previous, dict) and ("subsets" in previous or "models" in previous)


def check_output_dir(
    path: str | Path,
    overwrite: bool = False,
    models: Sequence[str] = (),
    data: Sequence[str] = (),
    config: str | Path | None = None,
) -> bool:
    """Refuse a non-empty directory that is not a previous ``prmkit eval`` report unless ``overwrite``.

    A directory holding nothing but an earlier report is replaced: it is this command's own output, and
    re-running an evaluation into the same place is the common case. Returns whether files are being replaced.
    A model, data source or config file inside the directory is refused: the report's files would replace or
    delete it (a data file named ``rejects.jsonl``), or land in a model directory that gets published.
    """
    path = Path(path)
    sources = [
        spec.partition("=")[2] if "=" in spec and not Path(spec).expanduser().exists() else spec for spec in data
    ]
    refuse_inputs_inside(
        path,
        [*(("model", m) for m in models), *(("--data", s) for s in sources), ("--config", config)],
        "eval writes its report into",
    )
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a directory", hint="choose another --output-dir")
    if not path.exists() or not any(path.iterdir()):
        return False
    if _is_previous_report(path):
        return True
    if not overwrite:
        raise UsageError(
            f"{path} is not empty and does not hold a prmkit report",
            hint="pass --overwrite to write the report into it anyway, or choose another --output-dir",
        )
    return True


def check_plotting() -> None:
    """Raise :class:`prmkit.evaluation.report.MissingExtraError` now, before any scoring, when matplotlib is missing."""
    from prmkit.evaluation.report import MissingExtraError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingExtraError() from None


def _write_jsonl_atomic(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    write_atomic(path, "".join(dumps(r) + "\n" for r in records))


def write_outputs(result: EvalResult, out_dir: str | Path, plots: bool = True) -> list[Path]:
    """Write report.json, report.md, the plots (with ``plots``) and rejects.jsonl (when rows were skipped).

    The whole set is written into a temporary directory first, so a failure (a full disk, a plot that cannot be
    drawn) leaves the previous report as it was. A directory holding only a report is then swapped for the new one
    whole; one holding other files too (``--overwrite``) gets the new files renamed in, which takes no space. Files an
    earlier report left that this one does not write (a plot that no longer applies, old rejects) are removed, so
    the directory never mixes two runs.
    """
    out_dir = Path(out_dir)
    # Two evaluations into one directory each write a whole report, one after the other, never a mix of both.
    with OutputLock(out_dir, "prmkit eval").acquire(wait=True):
        real = out_dir.resolve()
        remove_leftovers(real.parent, real.name)  # a killed run's staging directory; a report it had moved aside
        if real.is_dir():
            remove_leftovers(real, _STAGING)
            if (real / "report.json").exists():
                log.warning(f"replacing the previous report in {out_dir}")
        whole = not real.exists() or (_only_own_files(real) and real.stat().st_dev == real.parent.stat().st_dev)
        stage = make_temp_dir(real.parent, real.name) if whole else make_temp_dir(real, _STAGING)
        try:
            names = _write_report_set(result, stage, plots)
            if whole:
                if real.exists():  # the directory keeps the mode its owner gave it
                    os.chmod(stage, stat.S_IMODE(real.stat().st_mode))
                swap_in(stage, real)
            else:
                for name in names:
                    os.replace(stage / name, real / name)
                for name in OWN_FILES - set(names):
                    (real / name).unlink(missing_ok=True)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
    return [out_dir / name for name in names]


def _write_report_set(result: EvalResult, directory: Path, plots: bool) -> list[str]:
    from prmkit.evaluation.write import write_report

    written = write_report(result.report, directory, plots=plots, raw=result.raw)
    if result.rejects:
        rejects_path = directory / REJECTS_FILE
        # The rows are the user's data, kept as they are; the source's name may be a URL with credentials.
        _write_jsonl_atomic(
            rejects_path,
            [{**r, "source": mask(r["source"])} if isinstance(r.get("source"), str) else r for r in result.rejects],
        )
        written.append(rejects_path)
    return [p.name for p in written]
