"""The GPT-2 model: embeddings, L pre-LN blocks, final LayerNorm, LM head tied to wte.

    x0 = drop(wte[idx] + wpe[pos])                  [B, T, C]
    x_{l+1} = Block_l(x_l)                          l = 0..L-1
    logits = ln_f(x_L) wte^T                        [B, T, Vp]   (only the first V are real)
    loss = sum of token cross-entropies / norm

Parameter names follow Hugging Face's GPT-2 (without the ``transformer.`` prefix) and weight
matrices are stored [in, out] like its Conv1D. Initialisation (GPT-2): weights N(0, 0.02^2),
the two residual output projections per block N(0, (0.02/sqrt(2L))^2), biases 0, LayerNorm
gain 1 and shift 0; padded vocabulary rows are 0.
"""

from __future__ import annotations

import math

import numpy as np

from .attention import KVCache
from .block import Block
from .dropout import Dropout
from .embedding import Embedding, TiedHead
from .layernorm import LayerNorm
from .loss import CrossEntropy
from .params import Params, ParamSpec


def param_specs(cfg) -> list[ParamSpec]:
    """Every parameter of the model, in flat-buffer order, with its full shape and init."""
    C, std = cfg.hidden_size, cfg.init_std
    resid_std = std / math.sqrt(2 * cfg.num_layers)
    specs = [ParamSpec("wte.weight", (cfg.padded_vocab, C), "normal", std, cfg.vocab_size),
             ParamSpec("wpe.weight", (cfg.n_positions, C), "normal", std)]
    for i in range(cfg.num_layers):
        p = f"h.{i}"
        specs += [
            ParamSpec(f"{p}.ln_1.weight", (C,), "ones"),
            ParamSpec(f"{p}.ln_1.bias", (C,)),
            ParamSpec(f"{p}.attn.c_attn.weight", (C, 3 * C), "normal", std),
            ParamSpec(f"{p}.attn.c_attn.bias", (3 * C,)),
            ParamSpec(f"{p}.attn.c_proj.weight", (C, C), "normal", resid_std),
            ParamSpec(f"{p}.attn.c_proj.bias", (C,)),
            ParamSpec(f"{p}.ln_2.weight", (C,), "ones"),
            ParamSpec(f"{p}.ln_2.bias", (C,)),
            ParamSpec(f"{p}.mlp.c_fc.weight", (C, 4 * C), "normal", std),
            ParamSpec(f"{p}.mlp.c_fc.bias", (4 * C,)),
            ParamSpec(f"{p}.mlp.c_proj.weight", (4 * C, C), "normal", resid_std),
            ParamSpec(f"{p}.mlp.c_proj.bias", (C,)),
        ]
    specs += [ParamSpec("ln_f.weight", (C,), "ones"), ParamSpec("ln_f.bias", (C,))]
    return specs


class GPTBase:
    """What the single-process GPT and the tensor-parallel one share: backward through the
    same stack of layers, the order in which it finalises gradients, and the switch that
    stops forwards from saving for backward. A subclass sets cfg, params, embed, embed_drop,
    blocks, ln_f, head, loss_fn and layers."""

    def set_grad_enabled(self, enabled: bool) -> None:
        """With False, forwards save nothing for backward (evaluation, generation)."""
        for layer in self.layers:
            layer.keep = enabled
            if not enabled:
                layer.stash.clear()

    def backward(self, on_ready=None) -> None:
        """Backward of the oldest forward still pending, from d(loss) = 1.

        on_ready(names) is called as groups of parameters get their final gradient of this
        backward, in the order of :meth:`ready_groups` (data parallelism starts reducing them).
        """
        groups = iter(self.ready_groups())
        notify = (lambda: on_ready(next(groups))) if on_ready else (lambda: None)
        dx = self.ln_f.backward(self.head.backward(self.loss_fn.backward()))
        notify()
        for block in reversed(self.blocks):
            dx = block.backward(dx)
            notify()
        self.embed.backward(self.embed_drop.backward(dx))
        notify()

    def ready_groups(self) -> list[list[str]]:
        """Parameter names in the order backward finalises them: ln_f, the blocks from last to
        first, then the embeddings (wte also receives the tied head's gradient, at the start).
        Within a group, names run backwards through the flat buffer, as the groups do."""
        names = list(self.params)
        prefixes = ["ln_f."] + [f"h.{i}." for i in reversed(range(self.cfg.num_layers))] + ["w"]
        return [[n for n in reversed(names) if n.startswith(p)] for p in prefixes]


class GPT(GPTBase):
    """A GPT-2 model on flat buffers: ``forward`` returns the loss, ``backward`` accumulates
    every parameter's gradient into ``params.grad``."""

    def __init__(self, cfg, dtype=np.float32, seed: int = 1234):
        cfg.validate()
        self.cfg = cfg
        self.dtype = np.dtype(dtype)
        self.params = Params(param_specs(cfg), self.dtype)
        self.params.initialise(seed)
        self.embed = Embedding(self.params)
        self.embed_drop = Dropout(cfg.dropout, "embed_drop", seed)
        self.blocks = [Block(self.params, i, cfg, seed) for i in range(cfg.num_layers)]
        self.ln_f = LayerNorm(self.params, "ln_f", cfg.layernorm_eps)
        self.head = TiedHead(self.params)
        self.loss_fn = CrossEntropy(cfg.vocab_size)
        self.layers = [self.embed, self.embed_drop, *(l for b in self.blocks for l in b.layers),
                       self.ln_f, self.head, self.loss_fn]


    def hidden(self, idx: np.ndarray, key=None, cache: KVCache | None = None,
               record: dict | None = None) -> np.ndarray:
        """ln_f output [B, T, C] for token ids idx [B, T]."""
        p0 = cache.length if cache is not None else 0
        x = self.embed_drop.forward(self.embed.forward(idx, p0), key)   # [B, T, C]
        if record is not None:
            record["embed"] = x
        for block in self.blocks:
            x = block.forward(x, key, cache, record)
        x = self.ln_f.forward(x)
        if record is not None:
            record["ln_f"] = x
        return x

    def forward(self, idx: np.ndarray, targets: np.ndarray, norm: float, key=None,
                record: dict | None = None) -> float:
        """Loss of one micro-batch: the sum of its token losses divided by ``norm``.

        key = (step, sample_ids) turns dropout on (training); None turns it off.
        record: a dict that receives every intermediate activation under the names of
        :mod:`refgpt.dump` ("embed", "h.0.ln_1", ..., "ln_f", "logits").
        """
        logits = self.head.forward(self.hidden(idx, key, None, record))  # [B, T, Vp]
        if record is not None:
            record["logits"] = logits[..., :self.cfg.vocab_size]
        return self.loss_fn.forward(logits, targets, norm)

    def logits(self, idx: np.ndarray, cache: KVCache | None = None) -> np.ndarray:
        """Logits over the real vocabulary [B, T, V], no dropout, nothing saved."""
        keep = self.embed.keep
        self.set_grad_enabled(False)
        try:
            return self.head.forward(self.hidden(idx, None, cache))[..., :self.cfg.vocab_size]
        finally:
            self.set_grad_enabled(keep)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.num_layers)
