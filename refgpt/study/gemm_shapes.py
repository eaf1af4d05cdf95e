"""A GEMM's time as a function of its shape, calibrated on the model's own GEMMs.

A rank multiplies [m, k] by [k, n] in

    t(m, n, k) = 2 m n k / F + w (m k + k n + m n) / B + t0

seconds: F its arithmetic rate on large products, B the rate at which it reads the operands
and writes the result (w bytes an element) while every rank of the node does the same, t0 a
call's fixed cost. Narrow and thin products (tensor parallelism's shards, a micro-batch of
few tokens, the attention core's [s, d] x [d, s] per head) are bandwidth- or call-bound, so
they reach less of F than the square product a single GEMM rate is measured on.

``model_gemms`` lists the products of one micro-batch's forward and backward on one rank of
a layout (each linear layer's y = x W, dx = dy W^T, dW = x^T dy; the attention core's
q k^T and P v and their two gradients per head; the LM head against the tied token table),
and ``GemmShape.rate`` the FLOP/s a rank reaches on that mix. ``fit`` finds B and t0 (and F,
unless given) from timed products by least squares on relative error (scipy's non-negative
least squares, as t is linear in 1/F, 1/B and t0); refgpt.plan's --calibrate takes F from
the trainer's measured rate on a large square product and times the model's products at
every tensor-parallel size the world allows, every rank at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def model_gemms(mcfg, micro_batch: int, tp: int = 1, cp: int = 1,
                q: int = 1) -> list[tuple[int, int, int, int]]:
    """(m, n, k, count) of the products one rank makes for one micro-batch's forward and
    backward through the whole model: 1-D tensor parallelism of tp splits each linear
    layer's inner dimension (column-parallel c_attn and c_fc: n / tp; row-parallel
    projections: k / tp), the heads and the vocabulary; context parallelism of cp leaves a
    rank s / cp tokens (its queries against every key); 2-D tensor parallelism (q x q)
    multiplies q panels of [m/q, k/q] x [k/q, n/q] for each product."""
    h, s, V = mcfg.hidden_size, mcfg.seq_length, mcfg.padded_vocab
    M = micro_batch * s // cp                                # the rank's tokens
    heads, d = mcfg.num_attention_heads // tp, h // mcfg.num_attention_heads
    out = []

    def linear(k: int, n: int, count: int) -> None:         # forward, dx, dW
        for shape in ((M, n, k), (M, k, n), (k, n, M)):
            out.append((*shape, count))
    L = mcfg.num_layers
    linear(h, 3 * h // tp, L)
    linear(h // tp, h, L)
    linear(h, 4 * h // tp, L)
    linear(4 * h // tp, h, L)
    linear(h, V // tp, 1)                                   # the head (x wte^T)
    # the attention core per head: S = q k^T, O = P v; dP = dO v^T, dv = P^T dO,
    # dq = dS k, dk = dS^T q
    core = [(s // cp, s, d), (s // cp, d, s), (s // cp, s, d), (s, d, s // cp),
            (s // cp, d, s), (s, d, s // cp)]
    out += [(*shape, L * micro_batch * heads) for shape in core]
    if q > 1:
        out = [(m // q, n // q, k // q, c * q) for m, n, k, c in out]
    return out


@dataclass(frozen=True)
class GemmShape:
    """t(m, n, k) of the module docstring, per rank: F (FLOP/s), B (bytes/s), t0 (s), w."""
    flops: float
    bandwidth: float
    overhead: float
    itemsize: int

    def seconds(self, m: int, n: int, k: int) -> float:
        return (2.0 * m * n * k / self.flops
                + self.itemsize * (m * k + k * n + m * n) / self.bandwidth + self.overhead)

    def rate(self, gemms) -> float:
        """FLOP/s on a mix of (m, n, k, count) products."""
        work = sum(2.0 * m * n * k * c for m, n, k, c in gemms)
        return work / sum(self.seconds(m, n, k) * c for m, n, k, c in gemms)

    @classmethod
    def fit(cls, samples, itemsize: int, flops: float | None = None) -> "GemmShape":
        """From (m, n, k, seconds) samples: the non-negative 1/F, 1/B, t0 that minimise the
        squared relative error, or with F given (a large square product's measured rate)
        1/B and t0 alone, which the samples always allow (tiny products that only show the
        call's cost leave B infinite); a term the samples do not support is left out."""
        from scipy.optimize import nnls
        work = np.array([2.0 * m * n * k for m, n, k, _ in samples])
        moved = np.array([itemsize * (m * k + k * n + m * n) for m, n, k, _ in samples])
        seconds = np.array([t for *_, t in samples])
        if flops is None:
            rows, target = np.stack([work, moved, np.ones(len(samples))], 1), seconds
        else:
            rows, target = np.stack([moved, np.ones(len(samples))], 1), seconds - work / flops
        coef, _ = nnls(rows / seconds[:, None], target / seconds)
        if flops is None:
            inv_f, coef = coef[0], coef[1:]
            if inv_f <= 0:
                raise ValueError("the GEMM samples give no arithmetic rate")
            flops = 1 / inv_f
        inv_b, t0 = coef
        return cls(flops, 1 / inv_b if inv_b > 0 else float("inf"), float(t0), itemsize)


def time_gemms(world, shapes, dtype, seconds: float = 0.005) -> list[tuple]:
    """(m, n, k, seconds a product) for each shape, on every rank of world at once
    (refgpt.study.measure.timed: the slowest rank's median), with the layers' GEMM
    (refgpt.nn.linear.matmul), each timed over enough products to last `seconds`."""
    import time

    from mpi4py import MPI

    from ..nn.linear import matmul
    from .measure import timed
    rng = np.random.default_rng(0)
    out = []
    for m, n, k in shapes:
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        start = time.perf_counter()
        matmul(a, b)
        once = max(time.perf_counter() - start, 1e-6)
        reps = world.allreduce(max(1, min(1000, int(seconds / once))), op=MPI.MAX)

        def work(a=a, b=b, reps=reps):
            for _ in range(reps):
                matmul(a, b)
        out.append((m, n, k, timed(world, work) / reps))
    return out
