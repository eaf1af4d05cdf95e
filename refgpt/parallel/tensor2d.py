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

Needs q^2 = TP size, q dividing the heads, the micro-batch size, the padded vocabulary and
the position table, and q^2 dividing the hidden size.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import array_module
from ..config import ConfigError
from ..nn.attention import CausalSelfAttention
from ..nn.block import residual
from ..nn.dropout import Dropout
from ..nn.embedding import scatter_add_rows
from ..nn.gelu import GELU
from ..nn.gpt import GPTBase, Stage, param_specs
from ..nn.layer import Layer, ParamRef
from ..nn.linear import column_sum
from ..nn.params import Params, ParamSpec
from ..optim.clip import sum_squares
from .summa import SummaGrid, matmul_ab, matmul_abt, matmul_atb
from .tensor import VocabParallelCrossEntropy, shard
from .tensor_comm import TPComm


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


class Linear2D(Layer):
    """y = x W (+ b: a separate Bias2D) with x [..., in/q] and W_ij [in/q, out/q]. As
    refgpt.nn.linear.Linear, a ``defer`` list postpones the weight gradient (zero-bubble W)."""

    w, gw = ParamRef("weight"), ParamRef("weight", grad=True)

    def __init__(self, params, name: str, grid: SummaGrid):
        super().__init__()
        self.params, self.param_names, self.grid = params, {"weight": name}, grid
        self.site = name.rsplit(".", 1)[0]                       # counters: h.0.mlp.c_fc, ...
        self.defer: list | None = None

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        self.save(x2)
        return matmul_ab(self.grid, x2, self.w, self.site).reshape(*x.shape[:-1], -1)

    def backward(self, dy):
        (x2,) = self.saved()
        dy2 = dy.reshape(-1, dy.shape[-1])
        if self.defer is None:
            self.weight_grad(x2, dy2)
        else:
            self.defer.append((self, x2, dy2))
        return matmul_abt(self.grid, dy2, self.w, self.site).reshape(*dy.shape[:-1], -1)

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
        return x + self.b.full()

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
        xc = x - self._mean(x)
        rstd = 1.0 / np.sqrt(self._mean(xc * xc) + self.eps)
        n = xc * rstd
        g = self.g.full()
        self.save(n, rstd, g)
        return n * g + self.b.full()

    def backward(self, dy):
        n, rstd, g = self.saved()
        C = n.shape[-1]
        self.g.add_grad(column_sum((dy * n).reshape(-1, C)))
        self.b.add_grad(column_sum(dy.reshape(-1, C)))
        dn = dy * g
        return rstd * (dn - self._mean(dn) - n * self._mean(dn * n))


class Block2D:
    """refgpt.nn.block.Block on the grid."""

    def __init__(self, params, index: int, cfg, seed: int, grid, row: TPComm, col: TPComm):
        p, q, j = f"h.{index}", grid.q, grid.j
        C, a = cfg.hidden_size, cfg.num_attention_heads
        self.index = index
        hidden = (1, slice(j * C // q, (j + 1) * C // q), C)     # dropout: this hidden block
        self.ln_1 = LayerNorm2D(params, f"{p}.ln_1", cfg.layernorm_eps, row, col, C)
        self.attn = CausalSelfAttention(params, f"{p}.attn", a // q, cfg.dropout, seed,
                                        proj_bias=False,
                                        head_part=(slice(j * a // q, (j + 1) * a // q), a))
        self.qkv = Linear2D(params, f"{p}.attn.c_attn.weight", grid)
        self.qkv_bias = Bias2D(params, f"{p}.attn.c_attn.bias", col)
        self.attn.c_attn = _WithBias(self.qkv, self.qkv_bias)      # what attention calls
        self.attn.c_proj = Linear2D(params, f"{p}.attn.c_proj.weight", grid)
        self.attn_bias = Bias2D(params, f"{p}.attn.c_proj.bias", col)
        self.attn_resid_drop = Dropout(cfg.dropout, f"{p}.attn.resid_drop", seed, hidden)
        self.ln_2 = LayerNorm2D(params, f"{p}.ln_2", cfg.layernorm_eps, row, col, C)
        self.c_fc = Linear2D(params, f"{p}.mlp.c_fc.weight", grid)
        self.fc_bias = Bias2D(params, f"{p}.mlp.c_fc.bias", col)
        self.act = GELU(cfg.gelu)
        self.c_proj = Linear2D(params, f"{p}.mlp.c_proj.weight", grid)
        self.mlp_bias = Bias2D(params, f"{p}.mlp.c_proj.bias", col)
        self.mlp_resid_drop = Dropout(cfg.dropout, f"{p}.mlp.resid_drop", seed, hidden)
        self.layers = [self.ln_1, self.qkv, self.qkv_bias, self.attn, self.attn.attn_drop,
                       self.attn.c_proj, self.attn_bias, self.attn_resid_drop, self.ln_2,
                       self.c_fc, self.fc_bias, self.act, self.c_proj, self.mlp_bias,
                       self.mlp_resid_drop]

    def forward(self, x, key=None):                              # x: [B/q, T, C/q]
        h = self.attn_bias.forward(self.attn.forward(self.ln_1.forward(x), key))
        a = residual(x, self.attn_resid_drop.forward(h, key))
        f = self.fc_bias.forward(self.c_fc.forward(self.ln_2.forward(a)))
        m = self.mlp_bias.forward(self.c_proj.forward(self.act.forward(f)))
        return residual(a, self.mlp_resid_drop.forward(m, key))

    def backward(self, dy):
        dm = self.mlp_bias.backward(self.mlp_resid_drop.backward(dy))
        df = self.act.backward(self.c_proj.backward(dm))
        da = residual(dy, self.ln_2.backward(self.c_fc.backward(self.fc_bias.backward(df))))
        dh = self.attn_bias.backward(self.attn_resid_drop.backward(da))
        return residual(da, self.ln_1.backward(self.attn.backward(dh)))


class _WithBias:
    """c_attn followed by its bias, as the one layer CausalSelfAttention calls."""

    def __init__(self, linear, bias):
        self.linear, self.bias = linear, bias

    def forward(self, x):
        return self.bias.forward(self.linear.forward(x))

    def backward(self, dy):
        return self.linear.backward(self.bias.backward(dy))


class Embedding2D(Layer):
    """x = wte[idx] + wpe[positions] for this rank's batch block and hidden block."""

    wte, gwte = ParamRef("wte"), ParamRef("wte", grad=True)

    def __init__(self, params, grid: SummaGrid, col: TPComm):
        super().__init__()
        self.params, self.param_names, self.grid, self.col = params, {"wte": "wte.weight"}, grid, col
        self.wpe = Vector2D(params, "wpe.weight", col)
        self.rows = params.specs["wte.weight"].shape[0]

    def forward(self, idx):                                      # idx [B, T]: the whole batch
        lo = self.grid.i * self.rows
        mine = (idx >= lo) & (idx < lo + self.rows)
        local = np.where(mine, idx - lo, 0)
        x = self.col.reduce_scatter(self.wte[local] * mine[..., None], 0, "embed")
        self.save(local, mine)
        return x + self.wpe.full()[:idx.shape[1]]                # [B/q, T, C/q]

    def backward(self, dx):
        local, mine = self.saved()
        P = self.params.specs["wpe.weight"].shape[0] * self.grid.q
        dpos = array_module().zeros((P, dx.shape[-1]), dx.dtype)
        dpos[:dx.shape[1]] = dx.sum(axis=0)
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

    def forward(self, logits, targets, norm):
        rows = targets.shape[0] // self.grid.q
        mine = targets[self.grid.i * rows:(self.grid.i + 1) * rows]
        part = self.ce.forward(logits, mine.reshape(-1), norm)
        return float(self.col.comm.allreduce(part))

    def backward(self):
        return self.ce.backward()


def local_specs_2d(specs, grid: SummaGrid) -> list[ParamSpec]:
    """This rank's block of each parameter (full shape kept for initialisation)."""
    return [ParamSpec(s.name, block2d(s.name, np.empty(s.shape, bool), grid.i, grid.j,
                                      grid.q).shape, s.init, s.std, s.valid_rows, s.shape)
            for s in specs]


class ParallelGPT2D(GPTBase):
    """The GPT over a q x q tensor-parallel grid, with the training interface of
    refgpt.nn.GPT; the parameters are this rank's blocks and pieces."""

    def __init__(self, cfg, dtype, seed: int, tp_comm, micro_batch: int, make_params=Params,
                 stage: Stage | None = None, params: Params | None = None,
                 grid: SummaGrid | None = None):
        """stage / params: a pipeline stage over a shared buffer, as refgpt.nn.GPT; grid: the
        SummaGrid of tp_comm, if one exists already."""
        cfg.validate()
        self.cfg, self.dtype = cfg, np.dtype(dtype)
        check_2d(cfg, tp_comm.Get_size(), micro_batch)
        self.grid = grid = grid or SummaGrid(tp_comm)
        self.tp_comm, self.row, self.col = tp_comm, TPComm(grid.row), TPComm(grid.col)
        stage = stage or Stage(range(cfg.num_layers))
        if params is None:
            params = make_params(local_specs_2d(param_specs(cfg, stage), grid), self.dtype)
            params.initialise(seed, self.shard)
        self.params = params
        C, first, last = cfg.hidden_size, stage.first, stage.last
        hidden = (1, slice(grid.j * C // grid.q, (grid.j + 1) * C // grid.q), C)
        self.embed = Embedding2D(params, grid, self.col) if first else None
        self.embed_drop = Dropout(cfg.dropout, "embed_drop", seed, hidden) if first else None
        self.blocks = [Block2D(params, i, cfg, seed, grid, self.row, self.col)
                       for i in stage.blocks]
        self.ln_f = LayerNorm2D(params, "ln_f", cfg.layernorm_eps, self.row, self.col, C) if last else None
        self.head = Head2D(params, grid) if last else None
        self.loss_fn = Loss2D(cfg.vocab_size, grid, self.row, self.col) if last else None
        self.layers = [l for l in (self.embed, self.embed_drop,
                                   *(l for b in self.blocks for l in b.layers), self.ln_f,
                                   self.head, self.loss_fn.ce if last else None) if l is not None]

    def shard(self, name: str, value: np.ndarray) -> np.ndarray:
        return block2d(name, value, self.grid.i, self.grid.j, self.grid.q)

    def forward_stage(self, x, targets=None, norm=None, key=None):
        """x, targets: the whole micro-batch on every TP rank (or, after the first stage, this
        rank's activation block); key as refgpt.nn.GPT, cut to this rank's batch block."""
        if key is not None:                                      # dropout: this batch block
            rows = len(key[1]) // self.grid.q
            key = (key[0], key[1][self.grid.i * rows:(self.grid.i + 1) * rows])
        return super().forward_stage(x, targets, norm, key)

    def forward(self, idx, targets, norm: float, key=None) -> float:
        return self.forward_stage(idx, targets, norm, key)

    def grad_norm(self) -> float:
        """Every element lives on one TP rank: the squares summed over the group."""
        return math.sqrt(self.tp_comm.allreduce(sum_squares(self.params.grad)))

    def full_tensors(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return full_tensors_2d(self.params, self.tp_comm, self.grid.q, flat)

    def layer_volume(self, prefix: str) -> tuple[float, int]:
        """(elements received, SUMMA messages) by the sites under prefix ("h.0." = block 0)
        since the counters began: SUMMA products, and the row/column collectives."""
        elements, messages = self.grid.layer_volume(prefix)
        return elements + self.row.layer_volume(prefix) + self.col.layer_volume(prefix), messages


def full_tensors_2d(params, tp_comm, q: int, flat: np.ndarray) -> dict[str, np.ndarray]:
    """Every full parameter-shaped tensor of a buffer laid out like params.data (collective)."""
    out = {}
    for n, (lo, hi) in params.slices.items():
        part = np.ascontiguousarray(flat[lo:hi].reshape(params.specs[n].shape))
        out[n] = unblock2d(n, tp_comm.allgather(part), q)
    return out
