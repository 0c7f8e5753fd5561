"""`prmkit push`: a trained model directory and a generated model card to the Hub, in one commit."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from prmkit.cli._errors import handle_errors
from prmkit.cli._options import ConfigOpt, JsonOpt, SetOpt
from prmkit.cli._output import Output, attach_logging
from prmkit.config.load import load_config
from prmkit.core.redact import register_secret
from prmkit.errors import UsageError

if TYPE_CHECKING:
    from prmkit.hub import PushResult


@handle_errors
def push(
    model_dir: Annotated[Path, typer.Argument(help="Model directory written by `prmkit train`.", show_default=False)],
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="Hub repo, namespace/name (sets push.repo_id).")
    ] = None,
    private: Annotated[
        bool | None,
        typer.Option(
            "--private/--public",
            help="Visibility of a new repo; an existing repo must already have it.",
            show_default=False,
        ),
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to (created if missing).")] = None,
    commit_message: Annotated[str | None, typer.Option("--commit-message", help="Commit title.")] = None,
    create_pr: Annotated[
        bool | None,
        typer.Option(
            "--create-pr/--no-create-pr",
            help="Open a pull request instead of committing to the branch.",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be uploaded; contact nothing.")] = False,
    adapter: Annotated[
        bool | None,
        typer.Option(
            "--adapter/--full",
            help="Push the LoRA adapter (adapter/ or the directory itself) instead of full weights.",
            show_default=False,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="Hub token; prefer `hf auth login` or HF_TOKEN, since this lands in shell history.",
            show_default=False,
        ),
    ] = None,
    eval_report: Annotated[
        Path | None,
        typer.Option(
            "--eval-report",
            help="report.json from `prmkit eval` to quote in the card (default: MODEL_DIR/report.json).",
        ),
    ] = None,
    overwrite_card: Annotated[
        bool | None,
        typer.Option(
            "--overwrite-card/--keep-card", help="Generate README.md even if MODEL_DIR has one.", show_default=False
        ),
    ] = None,
    allow_pickle: Annotated[
        bool | None,
        typer.Option(
            "--allow-pickle/--no-allow-pickle",
            help="Upload pickle files (*.bin, *.pt, ...) instead of refusing.",
            show_default=False,
        ),
    ] = None,
    license_: Annotated[str | None, typer.Option("--license", help="License id for the card, e.g. apache-2.0.")] = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Upload weights (safetensors), config, tokenizer, prmkit.json and a model card in one commit.

    Pushing an unchanged directory again is a no-op. Settings also come from the config's `push` section.

    Examples:
      prmkit push runs/prm --repo-id alice/qwen2-prm --license apache-2.0
      prmkit push runs/prm --repo-id acme/qwen2-prm --private --dry-run

    (Over 100 lines because its signature declares the command's options, one per parameter.)
    """
    out = Output(json_)
    attach_logging(out)
    if token:
        register_secret(token)  # masked in every message from here on, tracebacks included
        out.warn("--token is saved in your shell history; prefer `hf auth login` or the HF_TOKEN variable")
    cfg = load_config(
        config,
        set_,
        {
            "push.repo_id": repo_id,
            "push.private": private,
            "push.revision": revision,
            "push.commit_message": commit_message,
            "push.create_pr": create_pr,
            "push.adapter": adapter,
            "push.eval_report": str(eval_report) if eval_report else None,
            "push.overwrite_card": overwrite_card,
            "push.allow_pickle": allow_pickle,
            "push.license": license_,
        },
    )
    if not cfg.push.repo_id:
        raise UsageError("no repo id: pass --repo-id or set push.repo_id", hint="e.g. --repo-id alice/qwen2-prm")
    from prmkit import api  # the hub code: not for --help

    result = api.push_model(cfg, model_dir=model_dir, dry_run=dry_run, token=token)
    out.result(result.to_dict(), *_render(result))


def _render(result: PushResult) -> list:
    from prmkit.hub import human_size

    title = f"{result.repo_id}@{result.revision}"
    if result.dry_run:
        title = f"dry run: would upload to {title} ({result.mode} model)"
    table = Table(title=title)
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("from")
    if not result.dry_run:
        table.add_column("status")
    for f in result.files:
        row = [f.path, human_size(f.size), f.source + (f" ({f.note})" if f.note else "")]
        table.add_row(*row, *([] if result.dry_run else [f.status or ""]))
    for path in result.deleted:
        table.add_row(path, "", "", "deleted")
    items: list = [table]
    if result.dry_run:
        items.append(f"{len(result.files)} files, {human_size(result.total_bytes)}; nothing uploaded (dry run)")
    elif result.no_op:
        items.append(f"nothing to do: {result.repo_id}@{result.revision} already holds these files (no commit)")
    elif result.pr_url:
        items.append(f"opened pull request {result.pr_url} ({human_size(result.uploaded_bytes)} uploaded)")
    else:
        items.append(f"committed {result.commit_url} ({human_size(result.uploaded_bytes)} uploaded)")
    if result.skipped:
        items.append(f"not uploaded: {', '.join(result.skipped)}")
    return items
