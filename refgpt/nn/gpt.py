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

from .activations import ActivationMeter
from .attention import KVCache
from .block import Block
from .layer import primitives
from .moe import is_moe_layer
from .params import Params, ParamSpec, unit_key
from .recompute import recomputed, watch_recomputation
from .sublayers import Sublayers


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
        ]
        mlps = [f"{p}.mlp"]
        if is_moe_layer(cfg, i):
            specs.append(ParamSpec(f"{p}.mlp.router.weight", (C, cfg.num_experts), "normal", std))
            mlps = [f"{p}.mlp.experts.{e}" for e in range(cfg.num_experts)]
        for m in mlps:
            specs += [
                ParamSpec(f"{m}.c_fc.weight", (C, 4 * C), "normal", std),
                ParamSpec(f"{m}.c_fc.bias", (4 * C,)),
                ParamSpec(f"{m}.c_proj.weight", (4 * C, C), "normal", resid_std),
                ParamSpec(f"{m}.c_proj.bias", (C,)),
            ]
    if stage.last:
        specs += [ParamSpec("ln_f.weight", (C,), "ones"), ParamSpec("ln_f.bias", (C,))]
    return specs


class GPT:
    """A GPT-2 model, or one pipeline stage of it, on flat buffers, in any tensor-parallel
    layout: ``forward`` returns the loss, ``backward`` accumulates every parameter's gradient
    into ``params.grad``.

    What the engine uses, whatever the layout (refgpt.parallel.build makes the model):

        params                      the flat parameter and gradient buffers of this rank
        forward, backward           one micro-batch (backward reports finished gradients)
        complete_grads(names)       what the layout must still sum once accumulation is over
        counted(name)               whether this rank counts a parameter in the global norm
        full_tensors(flat)          full tensors of a params-shaped buffer (collective)
        shard(name, value)          this rank's part of a full tensor
        set_grad_enabled(enabled)   training, or evaluation (nothing saved for backward)
    """

    def __init__(self, cfg, dtype=np.float32, seed: int = 1234, stage: Stage | None = None,
                 params: Params | None = None, parts: Sublayers | None = None,
                 make_params=Params, recompute: int = 0, recompute_chunk: int = 1,
                 recompute_attention: bool = False):
        """cfg: a valid ModelConfig (ModelConfig.validate; the trainer checks the whole
        configuration once, refgpt.parallel.build.check_layout). stage: build only that part
        of the model (pipeline parallelism); params: take the (initialised) parameters from
        this buffer; else make_params(specs, dtype) makes it (refgpt.parallel.zero passes
        partitioned storage); parts: the layout's sublayers (default: one process's);
        recompute: how many of this stage's blocks, from its first, rerun their forward in
        backward instead of keeping their activations, in chunks of recompute_chunk blocks
        that keep only the chunk's input (refgpt.nn.recompute);
        recompute_attention: every block reruns its attention core instead (selective)."""
        stage = stage or Stage(range(cfg.num_layers))
        self.parts = parts = parts or Sublayers(cfg, seed)
        self.cfg, self.dtype = cfg, np.dtype(dtype)
        if params is None:
            specs = [s for s in param_specs(cfg, stage) if parts.holds(s.name)]
            params = make_params(parts.local_specs(specs), self.dtype)
            params.initialise(seed, parts.shard)
        self.params = params
        first, last = stage.first, stage.last
        self.embed = parts.embedding(params) if first else None
        self.embed_drop = parts.dropout("embed_drop") if first else None
        blocks = [Block(parts, params, i, recompute_attention, cfg) for i in stage.blocks]
        self.moe_layers = [b.moe for b in blocks if b.moe is not None]
        self.blocks = recomputed(blocks, min(recompute, len(blocks)), recompute_chunk,
                                 params.hold)
        self.ln_f = parts.layernorm(params, "ln_f") if last else None
        self.head = parts.head(params) if last else None
        self.loss_fn = parts.loss() if last else None
        self.layers = primitives(self.embed, self.embed_drop, *self.blocks, self.ln_f,
                                 self.head, self.loss_fn)
        self.activations = ActivationMeter(self.layers,
                                           self.blocks[0].layers if self.blocks else ())
        watch_recomputation(self.blocks, self.activations)

    def forward(self, x: np.ndarray, targets: np.ndarray | None = None, norm: float = 1.0,
                key=None, cache: KVCache | None = None, record: dict | None = None):
        """One micro-batch through this stage. x: token ids [B, T] on the first stage, else
        the previous stage's output. Returns, on the last stage, the loss (the sum of the token
        losses divided by norm) or, without targets, the logits; elsewhere the activations.

        key = (step, sample_ids) turns dropout on (training); None turns it off. cache: the
        keys and values of earlier positions (generation). record: a dict that receives every
        intermediate activation under the names of :mod:`refgpt.dump`.
        """
        hold = self.params.hold                 # where ZeRO-3 gathers a unit's parameters
        for moe in self.moe_layers:             # their aux losses are weighted as the loss
            moe.norm = norm
        with hold("embed", "forward"):          # wte: read by the embedding and the tied head
            if self.embed is not None:
                x = self.embed.forward(x, cache.length if cache is not None else 0)
                x = self.embed_drop.forward(x, key)                       # [B, T, C]
                _note(record, "embed", x)
            for block in self.blocks:
                with hold(block.unit, "forward"):
                    x = block.forward(x, key, cache, record)
            if self.head is None:
                return x
            with hold("ln_f", "forward"):
                x = self.ln_f.forward(x)
            _note(record, "ln_f", x)
            logits = self.head.forward(x)                                 # [B, T, Vp]
        if record is not None:                                            # the loss overwrites them
            record["logits"] = logits[..., :self.cfg.vocab_size].copy()
        if targets is None:
            return logits
        return self.loss_fn.forward(logits, targets, norm)

    def backward(self, dy: np.ndarray | None = None, on_ready=None):
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
                dy = self.head.backward(self.loss_fn.backward())
                with hold("ln_f", "backward"):
                    dy = self.ln_f.backward(dy)
                notify()
            for block in reversed(self.blocks):
                with hold(block.unit, "backward"):
                    dy = block.backward(dy)
                notify()
            if self.embed is not None:
                self.embed.backward(self.embed_drop.backward(dy))
                dy = None
        for names in groups if on_ready else ():    # wte on a last stage without the first
            on_ready(names)
        return dy

    # -- layered gradient accumulation -------------------------------------------------------
    def forward_layered(self, batches: list[tuple], norm: float) -> list[np.ndarray]:
        """Every micro-batch (x, y, key) of batches through the embeddings and the blocks,
        breadth-first: each unit runs all the micro-batches before the next unit starts, so
        ZeRO-3 gathers it once per step. Each layer's FIFO stash holds their contexts in
        micro-batch order. Returns the last block's outputs; backward_layered finishes.
        (Layered gradient accumulation, Lamy-Poirier 2021; one process only, no pipeline.)"""
        hold = self.params.hold
        for moe in self.moe_layers:
            moe.norm = norm
        with hold("embed", "forward"):
            xs = [self.embed_drop.forward(self.embed.forward(x, 0), key) for x, _, key in batches]
        for block in self.blocks:
            with hold(block.unit, "forward"):
                xs = [block.forward(x, key) for x, (_, _, key) in zip(xs, batches)]
        return xs

    def backward_layered(self, xs: list[np.ndarray], batches: list[tuple], norm: float,
                         on_ready=None) -> float:
        """The rest of the layered step: the final LayerNorm, head and loss forward and at once
        backward, micro-batch by micro-batch (so that no micro-batch's logits outlive it),
        then each block's backward for all the micro-batches, then the embeddings'. A unit's
        gradient is final once, after its last micro-batch: on_ready(names) is called then,
        once per step. Returns the summed loss."""
        groups = iter(self.ready_groups())
        notify = (lambda: on_ready(next(groups))) if on_ready else (lambda: None)
        hold, loss, dys = self.params.hold, 0.0, []
        with hold("embed", "backward"):
            with hold("ln_f", "backward"):
                for x, (_, y, _) in zip(xs, batches):
                    loss += self.loss_fn.forward(self.head.forward(self.ln_f.forward(x)), y,
                                                 norm)
                    dys.append(self.ln_f.backward(self.head.backward(self.loss_fn.backward())))
            notify()
            for block in reversed(self.blocks):
                with hold(block.unit, "backward"):
                    dys = [block.backward(dy) for dy in dys]
                notify()
            for dy in dys:
                self.embed.backward(self.embed_drop.backward(dy))
        for names in groups if on_ready else ():    # the embeddings
            on_ready(names)
        return loss

    def ready_groups(self) -> list[list[str]]:
        """Parameter names in the order backward finalises them, one group per unit
        (refgpt.nn.params.unit_key): ln_f, the blocks from last to first, then the embeddings
        (wte also receives the tied head's gradient, at the start). Within a group, names run
        backwards through the flat buffer, as the groups do."""
        names = list(self.params)
        keys = ["ln_f"] + [b.unit for b in reversed(self.blocks)] + ["embed"]
        groups = [[n for n in reversed(names) if unit_key(n) == k] for k in keys]
        return [g for g in groups if g]

    # -- what the layout decides -------------------------------------------------------------
    def complete_grads(self, names) -> None:
        self.parts.complete_grads(self.params, names)

    def counted(self, name: str) -> bool:
        return self.parts.counted(name)

    def full_tensors(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return self.parts.full_tensors(self.params, flat)

    def shard(self, name: str, value: np.ndarray) -> np.ndarray:
        return self.parts.shard(name, value)

    def shard_index(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of this rank's part of a parameter (Sublayers.shard_index)."""
        spec = self.params.specs[name]
        return self.parts.shard_index(name, spec.full_shape or spec.shape)

    # -- evaluation and generation -----------------------------------------------------------
    def set_grad_enabled(self, enabled: bool) -> None:
        """With False, forwards save nothing for backward (evaluation, generation)."""
        for layer in self.layers:
            layer.keep = enabled
            if not enabled:
                layer.stash.clear()

    def logits(self, idx: np.ndarray, cache: KVCache | None = None) -> np.ndarray:
        """Logits over the real vocabulary [B, T, V] (one process), no dropout, nothing saved."""
        keep = self.embed.keep
        self.set_grad_enabled(False)
        try:
            return self.forward(idx, cache=cache)[..., :self.cfg.vocab_size]
        finally:
            self.set_grad_enabled(keep)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.num_layers)


def _note(record: dict | None, name: str, x: np.ndarray) -> None:
    if record is not None:
        record[name] = x
