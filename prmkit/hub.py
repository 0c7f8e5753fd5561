"""Publishing a model directory to the Hugging Face Hub: pick the files, check them, write the card, commit once.

``push_model`` is what `prmkit push` and ``train.push_to_hub`` call. It works in three steps:

1. ``plan_push`` (local only, no network): choose the files to upload (safetensors weights, config, tokenizer,
   ``prmkit.json``, the card), run the pre-flight checks, and build the model card.
2. Compare with the remote branch (``list_repo_tree``): a file whose git blob sha1 (or LFS sha256) matches is not sent
   again, and a directory that matches completely is a no-op without a commit.
3. One ``create_commit`` with every changed file, so the repo never shows half a model.

The token comes from ``token=``, ``HF_TOKEN`` or the stored login (``huggingface_hub.get_token``); ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` are honoured by huggingface_hub itself. Hub and network failures become one-line ``PrmkitError``
messages in ``hub_error``; the token never appears in any of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from prmkit import __version__
from prmkit.errors import PrmkitError, UsageError
from prmkit.modeling import CONFIG_YAML, PRMKIT_JSON

log = logging.getLogger("prmkit")

TAGS = ["prm", "process-reward-model", "reward-model", "prmkit"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# The Trainer pickles its arguments beside the weights; they are not weights and are never pushed.
TRAINER_PICKLES = {"training_args.bin"}
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
)
# Files a tokenizer can be built from; tokenizer_config.json alone describes one but holds no vocabulary.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model",
                         "sentencepiece.bpe.model")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PROCESSBENCH_SUBSETS = {"gsm8k", "math", "olympiadbench", "omnimath"}
README = "README.md"
LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt")
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


# ---------------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class PushFile:
    path: str
    """Path in the repo."""
    size: int
    source: str
    """The local file it comes from (relative to the model directory), or "generated" for the model card."""
    status: str | None = None
    """new | changed | unchanged | deleted; None in a dry run (the Hub is not asked)."""
    content: bytes | None = field(default=None, repr=False)
    local: Path | None = field(default=None, repr=False)
    _hashes: tuple[str, str] | None = field(default=None, repr=False)

    def hashes(self) -> tuple[str, str]:
        """(sha256, git blob sha1): the Hub reports the first for LFS files and the second for regular ones."""
        if self._hashes is None:
            sha256, sha1 = hashlib.sha256(), hashlib.sha1()
            sha1.update(b"blob %d\0" % self.size)
            for chunk in self._chunks():
                sha256.update(chunk)
                sha1.update(chunk)
            self._hashes = (sha256.hexdigest(), sha1.hexdigest())
        return self._hashes

    def _chunks(self) -> Iterator[bytes]:
        if self.content is not None:
            yield self.content
            return
        assert self.local is not None
        with open(self.local, "rb") as fh:
            while chunk := fh.read(1 << 22):
                yield chunk

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "source": self.source, "status": self.status}


@dataclass
class PushPlan:
    model_dir: Path
    repo_id: str
    mode: str
    """full | adapter."""
    files: list[PushFile]
    card: str
    card_source: str
    """generated | model_dir (an existing README.md kept as it is)."""
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PushResult:
    repo_id: str
    revision: str
    mode: str
    files: list[PushFile]
    dry_run: bool = False
    no_op: bool = False
    url: str | None = None
    commit_oid: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    deleted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    card_source: str = "generated"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def uploaded_bytes(self) -> int:
        return sum(f.size for f in self.files if f.status in ("new", "changed"))

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "files"}
        out["files"] = [f.to_dict() for f in self.files]
        out["total_bytes"] = self.total_bytes
        out["uploaded_bytes"] = None if self.dry_run else self.uploaded_bytes
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Choosing files


def find_adapter_dir(model_dir: Path, metadata: dict | None = None) -> Path | None:
    """Where a LoRA adapter lives: prmkit.json's adapter_dir, else ``adapter/``, else the directory itself."""
    candidates = []
    if metadata and metadata.get("adapter_dir"):
        recorded = Path(metadata["adapter_dir"])
        candidates.append(recorded if recorded.is_absolute() else model_dir / recorded)
    candidates += [model_dir / "adapter", model_dir]
    for cand in candidates:
        if (cand / "adapter_config.json").is_file():
            return cand
    return None


def _top_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def _is_weight(name: str) -> bool:
    return (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")) and not name.startswith("adapter_")


def _select_files(model_dir: Path, adapter: bool, allow_pickle: bool, metadata: dict | None,
                  warnings: list[str]) -> tuple[list[tuple[str, Path]], list[str], Path, Path | None]:
    """(path in repo, local file) pairs, skipped names, the tokenizer's directory, and the adapter's directory."""
    chosen: dict[str, Path] = {}
    top = _top_files(model_dir)
    names = {p.name for p in top}
    adapter_dir = find_adapter_dir(model_dir, metadata)

    pickles = [p.name for p in top if p.suffix in PICKLE_SUFFIXES and p.name not in TRAINER_PICKLES]
    if pickles and not allow_pickle:
        raise UsageError(
            f"{model_dir} holds pickle files ({', '.join(pickles)}): loading them can run arbitrary code",
            hint="prmkit pushes safetensors only; delete or convert them, or pass --allow-pickle to upload them anyway")

    if adapter:
        if adapter_dir is None:
            raise UsageError(f"--adapter: no adapter_config.json in {model_dir} or {model_dir / 'adapter'}",
                             hint="train with train.lora set and train.lora_merge: false to get an adapter")
        for name in ADAPTER_FILES:
            if not (adapter_dir / name).is_file():
                raise UsageError(f"{adapter_dir}: {name} is missing; an adapter needs {' and '.join(ADAPTER_FILES)}")
            chosen[name] = adapter_dir / name
    else:
        weights = [p for p in top if _is_weight(p.name)]
        if not any(p.name.endswith(".safetensors") for p in weights):
            hint = None
            if adapter_dir is not None:
                hint = "this directory holds a LoRA adapter: push it with --adapter"
            elif pickles:
                hint = "convert the weights: model.save_pretrained(dir, safe_serialization=True)"
            raise UsageError(f"{model_dir}: no safetensors weights (model.safetensors or shards)", hint=hint)
        for p in weights:
            chosen[p.name] = p
        for name in CONFIG_FILES:
            if name in names:
                chosen[name] = model_dir / name
        if "config.json" not in chosen:
            raise UsageError(f"{model_dir}: config.json is missing; the weights cannot be loaded without it")

    tok_dir = model_dir
    if not any(n in names for n in TOKENIZER_VOCAB_FILES) and adapter_dir is not None:
        tok_dir = adapter_dir
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            chosen[name] = tok_dir / name

    for name in (PRMKIT_JSON, CONFIG_YAML):
        for where in (model_dir, adapter_dir):
            if where is not None and (where / name).is_file():
                chosen.setdefault(name, where / name)

    if allow_pickle:
        for name in pickles:
            chosen[name] = model_dir / name
            warnings.append(f"uploading pickle file {name} as asked (--allow-pickle)")

    if README in names:
        chosen[README] = model_dir / README
    taken = {p.resolve() for p in chosen.values()}
    parents = {d for p in taken for d in p.parents}
    skipped = sorted(p.name + ("/" if p.is_dir() else "") for p in model_dir.iterdir()
                     if not p.name.startswith(".") and p.resolve() not in taken and p.resolve() not in parents)
    return sorted(chosen.items()), skipped, tok_dir, adapter_dir if adapter else None


# ---------------------------------------------------------------------------------------------------------------------
# Pre-flight checks


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking that the data it describes is all there."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise UsageError(f"{path}: not a safetensors file (too short)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or n > min(size - 8, 100 << 20):
            raise UsageError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UsageError(f"{path}: not a safetensors file (unreadable header)") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + n + (max(ends) if ends else 0)
    if expected != size:
        raise UsageError(f"{path}: truncated or corrupt ({size} bytes, the header describes {expected})")
    return header


def _check_weights(model_dir: Path, files: list[tuple[str, Path]]) -> None:
    headers = {name: read_safetensors_header(p) for name, p in files if name.endswith(".safetensors")}
    for name, p in files:
        if not name.endswith(".safetensors.index.json"):
            continue
        try:
            weight_map: dict[str, str] = json.loads(p.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            raise UsageError(f"{p}: not a valid safetensors index (no weight_map)") from None
        for shard in sorted(set(weight_map.values())):
            if shard not in headers:
                raise UsageError(f"{p}: refers to {shard}, which is not in {model_dir}")
            listed = {k for k, v in weight_map.items() if v == shard}
            present = set(headers[shard]) - {"__metadata__"}
            if listed - present:
                raise UsageError(f"{model_dir / shard}: lacks {len(listed - present)} tensor(s) the index lists, "
                                  f"e.g. {sorted(listed - present)[0]}")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # The loading report and progress bars of transformers would drown the push's own output.
    from transformers.utils import logging as tlog

    level, bar = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bar:
            tlog.enable_progress_bar()


def _trust_remote_code(model_dir: Path) -> bool:
    path = model_dir / CONFIG_YAML
    if not path.is_file():
        return False
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return bool((cfg.get("model") or {}).get("trust_remote_code", False))
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
        return False


def _check_model_loads(model_dir: Path, warnings: list[str]) -> None:
    """Instantiate the model on the meta device from config.json and the checkpoint's headers.

    This runs transformers' own key matching (renames, tied weights, shapes) without reading a tensor, so it takes
    about a second whatever the model's size.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification

    trust = _trust_remote_code(model_dir)
    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"{model_dir / 'config.json'}: does not load: {_first_line(e)}") from None
        if getattr(config, "num_labels", 2) != 2:
            warnings.append(f"config.json has num_labels={config.num_labels}; a prmkit PRM has 2 (wrong, correct)")
        try:
            _, info = AutoModelForTokenClassification.from_pretrained(
                model_dir, device_map="meta", output_loading_info=True, trust_remote_code=trust)
        except Exception as e:  # whatever stops it loading is the finding
            raise UsageError(f"{model_dir}: the model does not load with AutoModelForTokenClassification: "
                              f"{_first_line(e)}") from None
    problems = [("missing", sorted(info.get("missing_keys") or [])),
                ("with the wrong shape", sorted(str(k) for k in info.get("mismatched_keys") or []))]
    for what, keys in problems:
        if keys:
            raise UsageError(f"{model_dir}: {len(keys)} weight(s) {what} in the checkpoint, e.g. {keys[0]}",
                              hint="the weights do not match config.json; re-save the model with save_pretrained")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        warnings.append(f"the checkpoint has {len(unexpected)} weight(s) the model does not use, e.g. {unexpected[0]}")


def _check_adapter(adapter_dir: Path, warnings: list[str]) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise UsageError(f"{path}: not a PEFT adapter config (no peft_type)")
    read_safetensors_header(adapter_dir / "adapter_model.safetensors")
    base = cfg.get("base_model_name_or_path")
    if not base:
        warnings.append("adapter_config.json names no base model; users must load the base model themselves")
    elif _hub_id(base) is None:
        warnings.append(f"the adapter's base model {base!r} is a local path: others cannot load the adapter from "
                        "the Hub until base_model_name_or_path names a Hub model")
    return cfg


def _check_tokenizer(tok_dir: Path, names: set[str], trust: bool) -> None:
    if not any(n in names for n in TOKENIZER_VOCAB_FILES):
        raise UsageError(f"{tok_dir}: no tokenizer files (expected one of {', '.join(TOKENIZER_VOCAB_FILES)})",
                          hint="save the tokenizer beside the model: tokenizer.save_pretrained(dir)")
    from transformers import AutoTokenizer

    with _quiet_transformers():
        try:
            AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust)
        except Exception as e:  # whatever stops it loading is the finding
            raise UsageError(f"{tok_dir}: the tokenizer does not load: {_first_line(e)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------------
# The model card


def _hub_id(spec: Any) -> str | None:
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
    return name if _HUB_ID.match(name) else None


def _sources(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v]
    return [str(value)]


def load_eval_report(model_dir: Path, eval_report: str | Path | None, repo_id: str) -> tuple[dict | None, str | None]:
    """The report.json to quote in the card: --eval-report, else MODEL_DIR/report.json; (report, where)."""
    path = Path(eval_report).expanduser() if eval_report else model_dir / "report.json"
    if not path.is_file():
        if eval_report:
            raise UsageError(f"--eval-report {eval_report}: file not found")
        return None, None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if isinstance(report, dict) and isinstance(report.get("models"), dict):
        models = report["models"]
        wanted = [k for k in models if Path(str(k)).name in (model_dir.name, repo_id.split("/")[-1]) or k == repo_id]
        if len(models) == 1:
            report = next(iter(models.values()))
        elif len(wanted) == 1:
            report = models[wanted[0]]
        else:
            log.warning(f"{path} compares {len(models)} models and none is clearly {model_dir.name}; "
                        "the card quotes no results (pass --eval-report with this model's report)")
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
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"
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
        lines.append(f"Mean first-error F1 (ProcessBench's metric, unweighted over subsets): **{_fmt(mean)}**"
                     + (f" at threshold {threshold:g}." if isinstance(threshold, (int, float)) else "."))
        lines.append("")
    lines += [
        "| subset | first-error F1 | error acc. | correct acc. | step acc. | step AUROC | PRMScore |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    results = []
    for name, sub in report["subsets"].items():
        step = sub.get("step") or {}
        fe = sub.get("first_error") or {}
        lines.append(f"| {_md_cell(name)} | {_fmt(fe.get('f1'))} | {_fmt(fe.get('error_accuracy'))} | "
                     f"{_fmt(fe.get('correct_accuracy'))} | {_fmt(step.get('accuracy'))} | {_fmt(step.get('auroc'))} | "
                     f"{_fmt(step.get('prm_score'))} |")
        if isinstance(fe.get("f1"), (int, float)):
            known = str(name).lower() in PROCESSBENCH_SUBSETS
            results.append(EvalResult(
                task_type="token-classification", task_name="Process reward modelling (first error identification)",
                dataset_type="Qwen/ProcessBench" if known else str(name), dataset_name=f"ProcessBench {name}" if known else str(name),
                dataset_split=str(name) if known else None, metric_type="f1", metric_value=round(float(fe["f1"]), 4),
                metric_name="first-error F1"))
    lines += ["", "Error acc. and correct acc. are ProcessBench's accuracies on samples with and without an error; "
              "F1 is their harmonic mean. Step columns score every labelled step at the threshold."]
    if where:
        lines.append(f"Figures from `{Path(where).name}` written by `prmkit eval`.")
    return lines + [""], results


TRANSFORMERS_SNIPPET = '''\
import torch
{imports}

repo = "{repo_id}"
tokenizer = AutoTokenizer.from_pretrained(repo)
model = {model_load}
separator = {separator}  # prmkit.json: tokenization.step_separator

prompt = "Tom has 3 apples and buys 2 more. How many apples does he have?"
steps = ["Tom starts with 3 apples.", "He buys 2 more, so 3 + 2 = 5.", "The answer is 5."]


def encode(text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# As in training: the prompt and each step are tokenized on their own, the separator's tokens follow each step,
# and a step is scored at the LAST token of its separator.
input_ids = encode(prompt)
if tokenizer.bos_token_id is not None:
    input_ids = [tokenizer.bos_token_id] + input_ids
separator_ids = encode(separator)
positions = []
for step in steps:
    input_ids += encode(step) + separator_ids
    positions.append(len(input_ids) - 1)

with torch.no_grad():
    logits = model(input_ids=torch.tensor([input_ids])).logits[0]
step_scores = logits[positions].softmax(dim=-1)[:, 1].tolist()  # p(step is correct): LABEL_1
print(step_scores)
'''

PRMKIT_CLI_USAGE = "prmkit score {repo_id} solutions.jsonl -o scored.jsonl"


def transformers_snippet(repo_id: str, separator: str, adapter: bool = False) -> str:
    """Plain-transformers scoring code that places labels exactly where ``encode_solutions`` does."""
    if adapter:
        imports = "from peft import AutoPeftModelForTokenClassification\nfrom transformers import AutoTokenizer"
        model_load = "AutoPeftModelForTokenClassification.from_pretrained(repo).eval()"
    else:
        imports = "from transformers import AutoModelForTokenClassification, AutoTokenizer"
        model_load = "AutoModelForTokenClassification.from_pretrained(repo).eval()"
    return TRANSFORMERS_SNIPPET.format(repo_id=repo_id, separator=repr(separator), imports=imports,
                                       model_load=model_load)


def _kv_table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("", "")) -> list[str]:
    out = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    out += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in rows]
    return out


def _describe_source(spec: str) -> str:
    hub = _hub_id(spec)
    if hub:
        return f"[`{spec}`](https://huggingface.co/datasets/{hub})"
    return f"local file `{Path(spec).name}`"


def _describe_model(spec: str) -> str:
    # Local paths name the directory only: the card is public, the user's file system is not.
    hub = _hub_id(spec)
    return f"[`{spec}`](https://huggingface.co/{hub})" if hub else f"local model `{Path(spec).name}`"


def _data_sources(data: dict) -> dict[str, list[str]]:
    """{split: [spec, ...]} from prmkit.json's data section (``sources`` as prepare writes it, or train/eval keys)."""
    sources = data.get("sources") if isinstance(data.get("sources"), dict) else {}
    return {key: _sources(sources.get(key, data.get(key))) for key in ("train", "eval")}


# TrainingArguments that say how a run was logged, saved or scheduled, not how the model was trained.
_CARD_SKIP_KEYS = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps", "logging_strategy",
    "logging_first_step", "logging_dir", "save_steps", "save_strategy", "save_total_limit", "save_only_model",
    "eval_steps", "eval_strategy", "eval_on_start", "report_to", "disable_tqdm", "push_to_hub", "run_name", "log_level",
    "log_level_replica", "ddp_timeout", "per_device_eval_batch_size", "eval_accumulation_steps",
}
_CARD_SKIP_PREFIXES = ("hub_", "dataloader_", "logging_", "save_")
# What a finished run reports about itself (prmkit.json's training section), shown apart from the settings.
_RUN_RESULT_KEYS = ("global_step", "epochs", "train_loss", "final_loss", "seconds")


def _hyperparameters(training: dict) -> dict[str, Any]:
    if isinstance(training.get("hyperparameters"), dict):
        return dict(training["hyperparameters"])
    return {k: v for k, v in training.items()
            if k not in _CARD_SKIP_KEYS and not k.startswith(_CARD_SKIP_PREFIXES) and k not in _RUN_RESULT_KEYS
            and k not in ("eval", "lora") and (v is None or isinstance(v, (str, int, float, bool)))}


def _training_section(meta: dict, base: str | None, separator: str, has_config_yaml: bool) -> list[str]:
    tok = meta.get("tokenization") or {}
    data = meta.get("data") or {}
    training = meta.get("training") or {}
    lora = meta.get("lora") or training.get("lora")
    model = meta.get("model") or {}
    splits = data.get("splits") if isinstance(data.get("splits"), dict) else meta.get("splits") or {}
    formats = data.get("formats") if isinstance(data.get("formats"), dict) else {}

    if model.get("init_from_config"):
        base_cell = f"{_describe_model(base)}'s architecture with random weights (`model.init_from_config`)" \
            if base else "random weights"
    else:
        base_cell = _describe_model(base) if base else "–"
    rows: list[tuple[str, Any]] = [("base model", base_cell)]
    for key, specs in _data_sources(data).items():
        if not specs:
            continue
        detail = [formats.get(key) or (data.get("format") if data.get("format") not in (None, "auto") else None)]
        split = splits.get(key) if isinstance(splits.get(key), dict) else {}
        if split.get("rows_kept") is not None:
            detail.append(f"{split['rows_kept']:,} rows")
        if split.get("steps") is not None:
            detail.append(f"{split['steps']:,} steps")
        extra = ", ".join(str(d) for d in detail if d)
        rows.append((f"{key} data", ", ".join(_describe_source(s) for s in specs) + (f" ({extra})" if extra else "")))
    if "prm800k" in {data.get("format"), *formats.values()} and data.get("prm800k_neutral"):
        rows.append(("PRM800K neutral ratings count as", _setting(data["prm800k_neutral"])))
    if data.get("label_threshold") is not None:
        rows.append(("soft labels binarized at", _setting(data["label_threshold"])))
    lines = _kv_table(rows, ("", "setup")) + [""]

    lines += ["Tokenization (TRL `PRMTrainer` compatible; recorded in `prmkit.json`):", ""]
    tok_rows = [("step_separator", f"`{json.dumps(separator, ensure_ascii=False)}`")]
    tok_rows += [(k, _setting(v)) for k, v in tok.items() if k != "step_separator"]
    lines += _kv_table(tok_rows, ("parameter", "value")) + [""]

    hyper = _hyperparameters(training)
    if hyper:
        lines += ["Hyperparameters:", ""]
        lines += _kv_table([(k, _setting(v)) for k, v in hyper.items()], ("parameter", "value")) + [""]
    if isinstance(lora, dict) and lora:
        lines += ["LoRA:", ""]
        lines += _kv_table([(k, _setting(v)) for k, v in lora.items()], ("parameter", "value")) + [""]
    def short(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    run = [(k.replace("_", " "), short(training[k])) for k in _RUN_RESULT_KEYS if training.get(k) is not None]
    evals = training.get("eval") if isinstance(training.get("eval"), dict) else {}
    run += [(f"eval {k}", short(v)) for k, v in evals.items() if isinstance(v, (int, float))]
    if run:
        lines += ["Training run:", ""] + _kv_table(run, ("", "")) + [""]
    if meta.get("prmkit_version"):
        where = f"; the full config is in `{CONFIG_YAML}`" if has_config_yaml else ""
        lines += [f"Trained with prmkit {meta['prmkit_version']}{where}.", ""]
    return lines


def build_card(repo_id: str, metadata: dict | None, report: dict | None = None, report_path: str | None = None,
               license: str | None = None, adapter_config: dict | None = None, has_config_yaml: bool = False) -> str:
    """README.md text: YAML metadata (ModelCardData), how the model was trained, its results, and how to use it."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = metadata or {}
    tok = meta.get("tokenization") or {}
    base = meta.get("base_model")
    if adapter_config is not None and adapter_config.get("base_model_name_or_path"):
        base = _hub_id(adapter_config["base_model_name_or_path"]) or base or adapter_config["base_model_name_or_path"]
    random_init = bool((meta.get("model") or {}).get("init_from_config"))
    # A model built from a config with random weights is not a fine-tune of that model: no base_model link.
    base_id = None if random_init else _hub_id(base)
    separator = tok.get("step_separator", "\n")
    datasets = sorted({h for specs in _data_sources(meta.get("data") or {}).values() for s in specs
                       if (h := _hub_id(s))})

    eval_lines, eval_results = _eval_section(report, report_path) if report else ([], [])
    card_data = ModelCardData(
        library_name="peft" if adapter_config is not None else "transformers",
        pipeline_tag="token-classification",
        tags=list(TAGS),
        base_model=base_id,
        datasets=datasets or None,
        license=license,
        model_name=repo_id if eval_results else None,
        eval_results=eval_results or None,
    )

    kind = "A LoRA adapter for a process reward model (PRM)" if adapter_config is not None else "A process reward model (PRM)"
    lines = [f"# {repo_id.split('/')[-1]}", ""]
    intro = f"{kind}, trained with prmkit"
    intro += f" from {_describe_model(base)}." if base and not random_init else "."
    lines += [intro + " Given a problem and a step-by-step solution it gives every step the probability that the step "
              "is correct: `softmax(logits)[..., 1]` (`LABEL_1`) at the last token of the step's separator.", ""]
    lines += eval_lines

    lines += ["## Usage", "", "### prmkit", "", "```bash", PRMKIT_CLI_USAGE.format(repo_id=repo_id), "```", "",
              "```python", "from prmkit import StepScorer", "",
              f'scorer = StepScorer.from_pretrained("{repo_id}")',
              'scores = scorer.score("What is 2 + 3?", ["2 + 3 = 5.", "The answer is 5."])  # one p(correct) per step',
              "```", "",
              "prmkit reads the separator and the tokenization parameters from `prmkit.json` in this repo.", "",
              "### transformers", "",
              f"The step separator is `{json.dumps(separator, ensure_ascii=False)}`. Tokenize the prompt and every step "
              "separately and put the separator's tokens after each step, exactly as training did. Do not join "
              "`prompt + separator + step + ...` into one string: BPE merges characters across the boundary (with "
              "Qwen2, `.\\n` is a single token), so the separator's last token is not where the model learned to "
              "score, and the scores are wrong without any error.", "",
              "```python", transformers_snippet(repo_id, separator, adapter_config is not None).rstrip(), "```", ""]
    if tok.get("max_length"):
        lines += [f"Training truncated sequences to {tok['max_length']} tokens; keep solutions within that.", ""]

    lines += ["## Training", ""]
    if not metadata:
        lines += [f"This directory had no `{PRMKIT_JSON}`, so the training setup is not recorded; scorers assume the "
                  "separator `\"\\n\"` (TRL's default).", ""]
    else:
        lines += _training_section(meta, base, separator, has_config_yaml)

    lines += ["## Labels", "", "| id | label | meaning |", "|---|---|---|",
              "| 0 | LABEL_0 | step is wrong |", "| 1 | LABEL_1 | step is correct |", ""]

    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n"
    return str(ModelCard(content))  # parses the front matter back: a broken card fails here, not on the Hub


# ---------------------------------------------------------------------------------------------------------------------
# Planning (local) and pushing (remote)


def is_template_card(text: str) -> bool:
    """Whether a README.md is huggingface_hub's blank model-card template, as PeftModel.save_pretrained writes it."""
    return "<!-- Provide a quick summary of what the model is/does. -->" in text and \
        text.count("[More Information Needed]") >= 10


def plan_push(
    model_dir: str | Path,
    repo_id: str,
    *,
    adapter: bool = False,
    eval_report: str | Path | None = None,
    overwrite_card: bool = False,
    allow_pickle: bool = False,
    license: str | None = None,
) -> PushPlan:
    """Choose and check the files to upload and build the card; touches no network and writes nothing."""
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir}: not a directory")
    warnings: list[str] = []
    metadata = None
    if (model_dir / PRMKIT_JSON).is_file():
        try:
            metadata = json.loads((model_dir / PRMKIT_JSON).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{model_dir / PRMKIT_JSON}: not valid JSON ({e})") from None
    files, skipped, tok_dir, adapter_dir = _select_files(model_dir, adapter, allow_pickle, metadata, warnings)
    if metadata is None and not (adapter_dir and (adapter_dir / PRMKIT_JSON).is_file()):
        warnings.append(f"no {PRMKIT_JSON}: the card cannot state the step separator and scorers will assume '\\n'")

    adapter_config = None
    if adapter_dir is not None:
        adapter_config = _check_adapter(adapter_dir, warnings)
    else:
        _check_weights(model_dir, files)
        _check_model_loads(model_dir, warnings)
    _check_tokenizer(tok_dir, {p.name for p in tok_dir.iterdir()}, _trust_remote_code(model_dir))

    report, report_path = load_eval_report(model_dir, eval_report, repo_id)
    if license is None:
        warnings.append("no license given (--license or push.license): the card declares none")

    pushed = [PushFile(name, p.stat().st_size, _relative(p, model_dir), local=p) for name, p in files if name != README]
    existing = (model_dir / README).read_text(encoding="utf-8", errors="replace") if README in dict(files) else None
    if existing is not None and not overwrite_card and is_template_card(existing):
        log.info(f"{model_dir / README} is the unedited card template PEFT writes beside an adapter; generating the "
                 "card instead")
        overwrite_card = True
    if existing is not None and not overwrite_card:
        card = existing
        readme = PushFile(README, (model_dir / README).stat().st_size, README, local=model_dir / README)
        card_source = "model_dir"
    else:
        card = build_card(repo_id, metadata, report, report_path, license, adapter_config,
                          has_config_yaml=CONFIG_YAML in dict(files))
        data = card.encode("utf-8")
        readme = PushFile(README, len(data), "generated", content=data)
        card_source = "generated"
        if README in dict(files):
            skipped = sorted({*skipped, README})
    pushed.append(readme)
    for w in warnings:
        log.warning(w)
    return PushPlan(model_dir, repo_id, "adapter" if adapter_dir else "full", pushed, card, card_source, skipped,
                    warnings)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def resolve_token(token: str | None = None) -> str:
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise PrmkitError("not logged in to the Hugging Face Hub",
                          hint="run `hf auth login`, or set HF_TOKEN to a token with write access")
    return found


def hub_error(exc: BaseException, repo_id: str | None = None, token: str | None = None,
              revision: str | None = None) -> PrmkitError | None:
    """The one-line PrmkitError for a huggingface_hub or network failure; None for anything else (a bug)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError,
    )

    repo = repo_id or "the repo"
    err: PrmkitError | None = None
    if isinstance(exc, LocalTokenNotFoundError):
        err = PrmkitError("not logged in to the Hugging Face Hub",
                          hint="run `hf auth login`, or set HF_TOKEN to a token with write access")
    elif isinstance(exc, OfflineModeIsEnabled):
        err = PrmkitError("HF_HUB_OFFLINE is set: pushing needs the Hub", hint="unset HF_HUB_OFFLINE to push")
    elif isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if getattr(exc, "response", None) is not None else None
        server = " ".join(str(exc.server_message or "").split()).rstrip(".")
        said = f": {server}" if server else ""
        if status == 401 and not isinstance(exc, RepositoryNotFoundError):
            err = PrmkitError("the Hub rejected the token (401 Unauthorized): it is invalid, expired or revoked",
                              hint="create a token with write access at https://huggingface.co/settings/tokens, "
                                   "then `hf auth login` or set HF_TOKEN")
        elif isinstance(exc, RevisionNotFoundError):
            err = PrmkitError(f"{repo}: branch {revision!r} not found",
                              hint="create it on the Hub, or push without --revision" if revision else None)
        elif isinstance(exc, RepositoryNotFoundError):
            err = PrmkitError(f"{repo}: repository not found, or this token cannot see it")
        elif status == 403:
            err = PrmkitError(f"no write access to {repo} (403 Forbidden){said}",
                              hint="use a token with write permission for this namespace (a fine-grained token needs "
                                   "'write' on the repo or organisation)")
        elif status == 409:
            err = PrmkitError(f"{repo} exists but this token cannot see it (409 Conflict){said}")
        elif status == 429:
            err = PrmkitError(f"the Hub rate-limited this request (429){said}", hint="wait a minute and push again")
        elif status is not None and status >= 500:
            err = PrmkitError(f"the Hub failed ({status}){said}", hint="try again later")
        else:
            err = PrmkitError(f"the Hub refused the request ({status}){said}")
    elif type(exc).__name__ == "HFValidationError":
        err = UsageError(f"invalid repo id or revision: {_first_line(exc)}")
    elif isinstance(exc, ValueError) and "Invalid metadata in README.md" in str(exc):
        # The Hub validates the card's YAML before any upload; only a user's own README.md can fail it.
        detail = " ".join(str(exc).split("README.md.", 1)[-1].split())
        err = PrmkitError(f"the Hub rejects README.md's metadata: {detail}",
                          hint="fix the YAML front matter, or pass --overwrite-card to push a generated card")
    elif _is_network_error(exc):
        err = PrmkitError(f"cannot reach the Hub at {constants.ENDPOINT}: {_first_line(exc)}",
                          hint="check the network connection, proxy settings and HF_ENDPOINT")
    if err is not None and token:
        err.message = err.message.replace(token, "***")
    return err


def _is_network_error(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"TransportError", "ConnectError", "TimeoutException", "NetworkError"}) or isinstance(
        exc, (ConnectionError, TimeoutError))


@contextlib.contextmanager
def _hub_errors(repo_id: str, token: str | None, revision: str | None) -> Iterator[None]:
    try:
        yield
    except PrmkitError:
        raise
    except Exception as exc:
        err = hub_error(exc, repo_id, token, revision)
        if err is None:
            raise
        raise err from None


def _is_stale(path: str, mode: str) -> bool:
    """A remote file that would mix with the new upload when loaded, so the commit deletes it.

    Old shards or an old index next to new weights make a broken model, and transformers loads a leftover
    adapter_config.json *instead of* full weights. Full weights left beside a new adapter are harmless.
    """
    if "/" in path:
        return False
    is_adapter = path in ADAPTER_FILES or path.startswith("adapter_model")
    return (is_adapter or _is_weight(path)) if mode == "full" else is_adapter


def _ensure_repo(api: Any, repo_id: str, private: bool, whoami: dict) -> str:
    """Create the repo, or check that the existing one has the visibility asked for; returns its URL."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.repo_info(repo_id, repo_type="model")
    except RepositoryNotFoundError:
        info = None
    if info is not None:
        if info.private is not None and bool(info.private) != bool(private):
            now, asked = ("private", "public") if info.private else ("public", "private")
            raise PrmkitError(f"{repo_id} exists and is {now}, but a {asked} push was asked for",
                              hint=("pass --private to push to it" if info.private else "drop --private to push to it")
                              + ", or change its visibility on the Hub first")
        return f"{api.endpoint}/{repo_id}"
    namespace = repo_id.split("/")[0]
    orgs = {o.get("name") for o in whoami.get("orgs") or [] if isinstance(o, dict)}
    if namespace != whoami.get("name") and namespace not in orgs:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            api.get_organization_overview(namespace)
        except HfHubHTTPError as e:
            if e.response is not None and e.response.status_code == 404:
                raise PrmkitError(f"organisation or user {namespace!r} not found on the Hub",
                                  hint=f"check the spelling of {repo_id!r}") from None
            raise
        raise PrmkitError(f"no write access to {namespace!r}: {whoami.get('name')} is not a member of it",
                          hint=f"push to {whoami.get('name')}/{repo_id.split('/')[-1]} or ask to join {namespace!r}")
    url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=False)
    log.info(f"created {'private' if private else 'public'} repo {repo_id}")
    return str(url)


def push_model(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    adapter: bool = False,
    eval_report: str | Path | None = None,
    overwrite_card: bool = False,
    allow_pickle: bool = False,
    license: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
) -> PushResult:
    """Upload a prmkit model directory to the Hub in one commit; a directory that is already there is a no-op.

    ``dry_run`` returns what would be uploaded without touching the network. Raises PrmkitError with a one-line
    message for every known Hub or network failure.
    """
    if not repo_id or not repo_id.strip():
        raise UsageError("no repo id: pass --repo-id or set push.repo_id")
    repo_id = repo_id.strip()
    # The namespace is required: the card's snippets name the repo, and a dry run cannot ask the Hub who you are.
    if repo_id.count("/") != 1 or not _HUB_ID.match(repo_id):
        raise UsageError(f"{repo_id!r} is not a valid repo id; expected namespace/name, e.g. alice/qwen2-prm")
    branch = revision or "main"
    plan = plan_push(model_dir, repo_id, adapter=adapter, eval_report=eval_report, overwrite_card=overwrite_card,
                     allow_pickle=allow_pickle, license=license)
    result = PushResult(repo_id, branch, plan.mode, plan.files, dry_run=dry_run, skipped=plan.skipped,
                        warnings=list(plan.warnings), card_source=plan.card_source)
    if dry_run:
        return result

    token = resolve_token(token)
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(token=token)
    with _hub_errors(repo_id, token, revision):
        who = api.whoami()
        role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise PrmkitError("this token is read-only: pushing needs a token with write access",
                              hint="create a write token at https://huggingface.co/settings/tokens")
        result.url = _ensure_repo(api, repo_id, private, who)
        if branch != "main" and not create_pr:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        remote = {f.path: f for f in api.list_repo_tree(repo_id, revision=branch, recursive=True)
                  if isinstance(f, RepoFile)}

        local_paths = {f.path for f in plan.files}
        for f in plan.files:
            r = remote.get(f.path)
            sha256, sha1 = f.hashes()
            if r is None:
                f.status = "new"
            elif (r.lfs.sha256 == sha256) if r.lfs is not None else (r.blob_id == sha1):
                f.status = "unchanged"
            else:
                f.status = "changed"
        result.deleted = sorted(p for p in remote if p not in local_paths and _is_stale(p, plan.mode))
        changed = [f for f in plan.files if f.status != "unchanged"]
        if not changed and not result.deleted:
            result.no_op = True
            log.info(f"{repo_id}@{branch} already holds these files: nothing to commit")
            return result

        operations: list[Any] = [
            CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=f.content if f.content is not None else str(f.local))
            for f in changed
        ]
        operations += [CommitOperationDelete(path_in_repo=p) for p in result.deleted]
        for p in result.deleted:
            log.info(f"removing stale {p} from {repo_id}@{branch}")
        message = commit_message or f"Upload {'LoRA adapter' if plan.mode == 'adapter' else 'PRM'} with prmkit {__version__}"
        log.info(f"uploading {len(changed)} file(s), {human_size(sum(f.size for f in changed))}, to {repo_id}@{branch}"
                 + (" as a pull request" if create_pr else ""))
        info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=branch,
                                 create_pr=create_pr, repo_type="model")
    result.commit_oid = info.oid
    result.commit_url = info.commit_url
    result.pr_url = info.pr_url
    return result


def push_with_config(model_dir: str | Path, push: Any, *, dry_run: bool = False, token: str | None = None) -> PushResult:
    """``push_model`` with every setting from a config's ``push`` section (prmkit.config.PushConfig)."""
    return push_model(
        model_dir, push.repo_id or "", private=push.private, revision=push.revision,
        commit_message=push.commit_message, create_pr=push.create_pr, adapter=push.adapter,
        eval_report=push.eval_report, overwrite_card=push.overwrite_card, allow_pickle=push.allow_pickle,
        license=push.license, dry_run=dry_run, token=token,
    )


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
