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

    Under DDP every process fails alike (the defense callback broadcasts its errors); only the
    process of global rank 0 prints, as Lightning's ``rank_zero_*`` helpers do, so the user reads
    the line once. ``GAZEGUARD_TRACEBACK=1`` prints the traceback before it, for a defense's author.
    """
    try:
        run()
    except GazeguardError as err:
        if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":
            if os.environ.get("GAZEGUARD_TRACEBACK"):
                traceback.print_exc()
            print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
