"""Megatron 1-D tensor parallelism, with optional sequence parallelism.

Each of the t ranks of a tensor-parallel group holds a 1/t shard of every large matrix
(Narayanan et al. 2021, fig. 5). With W stored [in, out]:

    c_attn  column-parallel: heads r*a/t .. (r+1)*a/t - 1 of each of q, k, v   [C, 3C/t]
    c_proj  row-parallel: the rows of those heads                               [C/t, C]
    c_fc    column-parallel                                                     [C, 4C/t]
    mlp.c_proj  row-parallel                                                    [4C/t, C]
    wte     vocab-parallel: rows r*Vp/t .. (r+1)*Vp/t - 1                       [Vp/t, C]
    LayerNorms, row-parallel biases, wpe: replicated

A block is then  f -> c_attn -> local attention -> c_proj -> g (+ bias)  and
f -> c_fc -> GELU -> c_proj -> g (+ bias), with f and g from refgpt.parallel.tensor_comm: two
all-reduces forward and two backward per layer. The embedding looks up the ids of its vocab
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

import math

import numpy as np

from ..backend import array_module
from ..config import ConfigError
from ..nn.attention import CausalSelfAttention
from ..nn.block import residual
from ..nn.dropout import Dropout
from ..nn.gelu import BiasGELU
from ..nn.gpt import GPTBase, Stage, param_specs
from ..nn.embedding import TiedHead, TokenTable, scatter_add_rows
from ..nn.layer import Layer, ParamRef
from ..nn.layernorm import LayerNorm
from ..nn.linear import Linear, column_sum
from ..nn.params import Params, ParamSpec
from ..optim.clip import sum_squares
from .tensor_comm import CopyToTP, GatherSeq, ReduceFromTP, ScatterSeq, TPComm

SHARDED = {"c_attn": "qkv", "mlp.c_fc": "cols", "attn.c_proj.weight": "rows",
           "mlp.c_proj.weight": "rows", "wte.weight": "rows"}


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


def rank_shard(name: str, value: np.ndarray, tp) -> np.ndarray:
    """This TP rank's part of the full value of the parameter called name."""
    return shard(value, shard_kind(name), tp.rank, tp.t)


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
        return x + self.b

    def backward(self, dy):
        self.gb += column_sum(dy.reshape(-1, dy.shape[-1]))
        return dy


class ParallelBlock:
    """refgpt.nn.block.Block with its matrices sharded and f/g (or their SP forms) around the
    two tensor-parallel regions."""

    def __init__(self, params, i: int, cfg, seed: int, tp: TPComm, sp: bool):
        p, t, r = f"h.{i}", tp.t, tp.rank
        self.index = i
        heads = cfg.num_attention_heads // t
        enter, leave = (GatherSeq, ScatterSeq) if sp else (CopyToTP, ReduceFromTP)
        tokens = cfg.seq_length // t
        seq_part = (0, slice(r * tokens, (r + 1) * tokens), cfg.seq_length) if sp else None
        self.ln_1 = LayerNorm(params, f"{p}.ln_1", cfg.layernorm_eps)
        self.attn_in = enter(tp, f"{p}.attn")
        self.attn = CausalSelfAttention(params, f"{p}.attn", heads, cfg.dropout, seed,
                                        proj_bias=False,
                                        head_part=(slice(r * heads, (r + 1) * heads),
                                                   cfg.num_attention_heads))
        self.attn_out = leave(tp, f"{p}.attn")
        self.attn_bias = AddBias(params, f"{p}.attn.c_proj.bias")
        self.attn_resid_drop = Dropout(cfg.dropout, f"{p}.attn.resid_drop", seed, seq_part)
        self.ln_2 = LayerNorm(params, f"{p}.ln_2", cfg.layernorm_eps)
        self.mlp_in = enter(tp, f"{p}.mlp")
        self.c_fc = Linear(params, f"{p}.mlp.c_fc", bias=False)
        self.act = BiasGELU(params, f"{p}.mlp.c_fc.bias", cfg.gelu)
        self.c_proj = Linear(params, f"{p}.mlp.c_proj", bias=False)
        self.mlp_out = leave(tp, f"{p}.mlp")
        self.mlp_bias = AddBias(params, f"{p}.mlp.c_proj.bias")
        self.mlp_resid_drop = Dropout(cfg.dropout, f"{p}.mlp.resid_drop", seed, seq_part)
        self.layers = [self.ln_1, self.attn, *self.attn.layers, self.attn_bias,
                       self.attn_resid_drop, self.ln_2, self.c_fc, self.act, self.c_proj,
                       self.mlp_bias, self.mlp_resid_drop]

    def forward(self, x, key=None):                     # x: [B, T, C] or, with SP, [B, T/t, C]
        h = self.attn.forward(self.attn_in.forward(self.ln_1.forward(x)), key)
        a = residual(x, self.attn_resid_drop.forward(
            self.attn_bias.forward(self.attn_out.forward(h)), key))
        f = self.c_fc.forward(self.mlp_in.forward(self.ln_2.forward(a)))
        m = self.mlp_out.forward(self.c_proj.forward(self.act.forward(f)))
        return residual(a, self.mlp_resid_drop.forward(self.mlp_bias.forward(m), key))

    def backward(self, dy):
        dm = self.mlp_out.backward(self.mlp_bias.backward(self.mlp_resid_drop.backward(dy)))
        df = self.act.backward(self.c_proj.backward(dm))
        da = residual(dy, self.ln_2.backward(self.mlp_in.backward(self.c_fc.backward(df))))
        dh = self.attn_out.backward(self.attn_bias.backward(self.attn_resid_drop.backward(da)))
        return residual(da, self.ln_1.backward(self.attn_in.backward(self.attn.backward(dh))))


class VocabParallelEmbedding(TokenTable):
    """x = wte[idx] + wpe[pos], with wte's rows split over the group: each rank looks up the
    ids in its range (others contribute 0), then the partial sums are reduced (all-reduce, or
    with SP a reduce-scatter over tokens). Backward scatter-adds into the local rows only."""

    def __init__(self, params, tp: TPComm, sp: bool):
        super().__init__(params, positions=True)
        rows = params.specs["wte.weight"].shape[0]
        self.lo, self.hi = tp.rank * rows, (tp.rank + 1) * rows
        self.reduce = ScatterSeq(tp, "embed") if sp else ReduceFromTP(tp, "embed")
        self.tp, self.sp = tp, sp

    def forward(self, idx):                                          # idx [B, T], all tokens
        mine = (idx >= self.lo) & (idx < self.hi)
        local = np.where(mine, idx - self.lo, 0)
        x = self.reduce.forward(self.wte[local] * mine[..., None])    # [B, T(/t), C]
        T = x.shape[1]
        p0 = self.tp.rank * T if self.sp else 0
        self.save(local, mine, p0)
        return x + self.wpe[p0:p0 + T]

    def backward(self, dx):
        local, mine, p0 = self.saved()
        self.gwpe[p0:p0 + dx.shape[1]] += dx.sum(axis=0)
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
        z = zl[:, :n_real]                                            # [N, n_real]
        y = targets.reshape(-1)
        xp = array_module()
        local_max = z.max(axis=1) if n_real else xp.full(len(y), -np.inf, logits.dtype)
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
            zl[:, n_real:] = 0.0
            self.save(zl, logits.shape)
        return loss

    def backward(self):
        dz, shape = self.saved()
        return dz.reshape(shape)


class ParallelGPT(GPTBase):
    """refgpt.nn.GPT over a tensor-parallel group: the same training interface (forward,
    backward, ready_groups, set_grad_enabled); the parameters are this rank's shards. With
    sequence parallelism the caller completes the replicated parameters' gradients with
    reduce_replicated_grads once accumulation is over."""

    def __init__(self, cfg, dtype, seed: int, tp: TPComm, sequence_parallel: bool = False,
                 stage: Stage | None = None, params: Params | None = None, make_params=Params):
        """stage / params / make_params: as refgpt.nn.GPT."""
        cfg.validate()
        check_divisible(cfg, tp.t, sequence_parallel)
        stage = stage or Stage(range(cfg.num_layers))
        self.cfg, self.tp, self.sp = cfg, tp, sequence_parallel
        self.dtype = np.dtype(dtype)
        if params is None:
            params = make_params(local_specs(param_specs(cfg, stage), tp), self.dtype)
            params.initialise(seed, lambda n, v: rank_shard(n, v, tp))
        self.params = params
        T = cfg.seq_length // tp.t
        seq_part = (0, slice(tp.rank * T, (tp.rank + 1) * T), cfg.seq_length) if sequence_parallel else None
        first, last = stage.first, stage.last
        self.embed = VocabParallelEmbedding(params, tp, sequence_parallel) if first else None
        self.embed_drop = Dropout(cfg.dropout, "embed_drop", seed, seq_part) if first else None
        self.blocks = [ParallelBlock(params, i, cfg, seed, tp, sequence_parallel)
                       for i in stage.blocks]
        self.ln_f = LayerNorm(params, "ln_f", cfg.layernorm_eps) if last else None
        self.head = VocabParallelHead(params, tp, sequence_parallel) if last else None
        self.loss_fn = VocabParallelCrossEntropy(cfg.vocab_size, tp) if last else None
        self.layers = [l for l in (self.embed, self.embed_drop,
                                   *(l for b in self.blocks for l in b.layers),
                                   self.ln_f, self.head, self.loss_fn) if l is not None]

    def shard(self, name: str, value: np.ndarray) -> np.ndarray:
        return rank_shard(name, value, self.tp)

    def forward(self, idx, targets, norm: float, key=None) -> float:
        return self.forward_stage(idx, targets, norm, key)

    def reduce_replicated_grads(self, names) -> None:
        reduce_replicated_grads(self.params, self.tp, self.sp, names)

    def norm_counted(self, name: str) -> bool:
        return counted_once(name, self.tp)

    def grad_norm(self) -> float:
        """Global gradient norm: shards' squares summed over the group, replicated
        parameters counted once (on TP rank 0)."""
        return math.sqrt(self.tp.comm.allreduce(grad_squares(self.params, self.tp)))

    def full_tensors(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return full_tensors(self.params, self.tp, flat)


def local_specs(specs: list[ParamSpec], tp: TPComm) -> list[ParamSpec]:
    """This rank's shard of each parameter (full shape kept for initialisation)."""
    return [ParamSpec(s.name, shard(np.empty(s.shape, bool), shard_kind(s.name), tp.rank,
                                    tp.t).shape, s.init, s.std, s.valid_rows, s.shape)
            for s in specs]


def reduce_replicated_grads(params, tp: TPComm, sequence_parallel: bool, names) -> None:
    """With SP, sum the replicated parameters' gradients among names over the TP group
    (each rank saw only its tokens). Call once per step, on accumulated gradients."""
    if sequence_parallel:
        for n in names:
            if shard_kind(n) is None:
                params.grads[n][...] = tp.allreduce(params.grads[n], "sp-grads")


def counted_once(name: str, tp: TPComm) -> bool:
    """Shards count on every TP rank, replicated parameters on TP rank 0 only."""
    return shard_kind(name) is not None or tp.rank == 0


def grad_squares(params, tp: TPComm, counted=lambda name: True) -> float:
    """This rank's share of the squared gradient norm: its shards, and the replicated
    parameters on TP rank 0 only; counted(name) can leave out more (pipeline copies)."""
    sq = 0.0
    for n, g in params.grads.items():
        if counted(n) and counted_once(n, tp):
            sq += sum_squares(g)
    return sq


def full_tensors(params, tp: TPComm, flat: np.ndarray) -> dict[str, np.ndarray]:
    """Every full parameter-shaped tensor of a buffer laid out like params.data (the
    parameters themselves, or an optimizer moment), gathered from the TP group."""
    out = {}
    for n, (lo, hi) in params.slices.items():
        part = flat[lo:hi].reshape(params.specs[n].shape)
        out[n] = unshard(tp.comm.allgather(part), shard_kind(n))
    return out
