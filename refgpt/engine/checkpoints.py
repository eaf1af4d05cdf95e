"""Checkpoints of a run in any layout: each rank writes the pieces it owns, and reads the
pieces it needs from whatever layout saved them (refgpt.checkpoint_shards has the math;
refgpt.checkpoint the files and their atomic renames).

The parameters saved are the optimizer's (``opt.p``): the model's own in float32 and float64
runs, the fp32 master weights in 16-bit ones (refgpt.optim.mixed), so a checkpoint holds fp32
or fp64 tensors whatever the run computed in, and loading one sets the master weights and
rounds the model's 16-bit copy from them, as a step does.

Saving (collective): world rank 0 makes the temporary folder; every rank writes the part of
the optimizer's buffers it owns (ZeRO's shard, or all of its tensor- and pipeline-parallel
part), once per element across replicas, to ``shard_RRRRR.safetensors``, flushed to disk;
rank 0 gathers the pieces' descriptions and the files' checksums, writes state.json and
renames the folder into place. No tensor moves between ranks. Every rank needs the same file
system under ``--save`` (a parallel file system across nodes), as Megatron-LM's and
DeepSpeed's distributed checkpoints do.

Loading (collective): the files' SHA-256s are checked once, shared out over the ranks; then
each rank reads its part of every one of its tensors (the whole of its tensor-parallel part,
for the model's copy) and the moments of its own range. A problem any rank finds (a corrupt
file, a gap, a non-finite value) becomes the same error on every rank.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import safetensors.numpy

from ..backend import to_device, to_host
from ..checkpoint import SHARDED, abandon, begin_save, finish_save
from ..checkpoint_shards import Piece, owned_pieces, runs
from ..parallel.expert import expert_of
from ..cli import CheckpointError
from ..nn.gpt import param_specs


class Save:
    """One save under way: this rank's part already copied out of the training buffers (its
    safetensors bytes), written to disk and hashed by a thread (with --async-save while
    training goes on), and finished by every rank together (``finish``)."""

    def __init__(self, path, iteration: int, tmp: Path | None, data: bytes | None, file: str,
                 entries: list, state: dict, tokenizer, retention: int, failure: str | None,
                 background: bool):
        self.path, self.iteration, self.tmp, self.data, self.file = path, iteration, tmp, data, file
        self.entries, self.state, self.tokenizer, self.retention = entries, state, tokenizer, retention
        self.failure, self.records = failure, {}
        self.thread = None
        if data is not None and failure is None:
            if background:
                self.thread = threading.Thread(target=self._write, name="checkpoint-writer",
                                               daemon=True)
                self.thread.start()
            else:
                self._write()

    def _write(self) -> None:
        """The file written, flushed to disk and hashed from the bytes in memory. The work is
        system calls and hashing, which release Python's lock: training's thread runs on."""
        try:
            self.records = {self.file: write_file(self.tmp / self.file, self.data)}
        except OSError as e:
            self.failure = _failed(self.path, self.iteration, e)
        self.data = None

    def written(self) -> bool:
        """Whether this rank's file is done (or failed)."""
        return self.thread is None or not self.thread.is_alive()

    def finish(self, grid) -> Path | None:
        """Wait for this rank's file, then (collective) world rank 0 writes state.json with
        every rank's pieces and renames the folder into place; returns it on rank 0. A
        failure on any rank is the same CheckpointError on all, and the save is removed."""
        if self.thread is not None:
            self.thread.join()
        mine = (self.entries, self.records, self.failure)
        parts = [mine] if grid.world is None else grid.world.gather(mine, root=0)
        folder = failure = None
        if grid.rank == 0:
            failure = next((f for _, _, f in parts if f), None)
            if failure is None:
                try:
                    folder = finish_save(self.path, self.iteration, self.tmp,
                                         {**self.state, "pieces": [e for p in parts for e in p[0]]},
                                         {k: v for p in parts for k, v in p[1].items()},
                                         self.tokenizer, self.retention)
                except OSError as e:
                    failure = _failed(self.path, self.iteration, e)
            elif self.tmp is not None:
                abandon(self.tmp)
        if grid.world is not None:              # every rank stops with the same line
            failure = grid.world.bcast(failure)
        if failure:
            raise CheckpointError(failure)
        return folder


def write_file(path: Path, data: bytes) -> dict:
    """data written to a new file and flushed to disk; returns its record (refgpt.checkpoint's
    file_record: size and SHA-256), computed from the bytes in memory."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def start_save(path, iteration: int, model, opt, grid, state: dict, tokenizer=None,
               retention: int = 0, background: bool = False) -> Save:
    """Begin a save (collective): rank 0 makes the temporary folder, every rank copies out the
    pieces it owns (module docstring) and writes them, in a thread if background."""
    p, world = model.params, grid.world
    tmp = failure = None
    if grid.rank == 0:
        try:
            tmp = begin_save(path, iteration)
        except OSError as e:
            failure = _failed(path, iteration, e)
    if world is not None:
        tmp, failure = world.bcast((tmp, failure))
    file, entries, data = f"shard_{grid.rank:05d}.safetensors", [], None
    writes = lambda n: p.writes_own(grid.replica_rank(expert_of(n) is not None))  # noqa: E731
    pieces = owned_pieces(model, writes) if failure is None else []
    if pieces:
        tensors = {}
        for piece, a, b in pieces:
            piece.file = file
            entries.append(piece.to_json())
            for prefix, buf in (("", opt.p), ("exp_avg.", opt.m), ("exp_avg_sq.", opt.v)):
                tensors[prefix + piece.name] = np.ascontiguousarray(to_host(buf[a:b]))
        data = safetensors.numpy.save(tensors)              # the snapshot: training may go on
    state = {"format": SHARDED, "optimizer_step": opt.t, **state}
    return Save(path, iteration, tmp, data, file, entries, state, tokenizer, retention, failure,
                background)


def save(path, iteration: int, model, opt, grid, state: dict, tokenizer=None,
         retention: int = 0) -> Path | None:
    """Write the checkpoint (collective; module docstring), keeping the newest `retention`
    iterations if not 0; returns its folder on world rank 0."""
    return start_save(path, iteration, model, opt, grid, state, tokenizer, retention).finish(grid)


def all_written(pending: Save, grid) -> bool:
    """Whether every rank's file of a background save is done (collective)."""
    done = pending.written()
    return done if grid.world is None else all(grid.world.allgather(done))


def _failed(path, iteration: int, e: OSError) -> str:
    return (f"saving iteration {iteration} to {path} failed ({e.strerror or e}); its latest "
            f"checkpoint is still the one before")


def restore(saved, model, opt, cfg, grid) -> None:
    """Set this rank's parameters and optimizer state from an opened checkpoint
    (refgpt.checkpoint.open_checkpoint) saved in any layout (collective)."""
    names = {s.name for s in param_specs(cfg)}
    missing, extra = names - saved.names(), saved.names() - names
    if missing or extra:
        raise CheckpointError(f"{saved.folder}: parameter names differ: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    files, size = saved.files(), grid.world_size
    _agreed(grid, lambda: saved.verify(files[grid.rank::size]))     # each file hashed once
    _agreed(grid, lambda: _read(saved, model, opt))
    saved.close()
    if hasattr(opt, "round_to_model"):                   # the 16-bit copy, from the master
        opt.round_to_model()
    opt.t = saved.state["optimizer_step"]


def _read(saved, model, opt) -> None:
    """This rank's own range of the optimizer's buffers and, where the model holds more
    than that (all but ZeRO-3, whose parameters are its own range: refgpt.parallel.zero),
    the whole of each of its tensors, from the pieces. The tensors go to the model one at a
    time; a problem stops the reading, not the parameters' own collective at the end
    (refgpt.parallel.shared), and is raised after."""
    p, problems = model.params, []
    whole = p.data is not None

    def tensors():
        try:
            for name, (t0, t1) in p.slices.items():
                spec = p.specs[name]
                rows, cols = model.shard_index(name)
                mine = Piece(name, list(spec.full_shape or spec.shape), runs(rows), runs(cols),
                             0, spec.size)
                value = saved.read(mine, "param") if whole else None
                for a, b, at in p.in_shard(t0, t1):
                    own = Piece(**{**mine.to_json(), "start": a - t0, "stop": b - t0})
                    for quantity, buf in (("param", opt.p), ("exp_avg", opt.m),
                                          ("exp_avg_sq", opt.v)):
                        part = (value[a - t0:b - t0] if value is not None and quantity == "param"
                                else saved.read(own, quantity))
                        buf[at:at + b - a] = to_device(part)
                if whole:
                    yield name, value.reshape(spec.shape)
        except CheckpointError as e:
            problems.append(e)
    if whole:
        p.load_tensors(tensors())
    else:
        for _ in tensors():
            pass
    if problems:
        raise problems[0]


def _agreed(grid, work) -> None:
    """Run work on every rank; a CheckpointError on any becomes the same one on all (no rank
    goes on to a collective the others have left)."""
    try:
        work()
        problem = None
    except CheckpointError as e:
        problem = str(e)
    if grid.world is not None:
        problem = next((q for q in grid.world.allgather(problem) if q), None)
    if problem:
        raise CheckpointError(problem)
