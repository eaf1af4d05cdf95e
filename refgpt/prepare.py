"""``python -m refgpt.prepare``: train a byte-level BPE tokenizer and write token files.

    python -m refgpt.prepare --output data/mytext  notes/ book.txt     # your text
    python -m refgpt.prepare --output data/stdlib                      # the default corpus

The default corpus is the Python standard library's source on this machine. Documents are
joined with <|endoftext|>; the last --val-fraction of the token stream is the validation split.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .cli import exit_on_user_error
from .data.corpus import cache_dir, default_corpus_files, expand_inputs, read_texts
from .data.tokenizer import EOT, train_bpe
from .data.tokens import read_meta, write_token_folder


def prepare(inputs: list[str], output: Path, vocab_size: int, val_fraction: float = 0.05,
            log=print) -> Path:
    """Tokenise the inputs (default corpus when empty) into ``output``; returns ``output``."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    files = expand_inputs(inputs) if inputs else default_corpus_files()
    if not files:
        raise FileNotFoundError("no input files")
    t0 = time.perf_counter()
    texts = [t for t in read_texts(files) if t]
    log(f"prepare: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} M characters")
    tok = train_bpe(texts, vocab_size)
    eot = tok.token_to_id(EOT)
    ids = [np.array(e.ids + [eot], dtype=np.int64) for e in tok.encode_batch(texts)]
    stream = np.concatenate(ids)
    n_val = max(1, int(len(stream) * val_fraction))
    output.mkdir(parents=True, exist_ok=True)
    tok.save(str(output / "tokenizer.json"))
    write_token_folder(output, {"train": stream[:-n_val], "val": stream[-n_val:]},
                       tok.get_vocab_size(),
                       {"eot_id": eot, "documents": len(texts),
                        "sources": "python stdlib" if not inputs else [str(i) for i in inputs]})
    log(f"prepare: {len(stream):,} tokens (vocab {tok.get_vocab_size()}) -> {output} "
        f"in {time.perf_counter() - t0:.1f} s")
    return output


def default_data(vocab_size: int, log=print) -> Path:
    """The default corpus prepared for this vocabulary size, prepared on first use."""
    folder = cache_dir() / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-v{vocab_size}"
    try:
        read_meta(folder)
        return folder
    except (FileNotFoundError, ValueError):
        pass
    log(f"preparing the default corpus (Python standard library) into {folder} ...")
    tmp = folder.with_name(folder.name + ".tmp")
    prepare([], tmp, vocab_size, log=log)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m refgpt.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", help="text files or folders (default: the Python stdlib)")
    ap.add_argument("--output", "-o", required=True, help="folder to write")
    ap.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    ap.add_argument("--val-fraction", type=float, default=0.05,
                    help="share of tokens held out for validation (default 0.05)")
    return ap


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prepare(args.inputs, Path(args.output), args.vocab_size, args.val_fraction)
    return 0


if __name__ == "__main__":
    sys.exit(main())
