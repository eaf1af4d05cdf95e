"""Cross-entropy over the real vocabulary, normalised by a given token count.

For logits z [N, Vp] of which the first V columns are real (the rest is padding, excluded
from softmax and loss) and targets y [N]:

    m = max_v z[:, v]        lse = m + log sum_v exp(z[:, v] - m)      (log-softmax, stable)
    loss = sum_n (lse_n - z[n, y_n]) / norm
    dz[:, :V] = (softmax(z[:, :V]) - onehot(y)) / norm        dz[:, V:] = 0

``norm`` is the number of tokens in the *global* batch of the step, so summing the losses
(and gradients) of micro-batches, or of data-parallel ranks, gives the mean over the batch.
"""

from __future__ import annotations

import numpy as np

from ..backend import kernel
from .layer import Layer


class CrossEntropy(Layer):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.V = vocab_size

    def forward(self, logits: np.ndarray, targets: np.ndarray, norm: float) -> float:
        Vp = logits.shape[-1]
        z = logits.reshape(-1, Vp)[:, :self.V]                    # [N, V] real columns
        y = targets.reshape(-1)                                   # [N]
        if y.size and (y.min() < 0 or y.max() >= self.V):
            raise ValueError(f"target ids must lie in [0, {self.V})")
        total, probs = cross_entropy_forward(z, y)
        self.save(probs, y, norm, logits.shape)
        return float(total / norm)

    def backward(self) -> np.ndarray:
        probs, y, norm, shape = self.saved()
        return cross_entropy_backward(probs, y, norm, shape[-1]).reshape(shape)


@kernel
def cross_entropy_forward(z: np.ndarray, y: np.ndarray):
    """(sum of the token losses, softmax probabilities [N, V]) for logits z [N, V]."""
    m = z.max(axis=1, keepdims=True)                              # [N, 1]
    e = np.exp(z - m)                                             # [N, V]
    s = e.sum(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(s[:, 0])                               # [N]
    losses = lse - z[np.arange(len(y)), y]                        # [N]
    return float(losses.sum()), e / s


@kernel
def cross_entropy_backward(probs: np.ndarray, y: np.ndarray, norm: float, Vp: int) -> np.ndarray:
    """dz [N, Vp] = (probs - onehot(y)) / norm on the real columns, 0 on the padding."""
    dz = np.zeros((probs.shape[0], Vp), probs.dtype)
    dz[:, :probs.shape[1]] = probs
    dz[np.arange(len(y)), y] -= 1.0
    dz /= norm
    return dz
