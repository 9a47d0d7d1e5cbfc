"""Errors that stop a run before training, with a message a user can act on.

The CLIs catch :class:`GazeguardError` and print its message on one line, so every raise site
names the file or option and what is wrong with it.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable


class GazeguardError(Exception):
    """Base class for user-facing errors (bad input, bad configuration)."""


class DataFormatError(GazeguardError, ValueError):
    """A data file is missing, unreadable or not laid out as its format requires."""


class ConfigError(GazeguardError, ValueError):
    """An option has a value that cannot work (unknown name, out of range, empty split)."""


def run_command(run: Callable[[], object]) -> int:
    """A command's exit status: 0, or 2 after printing a :class:`GazeguardError` as one
    ``error: ...`` line on stderr (the shared ``main`` of the gazeguard CLIs).

    An error that every DDP process raises alike (``on_every_rank``, as the defense callback's
    broadcast errors are) is printed by the process of global rank 0 only, so the user reads the
    line once; any other error is printed where it happened. ``GAZEGUARD_TRACEBACK=1`` prints the
    traceback before it, for a defense's author.
    """
    try:
        run()
    except GazeguardError as err:
        if _global_rank() == 0 or not getattr(err, "on_every_rank", False):
            if os.environ.get("GAZEGUARD_TRACEBACK"):
                traceback.print_exc()
            print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _global_rank() -> int:
    """This process's global rank from the variables Lightning's launchers (or SLURM) set; 0 alone."""
    for variable in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    node, local = os.environ.get("NODE_RANK", "0"), os.environ.get("LOCAL_RANK", "0")
    return 0 if node in ("", "0") and local in ("", "0") else 1
