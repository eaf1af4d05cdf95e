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
from dataclasses import dataclass

import numpy as np

from .attention import KVCache
from .block import Block
from .dropout import Dropout
from .embedding import Embedding, TiedHead
from .layernorm import LayerNorm
from .loss import CrossEntropy
from .params import Params, ParamSpec, unit_key


@dataclass(frozen=True)
class Stage:
    """A contiguous part of the model (a pipeline stage): blocks in ``blocks``, with the
    embeddings if ``first`` and the final LayerNorm, head (tied to wte) and loss if ``last``."""

    blocks: range
    first: bool = True
    last: bool = True


def param_specs(cfg, stage: Stage | None = None) -> list[ParamSpec]:
    """Every parameter of the model (or of one stage), in flat-buffer order, with its full
    shape and init. The token table belongs to both the first and the last stage."""
    stage = stage or Stage(range(cfg.num_layers))
    C, std = cfg.hidden_size, cfg.init_std
    resid_std = std / math.sqrt(2 * cfg.num_layers)
    specs = []
    if stage.first or stage.last:
        specs.append(ParamSpec("wte.weight", (cfg.padded_vocab, C), "normal", std, cfg.vocab_size))
    if stage.first:
        specs.append(ParamSpec("wpe.weight", (cfg.n_positions, C), "normal", std))
    for i in stage.blocks:
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
    if stage.last:
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

    def forward_stage(self, x, targets=None, norm: float | None = None, key=None):
        """The stage's forward: x is token ids on the first stage, else the activations of the
        previous stage; returns the loss on the last stage, else this stage's activations."""
        hold = self.params.hold                 # where ZeRO-3 gathers a unit's parameters
        with hold("embed", "forward"):          # wte: read by the embedding and the tied head
            if self.embed is not None:
                x = self.embed_drop.forward(self.embed.forward(x), key)
            for block in self.blocks:
                with hold(f"h.{block.index}", "forward"):
                    x = block.forward(x, key)
            if self.head is None:
                return x
            with hold("ln_f", "forward"):
                return self.loss_fn.forward(self.head.forward(self.ln_f.forward(x)), targets, norm)

    def backward_stage(self, dy=None, on_ready=None):
        """Backward of the oldest pending forward: from d(loss) = 1 on the last stage, else
        from dy; returns the gradient of the stage's input activations (None on the first).

        on_ready(names) is called as groups of parameters get their final gradient of this
        backward, in the order of :meth:`ready_groups` (data parallelism starts reducing them).
        """
        groups = iter(self.ready_groups())
        notify = (lambda: on_ready(next(groups))) if on_ready else (lambda: None)
        hold = self.params.hold
        with hold("embed", "backward"):
            if self.head is not None:
                with hold("ln_f", "backward"):
                    dy = self.ln_f.backward(self.head.backward(self.loss_fn.backward()))
                notify()
            for block in reversed(self.blocks):
                with hold(f"h.{block.index}", "backward"):
                    dy = block.backward(dy)
                notify()
            if self.embed is not None:
                self.embed.backward(self.embed_drop.backward(dy))
                dy = None
        for names in groups if on_ready else ():    # wte on a last stage without the first
            on_ready(names)
        return dy

    def backward(self, on_ready=None) -> None:
        """Backward of the whole model's oldest pending forward, from d(loss) = 1."""
        self.backward_stage(None, on_ready)

    def ready_groups(self) -> list[list[str]]:
        """Parameter names in the order backward finalises them, one group per unit
        (refgpt.nn.params.unit_key): ln_f, the blocks from last to first, then the embeddings
        (wte also receives the tied head's gradient, at the start). Within a group, names run
        backwards through the flat buffer, as the groups do."""
        names = list(self.params)
        keys = ["ln_f"] + [f"h.{b.index}" for b in reversed(self.blocks)] + ["embed"]
        groups = [[n for n in reversed(names) if unit_key(n) == k] for k in keys]
        return [g for g in groups if g]

    def norm_counted(self, name: str) -> bool:
        """Whether this rank counts the parameter in the global gradient norm (a parallel
        layout counts each element of the model once)."""
        return True


class GPT(GPTBase):
    """A GPT-2 model on flat buffers: ``forward`` returns the loss, ``backward`` accumulates
    every parameter's gradient into ``params.grad``."""

    def __init__(self, cfg, dtype=np.float32, seed: int = 1234, stage: Stage | None = None,
                 params: Params | None = None, make_params=Params):
        """stage: build only that part of the model (pipeline parallelism); params: take the
        (initialised) parameters from this buffer; else make_params(specs, dtype) makes it
        (refgpt.parallel.zero passes partitioned storage)."""
        cfg.validate()
        stage = stage or Stage(range(cfg.num_layers))
        self.cfg = cfg
        self.dtype = np.dtype(dtype)
        if params is None:
            params = make_params(param_specs(cfg, stage), self.dtype)
            params.initialise(seed)
        self.params = params
        first, last = stage.first, stage.last
        self.embed = Embedding(params) if first else None
        self.embed_drop = Dropout(cfg.dropout, "embed_drop", seed) if first else None
        self.blocks = [Block(params, i, cfg, seed) for i in stage.blocks]
        self.ln_f = LayerNorm(params, "ln_f", cfg.layernorm_eps) if last else None
        self.head = TiedHead(params) if last else None
        self.loss_fn = CrossEntropy(cfg.vocab_size) if last else None
        self.layers = [l for l in (self.embed, self.embed_drop,
                                   *(l for b in self.blocks for l in b.layers),
                                   self.ln_f, self.head, self.loss_fn) if l is not None]


    def hidden(self, idx: np.ndarray, key=None, cache: KVCache | None = None,
               record: dict | None = None) -> np.ndarray:
        """ln_f output [B, T, C] for token ids idx [B, T]."""
        p0 = cache.length if cache is not None else 0
        hold = self.params.hold
        with hold("embed", "forward"):
            x = self.embed_drop.forward(self.embed.forward(idx, p0), key)   # [B, T, C]
        if record is not None:
            record["embed"] = x
        for block in self.blocks:
            with hold(f"h.{block.index}", "forward"):
                x = block.forward(x, key, cache, record)
        with hold("ln_f", "forward"):
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
        with self.params.hold("embed", "forward"):                # wte: embedding and head
            logits = self.head.forward(self.hidden(idx, key, None, record))  # [B, T, Vp]
        if record is not None:                                    # the loss overwrites them
            record["logits"] = logits[..., :self.cfg.vocab_size].copy()
        return self.loss_fn.forward(logits, targets, norm)

    def logits(self, idx: np.ndarray, cache: KVCache | None = None) -> np.ndarray:
        """Logits over the real vocabulary [B, T, V], no dropout, nothing saved."""
        keep = self.embed.keep
        self.set_grad_enabled(False)
        try:
            with self.params.hold("embed", "forward"):
                return self.head.forward(self.hidden(idx, None, cache))[..., :self.cfg.vocab_size]
        finally:
            self.set_grad_enabled(keep)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.num_layers)
