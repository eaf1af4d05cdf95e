"""What a rank trains and evaluates on: the datasets, and each step's micro-batches.

Step k's global batch is samples [kG, (k+1)G) of the run, whatever the layout. Data-parallel
rank r of d takes the contiguous share [kG + rG/d, kG + (r+1)G/d) and runs it as m = G/(d B)
micro-batches of B sequences (TrainConfig.micro_batches); every micro-batch's loss is
divided by the global token count G T, so the accumulated, then summed, gradient is the
single process's. Tensor- and pipeline-parallel ranks of one replica read the same share, and
so do the c ranks of a context-parallel group (refgpt.parallel.context), each keeping the
tokens at its positions (inputs and targets alike): d / c replicas share the batch.
Dropout's key for a micro-batch is (step, its sample ids): its masks are the single
process's too (refgpt.nn.dropout).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..backend import to_device
from ..config import ConfigError
from ..data.prepared import default_data
from ..data.tokens import SyntheticDataset, TokenDataset, batch, read_meta
from ..parallel.context import positions
from ..parallel.launch import on_rank0


def data_folder(tcfg, mcfg, world, log) -> Path | None:
    """The token folder to read (None: synthetic data). The default corpus is prepared on
    first use by world rank 0 while the others wait asleep (refgpt.parallel.launch)."""
    if tcfg.synthetic_data:
        return None
    if tcfg.data_path:
        return Path(tcfg.data_path)
    return on_rank0(world, default_data, mcfg.vocab_size, log)


def fit_vocabulary(mcfg, tcfg, given: set, from_checkpoint: bool) -> None:
    """With --data-path, the model's vocabulary is the data's unless --vocab-size (or a
    checkpoint) sets it, and may not be smaller (the default corpus is prepared with the
    model's vocabulary)."""
    if tcfg.synthetic_data or not tcfg.data_path:
        return
    meta = read_meta(Path(tcfg.data_path))
    if not from_checkpoint and "vocab_size" not in given:
        mcfg.vocab_size = meta["vocab_size"]
    if mcfg.vocab_size < meta["vocab_size"]:
        raise ConfigError(f"--vocab-size {mcfg.vocab_size} is smaller than the data's "
                          f"vocabulary ({meta['vocab_size']}, {tcfg.data_path})")


class Batches:
    """This rank's micro-batches of each step, and of the validation batches."""

    def __init__(self, mcfg, tcfg, grid, folder: Path | None):
        self.tcfg, self.grid, self.T = tcfg, grid, mcfg.seq_length
        self.positions = (positions(self.T, grid.cp_size, grid.cp_rank) if grid.cp_size > 1
                          else None)
        if folder is None:
            self.train = SyntheticDataset(mcfg.vocab_size, mcfg.seq_length, tcfg.seed, "train")
            self.val = SyntheticDataset(mcfg.vocab_size, mcfg.seq_length, tcfg.seed, "val")
            self.tokenizer = None
        else:
            self.train = TokenDataset(folder, "train", mcfg.seq_length, tcfg.seed)
            self.val = TokenDataset(folder, "val", mcfg.seq_length, tcfg.seed)
            tok = folder / "tokenizer.json"
            self.tokenizer = tok if tok.is_file() else None

    @property
    def norm(self) -> float:
        """The global token count of a step, which every micro-batch's loss is divided by."""
        return float(self.tcfg.global_batch_size * self.T)

    def step(self, consumed: int, iteration: int) -> list[tuple]:
        """[(x, y, key), ...] of this rank's share of the step that starts at sample consumed."""
        share = self.tcfg.global_batch_size // self.grid.data_size
        return [(*map(self._tokens, batch(self.train, ids)), (iteration, ids))
                for ids in self._micro_batches(consumed + self.grid.data_rank * share, share)]

    def validation(self) -> tuple[list[tuple], float]:
        """([(x, y, None), ...] of this rank's share of the eval_iters validation batches, in
        order; their global token count)."""
        total = self.tcfg.eval_iters * self.tcfg.global_batch_size
        share = total // self.grid.data_size
        return ([(*map(self._tokens, batch(self.val, ids, sequential=True)), None)
                 for ids in self._micro_batches(self.grid.data_rank * share, share)],
                float(total * self.T))

    def _tokens(self, ids: np.ndarray):
        """[B, T] ids on the device: this rank's positions of them under context parallelism."""
        if self.positions is not None:
            ids = ids[:, self.positions]
        return to_device(ids)

    def _micro_batches(self, first: int, share: int):
        B = self.tcfg.micro_batch_size
        return [np.arange(start, start + B) for start in range(first, first + share, B)]
