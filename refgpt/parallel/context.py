"""Context parallelism: the sequence of every micro-batch split over a group of C ranks.

Megatron's sequence parallelism splits the tokens only outside attention; attention itself
still sees the whole sequence on every rank. Context parallelism (``--context-parallel-size
C``) splits it everywhere: each rank of a CP group holds T / C of the tokens of the same
samples, through every layer. Everything but attention acts token by token (embeddings,
LayerNorm, the MLP, dropout, the loss), so it runs unchanged on the rank's tokens; attention
needs every earlier key, which comes by one of two routes (``--cp-comm-type``).

Which tokens. The sequence is cut into 2C chunks of n = T / 2C and rank r holds chunks r and
2C-1-r (``positions``). Under the causal mask, query chunk i sees key chunks j <= i, so chunk
i costs i + 1/2 blocks of work; rank r's two cost (r + 1/2) + (2C - 1 - r + 1/2) = 2C: the
same on every rank, where a plain split (rank r holding chunk r of C) would leave the last
rank C times the first's work.

p2p (ring attention; Li et al. 2021, Liu et al. 2023). Each rank's keys and values travel
the ring r -> r + 1 in C steps; at step s rank r holds those of rank (r - s) mod C and
computes its queries' attention to them, block by block: a block of query chunk i and key
chunk j is skipped if j > i, causal if j = i, full if j < i. Each block yields an output O_b
normalised over its own keys and its log-sum-exp lse_b; two partial results merge exactly:

    lse = log(e^lse_1 + e^lse_2)        O = O_1 e^(lse_1 - lse) + O_2 e^(lse_2 - lse)

The next step's keys and values are sent and received (MPI_Isend / MPI_Irecv, posted before
the current block is computed) while the current block is computed. Backward recomputes each
block's probabilities from the saved final lse, P_b = exp(S_b - lse), and with
Delta = rowsum(dO * O) (the softmax's backward, summed over all keys at once):

    dV_b = P~_b^T dO     dP~_b = dO V_b^T     dS_b = P_b * (dP_b - Delta)
    dQ  += dS_b K_b / sqrt(D)                 dK_b = dS_b^T Q / sqrt(D)

(P~ = dropout(P), dP = dropout_backward(dP~)). A block's forward and backward are the
kernels attention_block_forward and attention_block_backward (refgpt.nn.attention): fused,
flash-style, under the numba backend (refgpt.kernels.numba_flash) and the cupy backend
(refgpt.kernels.cupy_flash), neither of which writes a block's n x n matrices.

The keys and values travel the ring again with their gradients' accumulators: at step s rank
r adds its queries' part to the dK, dV of rank (r - s)'s block and passes them on; after C
steps they have made the whole circle and one more pass brings them home. Per layer and micro-batch, with b = B H D n elements in a
chunk's keys (H: the rank's heads), a rank sends

    forward  (C - 1) x 2 x 2b          keys and values, C - 1 passes
    backward (C - 1) x 2 x 2b + C x 2 x 2b     the same, and dK, dV C passes

a2a (Ulysses; Jacobs et al. 2023). An all-to-all turns the rank's T/C tokens of all H heads
into all T tokens of H / C heads; attention runs there as on one process (the local kernels,
whole sequence, causal); a second all-to-all returns the output. Backward does the same with
dO in and dQ, dK, dV out. A rank keeps 1/C of each all-to-all's buffer, so per layer and
micro-batch it sends (C - 1)/C of 4 x 2b elements forward (q, k, v in; O out) and the same
backward (dO in; dq, dk, dv out). Needs H divisible by C (per TP rank).

Attention dropout draws each sample's whole mask [H, T, T] (refgpt.nn.dropout) and keeps
this rank's part: its heads (a2a) or its queries' rows (p2p), so the numbers are one
process's; the draw is O(H T^2) per sample, which is for tests and short runs: long-context
training runs without attention dropout, as Megatron's long-context recipes do.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from ..backend import to_device, to_host
from ..config import ConfigError
from ..nn.attention import LocalAttention, attention_block_backward, attention_block_forward
from ..nn.cast import narrow, wide
from ..nn.dropout import Dropout
from .grid import check_context_size
from .wire import moved

def positions(T: int, C: int, r: int) -> np.ndarray:
    """The sequence positions CP rank r of C holds: chunks r and 2C-1-r of n = T / 2C."""
    n = T // (2 * C)
    return np.concatenate([np.arange(r * n, (r + 1) * n),
                           np.arange((2 * C - 1 - r) * n, (2 * C - r) * n)])


def formula_volume(B: int, T: int, H: int, D: int, C: int, kind: str) -> dict[str, int]:
    """Elements a rank sends over its CP group per layer and micro-batch of B sequences of T
    tokens, H the rank's heads of D (module docstring; b = B H D n elements in one chunk's
    keys, n = T / 2C): p2p forward (C-1) 2 (2b), backward (2C-1) 2 (2b); a2a (C-1)/C 4 (2b)
    each way."""
    b = B * H * D * T // (2 * C)
    if kind == "p2p":
        return {"forward": (C - 1) * 4 * b, "backward": (2 * C - 1) * 4 * b}
    return {"forward": (C - 1) * 8 * b // C, "backward": (C - 1) * 8 * b // C}


def check_context(mcfg, pcfg, tp: int, dp: int) -> None:
    """The ConfigError a context-parallel run would meet, before anything is made."""
    C = pcfg.context_parallel_size
    if C == 1:
        return
    check_context_size(C, dp)
    if mcfg.seq_length % (2 * C):
        raise ConfigError(f"--seq-length {mcfg.seq_length} is not divisible by 2 x "
                          f"--context-parallel-size = {2 * C} (each rank holds two chunks)")
    sp = tp if pcfg.sequence_parallel else 1
    if mcfg.seq_length % (2 * C * sp):
        raise ConfigError(f"--seq-length {mcfg.seq_length} is not divisible by 2 x "
                          f"--context-parallel-size x --tensor-model-parallel-size = "
                          f"{2 * C * sp} (sequence parallelism splits each rank's chunks)")
    heads = mcfg.num_attention_heads // tp
    if pcfg.cp_comm_type == "a2a" and heads % C:
        raise ConfigError(f"--cp-comm-type a2a splits each rank's {heads} attention heads "
                          f"over --context-parallel-size {C}: not divisible (use p2p)")
    if mcfg.num_experts:
        raise ConfigError("--context-parallel-size with --num-experts is not supported yet "
                          "(an expert's capacity is counted over the micro-batch's tokens)")
    if tp > 1 and pcfg.tensor_parallel_mode == "2d":
        raise ConfigError("--context-parallel-size with --tensor-parallel-mode 2d is not "
                          "supported (1-D tensor parallelism, with or without "
                          "--sequence-parallel, is)")


def whole_sequence_only(p0: int, keep_probs: bool) -> None:
    """Context parallelism's cores serve training and evaluation, not generation's key/value
    cache (p0 > 0) nor the dumps' recorded probabilities."""
    if keep_probs or p0:
        raise ValueError("attention probabilities and key/value caches are not available "
                         "under context parallelism")


class ContextComm:
    """This rank's CP group: its positions, its attention cores, the elements each layer
    sent (``volume[(site, pass)]``, as the tensor-parallel counters) and the seconds spent
    waiting for them (``seconds``: what the computation did not hide)."""

    def __init__(self, comm, seq_length: int, comm_type: str = "p2p"):
        self.comm, self.T, self.comm_type = comm, seq_length, comm_type
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.positions = positions(self.T, self.size, self.rank)
        self.volume: dict[tuple[str, str], int] = defaultdict(int)
        self.seconds = 0.0

    def wait(self, reqs) -> None:
        """Complete the requests, counting the time it takes."""
        from mpi4py import MPI
        t0 = time.perf_counter()
        MPI.Request.Waitall(reqs)
        self.seconds += time.perf_counter() - t0

    def alltoall(self, send, recv) -> None:
        t0 = time.perf_counter()
        self.comm.Alltoall(moved(send), moved(recv))
        self.seconds += time.perf_counter() - t0

    def core(self, site: str, drop: Dropout):
        """The attention core of one layer (site: its name), with its attention dropout."""
        kind = RingAttention if self.comm_type == "p2p" else UlyssesAttention
        return kind(self, site, drop)

    def core_heads(self, heads: slice) -> slice:
        """Of the model's heads this rank's layer computes, those its attention core sees:
        all of them (p2p), or this rank's 1/C of them (a2a)."""
        if self.comm_type == "p2p":
            return heads
        per = (heads.stop - heads.start) // self.size
        return slice(heads.start + self.rank * per, heads.start + (self.rank + 1) * per)


class RingAttention:
    """p2p: keys and values around the ring, partial outputs merged (module docstring)."""

    def __init__(self, cp: ContextComm, site: str, drop: Dropout):
        self.cp, self.site, self.drop = cp, site, drop
        C, r = cp.size, cp.rank
        self.n = cp.T // (2 * C)
        self.chunks = (r, 2 * C - 1 - r)                 # this rank's two query chunks

    def _mask(self, key, dtype):
        """The rank's rows of the attention-dropout mask [B, H, T/C, T], or None."""
        if key is None or self.drop.p == 0:
            return None
        return self.drop.rows_of(key, self.cp.positions, self.cp.T, dtype)

    def _blocks(self, src: int):
        """(i, j, kc, causal): this rank's query half i against half j (chunk kc) of src's
        keys, where the causal mask lets any query see a key; causal: the diagonal block."""
        theirs = (src, 2 * self.cp.size - 1 - src)
        for i, qc in enumerate(self.chunks):
            for j, kc in enumerate(theirs):
                if kc <= qc:
                    yield i, j, kc, kc == qc

    def _ring(self, bufs, site: str, tag: int):
        """Start passing bufs to the next rank and receiving the previous rank's."""
        cp = self.cp
        nxt, prv = (cp.rank + 1) % cp.size, (cp.rank - 1) % cp.size
        host = [np.ascontiguousarray(to_host(b)) for b in bufs]      # kept until the wait
        recv = [np.empty_like(h) for h in host]
        reqs = [cp.comm.Irecv(moved(x), source=prv, tag=tag + i) for i, x in enumerate(recv)]
        reqs += [cp.comm.Isend(moved(x), dest=nxt, tag=tag + i) for i, x in enumerate(host)]
        cp.volume[(self.site, site)] += sum(x.size for x in host)
        return reqs, recv, host

    def forward(self, q, k, v, p0: int, key, keep_probs: bool = False):
        whole_sequence_only(p0, keep_probs)
        n, C, r = self.n, self.cp.size, self.cp.rank
        mask = self._mask(key, wide(q).dtype)
        halves = (slice(0, n), slice(n, 2 * n))
        out = np.zeros_like(wide(q))
        lse = np.full_like(out[..., 0], -np.inf)
        kv = (k, v)
        for s in range(C):
            src = (r - s) % C
            pending = self._ring(kv, "forward", 0) if s < C - 1 else None
            for i, j, kc, causal in self._blocks(src):
                m = None if mask is None else mask[:, :, halves[i], kc * n:(kc + 1) * n]
                o_b, lse_b = attention_block_forward(
                    q[:, :, halves[i]], kv[0][:, :, halves[j]], kv[1][:, :, halves[j]], causal, m)
                merge(out[:, :, halves[i]], lse[:, :, halves[i]], o_b, lse_b)
            if pending is not None:
                reqs, recv, _ = pending
                self.cp.wait(reqs)
                kv = tuple(to_device(x) for x in recv)
        return narrow(out, q.dtype), (out, lse, key)

    def backward(self, q, k, v, saved, do, dq, dk, dv, drop: bool) -> None:
        out, lse, key = saved
        n, C, r = self.n, self.cp.size, self.cp.rank
        mask = self._mask(key, out.dtype) if drop else None
        halves = (slice(0, n), slice(n, 2 * n))
        delta = (wide(do) * out).sum(axis=-1)                        # rowsum(dO * O)
        dq_acc = np.zeros_like(out)
        kv = (k, v)
        dkv = (np.zeros_like(out), np.zeros_like(out))               # src's dK, dV so far
        for s in range(C):
            src = (r - s) % C
            pending = self._ring(kv, "backward", 0) if s < C - 1 else None
            for i, j, kc, causal in self._blocks(src):
                m = None if mask is None else mask[:, :, halves[i], kc * n:(kc + 1) * n]
                attention_block_backward(
                    q[:, :, halves[i]], kv[0][:, :, halves[j]], kv[1][:, :, halves[j]],
                    do[:, :, halves[i]], lse[:, :, halves[i]], delta[:, :, halves[i]], causal,
                    m, dq_acc[:, :, halves[i]], dkv[0][:, :, halves[j]], dkv[1][:, :, halves[j]])
            reqs, recv, _ = self._ring(dkv, "backward", 2)           # dK, dV to the next rank
            self.cp.wait(reqs)
            dkv = tuple(to_device(x) for x in recv)
            if pending is not None:
                reqs, recv, _ = pending
                self.cp.wait(reqs)
                kv = tuple(to_device(x) for x in recv)
        dq[...] = narrow(dq_acc, dq.dtype)                           # after C passes, dkv is
        dk[...] = narrow(dkv[0], dk.dtype)                           # this rank's own block's
        dv[...] = narrow(dkv[1], dv.dtype)


def merge(out, lse, o_b, lse_b) -> None:
    """out, lse (views, in place) <- the exact merge of (out, lse) and a block's (o_b, lse_b)."""
    new = np.logaddexp(lse, lse_b)
    out *= np.exp(lse - new)[..., None]
    out += o_b * np.exp(lse_b - new)[..., None]
    lse[...] = new


class UlyssesAttention:
    """a2a: heads for tokens by all-to-all, attention on the whole sequence (module docstring)."""

    def __init__(self, cp: ContextComm, site: str, drop: Dropout):
        self.cp, self.site = cp, site
        self.local = LocalAttention(drop)          # on the whole sequence; drop: core_heads
        C = cp.size
        order = np.concatenate([positions(cp.T, C, s) for s in range(C)])
        self.order = order                                  # gathered token i is position order[i]
        self.inverse = np.argsort(order)

    def _to_heads(self, xs, site: str):
        """Each of xs [B, H, T/C, D] -> [B, H/C, T, D] in position order (all-to-all)."""
        C = self.cp.size
        B, H, Tl, D = xs[0].shape
        send = np.stack([to_host(x).reshape(B, C, H // C, Tl, D) for x in xs])  # [k, B, C, ...]
        send = np.ascontiguousarray(send.transpose(2, 0, 1, 3, 4, 5))      # [C dest, k, B, h, Tl, D]
        recv = np.empty_like(send)                                          # [C src, ...]
        self.cp.alltoall(send, recv)
        self.cp.volume[(self.site, site)] += send.size // C * (C - 1)
        full = recv.transpose(1, 2, 3, 0, 4, 5).reshape(len(xs), B, H // C, C * Tl, D)
        return [to_device(np.ascontiguousarray(f[:, :, self.inverse])) for f in full]

    def _to_tokens(self, xs, site: str):
        """The reverse: each of xs [B, H/C, T, D] in position order -> [B, H, T/C, D]."""
        C = self.cp.size
        B, h, T, D = xs[0].shape
        Tl = T // C
        send = np.stack([to_host(x)[:, :, self.order].reshape(B, h, C, Tl, D) for x in xs])
        send = np.ascontiguousarray(send.transpose(3, 0, 1, 2, 4, 5))      # [C dest, k, B, h, Tl, D]
        recv = np.empty_like(send)                                          # [C src = heads]
        self.cp.alltoall(send, recv)
        self.cp.volume[(self.site, site)] += send.size // C * (C - 1)
        out = recv.transpose(1, 2, 0, 3, 4, 5).reshape(len(xs), B, h * C, Tl, D)
        return [to_device(o) for o in out]

    def forward(self, q, k, v, p0: int, key, keep_probs: bool = False):
        whole_sequence_only(p0, keep_probs)
        qf, kf, vf = self._to_heads((q, k, v), "forward")
        o, saved = self.local.forward(qf, kf, vf, 0, key)
        (out,) = self._to_tokens((o,), "forward")
        return out, (qf, kf, vf, saved)

    def backward(self, q, k, v, saved, do, dq, dk, dv, drop: bool) -> None:
        qf, kf, vf, inner = saved
        (dof,) = self._to_heads((do,), "backward")
        dqf, dkf, dvf = (np.empty_like(x) for x in (qf, kf, vf))
        self.local.backward(qf, kf, vf, inner, dof, dqf, dkf, dvf, drop)
        for dst, src in zip((dq, dk, dv), self._to_tokens((dqf, dkf, dvf), "backward")):
            dst[...] = src
