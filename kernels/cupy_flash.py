"""Fused causal attention on the GPU, flash-style: the ``cupy`` backend's attention_forward and
attention_backward (their references, which build the T x Tk matrices, are in
refgpt.nn.attention).

Forward, per (batch, head) and block of BQ queries, over blocks of BK keys j = 0, 1, ...
up to the causal boundary (the online softmax; m, l and O are per query row):

    S_j = q K_j^T / sqrt(D), masked          m' = max(m, rowmax S_j)
    P_j = exp(S_j - m')                      l  = l exp(m - m') + rowsum P_j
    O   = O exp(m - m') + P_j V_j            m  = m'
    at the end: O = O / l,  lse = m + log l  (the log of the softmax's normaliser)

so no T x Tk matrix is ever written: the block's S_j and P_j live in registers and shared
memory. The backward recomputes them from lse (P = exp(S - lse) is the softmax exactly), per
block of BK keys, over the blocks of queries that see it:

    dV_j += P^T dO      dP = dO V_j^T      dS = P * (dP - delta),  delta = rowsum(dO * O)
    dK_j += dS^T q / sqrt(D)               dQ   = sum over j of dS K_j / sqrt(D)

delta equals the reference's rowsum(dP * P); a small kernel computes it first, a warp per
row. Each key block writes its part of dQ to a buffer of its own, and a last kernel adds the
parts in the order of the blocks: no atomics, so a run gives the same bits every time. That
buffer, T / BK times the size of q, lives only during one layer's backward; what the forward
keeps for the backward is O and lse, where the reference keeps P (B H T Tk per layer).

Each block's products are tiles of 16 x TY threads, a thread RM x RN of the outputs. The
tiles sit in shared memory laid out so that both operands of a product are read as aligned
vectors (q and dO are kept both ways round in the backward for that), and the backward
loads the next block of queries into registers while it multiplies the current one. TILES
holds (BQ, BK, TY) per element size; attention_forward's ``tiles`` argument runs others (the
backward takes the forward's), which benchmarks/gpu_attention.py --sweep times.

16-bit q, k and v run refgpt.kernels.cupy_flash16's kernels: the same algorithm on the
tensor cores.

The causal boundary is an argument, off: query i sees keys j <= i + off. Whole-sequence
attention passes off = Tk - T (queries are the last T of Tk positions); context
parallelism's ring blocks (attention_block_forward and _backward, refgpt.parallel.context)
pass 0 on the diagonal block and Tk for a block whose keys all come earlier, and take the
block's lse as it is (the ring merges blocks by it) and, backward, the ring's final lse and
delta (the gradients are added into the ring's accumulators). The blocks run in float32 or
float64; 16-bit ring blocks take the reference's cuBLAS path.

What this path does not cover it declines (returns NotImplemented), and the reference runs
(cuBLAS products on blocks of rows, refgpt.kernels.cupy_attention): attention dropout,
recording the probabilities, head sizes that are not a multiple of 16 up to 128, and tiles
that need more shared memory than the GPU gives a block. refgpt.backend's
``Backend("cupy", fused_attention=False)`` sends every call there (the benchmarks compare
the two paths).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cupy as cp
import numpy as np

from . import cupy_flash16
from .cupy_attention import CTYPE
from .cupy_half import is_half

# (BQ queries, BK keys, TY rows of 16 threads) per element size, for the forward and backward
TILES = {4: {"forward": (64, 64, 8), "backward": (32, 64, 8)},
         8: {"forward": (32, 32, 8), "backward": (16, 32, 8)}}

_SOURCE = r"""
template <typename T> __device__ __forceinline__ T ex(T x) { return exp(x); }
template <> __device__ __forceinline__ float ex<float>(float x) { return __expf(x); }
template <typename T> __device__ __forceinline__ T inf();
template <> __device__ __forceinline__ float inf<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double inf<double>() {
    return __longlong_as_double(0x7ff0000000000000LL);
}

// r[0..N) = p[0..N), as float4 / float2 / double2 loads where N allows (p aligned to them)
template <typename T, int N>
__device__ __forceinline__ void load_vec(T (&r)[N], const T* p) {
    if constexpr (sizeof(T) == 4 && N % 4 == 0) {
        #pragma unroll
        for (int i = 0; i < N; i += 4) {
            float4 x = *reinterpret_cast<const float4*>(p + i);
            r[i] = x.x; r[i + 1] = x.y; r[i + 2] = x.z; r[i + 3] = x.w;
        }
    } else if constexpr (sizeof(T) == 4 && N == 2) {
        float2 x = *reinterpret_cast<const float2*>(p);
        r[0] = x.x; r[1] = x.y;
    } else if constexpr (sizeof(T) == 8 && N % 2 == 0) {
        #pragma unroll
        for (int i = 0; i < N; i += 2) {
            double2 x = *reinterpret_cast<const double2*>(p + i);
            r[i] = x.x; r[i + 1] = x.y;
        }
    } else {
        #pragma unroll
        for (int i = 0; i < N; ++i) r[i] = p[i];
    }
}

// p[0..N) = r[0..N), as vector stores where N allows (p aligned to them)
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const T (&r)[N]) {
    if constexpr (sizeof(T) == 4 && N % 4 == 0) {
        #pragma unroll
        for (int i = 0; i < N; i += 4)
            *reinterpret_cast<float4*>(p + i) = make_float4(r[i], r[i + 1], r[i + 2], r[i + 3]);
    } else if constexpr (sizeof(T) == 4 && N == 2) {
        *reinterpret_cast<float2*>(p) = make_float2(r[0], r[1]);
    } else if constexpr (sizeof(T) == 8 && N % 2 == 0) {
        #pragma unroll
        for (int i = 0; i < N; i += 2)
            *reinterpret_cast<double2*>(p + i) = make_double2(r[i], r[i + 1]);
    } else {
        #pragma unroll
        for (int i = 0; i < N; ++i) p[i] = r[i];
    }
}

// acc[i][j] += sum over k < K of A(m0 + i, k) B(k, col j), where A(m, k) = a[k LDA + m] (a
// thread's RM rows are contiguous: vector loads) and B(k, n) = b[k BK_ + n BN]. A thread's
// columns are n0 + 16 j (the 16 threads of a row of threads read 16 neighbours), or, with
// VN (BN = 1), the contiguous n0 + j, read as vectors. Step k + 1's operands are loaded
// before step k's products, so that the loads' latency overlaps them.
template <typename T, int RM, int RN, int K, int LDA, int BK_, int BN, bool VN = false>
__device__ __forceinline__ void mac(T (&acc)[RM][RN], const T* a, const T* b, int m0, int n0) {
    static_assert(!VN || BN == 1, "vector columns need unit stride");
    T x[2][RM], y[2][RN];
    auto load = [&](int k, T (&xk)[RM], T (&yk)[RN]) {
        load_vec<T, RM>(xk, a + k * LDA + m0);
        if constexpr (VN) {
            load_vec<T, RN>(yk, b + k * BK_ + n0);
        } else {
            #pragma unroll
            for (int j = 0; j < RN; ++j) yk[j] = b[k * BK_ + (n0 + 16 * j) * BN];
        }
    };
    load(0, x[0], y[0]);
    #pragma unroll 8
    for (int k = 0; k < K; ++k) {
        if (k + 1 < K) load(k + 1, x[(k + 1) & 1], y[(k + 1) & 1]);
        #pragma unroll
        for (int i = 0; i < RM; ++i)
            #pragma unroll
            for (int j = 0; j < RN; ++j) acc[i][j] += x[k & 1][i] * y[k & 1][j];
    }
}

template <typename T, int N, int M>
__device__ __forceinline__ void zero(T (&a)[N][M]) {
    #pragma unroll
    for (int i = 0; i < N; ++i)
        #pragma unroll
        for (int j = 0; j < M; ++j) a[i][j] = (T)0;
}

// One block: BQ queries of one (batch, head); lse[bh T + t] = m + log l of each row.
template <typename T, int D, int BQ, int BK, int TY>
__global__ void __launch_bounds__(16 * TY) flash_forward(
        const T* q, const T* k, const T* v, T* o, T* lse,
        long long qb, long long qh, long long qt, long long kb, long long kh, long long kt,
        long long vb, long long vh, long long vt, long long ob, long long oh, long long ot,
        int H, int T_, int Tk, int off, T scale) {
    constexpr int NT = 16 * TY, RM = BQ / TY, RN = BK / 16, RD = D / 16;
    constexpr int LQ = BQ + 4, LK = BK + 4;    // row pitches (+ 4: keeps 16-byte rows)
    extern __shared__ __align__(16) unsigned char smem[];
    T* Qt = reinterpret_cast<T*>(smem);        // [D][LQ]: Qt[d LQ + t] = q[t][d]
    T* Vs = Qt + D * LQ;                       // [BK][D]
    T* Kt = Vs + BK * D;                       // [D][LK]: Kt[d LK + key] = k[key][d], then
    T* Pt = Kt;                                // [BK][LQ]: Pt[key LQ + t] = P[t][key]
    const T NEG = -inf<T>();
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16, r0 = ty * RM;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;          // the longest rows first
    q += b * qb + h * qh; k += b * kb + h * kh; v += b * vb + h * vh; o += b * ob + h * oh;
    for (int i = tid; i < BQ * D; i += NT) {
        int t = i / D, d = i % D;
        Qt[d * LQ + t] = q0 + t < T_ ? q[(q0 + t) * qt + d] : (T)0;
    }
    T m[RM], l[RM], acc[RM][RD];
    #pragma unroll
    for (int i = 0; i < RM; ++i) { m[i] = NEG; l[i] = (T)0; }
    zero(acc);
    const int last = min(Tk - 1, q0 + BQ - 1 + off);            // the block's last visible key
    for (int k0 = 0; k0 <= last; k0 += BK) {
        __syncthreads();
        for (int i = tid; i < BK * D; i += NT) {
            int t = i / D, d = i % D;
            bool in = k0 + t < Tk;
            Kt[d * LK + t] = in ? k[(k0 + t) * kt + d] : (T)0;
            Vs[t * D + d] = in ? v[(k0 + t) * vt + d] : (T)0;
        }
        __syncthreads();
        T s[RM][RN];
        zero(s);
        mac<T, RM, RN, D, LQ, LK, 1, true>(s, Qt, Kt, r0, tx * RN);
        #pragma unroll
        for (int i = 0; i < RM; ++i) {
            const int row = q0 + r0 + i;
            T mx = NEG;
            #pragma unroll
            for (int j = 0; j < RN; ++j) {
                const int key = k0 + tx * RN + j;
                s[i][j] = key <= row + off && key < Tk ? s[i][j] * scale : NEG;
                mx = max(mx, s[i][j]);
            }
            #pragma unroll
            for (int w = 8; w > 0; w >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, w));
            const T mnew = max(m[i], mx);      // finite: key 0 is in the first block
            const T alpha = ex(m[i] - mnew);
            T sum = (T)0;
            #pragma unroll
            for (int j = 0; j < RN; ++j) { s[i][j] = ex(s[i][j] - mnew); sum += s[i][j]; }
            #pragma unroll
            for (int w = 8; w > 0; w >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, w);
            l[i] = l[i] * alpha + sum;
            m[i] = mnew;
            #pragma unroll
            for (int d = 0; d < RD; ++d) acc[i][d] *= alpha;
        }
        __syncthreads();                       // every thread is done with Kt: P takes its place
        #pragma unroll
        for (int j = 0; j < RN; ++j) {
            T col[RM];
            #pragma unroll
            for (int i = 0; i < RM; ++i) col[i] = s[i][j];
            store_vec(Pt + (tx * RN + j) * LQ + r0, col);
        }
        __syncthreads();
        mac<T, RM, RD, BK, LQ, D, 1, true>(acc, Pt, Vs, r0, tx * RD);
    }
    #pragma unroll
    for (int i = 0; i < RM; ++i) {
        const int row = q0 + r0 + i;
        if (row >= T_) continue;
        #pragma unroll
        for (int d = 0; d < RD; ++d) o[row * ot + tx * RD + d] = acc[i][d] / l[i];
        if (tx == 0) lse[(long long)bh * T_ + row] = m[i] + log(l[i]);
    }
}

// One block: BK keys of one (batch, head), over the blocks of queries that see them. Writes
// dK, dV, and this key block's part of dQ (unscaled) to dqp[kb][bh][t][d].
template <typename T, int D, int BQ, int BK, int TY>
__global__ void __launch_bounds__(16 * TY) flash_backward(
        const T* q, const T* k, const T* v, const T* dout, const T* lse, const T* delta,
        T* dk, T* dv, T* dqp,
        long long qb, long long qh, long long qt, long long kb, long long kh, long long kt,
        long long vb, long long vh, long long vt, long long gb, long long gh, long long gt,
        long long kgb, long long kgh, long long kgt, long long vgb, long long vgh, long long vgt,
        int H, int T_, int Tk, int off, T scale) {
    constexpr int NT = 16 * TY, RK = BK / TY, RQ = BQ / 16, RD = D / 16, RQ2 = BQ / TY;
    constexpr int LK = BK + 4, LQ = BQ + 4, LD = D + 4, PF = (BQ * D + NT - 1) / NT;
    static_assert(BQ <= NT, "a thread per query row of the block");
    extern __shared__ __align__(16) unsigned char smem[];
    T* Kt = reinterpret_cast<T*>(smem);        // [D][LK]: Kt[d LK + key] = k[key][d]
    T* Vt = Kt + D * LK;                       // [D][LK]
    T* Ks = Vt + D * LK;                       // [BK][D]
    T* Ps = Ks + BK * D;                       // [BQ][LK]: P [t][key]
    T* Ds = Ps + BQ * LK;                      // [BQ][LK]: dS [t][key]
    T* St = Ds + BQ * LK;                      // [BK][LQ]: dS^T [key][t]
    T* Qs = St + BK * LQ;                      // [BQ][LD]
    T* Gs = Qs + BQ * LD;                      // [BQ][LD]: dO
    T* Qt = Gs + BQ * LD;                      // [D][LQ]: q^T
    T* Gt = Qt + D * LQ;                       // [D][LQ]: dO^T
    T* Ls = Gt + D * LQ;                       // [BQ]: lse
    T* Es = Ls + BQ;                           // [BQ]: delta
    const T INF = inf<T>();
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int k0 = blockIdx.x * BK;
    q += b * qb + h * qh; k += b * kb + h * kh; v += b * vb + h * vh; dout += b * gb + h * gh;
    dk += b * kgb + h * kgh; dv += b * vgb + h * vgh;
    lse += (long long)bh * T_; delta += (long long)bh * T_;
    dqp += ((long long)blockIdx.x * gridDim.y + bh) * T_ * D;
    for (int i = tid; i < BK * D; i += NT) {
        int t = i / D, d = i % D;
        bool in = k0 + t < Tk;
        T kv = in ? k[(k0 + t) * kt + d] : (T)0;
        Kt[d * LK + t] = kv;
        Ks[t * D + d] = kv;
        Vt[d * LK + t] = in ? v[(k0 + t) * vt + d] : (T)0;
    }
    // a block of queries' q, dO, lse and delta, loaded into registers while the block before
    // it is multiplied, then stored to shared memory
    T pq[PF], pg[PF], pl = INF, pe = (T)0;                           // P = 0 past the end
    auto fetch = [&](int q0) {
        #pragma unroll
        for (int r = 0; r < PF; ++r) {
            const int i = tid + r * NT, t = i / D, d = i % D;
            const bool in = i < BQ * D && q0 + t < T_;
            pq[r] = in ? q[(q0 + t) * qt + d] : (T)0;
            pg[r] = in ? dout[(q0 + t) * gt + d] : (T)0;
        }
        pl = tid < BQ && q0 + tid < T_ ? lse[q0 + tid] : INF;
        pe = tid < BQ && q0 + tid < T_ ? delta[q0 + tid] : (T)0;
    };
    T gk[RK][RD], gv[RK][RD];
    zero(gk); zero(gv);
    int q0 = max(0, k0 - off) / BQ * BQ;
    if (q0 < T_) fetch(q0);
    for (; q0 < T_; q0 += BQ) {
        __syncthreads();                       // the block before is done with the buffers
        #pragma unroll
        for (int r = 0; r < PF; ++r) {
            const int i = tid + r * NT, t = i / D, d = i % D;
            if (i < BQ * D) {
                Qs[t * LD + d] = pq[r]; Gs[t * LD + d] = pg[r];
                Qt[d * LQ + t] = pq[r]; Gt[d * LQ + t] = pg[r];
            }
        }
        if (tid < BQ) { Ls[tid] = pl; Es[tid] = pe; }
        if (q0 + BQ < T_) fetch(q0 + BQ);
        __syncthreads();
        T s[RK][RQ], dp[RK][RQ];                                     // S^T, dP^T: [key][t]
        zero(s); zero(dp);
        mac<T, RK, RQ, D, LK, LQ, 1, true>(s, Kt, Qt, ty * RK, tx * RQ);
        mac<T, RK, RQ, D, LK, LQ, 1, true>(dp, Vt, Gt, ty * RK, tx * RQ);
        #pragma unroll
        for (int j = 0; j < RQ; ++j) {
            const int t = tx * RQ + j;
            T pc[RK];
            #pragma unroll
            for (int i = 0; i < RK; ++i) {
                const int key = k0 + ty * RK + i;
                pc[i] = key <= q0 + t + off && key < Tk ? ex(s[i][j] * scale - Ls[t]) : (T)0;
                dp[i][j] = pc[i] * (dp[i][j] - Es[t]);              // dS
            }
            store_vec(Ps + t * LK + ty * RK, pc);
            T dc[RK];
            #pragma unroll
            for (int i = 0; i < RK; ++i) dc[i] = dp[i][j];
            store_vec(Ds + t * LK + ty * RK, dc);
        }
        #pragma unroll
        for (int i = 0; i < RK; ++i) store_vec(St + (ty * RK + i) * LQ + tx * RQ, dp[i]);
        __syncthreads();
        mac<T, RK, RD, BQ, LK, LD, 1, true>(gv, Ps, Gs, ty * RK, tx * RD);   // dV += P^T dO
        mac<T, RK, RD, BQ, LK, LD, 1, true>(gk, Ds, Qs, ty * RK, tx * RD);   // dK += dS^T q
        T gq[RQ2][RD];
        zero(gq);
        mac<T, RQ2, RD, BK, LQ, D, 1, true>(gq, St, Ks, ty * RQ2, tx * RD);   // dQ part = dS K
        #pragma unroll
        for (int i = 0; i < RQ2; ++i) {
            const int row = q0 + ty * RQ2 + i;
            if (row >= T_) continue;
            #pragma unroll
            for (int d = 0; d < RD; ++d) dqp[(long long)row * D + tx * RD + d] = gq[i][d];
        }
    }
    #pragma unroll
    for (int i = 0; i < RK; ++i) {
        const int key = k0 + ty * RK + i;
        if (key >= Tk) continue;
        #pragma unroll
        for (int d = 0; d < RD; ++d) {
            dk[key * kgt + tx * RD + d] = gk[i][d] * scale;
            dv[key * vgt + tx * RD + d] = gv[i][d];
        }
    }
}

// delta[bh T + t] = sum over d of dO[b, h, t, d] O[b, h, t, d]: a warp per row.
template <typename T>
__global__ void flash_delta(const T* dout, const T* o, T* delta, long long gb, long long gh,
                            long long gt, long long ob, long long oh, long long ot,
                            int H, int T_, int D, int rows) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int t = row % T_, bh = row / T_, b = bh / H, h = bh % H;
    dout += b * gb + h * gh + t * gt;
    o += b * ob + h * oh + t * ot;
    T sum = (T)0;
    for (int d = lane; d < D; d += 32) sum += dout[d] * o[d];
    #pragma unroll
    for (int w = 16; w > 0; w >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, w);
    if (lane == 0) delta[row] = sum;
}

// dq[b, h, t, :] = scale * the sum of the key blocks' parts, in block order.
template <typename T>
__global__ void flash_dq(const T* dqp, T* dq, long long db, long long dh, long long dt,
                         int H, int T_, int Tk, int off, int D, int BK, int BH, T scale) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)BH * T_ * D) return;
    const int d = i % D, row = (i / D) % T_, bh = i / ((long long)D * T_);
    const int last = min(Tk - 1, row + off) / BK;
    T sum = (T)0;
    for (int j = 0; j <= last; ++j)
        sum += dqp[((long long)j * BH + bh) * T_ * D + (long long)row * D + d];
    dq[(bh / H) * db + (bh % H) * dh + row * dt + d] = sum * scale;
}
"""


@functools.cache
def _module(ctype: str, D: int, forward: tuple, backward: tuple):
    fwd = f"flash_forward<{ctype}, {D}, {', '.join(map(str, forward))}>"
    bwd = f"flash_backward<{ctype}, {D}, {', '.join(map(str, backward))}>"
    names = [fwd, bwd, f"flash_dq<{ctype}>", f"flash_delta<{ctype}>"]
    mod = cp.RawModule(code=_SOURCE, options=("--std=c++17",), name_expressions=names)
    return [mod.get_function(n) for n in names]


def _kernel(which: str, dtype, D: int, shared: int, tiles: dict):
    f = _module(CTYPE[dtype], D, tiles["forward"], tiles["backward"])
    kern = f[("forward", "backward", "dq", "delta").index(which)]
    if shared > kern.max_dynamic_shared_size_bytes:
        kern.max_dynamic_shared_size_bytes = shared
    return kern


def shared_bytes(which: str, itemsize: int, D: int, tiles: dict | None = None) -> int:
    BQ, BK, _ = (tiles or TILES[itemsize])[which]
    if which == "forward":
        return itemsize * (D * (BQ + 4) + BK * D + max(D * (BK + 4), BK * (BQ + 4)))
    return itemsize * (2 * D * (BK + 4) + BK * D + 2 * BQ * (BK + 4) + BK * (BQ + 4)
                       + 2 * BQ * (D + 4) + 2 * D * (BQ + 4) + 2 * BQ)


def _strides(a) -> list:
    return [np.int64(s // a.itemsize) for s in a.strides[:3]]


def _ptr(a):
    return np.uint64(a.data.ptr)


def _fits(q, k, v, tiles: dict | None) -> bool:
    D, size = q.shape[-1], q.itemsize
    if not ((tiles or size in TILES) and D % 16 == 0 and D <= 128
            and all(x.ndim == 4 and x.dtype == q.dtype and x.strides[-1] == size
                    for x in (q, k, v))):
        return False
    limit = _shared_limit(cp.cuda.Device().id)
    return max(shared_bytes(w, size, D, tiles) for w in ("forward", "backward")) <= limit


@functools.cache
def _shared_limit(device: int) -> int:
    """The most shared memory a block of this GPU may ask for (227 KiB on an H100)."""
    return cp.cuda.Device(device).attributes["MaxSharedMemoryPerBlockOptin"]


@dataclass
class Saved:
    """What the fused forward keeps for its backward: O and the rows' log-normalisers."""
    o: cp.ndarray                  # [B, H, T, D]
    lse: cp.ndarray                # [B, H, T]
    tiles: dict                    # the tile shapes the forward ran with


def attention_forward(q, k, v, p0, dropout=None, keep_probs=False, tiles=None):
    """O [B, H, T, D] (a view of a [B, T, H, D] array: heads merged for free) and Saved.
    tiles: {"forward": (BQ, BK, TY), "backward": ...} instead of TILES' (a tile sweep).
    16-bit q, k, v go to the tensor-core kernels of refgpt.kernels.cupy_flash16."""
    if is_half(q):
        if dropout is not None or keep_probs or not cupy_flash16.fits(q, k, v):
            return NotImplemented
        return cupy_flash16.attention_forward(q, k, v, p0)
    tiles = tiles or TILES.get(q.itemsize)
    if dropout is not None or keep_probs or not _fits(q, k, v, tiles):
        return NotImplemented                           # the reference's cuBLAS path
    cupy_flash16.check_queries_last(q.shape[2], k.shape[2], p0)
    o, lse = _forward(q, k, v, k.shape[2] - q.shape[2], tiles)
    return o, Saved(o, lse, tiles)


def attention_backward(q, k, v, saved, do, dq, dk, dv, dropout_backward=None):
    """dq, dk, dv (written into the given views) from the forward's O and lse."""
    if isinstance(saved, cupy_flash16.Saved16):
        return cupy_flash16.attention_backward(q, k, v, saved, do, dq, dk, dv)
    if not isinstance(saved, Saved):                    # the forward took the reference path
        return NotImplemented
    if do.strides[-1] != do.itemsize:
        do = cp.ascontiguousarray(do)
    if any(g.strides[-1] != g.itemsize for g in (dq, dk, dv)):
        raise ValueError("dq, dk and dv need contiguous rows of D")
    delta = _delta(do, saved.o, saved.tiles)
    _backward(q, k, v, do, saved.lse, delta, k.shape[2] - q.shape[2], dq, dk, dv, saved.tiles)


def attention_block_forward(q, k, v, causal, mask=None):
    """A ring block (refgpt.parallel.context): O normalised over the block's keys and lse, by
    the same kernel, whose causal boundary key <= query + off is the diagonal (off = 0) or
    lets every key through (off = nk)."""
    tiles = TILES.get(q.itemsize)
    if mask is not None or is_half(q) or not _fits(q, k, v, tiles):
        return NotImplemented
    return _forward(q, k, v, 0 if causal else k.shape[2], tiles)


def attention_block_backward(q, k, v, do, lse, delta, causal, mask, dq, dk, dv):
    """Adds the block's parts to the accumulators dq, dk, dv, from the ring's final lse and
    delta (the kernels write their results; the sums are then added)."""
    tiles = TILES.get(q.itemsize)
    if mask is not None or is_half(q) or not _fits(q, k, v, tiles) or do.dtype != q.dtype:
        return NotImplemented
    grads = [cp.empty(x.shape, q.dtype) for x in (q, k, v)]
    _backward(q, k, v, cp.ascontiguousarray(do), cp.ascontiguousarray(lse, q.dtype),
              cp.ascontiguousarray(delta, q.dtype), 0 if causal else k.shape[2], *grads, tiles)
    for acc, g in zip((dq, dk, dv), grads):
        acc += g


def _forward(q, k, v, off: int, tiles: dict):
    """(O, lse) of queries q against keys k, v where query i sees keys j <= i + off."""
    B, H, T, D = q.shape
    Tk = k.shape[2]
    o = cp.empty((B, T, H, D), q.dtype).transpose(0, 2, 1, 3)
    lse = cp.empty((B, H, T), q.dtype)
    BQ, _, TY = tiles["forward"]
    shared = shared_bytes("forward", q.itemsize, D, tiles)
    kern = _kernel("forward", q.dtype, D, shared, tiles)
    kern((-(-T // BQ), B * H), (16 * TY,),
         (_ptr(q), _ptr(k), _ptr(v), _ptr(o), lse, *_strides(q), *_strides(k), *_strides(v),
          *_strides(o), np.int32(H), np.int32(T), np.int32(Tk), np.int32(off),
          q.dtype.type(1 / math.sqrt(D))), shared_mem=shared)
    return o, lse


def _delta(do, o, tiles: dict):
    """rowsum(dO * O) [B, H, T]."""
    B, H, T, D = o.shape
    delta = cp.empty((B, H, T), o.dtype)
    _kernel("delta", o.dtype, D, 0, tiles)((-(-B * H * T // 8),), (256,),
                                           (_ptr(do), _ptr(o), delta, *_strides(do),
                                            *_strides(o), np.int32(H), np.int32(T), np.int32(D),
                                            np.int32(B * H * T)))
    return delta


def _backward(q, k, v, do, lse, delta, off: int, dq, dk, dv, tiles: dict):
    """dq, dk, dv written from dO, the rows' lse and delta (contiguous [B, H, T])."""
    B, H, T, D = q.shape
    Tk = k.shape[2]
    BQ, BK, TY = tiles["backward"]
    blocks = -(-Tk // BK)
    parts = cp.empty((blocks, B * H, T, D), q.dtype)
    scale = q.dtype.type(1 / math.sqrt(D))
    shared = shared_bytes("backward", q.itemsize, D, tiles)
    kern = _kernel("backward", q.dtype, D, shared, tiles)
    kern((blocks, B * H), (16 * TY,),
         (_ptr(q), _ptr(k), _ptr(v), _ptr(do), lse, delta, _ptr(dk), _ptr(dv), parts,
          *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
          np.int32(H), np.int32(T), np.int32(Tk), np.int32(off), scale), shared_mem=shared)
    n = B * H * T * D
    _kernel("dq", q.dtype, D, 0, tiles)((-(-n // 256),), (256,),
                                        (parts, _ptr(dq), *_strides(dq), np.int32(H), np.int32(T),
                                         np.int32(Tk), np.int32(off), np.int32(D), np.int32(BK),
                                         np.int32(B * H), scale))
