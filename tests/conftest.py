import numpy as np
import pytest

from refgpt import backend
from refgpt.config import ModelConfig


@pytest.fixture
def tiny_cfg():
    """Odd sizes on purpose: vocab not a multiple of the padding, 3 heads."""
    return ModelConfig(num_layers=2, hidden_size=12, num_attention_heads=3, seq_length=6,
                       max_position_embeddings=9, vocab_size=37, vocab_multiple=16)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def kernels():
    """{name: kernel} of every @kernel reference of refgpt (refgpt.backend)."""
    from refgpt.nn import (attention, block, cast, embedding, gelu, layernorm, linear, loss,
                           params)
    from refgpt.optim import adamw, clip, mixed
    from refgpt.parallel import shared
    return backend.kernels_in(attention, block, cast, embedding, gelu, layernorm, linear, loss,
                              params, adamw, clip, mixed, shared)


@pytest.fixture
def conversion_values():
    """float32 values for the 16-bit conversions: every magnitude, infinities, a nan, zeros of
    both signs, the largest float32, a subnormal and ties to round to even."""
    rng = np.random.default_rng(5)
    return np.concatenate([rng.standard_normal(4099) * 10.0 ** rng.integers(-8, 8, 4099),
                           np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 3.4e38, 1e-40,
                                     1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -11])
                           ]).astype(np.float32).reshape(7, -1)
