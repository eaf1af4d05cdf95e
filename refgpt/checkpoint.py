"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

Layout of ``--save DIR``::

    DIR/latest                               the newest complete iteration, e.g. "iter_0000100"
    DIR/iter_0000100/shard_00000.safetensors   what world rank 0 owns of every tensor: the
    DIR/iter_0000100/shard_00001.safetensors   parameters as the optimizer holds them and
    ...                                         AdamW's moments (refgpt.checkpoint_shards)
    DIR/iter_0000100/state.json              format, iteration, consumed samples, optimizer
                                             step, model and training configuration, dtype,
                                             the manifest of pieces, each file's size and SHA-256
    DIR/iter_0000100/tokenizer.json          when the run used a tokenizer

Training writes this sharded form (format v2: every rank its own file, nothing gathered) and
any layout reads it back (refgpt.engine.checkpoints). The single-file form (v1:
model.safetensors with whole tensors by name, optimizer.safetensors with "exp_avg.NAME" and
"exp_avg_sq.NAME") is what ``save_checkpoint`` writes for tools that hold whole tensors
(``refgpt.convert``); both forms load everywhere.

An iteration folder is written under a temporary name (each file flushed to disk) and
renamed when complete, and ``latest`` is replaced atomically, so a crash never leaves a half
checkpoint behind. Re-saving an iteration that exists moves the old copy aside first
(``.iter_0000100.replaced*``) and deletes it only once the new one is in place; if a crash
falls between the two renames, loading takes the copy set aside. Loading checks every file
against state.json's size and SHA-256, and every tensor finite, before anything is used.
``clean_stale`` removes what crashed saves left; ``retention`` keeps the newest K iterations.
Dropout masks and data order are functions of (seed, step, sample), so the configuration and
the consumed-sample count are the whole random state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .checkpoint_shards import SavedCheckpoint, file_record
from .cli import CheckpointError, require
from .config import ConfigError, ModelConfig, TrainConfig

CONSOLIDATED, SHARDED = "refgpt-checkpoint-v1", "refgpt-checkpoint-v2"
STATE = {"iteration": int, "optimizer_step": int, "files": dict}   # state.json's, typed
TRAINING = {"consumed_samples": int, "model": dict, "train": dict}   # and a training run's
PIECE = {"name": str, "shape": list, "rows": list, "cols": list, "start": int, "stop": int,
         "file": str}                            # a manifest entry (refgpt.checkpoint_shards)


@dataclass
class Checkpoint:
    path: Path
    state: dict
    params: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray] | None

    @property
    def tokenizer(self) -> Path | None:
        p = self.path / "tokenizer.json"
        return p if p.is_file() else None


def write_tensors(tensors: dict, path, metadata: dict | None = None) -> Path:
    """safetensors' save_file, with the file's permissions as the umask asks (save_file
    writes 0600 whatever the umask; state.json and every other file get 0666 & ~umask)."""
    path = Path(path)
    save_file({n: np.require(v, requirements="C") for n, v in tensors.items()}, str(path),
              metadata=metadata)                      # (require keeps 0-d tensors 0-d)
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
    return path


def synced(path: Path) -> Path:
    """path (a file or a folder) flushed to disk: a rename after this cannot expose it
    half-written after a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


ITERATION = re.compile(r"iter_\d{7}")


def save_checkpoint(root, iteration: int, params: dict[str, np.ndarray],
                    moments: dict[str, dict[str, np.ndarray]], step: int, state: dict,
                    tokenizer: Path | None = None, retention: int = 0) -> Path:
    """The single-file form (v1): params, full tensors by name; moments: {"exp_avg": {name:
    tensor}, "exp_avg_sq": ...}; retention: keep only the newest that many iterations (0: all)."""
    tmp = begin_save(root, iteration)
    try:
        files = [write_tensors(params, tmp / "model.safetensors"),
                 write_tensors({f"{key}.{n}": v for key, named in moments.items()
                                for n, v in named.items()}, tmp / "optimizer.safetensors")]
        records = {f.name: file_record(synced(f)) for f in files}
    except OSError:
        abandon(tmp)
        raise
    return finish_save(root, iteration, tmp, {"format": CONSOLIDATED, "optimizer_step": step,
                                              **state}, records, tokenizer, retention)


def begin_save(root, iteration: int) -> Path:
    """The empty temporary folder an iteration is written into."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".iter_{iteration:07d}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def abandon(tmp: Path) -> None:
    """Remove a temporary folder whose save failed (a full disk, say)."""
    shutil.rmtree(tmp, ignore_errors=True)


def finish_save(root, iteration: int, tmp: Path, state: dict, records: dict,
                tokenizer: Path | None = None, retention: int = 0) -> Path:
    """Complete a save whose tensor files (records: {file name: file_record}) are in tmp:
    state.json, the rename into place and ``latest`` (module docstring); returns the folder.
    On an OSError nothing of this save stays and the previous ``latest`` stands."""
    root = Path(root)
    name = f"iter_{iteration:07d}"
    final, aside = root / name, root / f".{name}.replaced{os.getpid()}"
    latest_tmp = root / f".latest.tmp{os.getpid()}"
    try:
        if tokenizer is not None:
            copy = Path(shutil.copyfile(tokenizer, tmp / "tokenizer.json"))
            records = {**records, copy.name: file_record(synced(copy))}
        full_state = {**state, "iteration": iteration, "files": records}
        (tmp / "state.json").write_text(json.dumps(full_state, indent=1))
        synced(tmp / "state.json")
        synced(tmp)
        if final.exists():              # the good copy is deleted only once this one is in place
            final.rename(aside)
        tmp.rename(final)
        latest_tmp.write_text(name + "\n")
        synced(latest_tmp)
        os.replace(latest_tmp, root / "latest")
        synced(root)
    except OSError:                     # a full disk, say: nothing half-written stays behind
        abandon(tmp)
        latest_tmp.unlink(missing_ok=True)
        raise
    if aside.exists():
        shutil.rmtree(aside)
    if retention:
        for old in iterations(root)[:-retention]:
            shutil.rmtree(old)
    return final


def unwritable(root) -> str | None:
    """Why checkpoints cannot be written under root, or None: found before training, not at
    the first save, after the work. Nothing is created: a folder that does not exist yet is
    judged by the nearest one above it that does."""
    root = Path(root).absolute()
    if root.exists() and not root.is_dir():
        return f"--save {root}: exists and is not a folder"
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        return f"--save {root}: {existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--save {root}: {existing} is not writable"
    return None


def iterations(root) -> list[Path]:
    """The complete iteration folders of a checkpoint root, oldest first."""
    return sorted(p for p in Path(root).iterdir()
                  if ITERATION.fullmatch(p.name) and (p / "state.json").is_file())


def clean_stale(root) -> list[Path]:
    """Remove what interrupted saves left in a checkpoint root (temporary folders and files,
    copies set aside whose replacement is in place); returns what was removed."""
    root, removed = Path(root), []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        m = re.fullmatch(r"\.(iter_\d{7})\.(tmp|replaced)\d+|\.latest\.tmp\d+", p.name)
        if m is None:
            continue
        if m.group(2) == "replaced" and not (root / m.group(1) / "state.json").is_file():
            continue                    # the only copy of that iteration: resolve() loads it
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        removed.append(p)
    return removed


def resolve(path) -> Path:
    """A checkpoint root (follow ``latest``) or an iteration folder itself."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if not ITERATION.fullmatch(name):
            raise CheckpointError(f"{latest} names {name[:80]!r}, not an iteration folder "
                                  f"(iter_NNNNNNN) of {path}")
        target = path / name
        if (target / "state.json").is_file():
            return target
        for aside in sorted(path.glob(f".{name}.replaced*")):   # a crash between two renames
            if (aside / "state.json").is_file():
                return aside
        raise CheckpointError(f"{latest} names {target.name}, which is missing or incomplete")
    raise CheckpointError(f"no checkpoint at {path} (neither state.json nor latest found)")


def read_state(path) -> tuple[Path, dict]:
    """(iteration folder, its state.json) of a checkpoint, without reading its tensors."""
    folder = resolve(path)
    try:
        state = json.loads((folder / "state.json").read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"corrupt checkpoint {folder}: {e}") from None
    if not isinstance(state, dict) or state.get("format") not in (CONSOLIDATED, SHARDED):
        raise CheckpointError(f"{folder}: unknown checkpoint format "
                              f"{state.get('format') if isinstance(state, dict) else state!r}")
    where = folder / "state.json"
    require(state, STATE, str(where), CheckpointError)
    for name, record in state["files"].items():
        require(record, {"bytes": int, "sha256": str}, f"{where}: files: {name}", CheckpointError)
    pieces = state.get("pieces", []) if state["format"] == SHARDED else []
    for entry in pieces:
        require(entry, PIECE, f"{where}: pieces", CheckpointError)
        if set(entry) != set(PIECE):
            raise CheckpointError(f"{where}: pieces: unexpected keys {sorted(set(entry) - set(PIECE))}")
    for name in [*state["files"], *(e["file"] for e in pieces)]:
        if name not in state["files"] or Path(name).name != name:  # a file of this folder,
            raise CheckpointError(f"{where}: {name[:80]!r} is not one of its files")  # checked
    return folder, state


def read_training_state(path) -> tuple[Path, dict]:
    """read_state, for resuming a run: with what a training run's state.json also holds."""
    folder, state = read_state(path)
    require(state, TRAINING, str(folder / "state.json"), CheckpointError)
    try:
        ModelConfig.from_dict(state["model"])
        TrainConfig.from_dict(state["train"])
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'state.json'}: {e}") from None
    return folder, state


def open_checkpoint(path) -> SavedCheckpoint:
    """A checkpoint's state.json and manifest; its tensors are read on demand
    (refgpt.checkpoint_shards.SavedCheckpoint)."""
    return SavedCheckpoint(*read_state(path))


def load_checkpoint(path, with_optimizer: bool = True) -> Checkpoint:
    """The checkpoint's state and whole tensors (either form), each file checked against the
    size and SHA-256 state.json records and every tensor checked finite."""
    saved = open_checkpoint(path)
    saved.verify(saved.files())
    params = {n: saved.full(n) for n in sorted(saved.names())}
    optimizer = ({f"{q}.{n}": saved.full(n, q) for q in ("exp_avg", "exp_avg_sq")
                  for n in sorted(saved.names(q))} if with_optimizer else None)
    saved.close()
    return Checkpoint(saved.folder, saved.state, params, optimizer)


def consolidate(src, dst) -> Path:
    """Write a checkpoint (either form) as the single-file form under dst, at its iteration:
    whole tensors, which tools outside refgpt read by name."""
    ckpt = load_checkpoint(src)
    state = {k: v for k, v in ckpt.state.items()
             if k not in ("format", "iteration", "optimizer_step", "files", "pieces")}
    moments = {q: {k[len(q) + 1:]: v for k, v in ckpt.optimizer.items() if k.startswith(q + ".")}
               for q in ("exp_avg", "exp_avg_sq")}
    return save_checkpoint(dst, ckpt.state["iteration"], ckpt.params, moments,
                           ckpt.state["optimizer_step"], state, ckpt.tokenizer)
