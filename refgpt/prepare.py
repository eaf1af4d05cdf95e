"""``python -m refgpt.prepare``: train a byte-level BPE tokenizer and write token files.

    python -m refgpt.prepare --output data/mytext  notes/ book.txt     # your text
    python -m refgpt.prepare --output data/stdlib                      # the default corpus

The default corpus is the Python standard library's source on this machine. Documents are
joined with <|endoftext|>; the last --val-fraction of the token stream is the validation split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import exit_on_user_error, parser
from .config import ConfigError
from .data.corpus import TEXT_SUFFIXES
from .data.prepared import prepare


def build_parser() -> argparse.ArgumentParser:
    ap = parser("refgpt.prepare", __doc__)
    ap.add_argument("inputs", nargs="*",
                    help="text files, or folders: the files under them whose suffix is one of "
                         f"{' '.join(sorted(TEXT_SUFFIXES))} (name other files one by one) "
                         "[default: the Python standard library's source]")
    ap.add_argument("--output", "-o", required=True, help="folder to write")
    ap.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    ap.add_argument("--val-fraction", type=float, default=0.05,
                    help="share of tokens held out for validation (default 0.05)")
    return ap


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output}: exists and is not a folder")
    prepare(args.inputs, Path(args.output), args.vocab_size, args.val_fraction)
    return 0


if __name__ == "__main__":
    sys.exit(main())
