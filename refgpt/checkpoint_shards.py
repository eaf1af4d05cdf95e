"""Distributed checkpoints: the piece of each tensor a rank holds, and reading pieces saved by
any layout into any other.

A parameter of full shape S is viewed 2-D, G [R, C] (R the product of S's leading axes, C
its last; a vector of n is 1 x n). Every layout refgpt has holds of G a product grid

    G[rows] x [cols]     rows, cols: global indices; 1-D TP a block of rows, of columns or of
                         each of q, k and v's columns, 2-D TP a block of rows and of columns
                         (Sublayers.shard_index), no TP all of G

and of that grid, in row-major order, the elements [start, stop): ZeRO's shard of the flat
buffer cuts it anywhere, mid-row too. A ``Piece`` records exactly that, rows and cols as
runs [a, b) of consecutive indices (a TP shard has one run of rows and one to three of
columns), and the file it is stored in. Each stored quantity (the parameters as the
optimizer holds them, AdamW's two moments) is a 1-D tensor of stop - start values keyed
``NAME``, ``exp_avg.NAME``, ``exp_avg_sq.NAME``.

Saving: every rank writes the pieces it owns to its own file (``shard_RRRRR.safetensors``),
nothing gathered; state.json lists every piece (the manifest) and each file's size and
SHA-256. An element is written by one rank only: the one that counts it in the gradient norm
(tensor- and pipeline-parallel copies, refgpt.nn.gpt.counted), and of data-parallel replicas
the first (without ZeRO every DP rank holds all; with ZeRO the shards partition the buffer).

Loading into another layout (``SavedCheckpoint.read``): for a piece a rank needs, each saved
piece of the same tensor whose global rows meet the needed rows is read as one contiguous
byte range (safetensors' lazy slices: the rows in common, whole), and the elements in common
are copied across, rows and columns matched by global index (np.intersect1d). So a rank reads
the rows it needs of each saved piece, never a whole tensor unless it needs it. Every element
needed must be found: a gap is an error naming the tensor.

The single-file form of earlier checkpoints (model.safetensors + optimizer.safetensors,
whole tensors by name) is read the same way: each tensor is one piece, the whole grid.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from .cli import CheckpointError
from .nn.sublayers import grid_shape

QUANTITIES = {"param": "", "exp_avg": "exp_avg.", "exp_avg_sq": "exp_avg_sq."}   # key prefixes


def runs(indices: np.ndarray) -> list[list[int]]:
    """Sorted unique indices as runs [a, b) of consecutive ones."""
    indices = np.asarray(indices, np.int64)
    if indices.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(indices) != 1) + 1
    starts, stops = indices[np.r_[0, cuts]], indices[np.r_[cuts - 1, indices.size - 1]] + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def expand(spans: list[list[int]]) -> np.ndarray:
    """The indices of runs (inverse of runs)."""
    return np.concatenate([np.arange(a, b) for a, b in spans]) if spans else np.zeros(0, np.int64)


@dataclass
class Piece:
    """Elements [start, stop) of the row-major grid rows x cols of tensor name (full shape
    shape), stored in file (module docstring)."""

    name: str
    shape: list[int]
    rows: list[list[int]]
    cols: list[list[int]]
    start: int
    stop: int
    file: str = ""

    @property
    def size(self) -> int:
        return self.stop - self.start

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def whole(cls, name: str, shape, file: str = "") -> "Piece":
        """All of a tensor."""
        r, c = grid_shape(tuple(shape))
        return cls(name, list(shape), [[0, r]] if r else [], [[0, c]] if c else [], 0, r * c, file)


def owned_pieces(model, writes) -> list[tuple[Piece, int, int]]:
    """(piece, a, b): the parts of each of this rank's tensors in its own runs of the flat
    buffer (refgpt.nn.params.in_shard), as pieces and as [a, b) of the optimizer's shard; for
    a tensor with writes(name) False (a data-parallel replica's), or for the copies another
    rank writes (module docstring), nothing."""
    params, out = model.params, []
    for name, (t0, t1) in params.slices.items():
        if not writes(name) or not model.counted(name):
            continue
        spec = params.specs[name]
        rows, cols = model.shard_index(name)
        for a, b, at in params.in_shard(t0, t1):
            out.append((Piece(name, list(spec.full_shape or spec.shape), runs(rows), runs(cols),
                              a - t0, b - t0), at, at + b - a))
    return out


def file_record(path: Path) -> dict:
    """{"bytes", "sha256"} of a file, as state.json records it."""
    with open(path, "rb") as f:
        return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


class SavedCheckpoint:
    """A checkpoint folder opened for reading: its manifest, and pieces read on demand."""

    def __init__(self, folder: Path, state: dict):
        self.folder, self.state, self.handles, self._pieces = Path(folder), state, {}, None

    @property
    def pieces(self) -> dict[str, dict[str, list[Piece]]]:
        """{quantity: {tensor name: its saved pieces}}, from the manifest; for the single-file
        form from the files' headers (each tensor one piece), read when first needed: after
        verify has checked the files."""
        if self._pieces is None:
            self._pieces = {q: {} for q in QUANTITIES}
            if "pieces" in self.state:
                for entry in self.state["pieces"]:
                    piece = Piece(**entry)
                    for q in QUANTITIES:
                        self._pieces[q].setdefault(piece.name, []).append(piece)
            else:
                for q, file in (("param", "model.safetensors"),
                                ("exp_avg", "optimizer.safetensors"),
                                ("exp_avg_sq", "optimizer.safetensors")):
                    if (self.folder / file).is_file():
                        prefix, header = QUANTITIES[q], self._open(file)
                        for key in header.keys():
                            if key.startswith(prefix):
                                name = key[len(prefix):]
                                shape = header.get_slice(key).get_shape()
                                self._pieces[q][name] = [Piece.whole(name, shape, file)]
        return self._pieces

    # -- files --------------------------------------------------------------------------------
    def _open(self, file: str):
        if file not in self.handles:
            try:
                self.handles[file] = safe_open(str(self.folder / file), framework="np")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"corrupt checkpoint {self.folder}: {file}: {e}") from None
        return self.handles[file]

    def files(self) -> list[str]:
        """The files state.json records (size and SHA-256), in order."""
        return sorted(self.state.get("files", {}))

    def verify(self, files: list[str]) -> None:
        """Check these files against the size and SHA-256 state.json records."""
        records = self.state.get("files", {})
        for file in files:
            path = self.folder / file
            if not path.is_file():
                raise CheckpointError(f"corrupt checkpoint: {path} is missing")
            if file_record(path) != records[file]:
                raise CheckpointError(f"corrupt checkpoint: {path} does not match the size "
                                      f"and SHA-256 in its state.json")

    def close(self) -> None:
        self.handles.clear()

    # -- tensors ------------------------------------------------------------------------------
    def names(self, quantity: str = "param") -> set[str]:
        return set(self.pieces[quantity])

    def shape(self, name: str) -> tuple:
        return tuple(self.pieces["param"][name][0].shape)

    def full(self, name: str, quantity: str = "param") -> np.ndarray:
        """A whole tensor."""
        shape = self.shape(name)
        need = Piece.whole(name, shape)
        return self.read(need, quantity).reshape(shape)

    def read(self, need: Piece, quantity: str = "param") -> np.ndarray:
        """The need.size values of the needed piece, from the saved pieces of its tensor
        (module docstring); checked present and finite."""
        saved = self.pieces[quantity].get(need.name)
        if not saved:
            raise CheckpointError(f"checkpoint {self.folder} lacks "
                                  f"{QUANTITIES[quantity]}{need.name}")
        if tuple(saved[0].shape) != tuple(need.shape):
            raise CheckpointError(f"checkpoint {self.folder}: {need.name} has shape "
                                  f"{tuple(saved[0].shape)}, the model {tuple(need.shape)}")
        rows, cols = expand(need.rows), expand(need.cols)
        nc = len(cols)
        r0, r1 = need.start // nc, -(-need.stop // nc)               # the grid rows touched
        out = np.zeros((r1 - r0, nc), self._dtype(saved[0], quantity))
        found = np.zeros((r1 - r0, nc), bool)
        for piece in saved:
            self._copy(piece, quantity, rows[r0:r1], cols, out, found)
        part = slice(need.start - r0 * nc, need.stop - r0 * nc)
        if not found.reshape(-1)[part].all():
            raise CheckpointError(f"checkpoint {self.folder}: the saved pieces of "
                                  f"{QUANTITIES[quantity]}{need.name} do not cover this layout's")
        return out.reshape(-1)[part]

    def _dtype(self, piece: Piece, quantity: str) -> np.dtype:
        return self._slice(piece, quantity, 0, 0).dtype

    def _slice(self, piece: Piece, quantity: str, a: int, b: int) -> np.ndarray:
        """Values [a, b) of a saved piece, read from its file (checked finite)."""
        key = QUANTITIES[quantity] + piece.name
        try:
            stored = self._open(piece.file).get_slice(key)
            if stored.get_shape() != ([piece.size] if "pieces" in self.state else piece.shape):
                raise CheckpointError(f"checkpoint {self.folder}: {piece.file}: {key} has "
                                      f"shape {stored.get_shape()}, its manifest says "
                                      f"{piece.size} values")
            if len(stored.get_shape()) == 1:
                values = stored[a:b]
            else:                           # a whole matrix: its rows that hold [a, b)
                nc = piece.shape[-1]
                values = np.asarray(stored[a // nc:-(-b // nc)]).reshape(-1)
                values = values[a % nc:a % nc + b - a]
        except SafetensorError as e:
            raise CheckpointError(f"corrupt checkpoint {self.folder}: {piece.file}: {e}") from None
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise CheckpointError(f"corrupt checkpoint: {self.folder / piece.file}: tensor "
                                  f"{key} holds non-finite values")
        return np.asarray(values).reshape(-1)

    def _copy(self, piece: Piece, quantity: str, rows, cols, out, found) -> None:
        """Copy what a saved piece holds of the grid rows x cols into out (marking found).
        The piece is up to three rectangles of its grid (a partial first row, whole rows, a
        partial last row: ZeRO's cut falls anywhere); each is read once, as the contiguous
        range of its rows that meet the rows needed."""
        srows, scols = expand(piece.rows), expand(piece.cols)
        snc = len(scols)
        for r0, r1, c0, c1 in _rectangles(piece.start, piece.stop, snc):
            _, mine, theirs = np.intersect1d(rows, srows[r0:r1], assume_unique=True,
                                             return_indices=True)
            if not len(mine):
                continue
            _, mine_c, theirs_c = np.intersect1d(cols, scols[c0:c1], assume_unique=True,
                                                 return_indices=True)
            if not len(mine_c):
                continue
            first, last = r0 + theirs.min(), r0 + theirs.max() + 1      # grid rows to read
            lo = first * snc + c0 - piece.start         # (a rectangle of more than one row
            hi = (last - 1) * snc + c1 - piece.start    # has whole rows: one range)
            block = self._slice(piece, quantity, lo, hi).reshape(last - first, c1 - c0)
            src = (_index(theirs + r0 - first), _index(theirs_c))
            dst = (_index(mine), _index(mine_c))
            out[_grid(dst)] = block[_grid(src)]
            found[_grid(dst)] = True


def _rectangles(start: int, stop: int, nc: int) -> list[tuple[int, int, int, int]]:
    """Elements [start, stop) of a row-major grid of nc columns as rectangles (rows r0:r1,
    columns c0:c1): a partial first row, whole rows, a partial last row."""
    out = []
    while start < stop:
        r, c = divmod(start, nc)
        if c or stop - start < nc:                      # part of one row
            end = min(nc, c + stop - start)
            out.append((r, r + 1, c, end))
            start += end - c
        else:                                           # whole rows
            k = (stop - start) // nc
            out.append((r, r + k, 0, nc))
            start += k * nc
    return out


def _index(idx: np.ndarray):
    """Ascending indices as a slice where they are consecutive (a view, not a gather)."""
    return slice(int(idx[0]), int(idx[-1]) + 1) if idx[-1] - idx[0] == len(idx) - 1 else idx


def _grid(index: tuple):
    """Row and column indices (slices or arrays) as one index of their product."""
    rows, cols = index
    if isinstance(rows, slice) or isinstance(cols, slice):
        return rows, cols
    return np.ix_(rows, cols)
