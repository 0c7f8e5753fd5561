"""Claiming a `prmkit score` job: where it starts (fresh, resumed from the state file, already complete, or refused).

Process 0 alone reads the output's state and decides; the other processes follow its answer, refusals included
(:func:`claim_job`). What must match for a run to continue an earlier one's output is the job's identity
(:func:`job_identity`): the input's content, the model, and every setting that decides the bytes written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prmkit.core.atomic import remove_leftovers
from prmkit.core.outputs import OutputLock, refuse_inputs_inside
from prmkit.errors import PrmkitError, UsageError
from prmkit.scoring.groups import GroupSpec
from prmkit.scoring.resumable import finish_files
from prmkit.scoring.resume import (
    DIGEST,
    check_state,
    describe_mismatch,
    from_stdin,
    read_state,
    remove_files,
    remove_journals,
    remove_unresumable,
    verified_prefix,
)
from prmkit.scoring.source import InputSource

log = logging.getLogger("prmkit")


@dataclass
class JobClaim:
    plan: dict[str, Any]
    """Process 0's answer, the same on every process: ``complete``, or where to continue (``input_line``,
    ``input_offset``, ``output_bytes``, ``counts``, ...), and ``job`` (the digest every batch journal names)."""
    job: dict[str, Any] = field(default_factory=dict)
    """The job's identity, for the state file (process 0 only)."""
    hashes: dict[str, Any] = field(default_factory=dict)
    """Running hashes of the committed output and rejects (process 0 only: they are not broadcast)."""


def claim_job(
    scorer: Any,
    src: InputSource,
    paths: dict[str, Path] | None,
    *,
    fmt: str,
    threshold: float,
    window_rows: int,
    group: GroupSpec | None,
    overwrite: bool,
    lock: OutputLock | None,
) -> JobClaim:
    """Process 0 refuses an output that overlaps the input or the model, takes the output's lock, and plans the
    output from its state; every process gets the plan, or raises the refusal process 0 met."""
    claim = JobClaim(plan={})
    if scorer.is_main_process:
        try:
            if paths:
                refuse_overlap(paths, src, scorer)
            if lock is not None:
                lock.acquire()
            if paths is not None and not overwrite:
                keep_derived_budget(scorer, paths)
            claim.job = job_identity(scorer, src, fmt, threshold, window_rows, group)
            claim.plan = plan_output(paths, claim.job, src, overwrite) if paths else {}
            claim.hashes = claim.plan.pop("hashes", {})
            # Every process's batch journal names the job, so one left by another model or input is never replayed.
            claim.plan["job"] = job_digest(claim.job)
        except PrmkitError as e:
            claim.plan = {"error": [isinstance(e, UsageError), e.message, e.hint]}
    claim.plan = scorer.broadcast(claim.plan)
    if "error" in claim.plan:
        usage, message, hint = claim.plan["error"]
        raise (UsageError if usage else PrmkitError)(message, hint=hint)
    return claim


def job_identity(
    scorer: Any, src: InputSource, fmt: str, threshold: float, window_rows: int, group: GroupSpec | None = None
) -> dict[str, Any]:
    """What must match for a run to continue an earlier one's output.

    The batching settings belong here too: they decide which solutions share a forward pass, and a batch of another
    shape can round the last bit of a score differently, so a resumed run must batch as the first one did.
    """
    return {
        "input": {"sha256": src.fingerprint()},
        "input_spec": src.name,
        "model": scorer.identity,
        "settings": {
            "tokenization": scorer.params.to_dict(),
            "format": fmt,
            "threshold": threshold,
            "dtype": str(scorer.dtype).removeprefix("torch."),
            "positive_label_id": scorer.positive_label_id,
            "mode": "prefix" if scorer.prefix_mode else "one-pass",
            "batch_tokens": scorer.batch_tokens,
            "sort_window": window_rows,
            "processes": scorer.world_size,
            "device": scorer.device.type,
            "packing": scorer.packing,
            **({"group_by": group.to_dict()} if group is not None else {}),
        },
    }


def refuse_overlap(paths: dict[str, Path], src: InputSource, scorer: Any) -> None:
    """The output and its companions (partial, state, rejects) must be neither the input nor inside the model."""
    inputs = [("input", None if src.stdin else src.spec), ("model directory", scorer.identity.get("name"))]
    for path in paths.values():
        refuse_inputs_inside(
            path,
            inputs,
            "--overwrite would replace" if path == paths["output"] else "scoring writes",
            output_inside=True,
        )


def job_digest(job: dict[str, Any]) -> str:
    # What the state file checks before resuming (content, not names: the same file or model named otherwise matches).
    model = job["model"]
    key = {"input": job["input"], "model": model.get("sha256", model), "settings": job["settings"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def keep_derived_budget(scorer: Any, paths: dict[str, Path]) -> int:
    """A budget sized to the device's free memory (not given) continues with the figure the run started with: free
    memory varies between runs, and a resumed run must batch as the first one did."""
    state = read_state(paths["state"]) if getattr(scorer, "batch_tokens_source", "given") != "given" else None
    settings = (state or {}).get("settings")
    recorded = settings.get("batch_tokens") if isinstance(settings, dict) else None
    if isinstance(recorded, int) and recorded >= 1 and recorded != scorer.batch_tokens:
        log.info(
            f"continuing with the batch budget the run started with ({recorded} tokens, not {scorer.batch_tokens})"
        )
        scorer.batch_tokens = recorded
    return scorer.batch_tokens


def plan_output(paths: dict[str, Path], job: dict, src: InputSource, overwrite: bool) -> dict[str, Any]:
    """Where a file job starts: fresh, resumed from the state file, already complete, or refused."""
    out = paths["output"]
    if out.is_dir():
        raise UsageError(f"{out} is a directory; --output takes a JSONL file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    removed, _ = remove_leftovers(out.parent, paths["state"].name)
    if removed:
        log.info(
            f"removed {removed} temporary file{'s' if removed > 1 else ''} left beside {out} by an interrupted run"
        )
    if overwrite:
        remove_files(paths["output"], paths["partial"], paths["rejects"], paths["rejects_partial"], paths["state"])
        remove_journals(paths)
        return {"fresh": True}
    state = read_state(paths["state"])
    if state is not None and from_stdin(state) and state.get("status") != "complete":
        # An interrupted run that read stdin: nothing can tell where its input left off, so it cannot be continued.
        remove_unresumable(paths, "an earlier run read stdin and was interrupted; it cannot be continued")
        state = None
    if state is None:
        existing = [
            p for p in (paths["output"], paths["partial"], paths["rejects"], paths["rejects_partial"]) if p.exists()
        ]
        if existing:
            raise UsageError(
                f"{existing[0]} exists and no scoring state records how it was made",
                hint="pass --overwrite to replace it, or choose another --output",
            )
        remove_journals(paths)  # no state says whose they are
        return {"fresh": True}
    if src.stdin:
        raise UsageError(
            f"{out}: cannot check that stdin is the input an earlier run scored",
            hint="pass --overwrite to start over, or give the input as a file to resume",
        )
    progress = check_state(paths, state)
    why = describe_mismatch(state, job)
    if why:
        raise UsageError(
            f"{out}: refusing to continue it: {why}",
            hint="run with the settings it was started with to continue it (a resumed run must batch as "
            "the first did to give the same bytes), pass --overwrite to start over, or choose "
            "another --output",
        )
    if state.get("status") == "complete":
        return _finish_complete(paths, state, progress)
    return _resume_point(paths, state, progress, src)


def _finish_complete(paths: dict[str, Path], state: dict, progress: dict[str, Any]) -> dict[str, Any]:
    # Renamed only if they are, byte for byte, what the run wrote; an output already renamed is the user's.
    committed, rejected = progress.get("output_bytes", 0), progress.get("rejects_bytes", 0)
    for key, nbytes, digest in (
        ("partial", committed, "output_sha256"),
        ("rejects_partial", rejected, "rejects_sha256"),
    ):
        if paths[key].exists() and DIGEST in state:
            verified_prefix(paths[key], nbytes, progress[digest], paths["state"], whole=True)
    finish_files(paths)
    out = paths["output"]
    if not out.exists():
        raise UsageError(
            f"{out}: the state file says complete but the output is missing", hint="pass --overwrite to score again"
        )
    return {"complete": True, "counts": progress.get("counts", {}), "format": state.get("format_detected")}


def _resume_point(paths: dict[str, Path], state: dict, progress: dict[str, Any], src: InputSource) -> dict[str, Any]:
    committed, rejected = progress.get("output_bytes", 0), progress.get("rejects_bytes", 0)
    hashes = {
        # The partial is made before the first state is written, so a missing one was removed by hand.
        "output": verified_prefix(
            paths["partial"],
            committed,
            progress["output_sha256"],
            paths["state"],
            must_exist=progress.get("input_line", 0) > 0,
        ),
        "rejects": verified_prefix(paths["rejects_partial"], rejected, progress["rejects_sha256"], paths["state"]),
    }
    if progress.get("input_line"):
        log.info(
            f"resuming {paths['partial']} after {src.unit} {progress['input_line']} "
            f"({progress.get('counts', {}).get('rows_out', 0)} rows already scored)"
        )
    return {
        "input_line": progress.get("input_line", 0),
        "input_offset": progress.get("input_offset"),
        "output_bytes": committed,
        "rejects_bytes": rejected,
        "counts": progress.get("counts", {}),
        "format_detected": state.get("format_detected"),
        "hashes": hashes,
        "group": progress.get("group"),
    }
