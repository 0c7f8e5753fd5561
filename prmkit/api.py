"""prmkit's Python API: what `prmkit train`, `eval`, `score` and `push` do, called from Python.

Each function takes the config object (:func:`prmkit.load_config`, or :class:`prmkit.Config` built in Python) plus
what is particular to the call, calls the code its command calls, and returns the result object the command prints
(``--json`` prints its ``to_dict()``, or the report for ``eval``). Nothing here prints or exits: problems are raised
as :class:`prmkit.PrmkitError` (``UsageError``, ``ConfigError``, ``DataError``) with a one-line message and a hint.

    import prmkit

    cfg = prmkit.load_config("prm.yaml", overrides=["train.max_steps=100"])
    result = prmkit.train(cfg)
    report = prmkit.evaluate(cfg, models=[result.model_dir], data=["gsm8k.json"]).report
    summary = prmkit.score_file(cfg, "solutions.jsonl", "scored.jsonl", model=result.model_dir)
    pushed = prmkit.push_model(cfg, model_dir=result.model_dir, repo_id="alice/qwen2-prm")

Importing this module imports no torch; the first call that loads a model does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prmkit.config.schema import Config
from prmkit.core.outputs import refuse_inputs_inside
from prmkit.errors import UsageError
from prmkit.evaluation import evaluate as evaluation
from prmkit.hub import push_with_config
from prmkit.scoring.groups import GroupSpec, group_spec
from prmkit.scoring.job import ScoreSummary
from prmkit.scoring.job import score_file as score_job
from prmkit.scoring.settings import ScorerSettings
from prmkit.training import recipe

if TYPE_CHECKING:
    from prmkit.evaluation.evaluate import EvalResult, ProgressFn
    from prmkit.hub import PushResult
    from prmkit.scoring.engine import StepScorer
    from prmkit.training.recipe import TrainResult

__all__ = ["evaluate", "push_model", "score_file", "train"]


def train(
    cfg: Config,
    *,
    overwrite: bool = False,
    resume: bool | str | None = None,
    accept_changes: bool = False,
    console: Any = None,
    callbacks: list | None = None,
) -> TrainResult:
    """Train a PRM as ``cfg`` says and write its model directory (`prmkit train`).

    ``resume``: True continues from the last checkpoint in ``train.output_dir``, a path from that checkpoint; None
    follows ``train.resume_from_checkpoint``. A resumed run whose schedule or data changed is refused unless
    ``accept_changes``. ``console`` (a ``rich`` console) shows progress; ``callbacks`` are transformers
    ``TrainerCallback``s. Under ``accelerate launch`` every process calls it; the result of an interrupted run says so
    (``interrupted``, ``checkpoint``).
    """
    return recipe.train(
        cfg, overwrite=overwrite, resume=resume, console=console, callbacks=callbacks, accept_changes=accept_changes
    )


def evaluate(
    cfg: Config,
    *,
    models: Sequence[str | os.PathLike] | None = None,
    data: Sequence[str | os.PathLike] | None = None,
    threshold: float | None = None,
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Evaluate one model or several on labelled data (`prmkit eval`): the report, the scores and the rejects.

    ``models`` defaults to ``model.name_or_path``, ``data`` to ``eval.data`` (``NAME=SRC`` names a subset). The
    threshold is ``threshold`` when given (as ``--threshold``: it beats ``eval.tune_threshold``), else tuned on
    ``eval.tune_threshold``, else ``eval.threshold`` when the config sets it, else 0.5. Models load with the ``eval``
    section's dtype, device and batch budget (:class:`prmkit.scoring.settings.ScorerSettings`).
    ``progress(subset, done, total)`` is called as scoring goes. The result's ``report`` is what ``report.json``
    holds; :func:`prmkit.evaluation.write.write_outputs` writes the report files and plots.
    """
    ev = cfg.eval
    names = [str(m) for m in models] if models else ([cfg.model.name_or_path] if cfg.model.name_or_path else [])
    if not names:
        raise UsageError("no model to evaluate", hint="pass models=[...] or set model.name_or_path")
    sources = [str(d) for d in data] if data is not None else list(ev.data or [])
    if not sources:
        raise UsageError("no evaluation data", hint="pass data=[...] or set eval.data")
    given, tune_on = _threshold(cfg, threshold)
    return evaluation.evaluate(
        names,
        sources,
        # A config written for prepare and train (data.format) serves eval too, unless eval.format is set.
        fmt=ev.format if cfg.is_set("eval.format") else cfg.data.format,
        step_separator=None,
        threshold=given,
        tune_threshold=tune_on,
        prm800k_neutral=cfg.data.prm800k_neutral,
        label_threshold=cfg.data.label_threshold,
        skip_invalid=cfg.data.skip_invalid,
        progress=progress,
        **ScorerSettings.from_config(cfg, "eval").kwargs(),
    )


def _threshold(cfg: Config, threshold: float | None) -> tuple[float | None, str | None]:
    """(the threshold given, the subset to tune it on); both None: the default 0.5.

    A threshold passed to the call beats tuning asked for in the config; otherwise tuning beats a threshold from the
    config (the template from `prmkit config init` spells out threshold: 0.5).
    """
    if threshold is not None:
        return threshold, None
    tune_on = cfg.eval.tune_threshold
    if tune_on is None and "eval.threshold" in cfg.explicit:
        return cfg.eval.threshold, None
    return None, tune_on


def score_file(
    cfg: Config,
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: str | os.PathLike | StepScorer | None = None,
    overwrite: bool = False,
    step_separator: str | None = None,
    stdout: Any = None,
    on_progress: Callable[[dict[str, int]], None] | None = None,
    on_steps: Callable[[int], None] | None = None,
    on_reject: Callable[[str], None] | None = None,
) -> ScoreSummary:
    """Score every step of every solution in ``input`` into JSONL ``output`` (`prmkit score`), resumably.

    ``model`` is a model directory or Hub id (default ``model.name_or_path``), loaded with the ``score`` section's
    settings, or a :class:`prmkit.StepScorer` already loaded (to score several files with one). The ``score``
    section gives the format, threshold, ``skip_invalid`` and ``group_by``. ``output`` ``-`` writes to the text
    stream ``stdout``. Running it again after an interruption continues where it stopped; ``overwrite`` starts over.
    ``step_separator`` overrides the model's own, as ``--step-separator`` does.
    """
    input, output = str(input), str(output)
    group = check_score_file(cfg, input, output)
    scorer: Any = model
    if scorer is None or isinstance(scorer, (str, os.PathLike)):
        name = str(scorer) if scorer is not None else cfg.model.name_or_path
        if not name:
            raise UsageError("no model to score with", hint="pass model=... or set model.name_or_path")
        scorer = ScorerSettings.from_config(cfg, "score").load(name, step_separator=step_separator)
    sc = cfg.score
    return score_job(
        scorer,
        input,
        output,
        fmt=sc.format,
        threshold=sc.threshold,
        skip_invalid=sc.skip_invalid,
        overwrite=overwrite,
        on_progress=on_progress,
        on_steps=on_steps,
        stdout=stdout,
        on_reject=on_reject,
        group=group,
    )


def check_score_file(cfg: Config, input: str, output: str) -> GroupSpec | None:
    """What can be refused before a model loads: the ``score.group_by`` settings, and an output that is the input.

    Returns the grouping asked for (None: none)."""
    sc = cfg.score
    group = group_spec(sc.group_by, sc.select, sc.aggregate if cfg.is_set("score.aggregate") else None)
    if output != "-" and input != "-":
        # Checked again with the model and every companion file once loaded; this one fails before the model loads.
        refuse_inputs_inside(output, [("input", input)], "--overwrite would replace", output_inside=True)
    return group


def push_model(
    cfg: Config, *, model_dir: str | Path, repo_id: str | None = None, dry_run: bool = False, token: str | None = None
) -> PushResult:
    """Upload ``model_dir`` (weights, tokenizer, ``prmkit.json``, a generated card) to the Hub in one commit
    (`prmkit push`), with the ``push`` section's settings; ``repo_id`` overrides ``push.repo_id``.

    ``dry_run`` plans the upload and contacts nothing. The token is ``token``, else ``HF_TOKEN`` or the stored login.
    """
    push = cfg.push if repo_id is None else dataclasses.replace(cfg.push, repo_id=repo_id)
    if not push.repo_id:
        raise UsageError("no repo id: pass repo_id=... or set push.repo_id", hint='e.g. repo_id="alice/qwen2-prm"')
    return push_with_config(model_dir, push, dry_run=dry_run, token=token)
