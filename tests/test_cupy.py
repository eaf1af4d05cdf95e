"""The cupy backend: its kernels against their NumPy references, and training on the GPU
equal to the numpy backend (float64 to 1e-10, float32 loosely, 16 bits within 2^-8).
Skipped where CuPy or an NVIDIA GPU is missing (this project's CI machine has none; the GPU
node runs these)."""

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
try:
    GPUS = cp.cuda.runtime.getDeviceCount()
except cp.cuda.runtime.CUDARuntimeError:
    GPUS = 0
pytestmark = pytest.mark.skipif(GPUS == 0, reason="no NVIDIA GPU")

from refgpt import backend  # noqa: E402
from refgpt.config import ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from refgpt.engine import Trainer  # noqa: E402
from refgpt.nn import attention  # noqa: E402

TOL = {np.float64: dict(rtol=1e-12, atol=1e-14), np.float32: dict(rtol=2e-5, atol=1e-5)}


def cases(rng, dtype):
    r = lambda *s: rng.standard_normal(s).astype(dtype)   # noqa: E731
    v = np.abs(r(301))
    return {
        "gelu_forward": [(r(3, 5, 7), "tanh"), (r(3, 5, 7), "erf")],
        "gelu_backward": [(r(4, 9), r(4, 9), "tanh"), (r(4, 9), r(4, 9), "erf")],
        "bias_gelu_forward": [(r(3, 5, 7), r(7), "tanh"), (r(3, 5, 7), r(7), "erf")],
        "bias_gelu_backward": [(r(4, 9), r(4, 9), "tanh"), (r(4, 9), r(4, 9), "erf")],
        "adamw_update": [(r(301), r(301), r(301), v, 1e-3, 0.9, 0.95, 1e-8, 0.19, 0.0975),
                         (r(301), r(301), r(301), v, 1e-3, 0.9, 0.95, 1e-8, 0.19, 0.0975, 0.99)],
        "causal_softmax": [(r(2, 3, 5, 8), 3), (r(2, 3, 6, 6), 0), (r(1, 2, 300, 300), 0),
                           (r(1, 1, 4, 1500), 1496)],
        "column_sum": [(r(3, 7),), (np.round(8 * r(1000, 513)) / 8,)],   # sums exact in any order
        "cross_entropy": [(r(9, 64), 45, rng.integers(0, 45, 9), 9.0, True),   # in place
                          (r(9, 64), 45, rng.integers(0, 45, 9), 9.0, False),
                          (3 * r(5, 700), 601, rng.integers(0, 601, 5), 4.0, True)],
        "scatter_add_rows": [(r(10, 4), rng.integers(0, 10, 20), r(20, 4))],
        "layernorm_forward": [(r(3, 5, 300) + 2.0, r(300), r(300), 1e-5)],
        "layernorm_backward": [(r(7, 300), r(7, 300), np.abs(r(7, 1)) + 0.5, r(300))],
        "softmax_backward": [(np.abs(r(2, 3, 5, 300)), r(2, 3, 5, 300)),
                             (np.tril(np.abs(r(1, 1, 9, 1500)), 1491), r(1, 1, 9, 1500))],
        "causal_matmul_nt": [(r(2, 3, 5, 4), r(2, 3, 9, 4), 0.5), (r(1, 2, 300, 8), r(1, 2, 300, 8))],
        "causal_matmul_nn": [(np.tril(r(2, 3, 6, 6)), r(2, 3, 6, 4)),
                             (np.tril(r(1, 2, 5, 9), 4), r(1, 2, 9, 3), 0.5)],
        "causal_matmul_tn": [(np.tril(r(2, 3, 6, 6)), r(2, 3, 6, 4)),
                             (np.tril(r(1, 2, 5, 9), 4), r(1, 2, 5, 3), 0.5)],
    }


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cupy_kernels_equal_their_references(dtype, kernels):
    gpu = backend.Backend("cupy")
    fused = set(backend.FUSED_ATTENTION)                          # their own tests, below
    fused |= {"matmul", "add_matmul", "residual"}                 # 16-bit only: below
    replaced = {n for n, k in kernels.items() if gpu.replaces(k)}
    assert sorted(replaced - fused) == sorted(cases(np.random.default_rng(0), dtype))
    for name, calls in cases(np.random.default_rng(0), dtype).items():
        for args in calls:
            ref_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
            gpu_args = [cp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
            want = kernels[name].reference(*ref_args)
            got = gpu.implementation(kernels[name])(*gpu_args)
            want = [] if want is None else want if isinstance(want, (tuple, list)) else [want]
            got = [] if got is None else got if isinstance(got, (tuple, list)) else [got]
            assert len(got) == len(want), name
            # the results, then the arguments (which in-place kernels change)
            arrays = [i for i, a in enumerate(args) if isinstance(a, np.ndarray)]
            for w, g in zip([*want, *(ref_args[i] for i in arrays)],
                            [*got, *(gpu_args[i] for i in arrays)]):
                g = cp.asnumpy(g) if isinstance(g, cp.ndarray) else g
                np.testing.assert_allclose(g, w, **TOL[dtype], err_msg=name)


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_16_bit_conversions_round_as_ml_dtypes(name, conversion_values):
    from refgpt.kernels import cupy_half
    from refgpt.precision import dtype_of
    t = dtype_of(name)
    x = conversion_values
    with np.errstate(over="ignore"):                    # float16: 3.4e38 becomes inf
        want = x.astype(t)
    got = cp.asnumpy(cupy_half.narrow(cp.asarray(x), t).view(cp.uint16))
    nan = np.isnan(x)                                   # a quiet nan either way, payloads aside
    assert np.array_equal(got[~nan], want.view(np.uint16)[~nan])
    assert np.all(np.isnan(got[nan].view(t).astype(np.float32)))
    wide = cupy_half.widen(cp.asarray(want.view(np.uint16)).view(t))
    assert np.array_equal(cp.asnumpy(wide), want.astype(np.float32), equal_nan=True)


def sixteen_bit_cases(t, rng):
    """(kernel name, arguments) for every kernel the cupy backend runs on 16-bit arrays: the
    element-wise and row kernels, the layers' GEMMs and the attention's causal products on
    views of a qkv projection (the layouts the model gives them)."""
    from refgpt.nn.layernorm import layernorm_forward
    r = lambda *s, scale=1.0: (scale * rng.standard_normal(s)).astype(t)   # noqa: E731
    x, dy, g, b = r(3, 5, 64), r(3, 5, 64), r(64), r(64)
    n = layernorm_forward.reference(x, g, b, 1e-5)
    qkv = r(2, 9, 3, 3, 8)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))   # [2, 3, 9, 8] views
    s = attention.causal_matmul_nt.reference(q, k, 0.3)
    p = attention.causal_softmax.reference(s.copy(), 0).astype(t)
    w, bias = r(64, 48, scale=0.1), r(48)
    return [("residual", (x, dy)), ("gelu_forward", (x, "tanh")), ("gelu_backward", (x, dy, "erf")),
            ("bias_gelu_forward", (x, b, "tanh")), ("bias_gelu_backward", (x, dy, "tanh")),
            ("column_sum", (x.reshape(-1, 64),)), ("layernorm_forward", (x, g, b, 1e-5)),
            ("layernorm_backward", (dy, n[1], n[2], g)),
            ("cross_entropy", (r(6, 16, scale=3.0), 12, np.array([0, 5, 9, 2, 11, 3]), 6.0,
                               True)),
            ("scatter_add_rows", (np.zeros((10, 64), np.float32), np.arange(15) % 10,
                                  x.reshape(-1, 64))),
            ("scatter_add_rows", (r(10, 64), np.arange(10)[::-1].copy(), x.reshape(-1, 64)[:10])),
            ("softmax_backward", (p, s)),
            ("causal_matmul_nt", (q, k, 0.3)), ("causal_matmul_nn", (p, v, 0.5)),
            ("causal_matmul_nn", (s, k, 0.5)), ("causal_matmul_tn", (p, q, 0.5)),
            ("causal_matmul_tn", (s, q, 0.5)),
            ("matmul", (x.reshape(-1, 64), w)), ("matmul", (x.reshape(-1, 64), w, bias)),
            ("matmul", (x.reshape(-1, 64), w, None, False)),
            ("matmul", (dy.reshape(-1, 64), w[:, :64].T.copy().T)),        # a transposed view
            ("add_matmul", (r(64, 64).astype(np.float32), x.reshape(-1, 64).T, dy.reshape(-1, 64)))]


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_cupy_kernels_on_16_bit_arrays_round_as_the_references(name, kernels):
    """Each cupy kernel that takes 16-bit arrays against its reference, results and in-place
    arguments: the same types; fp32 results to float32's tolerance (the GEMMs' sums run in
    another order), 16-bit ones within one 16-bit ulp (the fp32 values they round differ in
    their last bits, so a rounding may go the other way)."""
    from refgpt.precision import dtype_of
    t = dtype_of(name)
    gpu = backend.Backend("cupy")
    ulp = 2.0 ** (-7 if name == "bfloat16" else -10)
    cases = sixteen_bit_cases(t, np.random.default_rng(6))
    fused = set(backend.FUSED_ATTENTION)          # rounds otherwise: its own test below
    assert {n for n, k in kernels.items() if gpu.replaces(k) and "cupy" in k.half} - fused == \
        {n for n, _ in cases}
    for kname, args in cases:
        kern = kernels[kname]
        ref_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        gpu_args = [cp.asarray(np.ascontiguousarray(a).view(np.uint16)).view(a.dtype)
                    .reshape(a.shape) if isinstance(a, np.ndarray) and a.dtype == t else
                    cp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
        want = kern.reference(*ref_args)
        got = gpu.implementation(kern)(*gpu_args)
        want = [] if want is None else want if isinstance(want, (tuple, list)) else [want]
        got = [] if got is None else got if isinstance(got, (tuple, list)) else [got]
        arrays = [i for i, a in enumerate(args) if isinstance(a, np.ndarray)]
        for w, g in zip([*want, *(ref_args[i] for i in arrays)],
                        [*got, *(gpu_args[i] for i in arrays)]):
            if not isinstance(w, np.ndarray):
                assert abs(g - w) <= 1e-5 * abs(w), kname
                continue
            g = cp.asnumpy(g.view(cp.uint16)).view(t) if g.dtype == t else cp.asnumpy(g)
            assert g.dtype == w.dtype and g.shape == w.shape, (kname, g.dtype, w.dtype)
            g32, w32 = g.astype(np.float32), w.astype(np.float32)
            tol = (ulp * np.abs(w32) + ulp * 1e-3 * np.abs(w32).max() if w.dtype == t else
                   1e-5 * np.abs(w32) + 1e-6 * np.abs(w32).max())
            assert np.all(np.abs(g32 - w32) <= tol), kname


@pytest.mark.parametrize("blocks", [1, 3, 4])
@pytest.mark.parametrize("T, Tk", [(64, 64), (1, 33), (50, 70)])
def test_causal_products_on_views_of_the_qkv_projection(blocks, T, Tk, kernels):
    from refgpt.kernels import cupy_attention
    rng = np.random.default_rng(5)
    B, H, D = 2, 3, 8
    qkv = rng.standard_normal((B, Tk, 3, H, D))               # q: of the last T positions
    p = np.tril(rng.standard_normal((B, H, T, Tk)), Tk - T)

    def views(xp):
        a = xp.asarray(qkv)
        q = a[:, Tk - T:, 0].transpose(0, 2, 1, 3)              # [B, H, T, D], strided
        k, v = a[:, :, 1].transpose(0, 2, 1, 3), a[:, :, 2].transpose(0, 2, 1, 3)
        return q, k, v, xp.asarray(p)
    (q, k, v, pn), (qg, kg, vg, pg) = views(np), views(cp)
    for name, args, gpu in [("causal_matmul_nt", (q, k, 0.5), (qg, kg, 0.5)),
                            ("causal_matmul_nn", (pn, v), (pg, vg, 1.0)),
                            ("causal_matmul_tn", (pn, q, 0.25), (pg, qg, 0.25))]:
        want = kernels[name].reference(*args)
        got = getattr(cupy_attention, name)(*gpu, blocks=blocks)
        np.testing.assert_allclose(cp.asnumpy(got), want, rtol=1e-12, atol=1e-12, err_msg=name)
        if name != "causal_matmul_nt":                          # into a strided view
            into = cp.zeros((B, Tk, 3, H, D))[:, :want.shape[2], 1].transpose(0, 2, 1, 3)
            assert getattr(cupy_attention, name)(*gpu, out=into, blocks=blocks) is into
            np.testing.assert_allclose(cp.asnumpy(into), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("T, Tk, D", [(64, 64, 64), (50, 70, 16), (130, 130, 32), (1, 33, 128),
                                      (200, 200, 64), (97, 97, 128)])
def test_flash_attention_equals_the_reference(dtype, T, Tk, D):
    """The fused kernels on views of the qkv projection (queries the last T of Tk positions,
    as with a KV cache) against the reference, forward and backward; the backward twice, for
    the same bits."""
    from refgpt.kernels import cupy_flash
    rng = np.random.default_rng(T + Tk + D)
    B, H = 2, 3
    qkv = rng.standard_normal((B, Tk, 3, H, D)).astype(dtype)
    dout = rng.standard_normal((B, T, H, D)).astype(dtype)

    def heads(qkv, dout):                                     # [B, H, T or Tk, D] views
        return (qkv[:, Tk - T:, 0].transpose(0, 2, 1, 3), qkv[:, :, 1].transpose(0, 2, 1, 3),
                qkv[:, :, 2].transpose(0, 2, 1, 3), dout.transpose(0, 2, 1, 3))
    q, k, v, do = heads(qkv, dout)
    o_ref, saved = attention.attention_forward.reference(q, k, v, Tk - T)
    want = [np.empty_like(q), np.empty_like(k), np.empty_like(v)]
    attention.attention_backward.reference(q, k, v, saved, do, *want)
    gq, gk, gv, gdo = heads(cp.asarray(qkv), cp.asarray(dout))
    o, saved = cupy_flash.attention_forward(gq, gk, gv, Tk - T)
    assert isinstance(saved, cupy_flash.Saved) and saved.o is o   # the fused path
    lse = saved.lse
    tol = TOL[dtype] if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(cp.asnumpy(o), o_ref, **tol)
    s = np.where(np.tril(np.ones((T, Tk), bool), Tk - T), q @ k.swapaxes(-1, -2) / np.sqrt(D),
                 -np.inf)
    np.testing.assert_allclose(cp.asnumpy(lse), np.logaddexp.reduce(s, axis=-1), **tol)
    results = []
    for _ in range(2):
        dqkv = cp.full((B, Tk, 3, H, D), np.nan, dtype)
        dq, dk, dv, _ = heads(dqkv, dout)
        cupy_flash.attention_backward(gq, gk, gv, saved, gdo, dq, dk, dv)
        for g, w in zip((dq, dk, dv), want):
            np.testing.assert_allclose(cp.asnumpy(g), w, **tol)
        results.append(cp.asnumpy(dqkv))
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n, D", [(64, 64), (97, 32), (200, 128)])
def test_flash_ring_blocks_equal_their_references(dtype, causal, n, D):
    """Context parallelism's ring blocks by the fused kernels (the diagonal block, and a block
    of earlier keys) against the references: O and lse, and the gradients added into views
    of the ring's accumulators (what they held kept)."""
    from refgpt.kernels import cupy_flash
    rng = np.random.default_rng(n + D + causal)
    B, H = 2, 3
    q, k, v = rng.standard_normal((3, B, n, H, D)).astype(dtype).transpose(0, 1, 3, 2, 4)
    do = rng.standard_normal((B, H, n, D)).astype(dtype)
    o_ref, lse_ref = attention.attention_block_forward.reference(q, k, v, causal)
    gq, gk, gv, gdo = (cp.asarray(x) for x in (q, k, v, do))
    o, lse = cupy_flash.attention_block_forward(gq, gk, gv, causal)
    tol = TOL[dtype] if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(cp.asnumpy(o), o_ref, **tol)
    np.testing.assert_allclose(cp.asnumpy(lse), lse_ref, **tol)
    delta = (do * o_ref).sum(-1)
    acc = rng.standard_normal((3, B, H, 2 * n, D)).astype(dtype)
    want = acc.copy()
    attention.attention_block_backward.reference(q, k, v, do, lse_ref, delta, causal, None,
                                                 *want[:, :, :, :n])
    got = cp.asarray(acc)
    cupy_flash.attention_block_backward(gq, gk, gv, gdo, cp.asarray(lse_ref), cp.asarray(delta),
                                        causal, None, *got[:, :, :, :n])
    np.testing.assert_allclose(cp.asnumpy(got), want, **tol)


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
@pytest.mark.parametrize("T, Tk, D", [(64, 64, 64), (50, 70, 16), (130, 130, 32), (1, 33, 128),
                                      (200, 200, 64), (97, 97, 128)])
def test_flash_attention_16_bits_within_its_roundings(name, T, Tk, D):
    """The tensor-core kernels (refgpt.kernels.cupy_flash16) against exact float64 arithmetic
    on the same 16-bit inputs. Each result is a sum of products whose factors the kernels
    round once to 16 bits, and the result is rounded once. A rounding errs by at most
    u |x| + eta: u = 2^-8 for bf16, 2^-11 for fp16, and eta half the spacing of the
    subnormals (2^-25 for fp16: P and dS below 2^-14 lose relative precision, which is why
    fp16 training scales the loss; negligible for bf16). Summed over the terms (M: the causal
    mask), and doubled for fp32 sums and second-order terms:
      O:   P rounded                     e_O  = u (P |v| + |O|) + eta (M |v| + 1)
      dV:  P rounded                     (u P + eta M)^T |dO| + u |dV| + eta
      dS:  rounded, with delta = rowsum(dO O) from the kernel's O:
                                         e_dS = u |dS| + eta M + P rowsum(|dO| e_O)
      dQ, dK:                            e_dS |k| / sqrt(D) + u |dQ| + eta, and e_dS^T |q| ...
    The backward runs twice: the same bits (no atomics)."""
    from refgpt.kernels import cupy_flash, cupy_flash16
    from refgpt.precision import dtype_of
    t = dtype_of(name)
    u, eta = (2.0 ** -8, 2.0 ** -134) if name == "bfloat16" else (2.0 ** -11, 2.0 ** -25)
    rng = np.random.default_rng(T + Tk + D)
    B, H = 2, 3
    qkv = rng.standard_normal((B, Tk, 3, H, D)).astype(t)
    dout = rng.standard_normal((B, T, H, D)).astype(t)

    def heads(qkv, dout):
        return (qkv[:, Tk - T:, 0].transpose(0, 2, 1, 3), qkv[:, :, 1].transpose(0, 2, 1, 3),
                qkv[:, :, 2].transpose(0, 2, 1, 3), dout.transpose(0, 2, 1, 3))
    q, k, v, do = (x.astype(np.float64) for x in heads(qkv, dout))
    mask = np.tril(np.ones((T, Tk)), Tk - T)
    s = np.where(mask > 0, q @ k.swapaxes(-1, -2) / np.sqrt(D), -np.inf)
    lse = np.logaddexp.reduce(s, axis=-1)
    p = np.exp(s - lse[..., None])
    o = p @ v
    ds = p * (do @ v.swapaxes(-1, -2) - (do * o).sum(-1, keepdims=True))
    want = {"o": o, "dq": ds @ k / np.sqrt(D), "dk": ds.swapaxes(-1, -2) @ q / np.sqrt(D),
            "dv": p.swapaxes(-1, -2) @ do}
    e_o = u * (p @ np.abs(v) + np.abs(o)) + eta * (mask @ np.abs(v) + 1)
    e_ds = u * np.abs(ds) + eta * mask + p * (np.abs(do) * e_o).sum(-1, keepdims=True)
    bound = {"o": e_o,
             "dv": (u * p + eta * mask).swapaxes(-1, -2) @ np.abs(do) + u * np.abs(want["dv"])
             + eta,
             "dq": e_ds @ np.abs(k) / np.sqrt(D) + u * np.abs(want["dq"]) + eta,
             "dk": e_ds.swapaxes(-1, -2) @ np.abs(q) / np.sqrt(D) + u * np.abs(want["dk"]) + eta}

    def host(x):
        return cp.asnumpy(x.view(cp.uint16)).view(t).astype(np.float64)

    def gpu(x):
        return cp.asarray(x.view(np.uint16)).view(t)
    gq, gk, gv, gdo = heads(gpu(qkv), gpu(dout))
    got_o, saved = cupy_flash.attention_forward(gq, gk, gv, Tk - T)
    assert isinstance(saved, cupy_flash16.Saved16) and saved.o is got_o    # the tensor cores
    assert np.all(np.abs(host(got_o) - o) <= 2 * bound["o"])        # and lse in fp32:
    np.testing.assert_allclose(cp.asnumpy(saved.lse), lse, rtol=1e-5, atol=1e-5)
    results = []
    for _ in range(2):
        dqkv = cp.full((B, Tk, 3, H, D), 0xFFFF, cp.uint16).view(t)     # nan
        dq, dk, dv, _ = heads(dqkv, gdo)
        cupy_flash.attention_backward(gq, gk, gv, saved, gdo, dq, dk, dv)
        for key, g in (("dq", dq), ("dk", dk), ("dv", dv)):
            err = np.abs(host(g) - want[key])
            assert np.all(err <= 2 * bound[key]), (key, (err / bound[key]).max())
        results.append(cp.asnumpy(dqkv.view(cp.uint16)))
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("dropout", [0.1, 0.0])          # 0.0: the fused attention kernels
def test_training_on_the_gpu_equals_numpy(dtype, dropout, tmp_path):
    """float64 to 1e-10, float32 to 2e-4. In 16 bits each op may round the other way where
    the GPU's fp32 sums differ in their last bits from NumPy's: a one-ulp difference in a
    few activations (2^-8 relative in bf16, 2^-11 in fp16), which moves the loss by far less
    than an ulp of the activations (it averages over every token); 2^-8 of the loss bounds it
    with room. The weights are compared after the optimizer's steps, where AdamW's
    normalised update amplifies a tiny gradient difference up to the learning rate (1e-2) for
    a weight whose gradient is near zero: so up to lr per step, 3 lr in all."""
    def run(name):
        tcfg = TrainConfig(micro_batch_size=2, global_batch_size=4, train_iters=3, lr=1e-2,
                           dtype=dtype, synthetic_data=True, eval_iters=1, backend=name,
                           save=str(tmp_path / name))
        cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=80,
                          vocab_size=45, vocab_multiple=16, dropout=dropout)
        t = Trainer(cfg, tcfg, log=lambda *_: None)
        return t.run(), backend.to_host(t.model.params.data).copy()
    (ref, p_ref), (got, p_got) = run("numpy"), run("cupy")
    if dtype in ("bfloat16", "float16"):
        np.testing.assert_allclose([h["loss"] for h in got], [h["loss"] for h in ref],
                                   rtol=2.0 ** -8)
        p_got, p_ref = p_got.astype(np.float32), p_ref.astype(np.float32)
        assert np.abs(p_got - p_ref).max() <= 3 * 1e-2 * (1 + 2.0 ** -7)
        return
    tol = 1e-10 if dtype == "float64" else 2e-4
    np.testing.assert_allclose([h["loss"] for h in got], [h["loss"] for h in ref], rtol=tol)
    np.testing.assert_allclose(p_got, p_ref, rtol=tol, atol=tol * np.abs(p_ref).max())
    assert (tmp_path / "cupy" / "latest").is_file()          # the checkpoint was written


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_experts_on_the_gpu_equal_numpy(dtype):
    """A model with experts (top-2, tokens dropped at capacity, aux and z losses) trained on
    the GPU against the numpy backend: float64 to 1e-10; bf16 as the dense model's test."""
    def run(name):
        tcfg = TrainConfig(micro_batch_size=2, global_batch_size=4, train_iters=3, lr=1e-2,
                           dtype=dtype, synthetic_data=True, eval_iters=1, backend=name)
        cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=80,
                          vocab_size=45, vocab_multiple=16, num_experts=4, moe_router_topk=2,
                          moe_expert_capacity_factor=1.0, moe_aux_loss_coeff=0.01,
                          moe_z_loss_coeff=0.001)
        t = Trainer(cfg, tcfg, log=lambda *_: None)
        hist = t.run()
        return hist, backend.to_host(t.model.params.data).astype(np.float64)
    (ref, p_ref), (got, p_got) = run("numpy"), run("cupy")
    assert all(m["dropped"] > 0 for h in ref for m in h["moe"])
    if dtype == "bfloat16":
        np.testing.assert_allclose([h["loss"] for h in got], [h["loss"] for h in ref],
                                   rtol=2.0 ** -8)
        return
    np.testing.assert_allclose([h["loss"] for h in got], [h["loss"] for h in ref], rtol=1e-10)
    for h, r in zip(got, ref):
        for a, b in zip(h["moe"], r["moe"]):
            assert a == pytest.approx(b, rel=1e-10)
    np.testing.assert_allclose(p_got, p_ref, rtol=1e-10, atol=1e-10 * np.abs(p_ref).max())


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("dropout", [0.1, 0.0])          # 0.0: the fused attention kernels
@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recomputation_on_the_gpu_changes_no_bit(dtype, dropout, granularity):
    """As tests/test_recompute.py on the CPU: the recomputed forward runs the same kernels on
    the same inputs, so parameters and losses are those of the run that kept everything."""
    def run(**recompute):
        tcfg = TrainConfig(micro_batch_size=2, global_batch_size=4, train_iters=3, lr=1e-2,
                           dtype=dtype, synthetic_data=True, eval_iters=1, backend="cupy")
        cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=80,
                          vocab_size=45, vocab_multiple=16, dropout=dropout)
        t = Trainer(cfg, tcfg, ParallelConfig(**recompute), log=lambda *_: None)
        hist = t.run()
        return [h["loss"] for h in hist] + [hist[-1]["val_loss"]], backend.to_host(t.opt.p)
    ref_losses, ref_p = run()
    losses, p = run(recompute_granularity=granularity)
    assert losses == ref_losses
    np.testing.assert_array_equal(p, ref_p)
