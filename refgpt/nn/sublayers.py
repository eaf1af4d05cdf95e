"""What a GPT is built from: the sublayers of one process, and how its parameters map to it.

The model (refgpt.nn.gpt, refgpt.nn.block) is written once. Where a parallel layout changes
it, the model asks this object instead of building a layer itself, the way Megatron Core's
layer specs supply a transformer layer's submodules:

    layernorm(params, prefix)          ln_1, ln_2, ln_f
    column_linear(params, prefix)      c_attn and mlp.c_fc: a layer whose output features are
                                       split over a tensor-parallel group (it enters the group)
    row_linear(params, prefix)         attn.c_proj and mlp.c_proj: input features split, the
                                       partial products summed (it leaves the group), + bias
    bias_gelu(params, bias)            the MLP's activation, with c_fc's bias
    heads, attention_dropout(site)     the attention heads computed here, and their dropout
    attention_core(site, drop)         attention from q, k, v: on the rank's whole sequence, or
                                       across a context-parallel group (refgpt.parallel.context)
    dropout(site)                      dropout on the activations between sublayers
    embedding, head, loss              the token and position tables, the tied LM head and
                                       the cross-entropy

and, for the parameters: ``local_specs`` and ``shard`` (a full tensor -> this rank's part),
``full_tensors`` (the parts -> full tensors, collective), ``counted`` (whether this rank
counts a parameter in the global gradient norm, so that every element counts once) and
``complete_grads`` (gradients a layout must still sum before they are final).

Here every parameter is whole and every answer is the plain layer. refgpt.parallel.tensor
(Megatron's 1-D tensor parallelism, with sequence parallelism) and refgpt.parallel.tensor2d
(SUMMA's 2-D) subclass it; a new sublayer option is one method here and one override in
each layout that splits it differently.
"""

from __future__ import annotations

import numpy as np

from .attention import LocalAttention
from .dropout import Dropout
from .embedding import Embedding, TiedHead
from .gelu import BiasGELU
from .layernorm import LayerNorm
from .linear import Linear
from .loss import CrossEntropy


def grid_shape(shape: tuple) -> tuple[int, int]:
    """A parameter's shape viewed 2-D: [rows, last axis] (a vector of n: 1 x n)."""
    return int(np.prod(shape[:-1])), int(shape[-1])


class Sublayers:
    """The layers of one process, holding every parameter whole."""

    def __init__(self, cfg, seed: int):
        self.cfg, self.seed = cfg, seed
        self.ep = None               # expert parallelism's group (refgpt.parallel.expert)
        self.cp = None               # context parallelism's group (refgpt.parallel.context)

    def holds(self, name: str) -> bool:
        """Whether this rank has the parameter at all: under expert parallelism only its own
        experts' (refgpt.parallel.expert)."""
        return self.ep is None or self.ep.holds(name)

    # -- parameters ------------------------------------------------------------------------
    def local_specs(self, specs: list) -> list:
        """This rank's part of each parameter spec (full shape kept for initialisation)."""
        return specs

    def shard(self, name: str, value: np.ndarray) -> np.ndarray:
        """This rank's part of the full value of a parameter."""
        return value

    def shard_index(self, name: str, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols): which elements of a parameter of full shape ``shape`` this rank holds,
        as global row and column indices of its 2-D view (a vector of n: 1 x n); the part is
        the grid rows x cols, row-major (refgpt.checkpoint_shards). shard() cuts the same."""
        rows, cols = grid_shape(shape)
        return np.arange(rows), np.arange(cols)

    def full_tensors(self, params, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The full tensors of a buffer laid out like params.data (the parameters, a gradient
        or an optimizer moment), by name; collective in a parallel layout."""
        return {n: flat[lo:hi].reshape(params.specs[n].shape)
                for n, (lo, hi) in params.slices.items()}

    def counted(self, name: str) -> bool:
        """Whether this rank counts the parameter in the global gradient norm."""
        return True

    def complete_grads(self, params, names) -> None:
        """Make the gradients of these parameters final on this rank (accumulation is over)."""

    def activation_shape(self, micro_batch: int) -> tuple:
        """The shape of the activations between blocks, as this rank holds them."""
        return micro_batch, self.tokens, self.cfg.hidden_size

    @property
    def tokens(self) -> int:
        """Tokens of each sequence this rank's layers see (all, or its context-parallel part)."""
        return self.cfg.seq_length // (1 if self.cp is None else self.cp.size)

    def token_positions(self) -> np.ndarray:
        """The sequence positions of those tokens, in the order the rank holds them."""
        return np.arange(self.cfg.seq_length) if self.cp is None else self.cp.positions

    def token_part(self, split: int = 1, rank: int = 0):
        """Dropout's part (refgpt.nn.dropout) for activations [B, T', C] when each rank of a
        group of `split` (sequence parallelism) holds block `rank` of this rank's tokens:
        None when that is the whole sequence in order."""
        if self.cp is None and split == 1:
            return None
        n = self.tokens // split
        return 0, self.token_positions()[rank * n:(rank + 1) * n], self.cfg.seq_length

    def head_slice(self) -> slice:
        """The model's attention heads this rank's layers compute."""
        return slice(0, self.cfg.num_attention_heads)

    # -- layers ------------------------------------------------------------------------------
    @property
    def heads(self) -> int:
        """Attention heads computed on this rank."""
        return self.cfg.num_attention_heads

    def dropout(self, site: str) -> Dropout:
        return Dropout(self.cfg.dropout, site, self.seed, self.token_part())

    def attention_dropout(self, site: str) -> Dropout:
        """Dropout on the probabilities [B, H', T, T] of the heads the attention core sees."""
        heads = self.head_slice() if self.cp is None else self.cp.core_heads(self.head_slice())
        return Dropout(self.cfg.dropout, site, self.seed, (0, heads, self.cfg.num_attention_heads))

    def attention_core(self, site: str, drop: Dropout):
        return LocalAttention(drop) if self.cp is None else self.cp.core(site, drop)

    def layernorm(self, params, prefix: str):
        return LayerNorm(params, prefix, self.cfg.layernorm_eps)

    def column_linear(self, params, prefix: str, bias: bool = True):
        return Linear(params, prefix, bias)

    def row_linear(self, params, prefix: str):
        return Linear(params, prefix)

    def bias_gelu(self, params, bias: str):
        return BiasGELU(params, bias, self.cfg.gelu)

    def embedding(self, params):
        return Embedding(params, None if self.cp is None else self.cp.positions)

    def head(self, params):
        return TiedHead(params)

    def loss(self):
        return CrossEntropy(self.cfg.vocab_size)

    def moe_parts(self):
        """The sublayers a MoE layer's experts are built from, and the ops around the layer
        (what enters and what leaves it): here itself, and no ops."""
        return self, (Identity(), Identity())


class Identity:
    def forward(self, x):
        return x

    def backward(self, dy):
        return dy
