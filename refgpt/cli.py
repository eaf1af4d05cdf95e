"""Shared entry-point behaviour: user errors become one line and exit status 2, and every
command's parser names the command as it was called and describes it in plain text.

Set REFGPT_DEBUG=1 to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import os
import re
import sys

from .config import ConfigError


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt."""


USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError)


def require(record, fields: dict, where: str, error=ValueError):
    """record, checked to be a JSON object holding each of fields ({key: type or tuple of
    types}) with a value of that type (a bool is not an int here); else error naming where
    and the key. Files refgpt wrote may have been edited or damaged since."""
    if not isinstance(record, dict):
        raise error(f"{where}: expected a JSON object, found {type(record).__name__}")
    for key, kinds in fields.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if key not in record:
            raise error(f"{where}: {key!r} is missing")
        value = record[key]
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            names = " or ".join(k.__name__ for k in kinds)
            raise error(f"{where}: {key!r} must be {names}, found {str(value)[:40]!r}")
    return record


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
    return OneLineParser(prog=prog, description=plain(doc), allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one ``error:`` line and status 2 (argparse
    prints the whole usage first: sixty lines for refgpt.train), with the flag meant where a
    known one is close to what was typed. Flags are not abbreviated (as Megatron-LM's):
    ``--num-layer 3`` is a typo, not --num-layers."""

    def error(self, message: str):
        unknown = re.fullmatch(r"unrecognized arguments: (.*)", message)
        if unknown:
            known = [o for a in self._actions for o in a.option_strings]
            for word in unknown.group(1).split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=1)
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
        self.exit(2, f"error: {message}; {self.prog} --help lists the flags\n")


def plain(doc: str) -> str:
    """A docstring without its reStructuredText markup (``code``, :mod:`name`)."""
    doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc)
    return doc.replace("``", "")
