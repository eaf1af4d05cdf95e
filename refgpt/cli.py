"""Shared entry-point behaviour: user errors become one line and exit status 2.

Set REFGPT_DEBUG=1 to see the full traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys

from .config import ConfigError


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt."""


USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError)


def exit_on_user_error(main):
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("REFGPT_DEBUG"):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    return wrapped
