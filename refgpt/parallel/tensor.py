"""Megatron 1-D tensor parallelism, with optional sequence parallelism.

Each of the t ranks of a tensor-parallel group holds a 1/t shard of every large matrix
(Narayanan et al. 2021, fig. 5). With W stored [in, out]:

    c_attn  column-parallel: heads r*a/t .. (r+1)*a/t - 1 of each of q, k, v   [C, 3C/t]
    c_proj  row-parallel: the rows of those heads                               [C/t, C]
    c_fc    column-parallel                                                     [C, 4C/t]
    mlp.c_proj  row-parallel                                                    [4C/t, C]
    wte     vocab-parallel: rows r*Vp/t .. (r+1)*Vp/t - 1                       [Vp/t, C]
    LayerNorms, row-parallel biases, wpe: replicated

A block (refgpt.nn.block, the same for every layout) is then  f -> c_attn -> local attention
-> c_proj -> g (+ bias)  and  f -> c_fc -> GELU -> c_proj -> g (+ bias), with f and g from
refgpt.parallel.tensor_comm: two all-reduces forward and two backward per layer.
TensorParallel supplies those layers: a column-parallel linear layer is f followed by the
layer on its column shard, a row-parallel one the layer on its row shard, then g, then the
bias. The embedding looks up the ids of its vocab
shard (others give 0) and all-reduces; the tied head computes the logits of its shard, and
the vocab-parallel cross-entropy needs only three all-reduces of per-token scalars:

    m = max over ranks of the local row max;   S = sum over ranks of sum_v exp(z_v - m)
    z_y = sum over ranks of the target logit if the target is in the shard, else 0
    loss = sum_tokens (log S + m - z_y) / norm;   dz = (exp(z - m)/S - onehot) / norm, local

With sequence parallelism (Korthikanti et al. 2022) the activations outside the TP regions
(LayerNorm, dropout, residual) are split along the tokens, [B, T/t, C]; f becomes an
all-gather and g a reduce-scatter. The replicated parameters then see only their rank's
tokens, so their gradients are summed over the TP group as soon as backward finishes them,
before the data-parallel reduction.

Parameters are initialised as a whole (refgpt.nn.params) and each rank keeps its shard, so
every layout starts from the single process's weights.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from ..config import ConfigError
from ..nn.dropout import Dropout
from ..nn.embedding import TiedHead, TokenTable, scatter_add_rows
from ..nn.layer import Layer, ParamRef, Sequence
from ..nn.linear import Linear, column_sum, matmul
from ..nn.params import ParamSpec
from ..precision import narrow, wide
from ..nn.sublayers import Sublayers, grid_shape
from .expert import expert_of
from .tensor_comm import CopyToTP, GatherSeq, GatherSeqWhole, ReduceFromTP, ScatterSeq, SplitSeq, TPComm

SHARDED = {"c_attn": "qkv", "c_fc": "cols", "c_proj.weight": "rows",   # MLPs' and experts'
           "wte.weight": "rows"}


def shard_kind(name: str) -> str | None:
    """How a parameter is split over the TP group: rows, cols, qkv (columns of each of q, k,
    v) or None (replicated)."""
    for key, kind in SHARDED.items():
        if key in name:
            return kind
    return None


def shard(value: np.ndarray, kind: str | None, r: int, t: int) -> np.ndarray:
    """Rank r's part of a full parameter value."""
    if kind is None:
        return value
    if kind == "rows":
        return np.split(value, t, axis=0)[r]
    if kind == "cols":
        return np.split(value, t, axis=-1)[r]
    q_k_v = value.reshape(*value.shape[:-1], 3, value.shape[-1] // 3)          # kind == "qkv"
    return np.split(q_k_v, t, axis=-1)[r].reshape(*value.shape[:-1], -1)


def unshard(parts: list[np.ndarray], kind: str | None) -> np.ndarray:
    """The full value from every rank's part (inverse of shard)."""
    if kind is None:
        return parts[0]
    if kind == "rows":
        return np.concatenate(parts, axis=0)
    if kind == "cols":
        return np.concatenate(parts, axis=-1)
    lead = parts[0].shape[:-1]
    return np.concatenate([p.reshape(*lead, 3, -1) for p in parts], axis=-1).reshape(*lead, -1)


def check_divisible(cfg, t: int, sequence_parallel: bool) -> None:
    for what, n in (("--num-attention-heads", cfg.num_attention_heads),
                     ("--hidden-size", cfg.hidden_size),
                     ("the padded vocabulary (--make-vocab-size-divisible-by)", cfg.padded_vocab)):
        if n % t:
            raise ConfigError(f"{what} {n} is not divisible by the tensor-parallel size {t}")
    if sequence_parallel and cfg.seq_length % t:
        raise ConfigError(f"--seq-length {cfg.seq_length} is not divisible by the tensor-parallel "
                          f"size {t} (needed by --sequence-parallel)")


class AddBias(Layer):
    """y = x + b after a row-parallel reduction; db += sum over this rank's tokens of dy."""

    b, gb = ParamRef("bias"), ParamRef("bias", grad=True)

    def __init__(self, params, name: str):
        super().__init__()
        self.params, self.param_names = params, {"bias": name}

    def forward(self, x):
        """x: the reduced sum (fp32 in a 16-bit run: rounded once here, with the bias)."""
        return narrow(wide(x) + wide(self.b), self.b.dtype)

    def backward(self, dy):
        self.gb += column_sum(dy.reshape(-1, dy.shape[-1]))
        return dy


class ColumnLinear(Linear):
    """A column-parallel layer: its input gradient sums over this rank's output columns only,
    a partial sum left in fp32 in a 16-bit run for the group's reduction to round once."""

    def input_grad(self, dy2):
        return matmul(dy2, self.w.T, rounded=False)


class RowLinear(Linear):
    """A row-parallel layer's product: a partial sum, left in fp32 in a 16-bit run until the
    group has summed it (then AddBias rounds it once, where one process rounds its GEMM)."""

    def product(self, x2):
        return matmul(x2, self.w, rounded=False)


class VocabParallelEmbedding(TokenTable):
    """x = wte[idx] + wpe[pos], with wte's rows split over the group: each rank looks up the
    ids in its range (others contribute 0), then the partial sums are reduced (all-reduce, or
    with SP a reduce-scatter over tokens). Backward scatter-adds into the local rows only."""

    def __init__(self, params, tp: TPComm, sp: bool, positions: np.ndarray):
        """positions: those of the tokens of the rank's sequence, in its order (all, or its
        context-parallel part)."""
        super().__init__(params, positions=True)
        rows = params.specs["wte.weight"].shape[0]
        self.lo, self.hi = tp.rank * rows, (tp.rank + 1) * rows
        self.reduce = ScatterSeq(tp, "embed") if sp else ReduceFromTP(tp, "embed")
        self.tp, self.sp, self.positions = tp, sp, positions

    def forward(self, idx, pos0: int = 0):                           # idx [B, T], all tokens
        mine = (idx >= self.lo) & (idx < self.hi)
        local = np.where(mine, idx - self.lo, 0)
        x = self.reduce.forward(wide(self.wte[local]) * mine[..., None])   # [B, T(/t), C]
        T = x.shape[1]
        first = self.tp.rank * T if self.sp else 0                    # SP: this rank's tokens
        pos = pos0 + self.positions[first:first + T]
        self.save(local, mine, pos)
        return narrow(x + wide(self.wpe[pos]), self.wte.dtype)

    def backward(self, dx):
        local, mine, pos = self.saved()
        self.gwpe[pos] += wide(dx).sum(axis=0)                        # distinct positions
        dfull = self.reduce.backward(dx)                              # [B, T, C]
        scatter_add_rows(self.gwte, local[mine], dfull[mine])


class VocabParallelHead(TiedHead):
    """Logits of this rank's vocabulary shard, tied to its wte rows: z_r = x wte_r^T (the
    single process's tied head on this rank's rows of wte, after the input enters the
    group)."""

    def __init__(self, params, tp: TPComm, sp: bool):
        super().__init__(params)
        self.enter = GatherSeq(tp, "head") if sp else CopyToTP(tp, "head")

    def forward(self, x):
        return super().forward(self.enter.forward(x))                 # [B, T, Vp/t]

    def backward(self, dz):
        return self.enter.backward(super().backward(dz))

    def input_grad(self, dl2):
        return matmul(dl2, self.wte, rounded=False)       # a partial sum over the vocabulary


class VocabParallelCrossEntropy(Layer):
    """refgpt.nn.loss.CrossEntropy over logits split by vocabulary (formulas above);
    padded columns (global index >= V) are left out, as in the single process. As there,
    while training the forward writes dz over this rank's logits, which nothing reads after
    the loss, and backward returns them."""

    def __init__(self, vocab_size: int, tp: TPComm):
        super().__init__()
        self.V, self.tp = vocab_size, tp

    def forward(self, logits, targets, norm: float) -> float:
        tp, Vl = self.tp, logits.shape[-1]
        lo = tp.rank * Vl
        n_real = min(max(self.V - lo, 0), Vl)                         # real columns held here
        zl = logits.reshape(-1, Vl)                                   # [N, Vl], a view
        zr = zl[:, :n_real]                                           # [N, n_real]
        z = wide(zr)                                                  # fp32 for 16-bit logits
        y = targets.reshape(-1)
        xp = array_module()
        local_max = z.max(axis=1) if n_real else xp.full(len(y), -np.inf, z.dtype)
        m = tp.allreduce(local_max, "loss", op="max")                 # [N]
        e = np.exp(z - m[:, None])
        s = tp.allreduce(e.sum(axis=1), "loss")                       # [N]
        mine = (y >= lo) & (y < lo + n_real)                          # targets in this shard
        y_local = np.where(mine, y - lo, 0)
        picked = z[xp.arange(len(y)), y_local] if n_real else xp.zeros(len(y), z.dtype)
        zy = tp.allreduce(np.where(mine, picked, 0.0), "loss")        # [N] target logits
        loss = float((np.log(s) + m - zy).sum() / norm)
        if self.keep:                                                 # z becomes dz
            z[...] = e / s[:, None]                                   # softmax
            z[np.nonzero(mine)[0], y_local[mine]] -= 1.0
            z /= norm
            if z is not zr:                                           # rounded once
                zr[...] = z
            zl[:, n_real:] = 0.0
            self.save(zl, logits.shape)
        return loss

    def backward(self):
        dz, shape = self.saved()
        return dz.reshape(shape)


class TensorParallel(Sublayers):
    """The sublayers of Megatron's 1-D tensor parallelism (module docstring) on this TP rank,
    with sequence parallelism when sequence_parallel."""

    def __init__(self, cfg, seed: int, tp: TPComm, sequence_parallel: bool = False):
        super().__init__(cfg, seed)
        self.tp, self.sp = tp, sequence_parallel
        a, t, r = cfg.num_attention_heads, tp.t, tp.rank
        self.heads_here = slice(r * a // t, (r + 1) * a // t)
        self.enter, self.leave = (GatherSeq, ScatterSeq) if sequence_parallel else (CopyToTP, ReduceFromTP)

    # -- parameters ------------------------------------------------------------------------
    def local_specs(self, specs: list[ParamSpec]) -> list[ParamSpec]:
        t, r = self.tp.t, self.tp.rank
        return [ParamSpec(s.name, shard(np.empty(s.shape, bool), shard_kind(s.name), r, t).shape,
                          s.init, s.std, s.valid_rows, s.shape) for s in specs]

    def shard(self, name: str, value: np.ndarray) -> np.ndarray:
        return shard(value, shard_kind(name), self.tp.rank, self.tp.t)

    def shard_index(self, name: str, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = (np.arange(n) for n in grid_shape(shape))
        kind, r, t = shard_kind(name), self.tp.rank, self.tp.t
        if kind == "rows":                                  # 2-D tensors only (SHARDED)
            return np.split(rows, t)[r], cols
        return rows, shard(cols, kind, r, t)

    def full_tensors(self, params, flat: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for n, (lo, hi) in params.slices.items():
            part = flat[lo:hi].reshape(params.specs[n].shape)
            out[n] = unshard(self.tp.comm.allgather(part), shard_kind(n))
        return out

    def counted(self, name: str) -> bool:
        """Shards count on every TP rank, replicated parameters on TP rank 0 only."""
        return shard_kind(name) is not None or self.tp.rank == 0

    def complete_grads(self, params, names) -> None:
        """With SP the replicated parameters saw only this rank's tokens: their gradients are
        summed over the TP group."""
        if self.sp:
            for n in names:                     # the MoE layers' saw every token (moe_parts)
                if shard_kind(n) is None and ".mlp.router." not in n and expert_of(n) is None:
                    params.grads[n][...] = self.tp.allreduce(params.grads[n], "sp-grads")

    def activation_shape(self, micro_batch: int) -> tuple:
        return micro_batch, self.tokens // (self.tp.t if self.sp else 1), self.cfg.hidden_size

    def head_slice(self) -> slice:
        return self.heads_here

    # -- layers ------------------------------------------------------------------------------
    @property
    def heads(self) -> int:
        return self.cfg.num_attention_heads // self.tp.t

    def dropout(self, site: str) -> Dropout:                 # with SP: this rank's tokens
        part = self.token_part(self.tp.t, self.tp.rank) if self.sp else self.token_part()
        return Dropout(self.cfg.dropout, site, self.seed, part)

    def column_linear(self, params, prefix: str, bias: bool = True):
        return Sequence(self.enter(self.tp, prefix), ColumnLinear(params, prefix, bias))

    def row_linear(self, params, prefix: str):
        return Sequence(RowLinear(params, prefix, bias=False), self.leave(self.tp, prefix),
                        AddBias(params, f"{prefix}.bias"))

    def moe_parts(self):
        """With SP the MoE layer runs on the whole sequence (its routing and capacity are
        those of the micro-batch's tokens): gathered on entry, each rank's part kept on
        leaving, and the experts tensor-parallel as without SP."""
        if not self.sp:
            return super().moe_parts()
        inner = TensorParallel(self.cfg, self.seed, self.tp, False)
        inner.ep = self.ep
        return inner, (GatherSeqWhole(self.tp, "moe"), SplitSeq(self.tp, "moe"))

    def embedding(self, params):
        return VocabParallelEmbedding(params, self.tp, self.sp, self.token_positions())

    def head(self, params):
        return VocabParallelHead(params, self.tp, self.sp)

    def loss(self):
        return VocabParallelCrossEntropy(self.cfg.vocab_size, self.tp)

