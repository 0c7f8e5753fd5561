"""Plan a push (local, no network), compare it with the remote branch, and commit every changed file at once."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prmkit.core import jsonio
from prmkit.core.filenames import CONFIG_YAML, PRMKIT_JSON
from prmkit.core.redact import mask, redact
from prmkit.core.version import __version__
from prmkit.errors import PrmkitError, UsageError
from prmkit.hub.card import HUB_ID, build_card, is_template_card, load_eval_report
from prmkit.hub.checks import check_adapter, check_model_loads, check_tokenizer, check_weights, trust_remote_code
from prmkit.hub.errors import hub_errors, resolve_token
from prmkit.hub.files import (
    ADAPTER_FILES,
    README,
    PushFile,
    human_size,
    inside,
    is_weight,
    read_text_capped,
    relative_to_dir,
    select_files,
)
from prmkit.hub.sanitize import (
    REWRITTEN_JSON,
    REWRITTEN_YAML,
    holds_secret,
    publishable,
    refuse_secret_files,
    rewrite_for_upload,
    secrets_in_use,
)
from prmkit.kinds.registry import trained_kind

log = logging.getLogger("prmkit")

# A model card is text for people; one this large is a mistake, and huggingface_hub reads it whole to validate it.
CARD_MAX_BYTES = 10 << 20
# PEFT's blank template is about 5 KB: the start of a README is enough to recognise it.
_CARD_PROBE_CHARS = 64 << 10


@dataclass
class PushPlan:
    model_dir: Path
    repo_id: str
    mode: str
    """full | adapter."""
    files: list[PushFile]
    card: str | None
    """The generated card's text; None when the directory's own README.md goes up as it is."""
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


def plan_push(
    model_dir: str | Path,
    repo_id: str,
    *,
    adapter: bool = False,
    eval_report: str | Path | None = None,
    overwrite_card: bool = False,
    allow_pickle: bool = False,
    license: str | None = None,
    token: str | None = None,
) -> PushPlan:
    """Choose and check the files to upload and build the card; touches no network and writes nothing.

    Refuses links that lead out of the model directory and any file that holds the token in use (``token``, or
    the login huggingface_hub would use); prmkit's metadata files go up with secrets and local paths removed.
    """
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir}: not a directory")
    root = model_dir.resolve()
    warnings: list[str] = []
    metadata = None
    if (model_dir / PRMKIT_JSON).is_file():
        try:
            metadata = jsonio.loads(read_text_capped(inside(model_dir / PRMKIT_JSON, model_dir)))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise UsageError(f"{model_dir / PRMKIT_JSON}: not valid JSON ({e})") from None
    if metadata is None and (model_dir / CONFIG_YAML).is_file():
        # prmkit writes prmkit.json last: a training output without it is unfinished (killed, or still running).
        raise UsageError(
            f"{model_dir}: holds a prmkit training run that did not finish (no {PRMKIT_JSON})",
            hint="push a finished model: let the run finish, or `prmkit train --resume` it",
        )
    files, skipped, tok_dir, adapter_dir = select_files(model_dir, adapter, allow_pickle, metadata, warnings)
    if metadata is None and not (adapter_dir and (adapter_dir / PRMKIT_JSON).is_file()):
        warnings.append(f"no {PRMKIT_JSON}: the card cannot state the step separator and scorers will assume '\\n'")

    adapter_config = None
    if adapter_dir is not None:
        adapter_config = check_adapter(adapter_dir, warnings)
    else:
        check_weights(model_dir, files)
        check_model_loads(model_dir, warnings, causal_lm=trained_kind((metadata or {}).get("kind")).causal_lm)
    check_tokenizer(tok_dir, {p.name for p in tok_dir.iterdir()}, trust_remote_code(model_dir))

    report, report_path = load_eval_report(model_dir, eval_report, repo_id)
    if license is None:
        warnings.append("no license given (--license or push.license): the card declares none")

    secrets = secrets_in_use(token)
    local = dict(files)
    pushed = [
        PushFile(name, p.stat().st_size, relative_to_dir(p, root), local=p) for name, p in files if name != README
    ]
    for f in pushed:
        if f.path in REWRITTEN_JSON + REWRITTEN_YAML:
            _rewrite(f, root, warnings)

    card: str | None = None
    if README in local and not overwrite_card and is_template_card(_card_head(local[README], model_dir)):
        log.info(
            f"{model_dir / README} is the unedited card template PEFT writes beside an adapter; generating the "
            "card instead"
        )
        overwrite_card = True
    if README in local and not overwrite_card:
        readme = PushFile(
            README, local[README].stat().st_size, relative_to_dir(local[README], root), local=local[README]
        )
        card_source = "model_dir"
    else:
        card = mask(
            build_card(
                repo_id,
                _card_metadata(metadata, root),
                report,
                report_path,
                license,
                adapter_config,
                has_config_yaml=CONFIG_YAML in local,
            ),
            secrets,
        )
        data = card.encode("utf-8")
        readme = PushFile(README, len(data), "generated", content=data)
        card_source = "generated"
        if README in local:
            skipped = sorted({*skipped, README})
    pushed.append(readme)
    refuse_secret_files([f.path for f in pushed if _holds(f, secrets)], model_dir)
    for w in warnings:
        log.warning(w)
    return PushPlan(
        model_dir, repo_id, "adapter" if adapter_dir else "full", pushed, card, card_source, skipped, warnings
    )


def _rewrite(f: PushFile, root: Path, warnings: list[str]) -> None:
    """Upload prmkit's metadata (and adapter_config.json) without secrets or local paths; the local file stays."""
    assert f.local is not None
    content, paths, secret = rewrite_for_upload(f.path, f.local, root)
    if content is None:
        return
    f.content, f.size = content, len(content)
    notes = []
    if paths:
        notes.append("local paths made relative")
        log.info(
            f"{f.path}: uploading {', '.join(paths)} as paths relative to the model or file names; the local "
            "file keeps the full paths"
        )
    if secret:
        notes.append("secrets redacted")
        warnings.append(f"{f.path} holds {', '.join(secret)}: uploading it redacted")
    f.note = ", ".join(notes)


def _card_metadata(metadata: dict | None, root: Path) -> dict | None:
    """prmkit.json for the card: secrets redacted, and local paths out of the hyperparameters it lists.

    The base model and data keep their local paths here: the card tells them from Hub ids by those paths, and
    names only the file or directory.
    """
    if not metadata:
        return metadata
    card = redact(metadata)
    if isinstance(card.get("training"), dict):
        card["training"] = publishable(card["training"], root)
    return card


def _card_head(path: Path, model_dir: Path) -> str:
    """The start of an existing README.md, enough to recognise a template; a card too big to publish is refused."""
    size = path.stat().st_size
    if size > CARD_MAX_BYTES:
        raise UsageError(
            f"{model_dir / README}: {human_size(size)} is too large for a model card (at most "
            f"{human_size(CARD_MAX_BYTES)})",
            hint="shorten it, or pass --overwrite-card to push a generated card instead",
        )
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read(_CARD_PROBE_CHARS)


def _holds(f: PushFile, secrets: list[str]) -> bool:
    if f.content is not None:
        return any(s.encode("utf-8") in f.content for s in secrets)
    assert f.local is not None
    return holds_secret(f.local, secrets, header_only=f.path.endswith(".safetensors"))


def _is_stale(path: str, mode: str) -> bool:
    """A remote file that would mix with the new upload when loaded, so the commit deletes it.

    Old shards or an old index next to new weights make a broken model, and transformers loads a leftover
    adapter_config.json *instead of* full weights. Full weights left beside a new adapter are harmless.
    """
    if "/" in path:
        return False
    is_adapter = path in ADAPTER_FILES or path.startswith("adapter_model")
    return (is_adapter or is_weight(path)) if mode == "full" else is_adapter


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
            raise PrmkitError(
                f"{repo_id} exists and is {now}, but a {asked} push was asked for",
                hint=("pass --private to push to it" if info.private else "drop --private to push to it")
                + ", or change its visibility on the Hub first",
            )
        return f"{api.endpoint}/{repo_id}"
    namespace = repo_id.split("/")[0]
    orgs = {o.get("name") for o in whoami.get("orgs") or [] if isinstance(o, dict)}
    if namespace != whoami.get("name") and namespace not in orgs:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            api.get_organization_overview(namespace)
        except HfHubHTTPError as e:
            if e.response is not None and e.response.status_code == 404:
                raise PrmkitError(
                    f"organisation or user {namespace!r} not found on the Hub",
                    hint=f"check the spelling of {repo_id!r}",
                ) from None
            raise
        raise PrmkitError(
            f"no write access to {namespace!r}: {whoami.get('name')} is not a member of it",
            hint=f"push to {whoami.get('name')}/{repo_id.split('/')[-1]} or ask to join {namespace!r}",
        )
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

    (Over 100 lines with its keyword signature; the three steps (plan, compare, commit) read in order.)
    """
    if not repo_id or not repo_id.strip():
        raise UsageError("no repo id: pass --repo-id or set push.repo_id")
    repo_id = repo_id.strip()
    # The namespace is required: the card's snippets name the repo, and a dry run cannot ask the Hub who you are.
    if repo_id.count("/") != 1 or not HUB_ID.match(repo_id):
        raise UsageError(f"{repo_id!r} is not a valid repo id; expected namespace/name, e.g. alice/qwen2-prm")
    branch = revision or "main"
    plan = plan_push(
        model_dir,
        repo_id,
        adapter=adapter,
        eval_report=eval_report,
        overwrite_card=overwrite_card,
        allow_pickle=allow_pickle,
        license=license,
        token=token,
    )
    result = PushResult(
        repo_id,
        branch,
        plan.mode,
        plan.files,
        dry_run=dry_run,
        skipped=plan.skipped,
        warnings=list(plan.warnings),
        card_source=plan.card_source,
    )
    if dry_run:
        return result

    token = resolve_token(token)
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(token=token)
    with hub_errors(repo_id, token, revision):
        who = api.whoami()
        if not isinstance(who, dict):
            raise PrmkitError(
                f"the Hub at {api.endpoint} answered whoami with {type(who).__name__}, not an account",
                hint="a proxy or a wrong HF_ENDPOINT may have answered instead of the Hub",
            )
        role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise PrmkitError(
                "this token is read-only: pushing needs a token with write access",
                hint="create a write token at https://huggingface.co/settings/tokens",
            )
        result.url = _ensure_repo(api, repo_id, private, who)
        if branch != "main" and not create_pr:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        remote = {
            f.path: f for f in api.list_repo_tree(repo_id, revision=branch, recursive=True) if isinstance(f, RepoFile)
        }

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
            CommitOperationAdd(
                path_in_repo=f.path, path_or_fileobj=f.content if f.content is not None else str(f.local)
            )
            for f in changed
        ]
        operations += [CommitOperationDelete(path_in_repo=p) for p in result.deleted]
        for p in result.deleted:
            log.info(f"removing stale {p} from {repo_id}@{branch}")
        message = (
            commit_message or f"Upload {'LoRA adapter' if plan.mode == 'adapter' else 'PRM'} with prmkit {__version__}"
        )
        log.info(
            f"uploading {len(changed)} file(s), {human_size(sum(f.size for f in changed))}, to {repo_id}@{branch}"
            + (" as a pull request" if create_pr else "")
        )
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=message,
            revision=branch,
            create_pr=create_pr,
            repo_type="model",
        )
    result.commit_oid = info.oid
    result.commit_url = info.commit_url
    result.pr_url = info.pr_url
    return result


def push_with_config(
    model_dir: str | Path, push: Any, *, dry_run: bool = False, token: str | None = None
) -> PushResult:
    """``push_model`` with every setting from a config's ``push`` section (prmkit.config.schema.PushConfig)."""
    return push_model(
        model_dir,
        push.repo_id or "",
        private=push.private,
        revision=push.revision,
        commit_message=push.commit_message,
        create_pr=push.create_pr,
        adapter=push.adapter,
        eval_report=push.eval_report,
        overwrite_card=push.overwrite_card,
        allow_pickle=push.allow_pickle,
        license=push.license,
        dry_run=dry_run,
        token=token,
    )
