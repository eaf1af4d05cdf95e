"""A token folder from text: a byte-level BPE tokenizer trained on it, and the tokens
written for training (refgpt.data.tokens reads them). ``python -m refgpt.prepare`` is the
command; the default corpus (the Python standard library's source) is prepared on first use,
into the cache.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .corpus import cache_dir, default_corpus_files, expand_inputs, read_texts
from .tokenizer import EOT, train_bpe
from .tokens import read_meta, write_token_folder


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
    log(f"prepare: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} M characters; "
        f"training a byte-level BPE tokenizer of {vocab_size} tokens ...")
    tok = train_bpe(texts, vocab_size)
    log(f"prepare: encoding ({time.perf_counter() - t0:.0f} s so far) ...")
    eot = tok.token_to_id(EOT)
    # encode_batch_fast: the token ids without their character offsets (about 1.6x faster)
    ids = [np.array(e.ids + [eot], dtype=np.int64) for e in tok.encode_batch_fast(texts)]
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
