"""Shared entry-point behaviour: user errors become one line and exit status 2, and every
command's parser names the command as it was called and describes it in plain text.

Set REFGPT_DEBUG=1 to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
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


def parser(module: str, doc: str, **kwargs) -> argparse.ArgumentParser:
    """A command's parser: its name as the user called it (``refgpt-train`` as a console
    script, else ``python -m refgpt.train``) and the module's docstring, as plain text, for
    its description."""
    called = os.path.basename(sys.argv[0]) if sys.argv else ""
    prog = called if called.startswith("refgpt-") else f"python -m {module}"
    return argparse.ArgumentParser(prog=prog, description=plain(doc),
                                   formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def plain(doc: str) -> str:
    """A docstring without its reStructuredText markup (``code``, :mod:`name`)."""
    doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc)
    return doc.replace("``", "")
