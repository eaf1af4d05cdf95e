"""Token + learned position embedding, and the LM head tied to the token table.

Embedding, for ids idx [B, T] starting at position p0:

    x = wte[idx] + wpe[p0 : p0 + T]                          [B, T, C]
    dwte[v] += sum over (b, t) with idx[b, t] = v of dx[b, t]   (scatter-add: np.add.at,
                                                                because `g[idx] += d` drops
                                                                repeated ids)
    dwpe[p0 + t] += sum_b dx[b, t]

Under context parallelism a rank holds tokens at given positions pos[t] instead of
p0 + t (refgpt.parallel.context): x = wte[idx] + wpe[pos], dwpe[pos[t]] += sum_b dx[b, t].

Tied head: logits = x wte^T, so dx = dlogits wte and dwte += dlogits^T x. The token table's
gradient therefore receives both the scatter-add above and this GEMM.
"""

from __future__ import annotations

import numpy as np

from ..backend import kernel
from .layer import Layer, ParamRef
from .linear import add_matmul, matmul
from .cast import wide


class TokenTable(Layer):
    """A layer that reads the token table wte (and, when it has it, the position table wpe)."""

    wte, gwte = ParamRef("wte"), ParamRef("wte", grad=True)
    wpe, gwpe = ParamRef("wpe"), ParamRef("wpe", grad=True)

    def __init__(self, params, positions: bool):
        super().__init__()
        self.params = params
        self.param_names = {"wte": "wte.weight", "wpe": "wpe.weight" if positions else None}


class Embedding(TokenTable):
    def __init__(self, params, positions: np.ndarray | None = None):
        """positions: the fixed positions of the tokens this rank holds (context
        parallelism); None: p0, p0 + 1, ..."""
        super().__init__(params, positions=True)
        self.positions = positions

    def forward(self, idx: np.ndarray, pos0: int = 0) -> np.ndarray:
        T = idx.shape[1]
        if pos0 + T > self.wpe.shape[0]:
            raise ValueError(f"positions {pos0}..{pos0 + T - 1} exceed the position table "
                             f"({self.wpe.shape[0]} rows)")
        pos = slice(pos0, pos0 + T) if self.positions is None else self.positions
        self.save(idx, pos)
        return self.wte[idx] + self.wpe[pos]                     # [B, T, C]

    def backward(self, dx: np.ndarray) -> None:
        idx, pos = self.saved()
        C = dx.shape[-1]
        scatter_add_rows(self.gwte, idx.ravel(), dx.reshape(-1, C))
        self.gwpe[pos] += wide(dx).sum(axis=0)                   # distinct positions


class TiedHead(TokenTable):
    def __init__(self, params):
        super().__init__(params, positions=False)

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.save(x)
        z = matmul(x.reshape(-1, x.shape[-1]), self.wte.T)          # [B T, C] @ [C, Vp]
        return z.reshape(*x.shape[:-1], -1)                       # [B, T, Vp]

    def backward(self, dlogits: np.ndarray) -> np.ndarray:
        (x,) = self.saved()
        dl2 = dlogits.reshape(-1, dlogits.shape[-1])              # [N, Vp]
        add_matmul(self.gwte, dl2.T, x.reshape(-1, x.shape[-1]))  # [Vp, C]
        return self.input_grad(dl2).reshape(*dlogits.shape[:-1], -1)  # [B, T, C]

    def input_grad(self, dl2: np.ndarray) -> np.ndarray:
        return matmul(dl2, self.wte)                              # [N, Vp] @ [Vp, C]


@kernel(numba="numba_cpu", cupy="cupy_gpu", half=("numba", "cupy"))
def scatter_add_rows(table: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> None:
    """table[idx[i]] += rows[i] for every i, repeated ids included (16-bit rows into the fp32
    gradient table: added in fp32)."""
    np.add.at(table, idx, rows.astype(table.dtype, copy=False))
