"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

Layout of ``--save DIR``::

    DIR/latest                    the newest complete iteration, e.g. "iter_0000100"
    DIR/iter_0000100/model.safetensors       full (unsharded) parameters by name
    DIR/iter_0000100/optimizer.safetensors   AdamW moments by name: "exp_avg.NAME", "exp_avg_sq.NAME"
    DIR/iter_0000100/state.json              format, iteration, consumed samples, optimizer
                                             step, model and training configuration, dtype
    DIR/iter_0000100/tokenizer.json          when the run used a tokenizer

An iteration folder is written under a temporary name and renamed when complete, and
``latest`` is replaced atomically, so a crash never leaves a half checkpoint behind. All
tensors are stored whole, keyed by parameter name, so any later layout can load them.
Dropout masks and data order are functions of (seed, step, sample), so the configuration and
the consumed-sample count are the whole random state.
"""

from __future__ import annotations

import json
import os
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


def save_checkpoint(root, iteration: int, params: dict[str, np.ndarray],
                    moments: dict[str, dict[str, np.ndarray]], step: int, state: dict,
                    tokenizer: Path | None = None) -> Path:
    """params: full tensors by name; moments: {"exp_avg": {name: tensor}, "exp_avg_sq": ...}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{iteration:07d}"
    final, tmp = root / name, root / f".{name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_tensors(params, tmp / "model.safetensors")
    write_tensors({f"{key}.{n}": v for key, named in moments.items() for n, v in named.items()},
                  tmp / "optimizer.safetensors")
    full_state = {"format": FORMAT, "iteration": iteration, "optimizer_step": step, **state}
    (tmp / "state.json").write_text(json.dumps(full_state, indent=1))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    latest_tmp = root / f".latest.tmp{os.getpid()}"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / "latest")
    return final


def resolve(path) -> Path:
    """A checkpoint root (follow ``latest``) or an iteration folder itself."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / "state.json").is_file():
            return target
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
    folder, state = read_state(path)
    try:
        params = load_file(str(folder / "model.safetensors"))
        opt = load_file(str(folder / "optimizer.safetensors")) if with_optimizer else None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt checkpoint {folder}: {e}") from None
    return Checkpoint(folder, state, params, opt)


def named_to_flat(tensors: dict[str, np.ndarray], prefix: str, params, out: np.ndarray) -> None:
    """Fill a buffer laid out like ``params.data`` from tensors named ``prefix + NAME``."""
    for n, (lo, hi) in params.slices.items():
        key = prefix + n
        if key not in tensors:
            raise CheckpointError(f"checkpoint lacks {key}")
        value = tensors[key]
        if value.size != hi - lo:
            raise CheckpointError(f"{key}: {value.size} elements, expected {hi - lo}")
        out[lo:hi] = value.reshape(-1)
