"""Causal multi-head self-attention, with an optional key/value cache for generation.

x [B, T, C], H heads of D = C/H features. c_attn's output columns are [q | k | v], each
head-major (GPT-2's layout). With query positions p0..p0+T-1 and key positions 0..Tk-1:

    q, k, v = split(x Wqkv + bqkv)                             [B, H, T, D], k, v: [B, H, Tk, D]
    S = q k^T / sqrt(D)                                        [B, H, T, Tk]
    S[i, j] = -inf where j > p0 + i                            (causal mask, before softmax)
    P = softmax(S)  (row max subtracted first)                 [B, H, T, Tk]
    O = dropout(P) v, heads merged, then out = O Wproj + bproj [B, T, C]

Backward (O(T^2) per head; never through an explicit Jacobian):

    dP~ = dO v^T        dv = P~^T dO            (P~ = dropout(P))
    dP  = dropout_backward(dP~)
    dS  = P * (dP - rowsum(dP * P))
    dq  = dS k / sqrt(D)          dk = dS^T q / sqrt(D)

Every T x Tk matrix here is zero past the causal boundary (P, P~ and dS are; S and dP~ are
only needed inside it), so the six products go through three kernels that may skip that half:
causal_matmul_nt (a b^T, set to zero past the boundary), causal_matmul_nn (P v) and
causal_matmul_tn (P^T x). The references below compute the full products.

In a 16-bit run (refgpt.precision) q, k, v, O and the probabilities P kept for backward
are 16-bit; the scores S, dP~ and dS are fp32 temporaries, and every product sums in fp32.

The whole of it, from q, k, v to O and back, is itself a pair of kernels, attention_forward
and attention_backward, so that a backend may compute it without ever storing a T x Tk
matrix (the cupy backend's flash-style kernels, refgpt.kernels.cupy_flash); what the forward
saves for the backward is then up to the backend.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, kernel
from .layer import Layer, primitives
from .cast import narrow, wide


def causal_visible(T: int, Tk: int, p0: int) -> np.ndarray:
    """[T, Tk] True where query i (position p0 + i) sees key j."""
    return np.arange(Tk)[None, :] <= (p0 + np.arange(T))[:, None]


@kernel(numba="numba_attention", cupy="cupy_attention", half=("numba", "cupy"))
def causal_matmul_nt(a: np.ndarray, b: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """scale a b^T [..., T, Tk] for queries a [..., T, D] and keys b [..., Tk, D], zero where
    key j comes after query i (queries are the last T of the Tk positions). 16-bit a and b:
    the result in fp32 (the scores and dP~ only feed the softmax and its backward)."""
    T, Tk = a.shape[-2], b.shape[-2]
    s = wide(a) @ wide(b).swapaxes(-1, -2)
    s *= scale * causal_visible(T, Tk, Tk - T)
    return s


def _into(res: np.ndarray, out: np.ndarray | None, dtype) -> np.ndarray:
    """A product where it goes: out (rounded to out's type), else a new array of dtype."""
    if out is None:
        return narrow(res, dtype)
    if res is not out:
        out[...] = res
    return out


def _same(out: np.ndarray | None, dtype) -> np.ndarray | None:
    """out, where the product can be written into it directly (it has the compute type)."""
    return out if out is not None and out.dtype == dtype else None


@kernel(numba="numba_attention", cupy="cupy_attention", half=("numba", "cupy"))
def causal_matmul_nn(p: np.ndarray, v: np.ndarray, scale: float = 1.0,
                     out: np.ndarray | None = None) -> np.ndarray:
    """scale p v for p [..., T, Tk] that is zero past the causal boundary; written into out
    (a view of where the caller wants it) when given. Summed in fp32 for 16-bit operands
    (p may be fp32: dS), rounded once to out's type, or v's."""
    pw, vw = wide(p), wide(v)
    res = np.matmul(pw, vw, out=_same(out, np.result_type(pw, vw)))
    if scale != 1.0:
        res *= scale
    return _into(res, out, v.dtype)


@kernel(numba="numba_attention", cupy="cupy_attention", half=("numba", "cupy"))
def causal_matmul_tn(p: np.ndarray, x: np.ndarray, scale: float = 1.0,
                     out: np.ndarray | None = None) -> np.ndarray:
    """scale p^T x for p [..., T, Tk] that is zero past the causal boundary; into out when
    given. Summed in fp32 for 16-bit operands, rounded once to out's type, or x's."""
    pw, xw = wide(p), wide(x)
    res = np.matmul(pw.swapaxes(-1, -2), xw, out=_same(out, np.result_type(pw, xw)))
    if scale != 1.0:
        res *= scale
    return _into(res, out, x.dtype)


@kernel(numba="numba_cpu", cupy="cupy_gpu", half=("numba", "cupy"))
def softmax_backward(p: np.ndarray, dp: np.ndarray) -> np.ndarray:
    """dS = P * (dP - rowsum(dP * P)): the gradient through a row softmax (in fp32 for a
    16-bit P; dS stays fp32, a temporary)."""
    p, dp = wide(p), wide(dp)
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


@kernel(numba="numba_cpu", cupy="cupy_gpu")
def causal_softmax(s: np.ndarray, p0: int) -> np.ndarray:
    """Row softmax of scores s [..., T, Tk] (in place) where query i sees keys j <= p0 + i."""
    T, Tk = s.shape[-2:]
    np.copyto(s, -np.inf, where=~causal_visible(T, Tk, p0))
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


@kernel(cupy="cupy_flash", half=("cupy",))
def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, dropout=None,
                      keep_probs: bool = False) -> tuple:
    """O = dropout(P) v with P = softmax(mask(q k^T / sqrt(D))), for q [B, H, T, D] and k, v
    [B, H, Tk, D]; returns O [B, H, T, D] and what attention_backward needs (here P and
    dropout(P)). dropout: the layer's dropout as a function of P, or None; keep_probs: the
    caller reads P from the second result (a fused backend then takes this path)."""
    s = causal_matmul_nt(q, k, 1.0 / np.sqrt(q.shape[-1]))         # [B, H, T, Tk]
    p = narrow(causal_softmax(s, p0), q.dtype)                      # kept in 16 bits
    pd = p if dropout is None else dropout(p)
    return causal_matmul_nn(pd, v), (p, pd)


@kernel(cupy="cupy_flash", half=("cupy",))
def attention_backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, saved, do: np.ndarray,
                       dq: np.ndarray, dk: np.ndarray, dv: np.ndarray,
                       dropout_backward=None) -> None:
    """dq, dk, dv (written into the given arrays) from dO and what attention_forward saved."""
    p, pd = saved
    dpd = causal_matmul_nt(do, v)                                   # [B, H, T, Tk]
    causal_matmul_tn(pd, do, out=dv)
    dp = dpd if dropout_backward is None else dropout_backward(dpd)
    ds = softmax_backward(p, dp)
    scale = 1.0 / np.sqrt(q.shape[-1])
    causal_matmul_nn(ds, k, scale, out=dq)
    causal_matmul_tn(ds, q, scale, out=dk)


def _block_scores(q, k, causal: bool):
    """q k^T / sqrt(D) in the wide type, -inf above the diagonal of a causal block."""
    s = wide(q) @ wide(k).swapaxes(-1, -2)
    s *= 1.0 / np.sqrt(q.shape[-1])
    if causal:                          # (the mask made where s is: cupy's arrays on a GPU)
        s[..., ~array_module().tri(s.shape[-1], dtype=bool)] = -np.inf
    return s


@kernel(numba="numba_flash", cupy="cupy_flash")
def attention_block_forward(q, k, v, causal: bool, mask=None) -> tuple:
    """One block of attention with its log-sum-exp, as context parallelism's ring computes
    it (refgpt.parallel.context): queries q [B, H, n, D] against the keys and values k, v
    [B, H, nk, D] of one block, all visible (causal=False) or, on the diagonal (causal, n =
    nk), query i seeing keys j <= i. Returns O [B, H, n, D], normalised over this block's
    keys only, and lse [B, H, n] = log of the softmax's normaliser, both in the wide type;
    mask: the block's attention-dropout mask (scaled keep flags) or None."""
    s = _block_scores(q, k, causal)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    total = p.sum(axis=-1, keepdims=True)
    p /= total
    if mask is not None:
        p *= mask
    return p @ wide(v), (m + np.log(total))[..., 0]


@kernel(numba="numba_flash", cupy="cupy_flash")
def attention_block_backward(q, k, v, do, lse, delta, causal: bool, mask, dq, dk, dv) -> None:
    """Add one block's parts to dq (its queries') and dk, dv (its keys'), from the final
    log-sum-exp of the queries' rows (P = exp(S - lse), the probabilities over every key the
    rows see) and delta = rowsum(dO * O) of the final output."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    p = np.exp(_block_scores(q, k, causal) - lse[..., None])
    pd = p if mask is None else p * mask
    dw = wide(do)
    dv += pd.swapaxes(-1, -2) @ dw
    dp = dw @ wide(v).swapaxes(-1, -2)
    if mask is not None:
        dp *= mask
    ds = p * (dp - delta[..., None])
    dq += (ds @ wide(k)) * scale
    dk += (ds.swapaxes(-1, -2) @ wide(q)) * scale


class LocalAttention:
    """The attention core on the whole sequence this rank holds: the two kernels above, with
    the layer's attention dropout. Context parallelism supplies others with the same methods
    (refgpt.parallel.context), whose keys come from other ranks."""

    def __init__(self, drop):
        self.drop = drop

    def forward(self, q, k, v, p0: int, key, keep_probs: bool = False) -> tuple:
        """(O, what backward needs); key: dropout's key, None for no dropout."""
        dropout = (lambda p: self.drop.forward(p, key)) if key is not None else None
        return attention_forward(q, k, v, p0, dropout, keep_probs)

    def backward(self, q, k, v, saved, do, dq, dk, dv, drop: bool) -> None:
        attention_backward(q, k, v, saved, do, dq, dk, dv, self.drop.backward if drop else None)


class KVCache:
    """Keys and values of the positions seen so far, per layer: [B, H, Tk, D] each."""

    def __init__(self, num_layers: int):
        self.k = [None] * num_layers
        self.v = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]


class CausalSelfAttention(Layer):
    """c_attn, the attention core over this rank's heads, c_proj: the two linear layers come
    from the layout (refgpt.nn.sublayers), which splits them over a tensor-parallel group
    (c_attn by heads, c_proj by its input rows) where there is one."""

    def __init__(self, parts, params, prefix: str, recompute_core: bool = False):
        """recompute_core: keep q, k, v and rerun the attention core (QK^T, softmax, dropout,
        PV) in backward instead of keeping its probabilities (selective recomputation)."""
        super().__init__()
        self.H, self.prefix, self.recompute_core = parts.heads, prefix, recompute_core
        self.c_attn = parts.column_linear(params, f"{prefix}.c_attn")
        self.c_proj = parts.row_linear(params, f"{prefix}.c_proj")
        self.attn_drop = parts.attention_dropout(f"{prefix}.attn_drop")
        self.core = parts.attention_core(prefix, self.attn_drop)
        self.layers = primitives(self.c_attn, self.c_proj, self.attn_drop)

    def forward(self, x: np.ndarray, key=None, cache: KVCache | None = None,
                layer: int = 0, record: dict | None = None) -> np.ndarray:
        qkv = self.c_attn.forward(x)                                  # [B, T, 3C]
        (B, T, _), H = qkv.shape, self.H                              # (SP: T whole again)
        D = qkv.shape[-1] // (3 * H)
        q, k, v = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)  # 3 x [B, H, T, D]
        p0 = 0
        if cache is not None:
            if cache.k[layer] is not None:
                p0 = cache.k[layer].shape[2]
                k = np.concatenate([cache.k[layer], k], axis=2)       # [B, H, Tk, D]
                v = np.concatenate([cache.v[layer], v], axis=2)
            cache.k[layer], cache.v[layer] = k, v
        drop = self.attn_drop.p > 0 and key is not None
        dkey = key if drop else None
        if self.recompute_core and self.keep and cache is None and record is None:
            self.attn_drop.keep = False                   # the core saves nothing now
            try:
                o, _ = self.core.forward(q, k, v, p0, dkey)
            finally:
                self.attn_drop.keep = True
            self.save(q, k, v, (p0, dkey), drop, True)
        else:
            o, saved = self.core.forward(q, k, v, p0, dkey, keep_probs=record is not None)
            if record is not None:
                record[f"{self.prefix}.qkv"], record[f"{self.prefix}.probs"] = qkv, saved[0]
            self.save(q, k, v, saved, drop, False)
        o = o.transpose(0, 2, 1, 3).reshape(B, T, H * D)              # heads merged
        return self.c_proj.forward(o)

    def on_recompute(self, held) -> None:
        """Called when a recomputed core's probabilities exist again (refgpt.nn.recompute)."""

    def backward(self, dout: np.ndarray) -> np.ndarray:
        q, k, v, saved, drop, recomputed = self.saved()
        if recomputed:                                    # the same core again, saved this time
            p0, dkey = saved
            _, saved = self.core.forward(q, k, v, p0, dkey)
            self.on_recompute((q, k, v, saved))
        B, H, T, D = q.shape
        do = self.c_proj.backward(dout)                               # [B, T, C]
        do = do.reshape(B, T, H, D).transpose(0, 2, 1, 3)             # [B, H, T, D]
        dqkv = np.empty_like(q, shape=(B, T, 3, H, D))                # c_attn's output layout
        dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)                    # 3 x [B, H, T, D] views
        self.core.backward(q, k, v, saved, do, dq, dk, dv, drop)
        return self.c_attn.backward(dqkv.reshape(B, T, 3 * H * D))    # [B, T, 3C]
