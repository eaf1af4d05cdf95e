import numpy as np
import pytest

from refgpt.config import ModelConfig


@pytest.fixture
def tiny_cfg():
    """Odd sizes on purpose: vocab not a multiple of the padding, 3 heads."""
    return ModelConfig(num_layers=2, hidden_size=12, num_attention_heads=3, seq_length=6,
                       max_position_embeddings=9, vocab_size=37, vocab_multiple=16)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
