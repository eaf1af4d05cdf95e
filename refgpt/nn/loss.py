"""Cross-entropy over the real vocabulary, normalised by a given token count.

For logits z [N, Vp] of which the first V columns are real (the rest is padding, excluded
from softmax and loss) and targets y [N]:

    m = max_v z[:, v]        lse = m + log sum_v exp(z[:, v] - m)      (log-softmax, stable)
    loss = sum_n (lse_n - z[n, y_n]) / norm
    dz[:, :V] = (softmax(z[:, :V]) - onehot(y)) / norm        dz[:, V:] = 0

``norm`` is the number of tokens in the *global* batch of the step, so summing the losses
(and gradients) of micro-batches, or of data-parallel ranks, gives the mean over the batch.

The loss is the model's last op and d(loss) is always 1, so its gradient is known as soon as
the softmax is: the forward computes it at once and writes it *over the logits*, which
nothing reads after the loss (Megatron's fused cross-entropy does the same). One pass over
the logits instead of three, and no [N, Vp] array of its own for the softmax or the gradient
(206 MB per micro-batch of GPT-2 124M at b4 s256, float32). So while training
(``keep = True``), ``forward`` overwrites the logits array it is given; in evaluation it only
reads them.
"""

from __future__ import annotations

import numpy as np

from ..backend import kernel
from .layer import Layer
from .cast import wide


class CrossEntropy(Layer):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.V = vocab_size

    def forward(self, logits: np.ndarray, targets: np.ndarray, norm: float) -> float:
        """The loss; while training, the logits are overwritten with their gradient."""
        z = logits.reshape(-1, logits.shape[-1])                  # [N, Vp], a view if it can be
        y = targets.reshape(-1)                                   # [N]
        if y.size and (y.min() < 0 or y.max() >= self.V):
            raise ValueError(f"target ids must lie in [0, {self.V})")
        total = cross_entropy(z, self.V, y, norm, self.keep)
        self.save(z, logits.shape)                                # z now holds dz
        return float(total / norm)

    def backward(self) -> np.ndarray:
        dz, shape = self.saved()
        return dz.reshape(shape)


@kernel(numba="numba_cpu", cupy="cupy_gpu", half=("numba", "cupy"))
def cross_entropy(z: np.ndarray, V: int, y: np.ndarray, norm: float, grad: bool) -> float:
    """The sum of the token losses of logits z [N, Vp] (real columns :V) for targets y [N];
    with grad, z is overwritten with the gradient of (that sum / norm): dz as above. 16-bit
    logits: everything in fp32, the gradient rounded once into z."""
    zr = z[:, :V]                                                 # [N, V] real columns (a view)
    zw = wide(zr)                                                 # the same, for fp32 logits
    rows = np.arange(len(y))
    m = zw.max(axis=1, keepdims=True)                             # [N, 1]
    e = np.exp(zw - m)                                            # [N, V]
    s = e.sum(axis=1, keepdims=True)
    total = float((m[:, 0] + np.log(s[:, 0]) - zw[rows, y]).sum())   # before z is overwritten
    if grad:
        zw[...] = e / s                                           # softmax
        zw[rows, y] -= 1.0
        zw /= norm
        if zw is not zr:                                          # 16-bit logits: rounded once
            zr[...] = zw
        z[:, V:] = 0.0
    return total
