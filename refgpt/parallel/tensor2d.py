"""2-D tensor parallelism (Optimus; Xu et al. 2021): the GPT on a q x q grid of TP ranks.

Rank (i, j) of the grid (refgpt.parallel.summa) holds, for a micro-batch of B sequences:

    activations   x_ij [B/q, T, C/q]      sequences of batch block i, hidden block j
    weights       W_ij [in/q, out/q]      rows block i, columns block j (c_attn: the columns
                                          of heads block j of each of q, k, v)
    token table   wte_ij [Vp/q, C/q]      vocabulary block i, hidden block j (tied head)
    positions     wpe_ij [P/q, C/q]       positions block i, hidden block j
    vectors       b_ij [out/q^2]          biases and LayerNorm gains/shifts: column block j,
                                          cut again into q pieces along the column's ranks

so every parameter element lives on exactly one TP rank. A linear layer is SUMMA's AB forward
(AB^T and A^T B backward), and its output has its input's layout. A vector is all-gathered
over the column's ranks before use; its gradient (summed over the rank's tokens) is
reduce-scattered back over them. LayerNorm sums over the hidden axis with all-reduces over
the row. Attention is local: block j of c_attn's output holds whole heads. The embedding
looks up every id of the micro-batch in its vocabulary block, then a reduce-scatter over the
column sums the vocabulary blocks and hands each rank its batch block. The tied head is an
AB^T with the token table, giving logits [tokens of block i, vocabulary block j], and the loss
is the vocab-parallel cross-entropy of refgpt.parallel.tensor over the row, summed over the
column.

Tensor2D supplies these layers to the one block and model of refgpt.nn (refgpt.nn.sublayers);
dropout masks are the single process's, cut to the rank's batch and hidden (or head) block.

Needs q^2 = TP size, q dividing the heads, the micro-batch size, the padded vocabulary and
the position table, and q^2 dividing the hidden size.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import array_module
from ..config import ConfigError
from ..nn.dropout import Dropout
from ..nn.embedding import scatter_add_rows
from ..nn.gelu import GELU
from ..nn.layer import Layer, ParamRef, Sequence
from ..nn.linear import Linear, column_sum
from ..nn.params import ParamSpec
from ..precision import compute_dtype, narrow, wide
from ..nn.sublayers import Sublayers, grid_shape
from .summa import SummaGrid, matmul_ab, matmul_abt, matmul_atb
from .tensor import VocabParallelCrossEntropy, shard
from .tensor_comm import TPComm


def formula_layer_volume(N: int, h: int, q: int) -> float:
    """Elements a rank receives per transformer layer, forward and backward, for a micro-batch
    of N tokens of hidden size h on a q x q grid: (q-1)/q^2 (21 N h + 36 h^2), the SUMMA
    products' panels (docs/tensor-parallel.md); the LayerNorms' row sums and the biases'
    gathers, which it leaves out, add under 1% at N, h >= 256."""
    return (q - 1) / q**2 * (21 * N * h + 36 * h * h)


def column_kind(name: str) -> str:
    return "qkv" if "c_attn" in name else "cols"


def block2d(name: str, value: np.ndarray, i: int, j: int, q: int) -> np.ndarray:
    """Rank (i, j)'s part of a full parameter (see the module docstring)."""
    cols = shard(value, column_kind(name), j, q)                 # column block j
    return np.split(cols, q, axis=0)[i]                          # rows (or vector piece) i


def unblock2d(name: str, parts: list[np.ndarray], q: int) -> np.ndarray:
    """The full parameter from every rank's part, parts[i q + j] (inverse of block2d)."""
    columns = [np.concatenate([parts[i * q + j] for i in range(q)], axis=0) for j in range(q)]
    if column_kind(name) == "cols":
        return np.concatenate(columns, axis=-1)
    lead = columns[0].shape[:-1]
    return np.concatenate([c.reshape(*lead, 3, -1) for c in columns], axis=-1).reshape(*lead, -1)


def check_2d(cfg, t: int, micro_batch: int) -> int:
    q = int(round(math.sqrt(t)))
    if q * q != t:
        raise ConfigError(f"--tensor-parallel-mode 2d needs a square tensor-parallel size, got {t}")
    for what, n, d in (("--num-attention-heads", cfg.num_attention_heads, q),
                       ("--hidden-size", cfg.hidden_size, q * q),
                       ("--micro-batch-size", micro_batch, q),
                       ("the padded vocabulary (--make-vocab-size-divisible-by)", cfg.padded_vocab, q),
                       ("--max-position-embeddings", cfg.n_positions, q)):
        if n % d:
            raise ConfigError(f"{what} {n} is not divisible by {d} (2-D tensor parallelism, q = {q})")
    return q


class Linear2D(Linear):
    """y = x W (its bias is a separate Bias2D) with x [..., in/q] and W_ij [in/q, out/q]: the
    three products of refgpt.nn.linear.Linear as SUMMA products on the grid (a ``defer`` list
    postpones the weight gradient, as there)."""

    def __init__(self, params, prefix: str, grid: SummaGrid, keep_wide: bool = False):
        """keep_wide: a bias follows, so a 16-bit run's product stays fp32 (Bias2D rounds
        it once, with the bias, as one process's GEMM)."""
        super().__init__(params, prefix, bias=False)
        self.grid, self.site, self.keep_wide = grid, prefix, keep_wide   # site: h.0.mlp.c_fc, ...

    def product(self, x2):
        return matmul_ab(self.grid, x2, self.w, self.site, self.keep_wide)

    def input_grad(self, dy2):
        return matmul_abt(self.grid, dy2, self.w, self.site)

    def weight_grad(self, x2, dy2) -> None:
        self.gw += matmul_atb(self.grid, x2, dy2, self.site)


class Vector2D:
    """A vector parameter stored as 1/q^2 pieces: gathered to the column block for use, its
    gradient reduce-scattered back to the pieces."""

    def __init__(self, params, name: str, col: TPComm):
        self.params, self.name, self.col = params, name, col

    def full(self) -> np.ndarray:
        return self.col.allgather(self.params[self.name], 0, self.name)

    def add_grad(self, g_column: np.ndarray) -> None:
        self.params.grads[self.name] += self.col.reduce_scatter(g_column, 0, self.name)


class Bias2D(Layer):
    def __init__(self, params, name: str, col: TPComm):
        super().__init__()
        self.b = Vector2D(params, name, col)

    def forward(self, x):
        """x: the product (fp32 in a 16-bit run: rounded once here, with the bias)."""
        b = self.b.full()
        return narrow(wide(x) + wide(b), b.dtype)

    def backward(self, dy):
        self.b.add_grad(column_sum(dy.reshape(-1, dy.shape[-1])))
        return dy


class LayerNorm2D(Layer):
    """refgpt.nn.layernorm over a hidden axis split along the row: the row sums of x, then of
    (x - mu)^2 (two passes, as the single process), and in backward of dn and dn n."""

    def __init__(self, params, prefix: str, eps: float, row: TPComm, col: TPComm, C: int):
        super().__init__()
        self.g = Vector2D(params, f"{prefix}.weight", col)
        self.b = Vector2D(params, f"{prefix}.bias", col)
        self.eps, self.row, self.C, self.site = eps, row, C, prefix

    def _mean(self, v):
        return self.row.allreduce(v.sum(axis=-1, keepdims=True), self.site) / self.C

    def forward(self, x):
        """16-bit x: computed in fp32 as refgpt.nn.layernorm (n kept rounded, rstd in fp32)."""
        xw = wide(x)
        xc = xw - self._mean(xw)
        rstd = 1.0 / np.sqrt(self._mean(xc * xc) + self.eps)
        n = xc * rstd
        g = self.g.full()
        self.save(narrow(n, x.dtype), rstd, g)
        return narrow(n * wide(g) + wide(self.b.full()), x.dtype)

    def backward(self, dy):
        n, rstd, g = self.saved()
        dyw, n = wide(dy), wide(n)
        C = n.shape[-1]
        self.g.add_grad(column_sum((dyw * n).reshape(-1, C)))
        self.b.add_grad(column_sum(dyw.reshape(-1, C)))
        dn = dyw * wide(g)
        return narrow(rstd * (dn - self._mean(dn) - n * self._mean(dn * n)), dy.dtype)


class Embedding2D(Layer):
    """x = wte[idx] + wpe[positions] for this rank's batch block and hidden block."""

    wte, gwte = ParamRef("wte"), ParamRef("wte", grad=True)

    def __init__(self, params, grid: SummaGrid, col: TPComm):
        super().__init__()
        self.params, self.param_names, self.grid, self.col = params, {"wte": "wte.weight"}, grid, col
        self.wpe = Vector2D(params, "wpe.weight", col)
        self.rows = params.specs["wte.weight"].shape[0]

    def forward(self, idx, pos0: int = 0):                       # idx [B, T]: the whole batch
        lo, T = self.grid.i * self.rows, idx.shape[1]
        mine = (idx >= lo) & (idx < lo + self.rows)
        local = np.where(mine, idx - lo, 0)
        x = self.col.reduce_scatter(wide(self.wte[local]) * mine[..., None], 0, "embed")
        self.save(local, mine, pos0)
        return narrow(x + wide(self.wpe.full()[pos0:pos0 + T]), self.wte.dtype)   # [B/q, T, C/q]

    def backward(self, dx):
        local, mine, pos0 = self.saved()
        P = self.params.specs["wpe.weight"].shape[0] * self.grid.q
        dpos = array_module().zeros((P, dx.shape[-1]), compute_dtype(dx.dtype))
        dpos[pos0:pos0 + dx.shape[1]] = wide(dx).sum(axis=0)
        self.wpe.add_grad(dpos)
        dfull = self.col.allgather(dx, 0, "embed")               # [B, T, C/q]
        scatter_add_rows(self.gwte, local[mine], dfull[mine])


class Head2D(Layer):
    """Logits [tokens of block i, vocabulary block j] = x wte^T (SUMMA AB^T)."""

    wte, gwte = ParamRef("wte"), ParamRef("wte", grad=True)

    def __init__(self, params, grid: SummaGrid):
        super().__init__()
        self.params, self.param_names, self.grid = params, {"wte": "wte.weight"}, grid

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        self.save(x2, x.shape)
        return matmul_abt(self.grid, x2, self.wte, "head")       # [B/q T, Vp/q]

    def backward(self, dz):
        x2, shape = self.saved()
        self.gwte += matmul_atb(self.grid, dz, x2, "head")
        return matmul_ab(self.grid, dz, self.wte, "head").reshape(shape)


class Loss2D(Layer):
    """The vocab-parallel cross-entropy over the row, on this rank's sequences, summed over
    the column (so every rank returns the micro-batch's loss)."""

    def __init__(self, vocab_size: int, grid: SummaGrid, row: TPComm, col: TPComm):
        super().__init__()
        self.ce, self.grid, self.col = VocabParallelCrossEntropy(vocab_size, row), grid, col
        self.layers = [self.ce]                                  # what keeps the stash

    def forward(self, logits, targets, norm):
        rows = targets.shape[0] // self.grid.q
        mine = targets[self.grid.i * rows:(self.grid.i + 1) * rows]
        part = self.ce.forward(logits, mine.reshape(-1), norm)
        return float(self.col.comm.allreduce(part))

    def backward(self):
        return self.ce.backward()


class Tensor2D(Sublayers):
    """The sublayers of 2-D tensor parallelism (module docstring) on rank (i, j) of the grid."""

    def __init__(self, cfg, seed: int, grid: SummaGrid):
        super().__init__(cfg, seed)
        self.grid, self.row, self.col = grid, TPComm(grid.row), TPComm(grid.col)
        q, i, j, C, a = grid.q, grid.i, grid.j, cfg.hidden_size, cfg.num_attention_heads
        self.hidden_part = (1, slice(j * C // q, (j + 1) * C // q), C)   # dropout on [T, C]
        self.head_part = (0, slice(j * a // q, (j + 1) * a // q), a)     # dropout on [H, T, T]
        self.rows = (i, q)                                             # batch block i of q

    # -- parameters ------------------------------------------------------------------------
    def local_specs(self, specs: list[ParamSpec]) -> list[ParamSpec]:
        g = self.grid
        return [ParamSpec(s.name, block2d(s.name, np.empty(s.shape, bool), g.i, g.j, g.q).shape,
                          s.init, s.std, s.valid_rows, s.shape) for s in specs]

    def shard(self, name: str, value: np.ndarray) -> np.ndarray:
        return block2d(name, value, self.grid.i, self.grid.j, self.grid.q)

    def shard_index(self, name: str, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        g = self.grid
        rows, cols = (np.arange(n) for n in grid_shape(shape))
        cols = shard(cols, column_kind(name), g.j, g.q)                  # column block j
        if len(shape) == 1:                                            # a vector: piece i
            return rows, np.split(cols, g.q)[g.i]
        return np.split(rows, g.q)[g.i], cols                          # rows block i

    def full_tensors(self, params, flat: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for n, (lo, hi) in params.slices.items():
            part = np.ascontiguousarray(flat[lo:hi].reshape(params.specs[n].shape))
            out[n] = unblock2d(n, self.grid.comm.allgather(part), self.grid.q)
        return out

    def counted(self, name: str) -> bool:
        return True                             # every element lives on one TP rank

    def activation_shape(self, micro_batch: int) -> tuple:
        q = self.grid.q
        return micro_batch // q, self.cfg.seq_length, self.cfg.hidden_size // q

    def layer_volume(self, prefix: str) -> tuple[float, int]:
        """(elements received, SUMMA messages) by the sites under prefix ("h.0." = block 0)
        since the counters began: SUMMA products, and the row/column collectives."""
        elements, messages = self.grid.layer_volume(prefix)
        return elements + self.row.layer_volume(prefix) + self.col.layer_volume(prefix), messages

    # -- layers ------------------------------------------------------------------------------
    @property
    def heads(self) -> int:
        return self.cfg.num_attention_heads // self.grid.q

    def dropout(self, site: str) -> Dropout:                 # this rank's hidden and batch block
        return Dropout(self.cfg.dropout, site, self.seed, self.hidden_part, self.rows)

    def attention_dropout(self, site: str) -> Dropout:       # its heads and batch block
        return Dropout(self.cfg.dropout, site, self.seed, self.head_part, self.rows)

    def layernorm(self, params, prefix: str):
        return LayerNorm2D(params, prefix, self.cfg.layernorm_eps, self.row, self.col,
                           self.cfg.hidden_size)

    def column_linear(self, params, prefix: str, bias: bool = True):
        linear = Linear2D(params, prefix, self.grid, keep_wide=bias)
        return Sequence(linear, Bias2D(params, f"{prefix}.bias", self.col)) if bias else linear

    def row_linear(self, params, prefix: str):
        """A SUMMA product's output has its input's layout: no region to leave, the same
        layer as column_linear's."""
        return self.column_linear(params, prefix)

    def bias_gelu(self, params, bias: str):
        return Sequence(Bias2D(params, bias, self.col), GELU(self.cfg.gelu))

    def embedding(self, params):
        return Embedding2D(params, self.grid, self.col)

    def head(self, params):
        return Head2D(params, self.grid)

    def loss(self):
        return Loss2D(self.cfg.vocab_size, self.grid, self.row, self.col)
