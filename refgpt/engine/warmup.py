"""Kernels compiled while the run sets up, not in its first step.

Numba compiles a kernel at its first call and keeps the machine code in its cache (beside
the kernels, or under NUMBA_CACHE_DIR) for later runs. On a machine's first run that takes
longer than preparing the default corpus, and it used to happen silently inside the first
step. So set-up starts it at once, in a background thread that runs one step of a tiny model
under the run's backend and dtype: the same kernels with the same signatures. It overlaps the
corpus's preparation (the tokenizer's work runs outside the GIL). With several ranks, world
rank 0 prepares the corpus and the other ranks compile; every rank then waits for them
before its first step, so rank 0 reads their cache instead of compiling again. A wait longer
than two seconds says what it waits for. A process that has the kernels already (a second
trainer in one job) compiles nothing.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..backend import Backend
from ..config import ModelConfig
from ..nn import GPT
from ..precision import compute_dtype, dtype_of, is_half
from ..optim import AdamW, MasterAdamW
from ..parallel.launch import quiet_barrier

SAY_AFTER_S = 2.0


class KernelWarmup:
    def __init__(self, backend: str, dtype: str, world):
        """backend: the run's backend's name (only numba compiles ahead); world: the world
        communicator, or None for one process."""
        self.world, self.error, self.thread = world, None, None
        if backend == "numba" and (world is None or world.Get_rank() != 0) and not _loaded(dtype):
            self.thread = threading.Thread(target=self._compile, args=(dtype_of(dtype),),
                                           name="refgpt-kernel-warmup", daemon=True)
            self.thread.start()

    def _compile(self, dtype) -> None:
        try:
            cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=16,
                              vocab_size=64)
            with Backend("numba"):                 # a backend of its own: contexts are per thread
                model = GPT(cfg, dtype, seed=0)
                p = model.params
                kind = MasterAdamW if is_half(dtype) else AdamW
                opt = kind(p.data, p.grad, p.decay_ranges(), weight_decay=0.1)
                x = np.zeros((2, cfg.seq_length), np.int64)
                p.zero_grad()
                model.forward(x, x, float(x.size))
                model.backward()
                opt.step(1e-3)
        except Exception as e:                     # noqa: BLE001 - raised again by wait()
            self.error = e

    def wait(self, log) -> None:
        """Until every rank's kernels are compiled (collective); log says so on a long wait."""
        t0 = time.perf_counter()
        said = threading.Timer(SAY_AFTER_S, log, ("compiling the numba kernels (the first run on "
                                                  "this machine; later runs read numba's "
                                                  "cache) ...",))
        said.start()
        try:
            if self.thread is not None:
                self.thread.join()
            quiet_barrier(self.world, longest_s=0.02)   # usually a few ms: poll often
        finally:
            said.cancel()
        if self.error is not None:
            raise self.error
        elapsed = time.perf_counter() - t0
        if elapsed > SAY_AFTER_S:
            log(f"kernels compiled ({elapsed:.0f} s)")


def _loaded(dtype) -> bool:
    """Whether this process has the kernels already (an earlier run in the same process)."""
    from ..kernels import numba_cpu
    return numba_cpu.compiled_for(compute_dtype(dtype_of(dtype)))
