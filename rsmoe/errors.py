"""The two kinds of error a user sees as one line (rsmoe.cli prints them; no traceback).

- `UserError`: something the user must fix (a config key, a path, an incomplete model directory,
  a bad upload). Exit code 2.
- `Halted`: the run stopped itself on purpose and said why (repeated non-finite loss, shards with no
  valid sample). Exit code 1.

Every module raises a subclass of one of these (or a plain exception for a bug); `rsmoe.cli` is the
only place that catches them for printing.
"""

from __future__ import annotations

import re


class UserError(Exception):
    """A problem the user must fix; the message names it and says what to do."""

    same_on_every_rank = False
    """True when every rank of a job raises the same error (config checks): printed by rank 0 only."""


class Halted(Exception):
    """The run stopped itself on purpose; the message says why and what is safe."""

    same_on_every_rank = False


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key."""

    same_on_every_rank = True


class TrainingHalted(Halted):
    """The training loop stopped itself (e.g. non-finite loss at every step of a streak)."""

    same_on_every_rank = True


def one_line(exc: BaseException) -> str:
    """The user-facing line of an exception (DataLoader workers wrap the original in a traceback)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError quotes its str
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1] if len(lines) > 1 and "Traceback" in text else lines[0]
    return re.sub(r"^[\w.]+(Error|Exception|Halted): ", "", last)
