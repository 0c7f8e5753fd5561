"""The model card: YAML metadata, how the model was trained, its eval results, and working usage snippets."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from prmkit.core import jsonio
from prmkit.core.filenames import CONFIG_YAML, PRMKIT_JSON
from prmkit.core.jsonio import as_object
from prmkit.data.formats import uses_neutral_ratings
from prmkit.errors import UsageError
from prmkit.hub.files import inside, read_text_capped
from prmkit.kinds.registry import HUB_TOKEN_CLASSIFICATION, trained_kind

log = logging.getLogger("prmkit")

TAGS = ["prm", "process-reward-model", "reward-model", "prmkit"]
PROCESSBENCH_SUBSETS = {"gsm8k", "math", "olympiadbench", "omnimath"}
LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt")
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def hub_id(spec: Any) -> str | None:
    """The Hub repo id a data or model spec names, or None for a local path (split syntax is dropped)."""
    if not isinstance(spec, str) or not spec.strip():
        return None
    spec = spec.strip()
    if spec.startswith((".", "/", "~")) or "\\" in spec:
        return None
    name = spec.split("[", 1)[0]
    name = name.split(":", 1)[0] if ":" in name else name
    if not name or name.lower().endswith(LOCAL_DATA_SUFFIXES) or Path(spec).expanduser().exists():
        return None
    return name if HUB_ID.match(name) else None


def _sources(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v]
    return [str(value)]


def load_eval_report(model_dir: Path, eval_report: str | Path | None, repo_id: str) -> tuple[dict | None, str | None]:
    """The report.json to quote in the card: --eval-report, else MODEL_DIR/report.json; (report, where).

    A report named on the command line may be anywhere; the default one must not be a link out of the directory.
    """
    path = Path(eval_report).expanduser() if eval_report else model_dir / "report.json"
    if not path.is_file():
        if eval_report:
            raise UsageError(f"--eval-report {eval_report}: file not found")
        return None, None
    try:
        report = jsonio.loads(read_text_capped(path if eval_report else inside(path, model_dir)))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if isinstance(report, dict) and isinstance(report.get("models"), dict):
        models = report["models"]
        wanted = [k for k in models if Path(str(k)).name in (model_dir.name, repo_id.split("/")[-1]) or k == repo_id]
        if len(models) == 1:
            report = next(iter(models.values()))
        elif len(wanted) == 1:
            report = models[wanted[0]]
        else:
            log.warning(
                f"{path} compares {len(models)} models and none is clearly {model_dir.name}; "
                "the card quotes no results (pass --eval-report with this model's report)"
            )
            return None, None
    if not isinstance(report, dict) or not isinstance(report.get("subsets"), dict):
        raise UsageError(f"{path}: not a prmkit eval report (no 'subsets')")
    return report, str(path)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.2e}"
    return str(value)


def _setting(value: Any) -> str:
    """A config value as its YAML spelling, in a code span."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    return f"`{text}`"


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _eval_section(report: dict, where: str | None) -> tuple[list[str], list[Any]]:
    from huggingface_hub import EvalResult

    lines = ["## Evaluation", ""]
    mean = report.get("mean_f1")
    threshold = report.get("threshold")
    if mean is not None:
        lines.append(
            f"Mean first-error F1 (ProcessBench's metric, unweighted over subsets): **{_fmt(mean)}**"
            + (f" at threshold {threshold:g}." if isinstance(threshold, (int, float)) else ".")
        )
        left_out = report.get("mean_f1_left_out") or {}
        if left_out:  # a headline over fewer subsets than the table shows must say so
            lines.append(
                f"It averages {', '.join(map(str, report.get('mean_f1_subsets') or []))} only; left out: "
                + "; ".join(f"{name} ({why})" for name, why in left_out.items())
                + "."
            )
        lines.append("")
    lines += [
        "| subset | first-error F1 | error acc. | correct acc. | step acc. | step AUROC | PRMScore |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    results = []
    for name, sub in report["subsets"].items():
        step = sub.get("step") or {}
        fe = sub.get("first_error") or {}
        lines.append(
            f"| {_md_cell(name)} | {_fmt(fe.get('f1'))} | {_fmt(fe.get('error_accuracy'))} | "
            f"{_fmt(fe.get('correct_accuracy'))} | {_fmt(step.get('accuracy'))} | {_fmt(step.get('auroc'))} | "
            f"{_fmt(step.get('prm_score'))} |"
        )
        if isinstance(fe.get("f1"), (int, float)):
            known = str(name).lower() in PROCESSBENCH_SUBSETS
            results.append(
                EvalResult(
                    task_type=HUB_TOKEN_CLASSIFICATION,
                    task_name="Process reward modelling (first error identification)",
                    dataset_type="Qwen/ProcessBench" if known else str(name),
                    dataset_name=f"ProcessBench {name}" if known else str(name),
                    dataset_split=str(name) if known else None,
                    metric_type="f1",
                    metric_value=round(float(fe["f1"]), 4),
                    metric_name="first-error F1",
                )
            )
    lines += [
        "",
        "Error acc. and correct acc. are ProcessBench's accuracies on samples with and without an error; "
        "F1 is their harmonic mean. Step columns score every labelled step at the threshold.",
    ]
    if where:
        lines.append(f"Figures from `{Path(where).name}` written by `prmkit eval`.")
    return [*lines, ""], results


PRMKIT_CLI_USAGE = "prmkit score {repo_id} solutions.jsonl -o scored.jsonl"


def _kv_table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("", "")) -> list[str]:
    out = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    out += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in rows]
    return out


def _describe_source(spec: str) -> str:
    hub = hub_id(spec)
    if hub:
        return f"[`{spec}`](https://huggingface.co/datasets/{hub})"
    return f"local file `{Path(spec).name}`"


def _describe_model(spec: str) -> str:
    # Local paths name the directory only: the card is public, the user's file system is not.
    hub = hub_id(spec)
    return f"[`{spec}`](https://huggingface.co/{hub})" if hub else f"local model `{Path(spec).name}`"


def _data_sources(data: dict) -> dict[str, list[str]]:
    """{split: [spec, ...]} from prmkit.json's data section (``sources`` as prepare writes it, or train/eval keys)."""
    sources = as_object(data.get("sources"))
    return {key: _sources(sources.get(key, data.get(key))) for key in ("train", "eval")}


# TrainingArguments that say how a run was logged, saved or scheduled, not how the model was trained.
_CARD_SKIP_KEYS = {
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "logging_steps",
    "logging_strategy",
    "logging_first_step",
    "logging_dir",
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "save_only_model",
    "eval_steps",
    "eval_strategy",
    "eval_on_start",
    "report_to",
    "disable_tqdm",
    "push_to_hub",
    "run_name",
    "log_level",
    "log_level_replica",
    "ddp_timeout",
    "per_device_eval_batch_size",
    "eval_accumulation_steps",
}
_CARD_SKIP_PREFIXES = ("hub_", "dataloader_", "logging_", "save_")
# What a finished run reports about itself (prmkit.json's training section), shown apart from the settings.
_RUN_RESULT_KEYS = ("global_step", "epochs", "train_loss", "final_loss", "seconds")


def _hyperparameters(training: dict) -> dict[str, Any]:
    if isinstance(training.get("hyperparameters"), dict):
        return dict(training["hyperparameters"])
    return {
        k: v
        for k, v in training.items()
        if k not in _CARD_SKIP_KEYS
        and not k.startswith(_CARD_SKIP_PREFIXES)
        and k not in _RUN_RESULT_KEYS
        and k not in ("eval", "lora")
        and (v is None or isinstance(v, (str, int, float, bool)))
    }


def _training_section(meta: dict, base: str | None, separator: str, has_config_yaml: bool) -> list[str]:
    tok = meta.get("tokenization") or {}
    data = meta.get("data") or {}
    training = meta.get("training") or {}
    lora = meta.get("lora") or training.get("lora")
    model = meta.get("model") or {}
    splits = as_object(data.get("splits") if isinstance(data.get("splits"), dict) else meta.get("splits"))
    formats = as_object(data.get("formats"))

    if model.get("init_from_config"):
        base_cell = (
            f"{_describe_model(base)}'s architecture with random weights (`model.init_from_config`)"
            if base
            else "random weights"
        )
    else:
        base_cell = _describe_model(base) if base else "–"
    rows: list[tuple[str, Any]] = [("base model", base_cell)]
    for key, specs in _data_sources(data).items():
        if not specs:
            continue
        detail = [formats.get(key) or (data.get("format") if data.get("format") not in (None, "auto") else None)]
        split = as_object(splits.get(key))
        if split.get("rows_kept") is not None:
            detail.append(f"{split['rows_kept']:,} rows")
        if split.get("steps") is not None:
            detail.append(f"{split['steps']:,} steps")
        extra = ", ".join(str(d) for d in detail if d)
        rows.append((f"{key} data", ", ".join(_describe_source(s) for s in specs) + (f" ({extra})" if extra else "")))
    if uses_neutral_ratings({data.get("format"), *formats.values()}) and data.get("prm800k_neutral"):
        rows.append(("PRM800K neutral ratings count as", _setting(data["prm800k_neutral"])))
    if data.get("label_threshold") is not None:
        rows.append(("soft labels binarized at", _setting(data["label_threshold"])))
    lines = [*_kv_table(rows, ("", "setup")), ""]

    lines += ["Tokenization (TRL `PRMTrainer` compatible; recorded in `prmkit.json`):", ""]
    tok_rows = [("step_separator", f"`{json.dumps(separator, ensure_ascii=False)}`")]
    tok_rows += [(k, _setting(v)) for k, v in tok.items() if k != "step_separator"]
    lines += [*_kv_table(tok_rows, ("parameter", "value")), ""]

    hyper = _hyperparameters(training)
    if hyper:
        lines += ["Hyperparameters:", ""]
        lines += [*_kv_table([(k, _setting(v)) for k, v in hyper.items()], ("parameter", "value")), ""]
    if isinstance(lora, dict) and lora:
        lines += ["LoRA:", ""]
        lines += [*_kv_table([(k, _setting(v)) for k, v in lora.items()], ("parameter", "value")), ""]

    def short(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    run = [(k.replace("_", " "), short(training[k])) for k in _RUN_RESULT_KEYS if training.get(k) is not None]
    evals = as_object(training.get("eval"))
    run += [(f"eval {k}", short(v)) for k, v in evals.items() if isinstance(v, (int, float))]
    if run:
        lines += ["Training run:", "", *_kv_table(run, ("", "")), ""]
    if meta.get("prmkit_version"):
        where = f"; the full config is in `{CONFIG_YAML}`" if has_config_yaml else ""
        lines += [f"Trained with prmkit {meta['prmkit_version']}{where}.", ""]
    return lines


def build_card(
    repo_id: str,
    metadata: dict | None,
    report: dict | None = None,
    report_path: str | None = None,
    license: str | None = None,
    adapter_config: dict | None = None,
    has_config_yaml: bool = False,
) -> str:
    """README.md text: YAML metadata (ModelCardData), how the model was trained, its results, and how to use it.

    (Over 100 lines: the card's sections, in the order they appear, each a few lines.)
    """
    from huggingface_hub import ModelCard, ModelCardData

    meta = metadata or {}
    tok = meta.get("tokenization") or {}
    base = meta.get("base_model")
    if adapter_config is not None and adapter_config.get("base_model_name_or_path"):
        base = hub_id(adapter_config["base_model_name_or_path"]) or base or adapter_config["base_model_name_or_path"]
    random_init = bool((meta.get("model") or {}).get("init_from_config"))
    # A model built from a config with random weights is not a fine-tune of that model: no base_model link.
    base_id = None if random_init else hub_id(base)
    separator = tok.get("step_separator", "\n")
    datasets = sorted(
        {h for specs in _data_sources(meta.get("data") or {}).values() for s in specs if (h := hub_id(s))}
    )

    eval_lines, eval_results = _eval_section(report, report_path) if report else ([], [])
    kind_info: dict[str, Any] = meta["kind"] if isinstance(meta.get("kind"), dict) else {}
    kind_card = trained_kind(kind_info).card
    assert kind_card is not None  # every kind prmkit trains declares its card
    card_data = ModelCardData(
        library_name="peft" if adapter_config is not None else "transformers",
        pipeline_tag=kind_card.pipeline_tag,
        tags=list(TAGS),
        base_model=base_id,
        datasets=datasets or None,
        license=license,
        model_name=repo_id if eval_results else None,
        eval_results=eval_results or None,
    )

    kind = (
        "A LoRA adapter for a process reward model (PRM)"
        if adapter_config is not None
        else "A process reward model (PRM)"
    )
    lines = [f"# {repo_id.split('/')[-1]}", ""]
    intro = f"{kind}, trained with prmkit"
    intro += f" from {_describe_model(base)}." if base and not random_init else "."
    where = kind_card.reads(kind_info)
    lines += [
        intro + " Given a problem and a step-by-step solution it gives every step the probability that the step "
        f"is correct: {where}.",
        "",
    ]
    lines += eval_lines

    lines += [
        "## Usage",
        "",
        "### prmkit",
        "",
        "```bash",
        PRMKIT_CLI_USAGE.format(repo_id=repo_id),
        "```",
        "",
        "```python",
        "from prmkit import StepScorer",
        "",
        f'scorer = StepScorer.from_pretrained("{repo_id}")',
        'scores = scorer.score("What is 2 + 3?", ["2 + 3 = 5.", "The answer is 5."])  # one p(correct) per step',
        "```",
        "",
        "prmkit reads the separator and the tokenization parameters from `prmkit.json` in this repo.",
        "",
    ]
    lines += kind_card.usage(repo_id, kind_info, separator, adapter_config is not None)
    if tok.get("max_length"):
        lines += [f"Training truncated sequences to {tok['max_length']} tokens; keep solutions within that.", ""]

    lines += ["## Training", ""]
    if not metadata:
        lines += [
            f"This directory had no `{PRMKIT_JSON}`, so the training setup is not recorded; scorers assume the "
            'separator `"\\n"` (TRL\'s default).',
            "",
        ]
    else:
        lines += _training_section(meta, base, separator, has_config_yaml)

    lines += [
        "## Labels",
        "",
        "| id | label | meaning |",
        "|---|---|---|",
        "| 0 | LABEL_0 | step is wrong |",
        "| 1 | LABEL_1 | step is correct |",
        "",
    ]

    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n"
    return str(ModelCard(content))  # parses the front matter back: a broken card fails here, not on the Hub


def is_template_card(text: str) -> bool:
    """Whether a README.md is huggingface_hub's blank model-card template, as PeftModel.save_pretrained writes it."""
    return (
        "<!-- Provide a quick summary of what the model is/does. -->" in text
        and text.count("[More Information Needed]") >= 10
    )
