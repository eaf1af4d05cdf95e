"""Dropout whose mask depends only on (seed, site, step, sample), never on the layout.

For sample s of step k at site "h.3.attn.drop" the keep-mask is drawn from the stream
keyed by that name (see :func:`refgpt.nn.params.name_stream`):

    keep = U[0,1)(seed, "site/k/s") >= p          y = x * keep / (1 - p)       dx = dy * keep / (1 - p)

(the mask in fp32 for 16-bit x, so that 1 / (1 - p) is not rounded to 16 bits; y rounded once)

so a data-parallel rank (or a micro-batch) holding sample s draws the same mask a single
process would. A layout that shards one axis of each sample (tensor parallelism: heads;
sequence parallelism: tokens; 2-D: the hidden axis) passes part = (axis, slice, full
length): it draws the whole sample's mask and keeps its slice, so the numbers still match one
process. One that holds block i of q of each micro-batch's samples (2-D: its batch rows)
passes rows = (i, q). Context parallelism's ring attention takes the rows of its queries
(rows_of).
"""

from __future__ import annotations

import numpy as np

from ..backend import to_device
from .layer import Layer
from .params import name_stream
from ..precision import compute_dtype
from .cast import narrow, wide


class Dropout(Layer):
    def __init__(self, p: float, site: str, seed: int, part: tuple | None = None,
                 rows: tuple | None = None):
        super().__init__()
        self.p, self.site, self.seed, self.part, self.rows = p, site, seed, part, rows

    def forward(self, x: np.ndarray, key=None) -> np.ndarray:
        """key = (step, sample_ids) enables dropout; None (evaluation) is the identity."""
        if self.p == 0.0 or key is None:
            self.save(None)
            return x
        step, samples = key
        if self.rows is not None:                      # this rank's block of the samples
            i, q = self.rows
            n = len(samples) // q
            samples = samples[i * n:(i + 1) * n]
        shape, index = list(x.shape[1:]), [slice(None)] * (x.ndim - 1)
        if self.part is not None:                      # draw the whole sample, keep a slice
            axis, sl, full = self.part
            shape[axis], index[axis] = full, sl
        keep = np.stack([name_stream(self.seed, f"{self.site}/{step}/{s}").random(shape)[tuple(index)]
                         >= self.p for s in samples])
        mask = to_device(keep.astype(compute_dtype(x.dtype)) / (1.0 - self.p))
        self.save(mask)
        return narrow(wide(x) * mask, x.dtype)

    def rows_of(self, key, rows: np.ndarray, T: int, dtype) -> np.ndarray:
        """The scaled mask [B, h, len(rows), T] of attention dropout on each sample's
        [H, T, T] probabilities: this layer's heads (its part), the queries at positions rows,
        every key (context parallelism's ring, refgpt.parallel.context). Saves nothing."""
        step, samples = key
        _, heads, H = self.part
        keep = np.stack([name_stream(self.seed, f"{self.site}/{step}/{s}").random((H, T, T))
                         [heads][:, rows] >= self.p for s in samples])
        return to_device(keep.astype(dtype) / (1.0 - self.p))

    def backward(self, dy: np.ndarray) -> np.ndarray:
        (mask,) = self.saved()
        return dy if mask is None else narrow(wide(dy) * mask, dy.dtype)
