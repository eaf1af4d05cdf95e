"""Checkpoints of a parallel run: full tensors assembled from every rank's parts, and each
rank's parts taken from full tensors, so any layout loads what any other saved
(refgpt.checkpoint writes and reads the files).

The parameters saved are the optimizer's (``opt.p``): the model's own in float32 and float64
runs, the fp32 master weights in 16-bit ones (refgpt.optim.mixed), so a checkpoint holds fp32
or fp64 tensors whatever the run computed in, and loading one sets the master weights and
rounds the model's 16-bit copy from them, as a step does.

Saving, for the parameters and both AdamW moments: the flat buffer is made whole over the
data-parallel group where ZeRO shards it (``gather_shards``), split into
full tensors by name over the tensor-parallel group (``model.full_tensors``), and the pipeline
stages' tensors are gathered to world rank 0, which writes them. Loading: each rank keeps its
part of each of its stage's tensors (``model.shard``) and the part of the moments it updates
(``params.own``).
"""

from __future__ import annotations

import numpy as np

from ..backend import to_device, to_host
from ..checkpoint import named_to_flat, save_checkpoint
from ..cli import CheckpointError
from ..nn.gpt import param_specs


def save(path, iteration: int, model, opt, grid, state: dict, tokenizer=None,
         retention: int = 0):
    """Write the checkpoint (collective; world rank 0 writes, keeping the newest `retention`
    iterations if not 0); returns its folder on rank 0."""
    p = model.params
    flat = (p.gather_shards(opt.p), p.gather_shards(opt.m), p.gather_shards(opt.v))
    params, m, v = (model.full_tensors(to_host(f)) for f in flat)
    if grid.pp_comm is not None:                            # every stage's tensors to rank 0
        parts = grid.pp_comm.gather((params, m, v), root=0)
        if parts is not None:
            params, m, v = ({k: val for part in reversed(parts) for k, val in part[i].items()}
                            for i in range(3))
    folder = failure = None
    if grid.rank == 0:
        try:
            folder = save_checkpoint(path, iteration, params, {"exp_avg": m, "exp_avg_sq": v},
                                     opt.t, state, tokenizer, retention)
        except OSError as e:                  # a full disk, say: the last good one stays
            failure = (f"saving iteration {iteration} to {path} failed ({e.strerror or e}); "
                       f"its latest checkpoint is still the one before")
    if grid.world is not None:                # every rank stops with the same line
        failure = grid.world.bcast(failure)
    if failure:
        raise CheckpointError(failure)
    return folder


def restore(ckpt, model, opt, cfg) -> None:
    """Set this rank's parameters and optimizer state from a loaded checkpoint."""
    p = model.params
    names = {s.name for s in param_specs(cfg)}
    missing, extra = names - set(ckpt.params), set(ckpt.params) - names
    if missing or extra:
        raise CheckpointError(f"{ckpt.path}: parameter names differ: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    try:
        p.load_state_dict(_local(model, ckpt.params))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    lo, hi = p.own
    for prefix, tensors, state in (("", ckpt.params, opt.p), ("exp_avg.", ckpt.optimizer, opt.m),
                                   ("exp_avg_sq.", ckpt.optimizer, opt.v)):
        full = np.zeros(p.padded, state.dtype)
        named_to_flat(_local(model, tensors, prefix), prefix, p, full)
        state[...] = to_device(full[lo:hi])
    if hasattr(opt, "round_to_model"):                   # the 16-bit copy, from the master
        opt.round_to_model()
    opt.t = ckpt.state["optimizer_step"]


def _local(model, tensors: dict, prefix: str = "") -> dict:
    """This rank's part of the full tensors named prefix + one of its parameters' names."""
    specs = model.params.specs
    return {k: model.shard(k[len(prefix):], v) for k, v in tensors.items()
            if k.startswith(prefix) and k[len(prefix):] in specs}
