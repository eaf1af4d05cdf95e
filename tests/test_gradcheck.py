"""Float64 central-difference checks of every op's backward and of the whole model."""

import numpy as np
import pytest

from refgpt.config import ModelConfig
from refgpt.nn import GPT, Params, ParamSpec
from refgpt.nn.attention import CausalSelfAttention
from refgpt.nn.dropout import Dropout
from refgpt.nn.embedding import Embedding, TiedHead
from refgpt.nn.gelu import GELU, BiasGELU
from refgpt.nn.layernorm import LayerNorm
from refgpt.nn.linear import Linear
from refgpt.nn.loss import CrossEntropy
from refgpt.nn.sublayers import Sublayers

EPS = 1e-6


def numeric_grad(f, x):
    """Central differences of the scalar f() with respect to every element of x (in place)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + EPS
        fp = f()
        x[i] = old - EPS
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * EPS)
    return g


def assert_close(analytic, numeric, what):
    scale = max(np.abs(numeric).max(), 1e-8)
    err = np.abs(analytic - numeric).max() / scale
    assert err < 1e-6, f"{what}: relative error {err:.2e}"


def check_layer(layer, params, x, forward=None):
    """Check dx and every parameter gradient of a layer for L = sum(w * layer(x))."""
    forward = forward or layer.forward
    rng = np.random.default_rng(1)
    w = rng.standard_normal(forward(x).shape)
    layer.stash.clear()

    def loss():
        y = forward(x)
        layer.stash.clear()
        return float((w * y).sum())

    forward(x)
    params.zero_grad()
    dx = layer.backward(w)
    if dx is not None:
        assert_close(dx, numeric_grad(loss, x), "dx")
    for name in params:
        assert_close(params.grads[name].copy(), numeric_grad(loss, params[name]), name)


def make_params(specs, seed=3):
    p = Params(specs, np.float64)
    p.initialise(seed)
    for name in p:                          # non-trivial values everywhere (also biases/gains)
        p[name][...] += 0.3 * np.random.default_rng(len(name)).standard_normal(p[name].shape)
    return p


def test_linear(rng):
    p = make_params([ParamSpec("l.weight", (5, 4), "normal", 0.5), ParamSpec("l.bias", (4,))])
    check_layer(Linear(p, "l"), p, rng.standard_normal((2, 3, 5)))


def test_layernorm(rng):
    p = make_params([ParamSpec("n.weight", (6,), "ones"), ParamSpec("n.bias", (6,))])
    check_layer(LayerNorm(p, "n"), p, rng.standard_normal((2, 3, 6)))


@pytest.mark.parametrize("kind", ["tanh", "erf"])
def test_gelu(rng, kind):
    check_layer(GELU(kind), Params([], np.float64), 2 * rng.standard_normal((3, 7)))


@pytest.mark.parametrize("kind", ["tanh", "erf"])
def test_bias_gelu(rng, kind):
    p = make_params([ParamSpec("fc.bias", (7,))])
    layer = BiasGELU(p, "fc.bias", kind)
    x = 2 * rng.standard_normal((3, 7))
    check_layer(layer, p, x, forward=lambda x: layer.forward(x.copy()))   # forward adds b in place


def test_gelu_large_inputs_are_finite():
    g = GELU("tanh")
    x = np.array([-1e4, -100.0, 100.0, 1e4], np.float32)
    y = g.forward(x)
    dx = g.backward(np.ones_like(x))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx, [0, 0, 1, 1], atol=1e-6)


def test_embedding_with_repeated_ids():
    p = make_params([ParamSpec("wte.weight", (7, 4), "normal", 1.0),
                     ParamSpec("wpe.weight", (6, 4), "normal", 1.0)])
    emb = Embedding(p)
    idx = np.array([[1, 1, 3], [3, 1, 0]])      # repeats must all reach the gradient
    check_layer(emb, p, np.zeros(1), forward=lambda _: emb.forward(idx, pos0=2))


def test_tied_head(rng):
    p = make_params([ParamSpec("wte.weight", (7, 4), "normal", 1.0)])
    check_layer(TiedHead(p), p, rng.standard_normal((2, 3, 4)))


def attention_params(C):
    return make_params([ParamSpec("a.c_attn.weight", (C, 3 * C), "normal", 0.5),
                        ParamSpec("a.c_attn.bias", (3 * C,)),
                        ParamSpec("a.c_proj.weight", (C, C), "normal", 0.5),
                        ParamSpec("a.c_proj.bias", (C,))])


def attention(heads, dropout):
    """The attention layer of one process with these heads and dropout (refgpt.nn.sublayers)."""
    return Sublayers(ModelConfig(num_attention_heads=heads, dropout=dropout), seed=0)


def test_attention(rng):
    p = attention_params(6)
    attn = CausalSelfAttention(attention(2, 0.0), p, "a")
    check_layer(attn, p, rng.standard_normal((2, 5, 6)))


def test_attention_with_dropout(rng):
    p = attention_params(4)
    attn = CausalSelfAttention(attention(2, 0.3), p, "a")
    check_layer(attn, p, rng.standard_normal((2, 4, 4)),
                forward=lambda x: attn.forward(x, key=(5, [10, 11])))


def test_dropout_mask_depends_on_sample_not_batch(rng):
    d = Dropout(0.5, "site", seed=9)
    x = np.ones((3, 4, 5))
    both = d.forward(x, key=(1, [7, 8, 9]))
    alone = d.forward(x[1:2], key=(1, [8]))
    np.testing.assert_array_equal(both[1:2], alone)
    assert 0 < (both == 0).mean() < 1
    check_layer(d, Params([], np.float64), rng.standard_normal((2, 3)),
                forward=lambda x: d.forward(x, key=(0, [0, 1])))


def test_cross_entropy_with_padded_vocab(rng):
    ce = CrossEntropy(vocab_size=5)
    logits = rng.standard_normal((2, 3, 8))
    logits[..., 5:] = 1e3                        # padded columns: must not matter at all
    targets = rng.integers(0, 5, (2, 3))

    def loss():
        v = ce.forward(logits.copy(), targets, norm=6.0)
        ce.stash.clear()
        return v

    trained = logits.copy()
    ce.forward(trained, targets, norm=6.0)
    d = ce.backward()
    assert np.shares_memory(d, trained)                          # written over the logits
    assert_close(d, numeric_grad(loss, logits), "dlogits")
    assert np.all(d[..., 5:] == 0)
    ce.keep = False                                              # evaluation: only read
    seen = logits.copy()
    assert ce.forward(seen, targets, norm=6.0) == loss()
    np.testing.assert_array_equal(seen, logits)
    ce.keep = True
    z = logits[..., :5]
    ref = -(z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(2)[:, None],
                                                          np.arange(3)[None], targets].sum() / 6
    assert abs(loss() - ref) < 1e-12


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_whole_model(tiny_cfg, rng, dropout):
    tiny_cfg.dropout = dropout
    model = GPT(tiny_cfg, np.float64, seed=5)
    p = model.params
    p.data[...] += 0.05 * rng.standard_normal(p.numel)     # break init symmetries (zeros, ones)
    p["wte.weight"][tiny_cfg.vocab_size:] = 0.0             # padded rows stay zero
    idx = rng.integers(0, tiny_cfg.vocab_size, (2, 6))
    tgt = rng.integers(0, tiny_cfg.vocab_size, (2, 6))
    key = (3, [4, 5]) if dropout else None

    def loss():
        model.set_grad_enabled(False)                         # save nothing for backward
        v = model.forward(idx, tgt, 12.0, key)
        model.set_grad_enabled(True)
        return v

    model.forward(idx, tgt, 12.0, key)
    p.zero_grad()
    model.backward()
    check_spread(p, p.grad.copy(), loss, 7)


def check_spread(p, analytic, loss, picks: int) -> None:
    """analytic (a gradient laid out like p.data) against central differences of loss() at
    `picks` entries spread over every parameter (all of them would be slow)."""
    for name in p:
        view = p[name].reshape(-1)
        lo = p.slices[name][0]
        for i in np.unique(np.linspace(0, view.size - 1, picks).astype(int)):
            num = numeric_grad(loss, view[i:i + 1])[0]
            a = analytic[lo + i]
            assert abs(a - num) <= 1e-6 * max(1.0, abs(num)), (name, i, a, num)
