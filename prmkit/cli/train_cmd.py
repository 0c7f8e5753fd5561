"""`prmkit train` (not built yet)."""

from __future__ import annotations

from prmkit.cli._errors import handle_errors
from prmkit.errors import NotImplementedYet


@handle_errors
def train() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("train")
