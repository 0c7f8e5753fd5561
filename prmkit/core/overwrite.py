"""``--overwrite``: the previous contents of an output directory wait, set aside, until the new run has something to
keep; a reader of the directory meanwhile is told where they are."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prmkit.core.atomic import remove_path
from prmkit.core.checkpoints import latest_complete_checkpoint
from prmkit.core.filenames import PRMKIT_JSON
from prmkit.errors import UsageError

FINAL_TMP = ".prmkit-final"


REPLACED = ".prmkit-replaced"


_MOVING = ".prmkit-replacing"  # REPLACED while being filled: if it exists, nothing of the new run was written yet


_RESTORING = ".prmkit-restoring"  # REPLACED on its way back: the new run's files are gone, only these are left to move


_DISCARDED = ".prmkit-discarded"  # REPLACED being deleted


_OWN_HIDDEN = {FINAL_TMP, REPLACED, _MOVING, _RESTORING, _DISCARDED}


def _set_aside_contents(out: Path) -> None:
    moving = out / _MOVING
    moving.mkdir()
    for item in list(out.iterdir()):
        if item.name not in _OWN_HIDDEN:
            os.rename(item, moving / item.name)
    os.rename(moving, out / REPLACED)


def _has_something_to_keep(out: Path) -> str | None:
    if (out / PRMKIT_JSON).is_file():
        return "its finished model"
    last, _ = latest_complete_checkpoint(out)
    return last.name if last is not None else None


def _move_back(holder: Path, out: Path) -> None:
    for item in list(holder.iterdir()):
        os.rename(item, out / item.name)
    holder.rmdir()


def settle_overwrite(out: str | Path) -> str | None:
    """Finish an ``--overwrite`` run's replacement of the previous contents, or undo it; say which, or None.

    The new run is kept once it has a complete checkpoint or its finished model: then the previous contents are
    deleted. Otherwise (it failed, or was killed, before saving anything) its files go and the previous contents
    come back exactly as they were.

    Each step is one rename of a hidden directory, whose name says how far it got, so a kill at any point is settled
    by the next call: the previous contents are never judged beside half of themselves (a ``prmkit.json`` already
    back would read as the new run's finished model).
    """
    out = Path(out)
    if (out / _DISCARDED).exists():
        shutil.rmtree(out / _DISCARDED, ignore_errors=True)
    moving, replaced, restoring = out / _MOVING, out / REPLACED, out / _RESTORING
    if moving.is_dir():  # killed while setting aside: the new run has not written anything yet
        _move_back(moving, out)
        return f"{out}: put back the previous contents, which an --overwrite run killed at its start had set aside"
    back = f"{out}: the --overwrite run stopped before saving anything; the previous contents are back as they were"
    if restoring.is_dir():  # killed while putting them back: the new run's files are gone already
        _move_back(restoring, out)
        return back
    if not replaced.is_dir():
        return None
    kept = _has_something_to_keep(out)
    if kept:
        os.rename(replaced, out / _DISCARDED)
        shutil.rmtree(out / _DISCARDED, ignore_errors=True)
        return (
            None
            if kept == "its finished model"
            else (f"{out}: the --overwrite run that stopped had saved {kept}; the previous contents are deleted")
        )
    for item in list(out.iterdir()):
        if item.name not in _OWN_HIDDEN:
            remove_path(item)
    os.rename(replaced, restoring)
    _move_back(restoring, out)
    return back


def set_aside_problem(model_dir: str | Path) -> UsageError | None:
    """Why ``model_dir`` cannot be read as a model because ``--overwrite`` set its previous contents aside, naming
    them and how to get them back; None when nothing is set aside, or the new run's model is finished."""
    model_dir = Path(model_dir)
    where = next((model_dir / n for n in (_MOVING, _RESTORING, REPLACED) if (model_dir / n).is_dir()), None)
    if where is None or (where.name == REPLACED and (model_dir / PRMKIT_JSON).is_file()):
        return None  # a finished new model; the previous one only waits to be deleted
    is_model = any((d / f).is_file() for d in (where, model_dir) for f in (PRMKIT_JSON, "config.json"))
    what = "model" if is_model else "contents"
    back = (
        f"if that run was interrupted, run its `prmkit train` command again without --overwrite: that puts the "
        f"previous {what} back, then stops"
    )
    if where.name != REPLACED:
        return UsageError(
            f"{model_dir}: `prmkit train --overwrite` was moving its previous {what} (partly in {where}) "
            "when it stopped, or is still at it",
            hint=back,
        )
    saved = _has_something_to_keep(model_dir)
    if saved:
        hint = (
            f"the new run saved {saved}: the next `prmkit train` into {model_dir} deletes the set-aside {what}, "
            f"so copy {where} elsewhere first if you need it; it can be scored where it lies"
        )
    else:
        hint = f"score it where it lies ({where}); {back}"
    return UsageError(
        f"{model_dir}: no finished model: `prmkit train --overwrite` set the previous {what} aside in "
        f"{where}, and the new run has not finished (it is running, or was interrupted)",
        hint=hint,
    )
