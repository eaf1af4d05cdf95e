"""Token files and the datasets that sample from them.

A prepared data folder holds ``meta.json`` (format, dtype, vocabulary size, token counts),
``train.bin`` and ``val.bin`` (raw token ids, uint16 when the vocabulary fits, else uint32;
read through np.memmap) and ``tokenizer.json``.

Sampling is a pure function of (seed, global sample index g): the stream is cut into
non-overlapping windows of T + 1 tokens (stride T); epoch e = g // n visits the n windows in
the permutation drawn from the stream keyed by (seed, "data/epoch/e"). The batch of step k is
samples [k G, (k + 1) G), so the data position is just the number of consumed samples, and
every parallel layout sees the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..cli import require
from ..nn.params import name_stream

FORMAT = "refgpt-tokens-v1"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_token_folder(out: Path, splits: dict[str, np.ndarray], vocab_size: int,
                       extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    meta = {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": vocab_size,
            "splits": {}, **extra}
    for name, ids in splits.items():
        ids.astype(dtype).tofile(out / f"{name}.bin")
        meta["splits"][name] = {"file": f"{name}.bin", "tokens": int(len(ids))}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def read_meta(folder: Path) -> dict:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"no prepared data at {folder} (missing meta.json; "
                                f"run python -m refgpt.prepare)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a refgpt token folder (format "
                         f"{meta.get('format') if isinstance(meta, dict) else meta!r})")
    require(meta, {"dtype": str, "vocab_size": int, "splits": dict}, str(path))
    for split, info in meta["splits"].items():
        require(info, {"file": str, "tokens": int}, f"{path}: splits: {split}")
    try:
        np.dtype(meta["dtype"])
    except TypeError:
        raise ValueError(f"{path}: 'dtype' {meta['dtype'][:40]!r} is not a NumPy type") from None
    return meta


class TokenDataset:
    """Windows of seq_length + 1 tokens from one split of a prepared folder."""

    def __init__(self, folder, split: str, seq_length: int, seed: int):
        folder = Path(folder)
        meta = read_meta(folder)
        info = meta["splits"].get(split)
        if info is None:
            raise ValueError(f"{folder} has no {split!r} split")
        path = folder / info["file"]
        expected = info["tokens"] * np.dtype(meta["dtype"]).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise ValueError(f"corrupt token file {path}: expected {expected} bytes")
        self.tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
        self.vocab_size = meta["vocab_size"]
        top = int(self.tokens.max()) if len(self.tokens) else 0    # one pass, at start
        if top >= self.vocab_size:
            raise ValueError(f"corrupt token file {path}: token id {top} is outside the data's "
                             f"vocabulary of {self.vocab_size}")
        self.T, self.seed = seq_length, seed
        self.num_windows = (len(self.tokens) - 1) // seq_length
        if self.num_windows < 1:
            raise ValueError(f"the {split} split of {folder} has {len(self.tokens)} tokens, "
                             f"fewer than --seq-length + 1 = {seq_length + 1}")
        self._perm_epoch, self._perm = -1, None

    def window(self, w: int) -> np.ndarray:
        return np.asarray(self.tokens[w * self.T: w * self.T + self.T + 1], dtype=np.int64)

    def sample(self, g: int) -> np.ndarray:
        """Tokens [T + 1] of global sample g (shuffled, epoch by epoch)."""
        epoch, i = divmod(g, self.num_windows)
        if epoch != self._perm_epoch:
            self._perm = name_stream(self.seed, f"data/epoch/{epoch}").permutation(self.num_windows)
            self._perm_epoch = epoch
        return self.window(int(self._perm[i]))

    def sequential(self, g: int) -> np.ndarray:
        """Tokens of window g mod n, in order (evaluation)."""
        return self.window(g % self.num_windows)


class SyntheticDataset:
    """Seeded random tokens: sample g is drawn from the stream keyed by (seed, split, g)."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int, split: str = "train"):
        self.vocab_size, self.T, self.seed, self.split = vocab_size, seq_length, seed, split

    def sample(self, g: int) -> np.ndarray:
        stream = name_stream(self.seed, f"synthetic/{self.split}/{g}")
        return stream.integers(0, self.vocab_size, self.T + 1)

    sequential = sample


def batch(dataset, sample_ids, sequential: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets [B, T] for the given global sample ids."""
    get = dataset.sequential if sequential else dataset.sample
    rows = np.stack([get(int(g)) for g in sample_ids])          # [B, T + 1]
    return rows[:, :-1], rows[:, 1:]
