"""`prmkit score` (not built yet)."""

from __future__ import annotations

from prmkit.cli._errors import handle_errors
from prmkit.errors import NotImplementedYet


@handle_errors
def score() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("score")
