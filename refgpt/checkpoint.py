"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

Layout of ``--save DIR``::

    DIR/latest                    the newest complete iteration, e.g. "iter_0000100"
    DIR/iter_0000100/model.safetensors       full (unsharded) parameters by name
    DIR/iter_0000100/optimizer.safetensors   AdamW moments by name: "exp_avg.NAME", "exp_avg_sq.NAME"
    DIR/iter_0000100/state.json              format, iteration, consumed samples, optimizer
                                             step, model and training configuration, dtype
    DIR/iter_0000100/tokenizer.json          when the run used a tokenizer

An iteration folder is written under a temporary name (each file flushed to disk) and
renamed when complete, and ``latest`` is replaced atomically, so a crash never leaves a half
checkpoint behind. Re-saving an iteration that exists moves the old copy aside first
(``.iter_0000100.replaced*``) and deletes it only once the new one is in place; if a crash
falls between the two renames, loading takes the copy set aside. state.json records each
file's size and SHA-256, and loading checks them, and that every tensor is finite, before
anything is used. ``clean_stale`` removes what crashed saves left; ``retention`` keeps the
newest K iterations. All tensors are stored whole, keyed by parameter name, so any later
layout can load them.
Dropout masks and data order are functions of (seed, step, sample), so the configuration and
the consumed-sample count are the whole random state.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .cli import CheckpointError

FORMAT = "refgpt-checkpoint-v1"


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


def flat_to_named(flat: np.ndarray, params) -> dict[str, np.ndarray]:
    """Split a buffer laid out like ``params.data`` into named, shaped tensors."""
    return {n: flat[lo:hi].reshape(params.specs[n].shape) for n, (lo, hi) in params.slices.items()}


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


def _synced(path: Path) -> Path:
    """path (a file or a folder) flushed to disk: a rename after this cannot expose it
    half-written after a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def file_record(path: Path) -> dict:
    """{"bytes", "sha256"} of a file, as state.json records it."""
    with open(path, "rb") as f:
        return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


ITERATION = re.compile(r"iter_\d{7}")


def save_checkpoint(root, iteration: int, params: dict[str, np.ndarray],
                    moments: dict[str, dict[str, np.ndarray]], step: int, state: dict,
                    tokenizer: Path | None = None, retention: int = 0) -> Path:
    """params: full tensors by name; moments: {"exp_avg": {name: tensor}, "exp_avg_sq": ...};
    retention: keep only the newest that many iteration folders (0: all)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{iteration:07d}"
    final, tmp = root / name, root / f".{name}.tmp{os.getpid()}"
    latest_tmp = root / f".latest.tmp{os.getpid()}"
    aside = root / f".{name}.replaced{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files = [write_tensors(params, tmp / "model.safetensors"),
                 write_tensors({f"{key}.{n}": v for key, named in moments.items()
                                for n, v in named.items()}, tmp / "optimizer.safetensors")]
        if tokenizer is not None:
            files.append(Path(shutil.copyfile(tokenizer, tmp / "tokenizer.json")))
        records = {f.name: file_record(_synced(f)) for f in files}
        full_state = {"format": FORMAT, "iteration": iteration, "optimizer_step": step, **state,
                      "files": records}
        (tmp / "state.json").write_text(json.dumps(full_state, indent=1))
        _synced(tmp / "state.json")
        _synced(tmp)
        if final.exists():              # the good copy is deleted only once this one is in place
            final.rename(aside)
        tmp.rename(final)
        latest_tmp.write_text(name + "\n")
        _synced(latest_tmp)
        os.replace(latest_tmp, root / "latest")
        _synced(root)
    except OSError:                     # a full disk, say: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
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
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: unknown checkpoint format "
                              f"{state.get('format') if isinstance(state, dict) else state!r}")
    return folder, state


def load_checkpoint(path, with_optimizer: bool = True) -> Checkpoint:
    """The checkpoint's state and tensors, each file checked against the size and SHA-256
    state.json records (checkpoints written before it recorded them are read as they are)
    and every tensor checked finite."""
    folder, state = read_state(path)
    names = ["model.safetensors"] + (["optimizer.safetensors"] if with_optimizer else [])
    records = state.get("files", {})
    try:
        for name in names + (["tokenizer.json"] if "tokenizer.json" in records else []):
            if name in records and file_record(folder / name) != records[name]:
                raise CheckpointError(f"corrupt checkpoint: {folder / name} does not match the "
                                      f"size and SHA-256 in its state.json")
        loaded = [load_file(str(folder / n)) for n in names]
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt checkpoint {folder}: {e}") from None
    for name, tensors in zip(names, loaded):
        for key, value in tensors.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise CheckpointError(f"corrupt checkpoint: {folder / name}: tensor {key} holds "
                                      f"non-finite values")
    return Checkpoint(folder, state, loaded[0], loaded[1] if with_optimizer else None)


def named_to_flat(tensors: dict[str, np.ndarray], prefix: str, params, out: np.ndarray) -> None:
    """Fill a buffer laid out like ``params.data`` from tensors named ``prefix + NAME``."""
    for n, (lo, hi) in params.slices.items():
        key = prefix + n
        if key not in tensors:
            raise CheckpointError(f"checkpoint lacks {key}")
        value = tensors[key]
        if value.size != hi - lo:
            raise CheckpointError(f"{key}: {value.size} elements, expected {hi - lo}")
        shape = params.specs[n].shape
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(f"{key}: shape {value.shape}, expected {shape}")
        out[lo:hi] = value.reshape(-1)
