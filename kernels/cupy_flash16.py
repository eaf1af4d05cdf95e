"""Fused causal attention for 16-bit q, k, v on the GPU's tensor cores: refgpt.kernels.
cupy_flash's algorithm (the online softmax forward, the backward that recomputes P from the
saved log-sum-exp, dQ summed from per-key-block parts in a fixed order) with every block
product a warp-wide ``mma.sync.m16n8k16`` on bf16 or fp16 operands with fp32 sums.

What is rounded where (u = 2^-8 for bf16, 2^-11 for fp16; everything else is fp32):

    forward    S = q K^T (fp32)  ->  m, l, P = exp(S/sqrt(D) - m) in fp32, l sums the fp32 P
               P rounded to 16 bits for the product P V (fp32 sums); O / l rounded once
               saved: O (16-bit) and lse = m + log l (fp32)
    backward   delta = rowsum(dO * O) in fp32; S, P and dP = dO V^T recomputed in fp32
               dS = P (dP - delta) rounded to 16 bits; P rounded to 16 bits for dV = P^T dO
               dK = dS^T q / sqrt(D), dV rounded once; dQ's parts fp32, their sum rounded once

The reference (refgpt.nn.attention in 16 bits) rounds P after normalising and keeps dS in
fp32, so the two differ by a few roundings of relative size u in each product's terms:
tests/test_cupy.py bounds the difference of each from exact float64 arithmetic by those
roundings (for O: u (P|v| + |O|)). In fp16, P and dS below 2^-14 are subnormal and keep
less than u relative precision (absolute spacing 2^-24): fp16 training scales the loss
(refgpt.precision's loss scaler) so that gradients stay above that range.

The fragments follow PTX's layout for m16n8k16 (lane = 4 g + t): A [16 x 16] row-major
holds rows g and g + 8, columns 2t, 2t + 1 and 2t + 8, 2t + 9 (four 32-bit words of two
16-bit values); B [16 x 8] holds rows (k) 2t, 2t + 1 and 2t + 8, 2t + 9 of column g; the fp32
accumulator C [16 x 8] rows g and g + 8, columns 2t, 2t + 1. So an accumulator's pair of
neighbouring 8-column tiles is, rounded, the A operand of the next product (FlashAttention-2's
trick: P never leaves registers). A B operand is two 32-bit loads from a shared-memory tile
stored n-major (K for q K^T, q for K q^T, dO for V dO^T), or, from a tile stored k-major (V
in P V, dO in P^T dO, q in dS^T q, K in dS K), one ldmatrix.trans of four 8 x 8 blocks
(two tiles' B operands), which transposes them on the way: every tile is kept as it is in
memory, each row padded by 16 bytes so that the loads meet no bank conflicts.

A block of four warps takes 64 queries (forward: 16 rows a warp) or 64 keys (backward: 16
keys a warp, whose dK and dV accumulate in registers over the query blocks). Head sizes a
multiple of 16 up to 128; anything else (dropout, recorded probabilities, rows not aligned
to 16 bytes) returns NotImplemented and the reference runs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cupy as cp
import numpy as np

from .cupy_half import SOURCE as HALF, ctype, is_half

BQ = BK = 64                       # queries and keys per block of four warps

_SOURCE = HALF + r"""
#define BQ 64
#define BK 64
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ unsigned ld32(const void* p) { return *(const unsigned*)p; }
template <typename T> __device__ __forceinline__ unsigned pack(float lo, float hi) {
    return (unsigned)st<T>(lo).u | ((unsigned)st<T>(hi).u << 16);
}
// c += a b on the tensor cores: a [16 x 16] and b [16 x 8] 16-bit, c fp32
template <typename T> __device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4],
                                                         unsigned b0, unsigned b1);
template <> __device__ __forceinline__ void mma<bf16>(float (&c)[4], const unsigned (&a)[4],
                                                      unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma<f16>(float (&c)[4], const unsigned (&a)[4],
                                                     unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// the shared-memory address of p, for ldmatrix
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 x; cvta.to.shared.u64 x, %1; cvt.u32.u64 %0, x; }" : "=r"(a) : "l"(p));
    return a;
}
// the B fragments of two neighbouring 8-column tiles, b[0..1] columns n0.. and b[2..3]
// columns n0 + 8.., rows k0..k0 + 15 of a row-major shared tile x (pitch ld): ldmatrix
// transposes the four 8 x 8 blocks on the way (lane l gives the address of row k0 + l % 16,
// column n0 + 8 (l / 16))
template <typename T>
__device__ __forceinline__ void load_b_trans(unsigned (&b)[4], const T* x, int ld, int k0, int n0) {
    int lane = threadIdx.x & 31;
    const T* row = x + (k0 + (lane & 15)) * ld + n0 + (lane >> 4) * 8;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(smem_addr(row)));
}
// rows r0 and r0 + 8 of x (row pitch xt, zero past `rows`), columns c.. of an A fragment
template <typename T>
__device__ __forceinline__ void load_a(unsigned (&a)[4], const T* x, long long xt, int r0,
                                       int rows, int c) {
    a[0] = r0 < rows ? ld32(x + r0 * xt + c) : 0u;
    a[1] = r0 + 8 < rows ? ld32(x + (r0 + 8) * xt + c) : 0u;
    a[2] = r0 < rows ? ld32(x + r0 * xt + c + 8) : 0u;
    a[3] = r0 + 8 < rows ? ld32(x + (r0 + 8) * xt + c + 8) : 0u;
}
// n rows of D from x (pitch xt, zero from row `rows` on) into shared memory s (pitch LS),
// 16 bytes per load
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* s, int LS, const T* x, long long xt, int n, int rows) {
    for (int e = threadIdx.x; e < n * D / 8; e += blockDim.x) {
        int r = e / (D / 8), c = (e % (D / 8)) * 8;
        *(uint4*)(s + r * LS + c) = r < rows ? *(const uint4*)(x + r * xt + c)
                                             : make_uint4(0u, 0u, 0u, 0u);
    }
}
template <typename T>
__device__ __forceinline__ void store_pair(T* x, long long xt, int r, int rows, int c,
                                           float lo, float hi) {
    if (r < rows) *(unsigned*)(x + r * xt + c) = pack<T>(lo, hi);
}

template <typename T, int D>
__global__ void __launch_bounds__(128)
flash16_forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                T* __restrict__ o, float* __restrict__ lse,
                long long qb, long long qh, long long qt, long long kb, long long kh, long long kt,
                long long vb, long long vh, long long vt, long long ob, long long oh, long long ot,
                int H, int T_, int Tk, float scale) {
    constexpr int LK = D + 8;
    extern __shared__ __align__(16) unsigned char smem[];
    T* Ks = (T*)smem;                                // [BK][LK]: B of q K^T
    T* Vs = Ks + BK * LK;                            // [BK][LK]: B of P V (transposed loads)
    const int bh = blockIdx.y, b = bh / H, h = bh % H, i0 = blockIdx.x * BQ, p0 = Tk - T_;
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    q += b * qb + h * qh; k += b * kb + h * kh; v += b * vb + h * vh; o += b * ob + h * oh;
    const int r0 = i0 + 16 * warp + g;               // this thread's rows: r0 and r0 + 8
    unsigned qa[D / 16][4];
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a(qa[kk], q, qt, r0, T_, 16 * kk + 2 * t);
    float acc[D / 8][4] = {};
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};
    const int end = min(Tk, p0 + i0 + BQ);           // the keys some row of the block sees
    for (int j0 = 0; j0 < end; j0 += BK) {
        __syncthreads();
        load_tile<T, D>(Ks, LK, k + j0 * kt, kt, BK, Tk - j0);
        load_tile<T, D>(Vs, LK, v + j0 * vt, vt, BK, Tk - j0);
        __syncthreads();
        float s[BK / 8][4] = {};
        #pragma unroll
        for (int n = 0; n < BK / 8; ++n)
            #pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const T* kb_ = Ks + (8 * n + g) * LK + 16 * kk + 2 * t;
                mma<T>(s[n], qa[kk], ld32(kb_), ld32(kb_ + 8));
            }
        float mx[2] = {m[0], m[1]};
        const bool whole = j0 + BK <= min(Tk, p0 + i0 + 1);     // every row sees every key
        #pragma unroll
        for (int n = 0; n < BK / 8; ++n)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                int row = r0 + (e >> 1) * 8, key = j0 + 8 * n + 2 * t + (e & 1);
                s[n][e] = whole || (key < Tk && key <= p0 + row) ? s[n][e] * scale : neg_inf();
                mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
            }
        #pragma unroll
        for (int i = 0; i < 2; ++i) {                // the row's max over its 4 threads
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            float alpha = __expf(m[i] - mx[i]);      // 0 on the first block (m = -inf)
            m[i] = mx[i];
            l[i] *= alpha;
            #pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) { acc[dn][2 * i] *= alpha; acc[dn][2 * i + 1] *= alpha; }
        }
        #pragma unroll
        for (int n = 0; n < BK / 8; ++n)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[n][e] = __expf(s[n][e] - m[e >> 1]);
                l[e >> 1] += s[n][e];
            }
        #pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            const unsigned pa[4] = {pack<T>(s[2 * kk][0], s[2 * kk][1]),
                                    pack<T>(s[2 * kk][2], s[2 * kk][3]),
                                    pack<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            #pragma unroll
            for (int dn = 0; dn < D / 8; dn += 2) {
                unsigned vb_[4];
                load_b_trans(vb_, Vs, LK, 16 * kk, 8 * dn);
                mma<T>(acc[dn], pa, vb_[0], vb_[1]);
                mma<T>(acc[dn + 1], pa, vb_[2], vb_[3]);
            }
        }
    }
    #pragma unroll
    for (int i = 0; i < 2; ++i) {                    // each thread summed its own columns
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
    #pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
        store_pair(o, ot, r0, T_, 8 * dn + 2 * t, acc[dn][0] / l[0], acc[dn][1] / l[0]);
        store_pair(o, ot, r0 + 8, T_, 8 * dn + 2 * t, acc[dn][2] / l[1], acc[dn][3] / l[1]);
    }
    if (t == 0) {
        if (r0 < T_) lse[(long long)bh * T_ + r0] = m[0] + logf(l[0]);
        if (r0 + 8 < T_) lse[(long long)bh * T_ + r0 + 8] = m[1] + logf(l[1]);
    }
}

template <typename T, int D>
__global__ void __launch_bounds__(128)
flash16_backward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 const T* __restrict__ dout, const float* __restrict__ lse,
                 const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv,
                 float* __restrict__ parts,
                 long long qb, long long qh, long long qt, long long kb, long long kh, long long kt,
                 long long vb, long long vh, long long vt, long long db, long long dh, long long dt,
                 long long kgb, long long kgh, long long kgt, long long vgb, long long vgh,
                 long long vgt, int H, int T_, int Tk, float scale) {
    constexpr int LQ = D + 8, LS = BK + 8;
    extern __shared__ __align__(16) unsigned char smem[];
    T* Qs = (T*)smem;                                // [BQ][LQ]: B of K q^T, of dS^T q (trans)
    T* Ds = Qs + BQ * LQ;                            // [BQ][LQ]: B of V dO^T, of P^T dO (trans)
    T* Ks = Ds + BQ * LQ;                            // [BK][LQ]: B of dS K (transposed loads)
    T* Ss = Ks + BK * LQ;                            // [BQ][LS]: dS, A of dS K
    float* lse_s = (float*)(Ss + BQ * LS);
    float* delta_s = lse_s + BQ;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, j0 = blockIdx.x * BK, p0 = Tk - T_;
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    q += b * qb + h * qh; k += b * kb + h * kh; v += b * vb + h * vh; dout += b * db + h * dh;
    lse += (long long)bh * T_; delta += (long long)bh * T_;
    const int kr = j0 + 16 * warp + g;               // this thread's keys: kr and kr + 8
    unsigned ka[D / 16][4], va[D / 16][4];
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        load_a(ka[kk], k, kt, kr, Tk, 16 * kk + 2 * t);
        load_a(va[kk], v, vt, kr, Tk, 16 * kk + 2 * t);
    }
    load_tile<T, D>(Ks, LQ, k + j0 * kt, kt, BK, Tk - j0);
    float dka[D / 8][4] = {}, dva[D / 8][4] = {};
    for (int i0 = max(0, j0 - p0) / BQ * BQ; i0 < T_; i0 += BQ) {    // the queries that see j0..
        __syncthreads();
        load_tile<T, D>(Qs, LQ, q + i0 * qt, qt, BQ, T_ - i0);
        load_tile<T, D>(Ds, LQ, dout + i0 * dt, dt, BQ, T_ - i0);
        for (int r = threadIdx.x; r < BQ; r += blockDim.x) {
            lse_s[r] = i0 + r < T_ ? lse[i0 + r] : 0.f;
            delta_s[r] = i0 + r < T_ ? delta[i0 + r] : 0.f;
        }
        __syncthreads();
        float s[BQ / 8][4] = {}, dp[BQ / 8][4] = {};   // S^T and dP^T: 16 keys x BQ queries
        #pragma unroll
        for (int n = 0; n < BQ / 8; ++n)
            #pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const T* qb_ = Qs + (8 * n + g) * LQ + 16 * kk + 2 * t;
                const T* db_ = Ds + (8 * n + g) * LQ + 16 * kk + 2 * t;
                mma<T>(s[n], ka[kk], ld32(qb_), ld32(qb_ + 8));
                mma<T>(dp[n], va[kk], ld32(db_), ld32(db_ + 8));
            }
        #pragma unroll
        for (int n = 0; n < BQ / 8; ++n)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {           // P^T and dS^T = P^T (dP^T - delta)
                int key = kr + (e >> 1) * 8, c = 8 * n + 2 * t + (e & 1), row = i0 + c;
                float p = key < Tk && row < T_ && key <= p0 + row
                              ? __expf(s[n][e] * scale - lse_s[c]) : 0.f;
                s[n][e] = p;
                dp[n][e] = p * (dp[n][e] - delta_s[c]);
                Ss[c * LS + 16 * warp + g + (e >> 1) * 8] = st<T>(dp[n][e]);
            }
        #pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk) {       // dV += P^T dO, dK += dS^T q
            const unsigned pa[4] = {pack<T>(s[2 * kk][0], s[2 * kk][1]),
                                    pack<T>(s[2 * kk][2], s[2 * kk][3]),
                                    pack<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            const unsigned da[4] = {pack<T>(dp[2 * kk][0], dp[2 * kk][1]),
                                    pack<T>(dp[2 * kk][2], dp[2 * kk][3]),
                                    pack<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                    pack<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
            #pragma unroll
            for (int dn = 0; dn < D / 8; dn += 2) {
                unsigned db_[4], qb_[4];
                load_b_trans(db_, Ds, LQ, 16 * kk, 8 * dn);
                load_b_trans(qb_, Qs, LQ, 16 * kk, 8 * dn);
                mma<T>(dva[dn], pa, db_[0], db_[1]);
                mma<T>(dva[dn + 1], pa, db_[2], db_[3]);
                mma<T>(dka[dn], da, qb_[0], qb_[1]);
                mma<T>(dka[dn + 1], da, qb_[2], qb_[3]);
            }
        }
        __syncthreads();                             // every warp's dS is in Ss
        const int qr = 16 * warp + g;                // dQ's part: rows qr, qr + 8 of the block
        unsigned sa[BK / 16][4];
        #pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) load_a(sa[kk], Ss, LS, qr, BQ, 16 * kk + 2 * t);
        float* part = parts + ((long long)blockIdx.x * gridDim.y + bh) * T_ * D;
        #pragma unroll
        for (int dn = 0; dn < D / 8; dn += 2) {
            float c[2][4] = {};
            #pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                unsigned kb_[4];
                load_b_trans(kb_, Ks, LQ, 16 * kk, 8 * dn);
                mma<T>(c[0], sa[kk], kb_[0], kb_[1]);
                mma<T>(c[1], sa[kk], kb_[2], kb_[3]);
            }
            #pragma unroll
            for (int x = 0; x < 2; ++x) {
                int col = 8 * (dn + x) + 2 * t;
                if (i0 + qr < T_)
                    *(float2*)(part + (i0 + qr) * D + col) = make_float2(c[x][0], c[x][1]);
                if (i0 + qr + 8 < T_)
                    *(float2*)(part + (i0 + qr + 8) * D + col) = make_float2(c[x][2], c[x][3]);
            }
        }
    }
    dk += b * kgb + h * kgh; dv += b * vgb + h * vgh;
    #pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
        int col = 8 * dn + 2 * t;
        store_pair(dk, kgt, kr, Tk, col, dka[dn][0] * scale, dka[dn][1] * scale);
        store_pair(dk, kgt, kr + 8, Tk, col, dka[dn][2] * scale, dka[dn][3] * scale);
        store_pair(dv, vgt, kr, Tk, col, dva[dn][0], dva[dn][1]);
        store_pair(dv, vgt, kr + 8, Tk, col, dva[dn][2], dva[dn][3]);
    }
}

// dq = scale * (sum over the key blocks row t sees, in their order, of the parts), rounded
template <typename T>
__global__ void flash16_dq(const float* __restrict__ parts, T* __restrict__ dq, long long qb,
                           long long qh, long long qt, int H, int T_, int Tk, int D, int BH,
                           float scale) {
    long long n = (long long)BH * T_ * D;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        int d = i % D, t = (i / D) % T_, bh = i / ((long long)T_ * D);
        int last = (Tk - T_ + t) / BK;
        float sum = 0.f;
        for (int j = 0; j <= last; ++j) sum += parts[((long long)j * BH + bh) * T_ * D + (long long)t * D + d];
        dq[(bh / H) * qb + (bh % H) * qh + t * qt + d] = st<T>(scale * sum);
    }
}

// delta = rowsum(dO * O) in fp32, a warp per row
template <typename T>
__global__ void flash16_delta(const T* __restrict__ dout, const T* __restrict__ o,
                              float* __restrict__ delta, long long db, long long dh, long long dt,
                              long long ob, long long oh, long long ot, int H, int T_, int D,
                              long long rows) {
    long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    int bh = row / T_, t = row % T_, lane = threadIdx.x & 31;
    const T* x = dout + (bh / H) * db + (bh % H) * dh + t * dt;
    const T* y = o + (bh / H) * ob + (bh % H) * oh + t * ot;
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s += ld(x[d]) * ld(y[d]);
    for (int w = 16; w; w >>= 1) s += __shfl_xor_sync(0xffffffffu, s, w);
    if (lane == 0) delta[row] = s;
}
"""


@functools.cache
def _module(t: str, D: int):
    names = [f"flash16_forward<{t}, {D}>", f"flash16_backward<{t}, {D}>", f"flash16_dq<{t}>",
             f"flash16_delta<{t}>"]
    mod = cp.RawModule(code=_SOURCE, options=("--std=c++17",), name_expressions=names)
    return dict(zip(("forward", "backward", "dq", "delta"), map(mod.get_function, names)))


def shared_bytes(which: str, D: int) -> int:
    if which == "forward":
        return 2 * 2 * BK * (D + 8)
    return 2 * ((2 * BQ + BK) * (D + 8) + BQ * (BK + 8)) + 8 * BQ


def _kernel(which: str, dtype, D: int):
    kern = _module(ctype(dtype), D)[which]
    shared = shared_bytes(which, D) if which in ("forward", "backward") else 0
    if shared > kern.max_dynamic_shared_size_bytes:
        kern.max_dynamic_shared_size_bytes = shared
    return kern, shared


def _strides(a) -> list:
    return [np.int64(s // a.itemsize) for s in a.strides[:3]]


def _ptr(a):
    return np.uint64(a.data.ptr)


def _aligned(x) -> bool:
    """Rows of x start on 16 bytes (the tiles' vector loads) and hold D contiguous values."""
    return (x.ndim == 4 and x.strides[-1] == 2 and x.data.ptr % 16 == 0
            and all(s % 16 == 0 for s in x.strides[:3]))


def fits(q, k, v) -> bool:
    D = q.shape[-1]
    return (is_half(q) and D % 16 == 0 and D <= 128
            and all(x.dtype == q.dtype and _aligned(x) for x in (q, k, v)))


def check_queries_last(T: int, Tk: int, p0: int) -> None:
    """The fused kernels' causal mask: the T queries are the last of the Tk positions."""
    if p0 != Tk - T:
        raise ValueError(f"queries must be the last {T} of the {Tk} positions (p0 = {p0})")


@dataclass
class Saved16:
    """What the 16-bit forward keeps for its backward: O (16-bit) and lse (fp32)."""
    o: cp.ndarray                  # [B, H, T, D]
    lse: cp.ndarray                # [B, H, T] float32


def attention_forward(q, k, v, p0):
    """O [B, H, T, D] (a view of a [B, T, H, D] array) and Saved16; queries the last T of
    the Tk positions (p0 = Tk - T)."""
    B, H, T, D = q.shape
    Tk = k.shape[2]
    check_queries_last(T, Tk, p0)
    o = cp.empty((B, T, H, D), q.dtype).transpose(0, 2, 1, 3)
    lse = cp.empty((B, H, T), np.float32)
    kern, shared = _kernel("forward", q.dtype, D)
    kern((-(-T // BQ), B * H), (128,),
         (*map(_ptr, (q, k, v, o, lse)), *_strides(q), *_strides(k), *_strides(v), *_strides(o),
          np.int32(H), np.int32(T), np.int32(Tk), np.float32(1 / math.sqrt(D))),
         shared_mem=shared)
    return o, Saved16(o, lse)


def attention_backward(q, k, v, saved: Saved16, do, dq, dk, dv):
    """dq, dk, dv (16-bit, written into the given views) from the forward's O and lse."""
    if not _aligned(do):
        do = cp.ascontiguousarray(do)
    if not all(_aligned(g) for g in (dq, dk, dv)):
        raise ValueError("dq, dk and dv need contiguous rows of D starting on 16 bytes")
    B, H, T, D = q.shape
    Tk = k.shape[2]
    o = saved.o
    delta = cp.empty((B, H, T), np.float32)
    kern, _ = _kernel("delta", q.dtype, D)
    kern((-(-B * H * T // 8),), (256,), (*map(_ptr, (do, o, delta)), *_strides(do), *_strides(o),
                                        np.int32(H), np.int32(T), np.int32(D),
                                        np.int64(B * H * T)))
    blocks = -(-Tk // BK)
    parts = cp.empty((blocks, B * H, T, D), np.float32)
    scale = np.float32(1 / math.sqrt(D))
    kern, shared = _kernel("backward", q.dtype, D)
    kern((blocks, B * H), (128,),
         (*map(_ptr, (q, k, v, do, saved.lse, delta, dk, dv, parts)), *_strides(q), *_strides(k),
          *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), np.int32(H), np.int32(T),
          np.int32(Tk), scale), shared_mem=shared)
    n = B * H * T * D
    kern, _ = _kernel("dq", q.dtype, D)
    kern((min(-(-n // 256), 65535),), (256,),
         (_ptr(parts), _ptr(dq), *_strides(dq), np.int32(H), np.int32(T), np.int32(Tk), np.int32(D),
          np.int32(B * H), scale))
