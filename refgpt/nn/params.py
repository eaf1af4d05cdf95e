"""Flat parameter and gradient buffers with layout-independent initialisation.

Every parameter of a model is a *view* into one contiguous array ``Params.data``; its gradient
is the matching view into ``Params.grad``. Data-parallel bucketing, ZeRO partitioning,
clipping, checkpoints and the optimizer state are then slices of one buffer.

Initialisation draws each *full* parameter from its own random stream, keyed by
``(seed, parameter name)``::

    rng_name = Generator(PCG64(SeedSequence([seed, sha256(name)])))
    W_name   = std * rng_name.standard_normal(shape)        (drawn in float64, then cast)

so the values do not depend on the order parameters are created, on the dtype, or (later) on
how a parallel layout shards them: a rank draws the full tensor and keeps its slice.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import numpy as np

from ..backend import array_module, kernel, to_device
from ..precision import compute_dtype

@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its name, full shape, how it is initialised and whether AdamW decays it.

    init is "normal" (N(0, std^2)), "zeros" or "ones". The decay rule (as Hugging Face and
    Megatron-LM): 2-D tensors (weight matrices and both embedding tables) are decayed; biases
    and LayerNorm gains/shifts are not.
    """

    name: str
    shape: tuple
    init: str = "zeros"
    std: float = 0.0
    valid_rows: int | None = None  # rows beyond this stay zero (padded vocabulary)
    full_shape: tuple | None = None  # the unsharded shape, when this rank holds a shard

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def decay(self) -> bool:
        return len(self.shape) == 2


def unit_key(name: str) -> str:
    """The group of parameters a parameter moves with when storage is partitioned (ZeRO):
    "embed" (wte, wpe), "h.3" (a transformer block) or "ln_f"."""
    if name.startswith("h."):
        return ".".join(name.split(".")[:2])
    return "embed" if name.startswith(("wte.", "wpe.")) else name.split(".")[0]


def name_stream(seed: int, name: str) -> np.random.Generator:
    """The random stream of one parameter (or any other named quantity) for a seed."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, key])))


def init_value(spec: ParamSpec, seed: int) -> np.ndarray:
    """The full float64 initial value of a parameter, independent of layout and dtype."""
    shape = spec.full_shape or spec.shape
    if spec.init == "zeros":
        return np.zeros(shape)
    if spec.init == "ones":
        return np.ones(shape)
    if spec.init != "normal":
        raise ValueError(f"unknown init {spec.init!r} for {spec.name}")
    value = spec.std * name_stream(seed, spec.name).standard_normal(shape)
    if spec.valid_rows is not None:
        value[spec.valid_rows:] = 0.0
    return value


class Params:
    """All parameters of a model in one flat buffer, gradients in another of the same layout.

    ``params[name]`` is the parameter view, ``params.grads[name]`` its gradient view;
    ``params.slices[name]`` is its (start, stop) in the flat buffers.
    """

    def __init__(self, specs: list[ParamSpec], dtype=np.float64, pad_to: int = 1,
                 allocate: bool = True, grad_dtype=None):
        """pad_to: make the buffers' length a multiple of this (ZeRO shards them evenly);
        the padding is zero and belongs to no parameter. allocate=False: a subclass
        provides the storage (refgpt.parallel.zero). grad_dtype: the gradient buffer's type
        (default: fp32 for 16-bit parameters, refgpt.precision; else the parameters')."""
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate parameter names")
        self.specs = {s.name: s for s in specs}
        self.dtype = np.dtype(dtype)
        self.grad_dtype = np.dtype(grad_dtype or compute_dtype(self.dtype))
        self.slices, self.layout, offset = {}, [], 0
        for group, pad in self._regions(specs, pad_to):
            start = offset
            for s in group:
                self.slices[s.name] = (offset, offset + s.size)
                offset += s.size
            offset = start + -(-(offset - start) // pad) * pad
            self.layout.append((start, offset))
        self.numel = sum(s.size for s in specs)
        self.padded = offset
        self.own_runs = [(0, self.padded)]      # the parts of the buffers this rank updates
        self.working_peak = 0                   # temporary buffers' high-water mark (ZeRO)
        self.data = self.grad = None
        if allocate:
            self.data, self.grad = self._buffers()
            self._views = {n: self._view(self.data, n) for n in names}
            self.grads = {n: self._view(self.grad, n) for n in names}

    def _regions(self, specs: list[ParamSpec], pad_to: int) -> list[tuple[list, int]]:
        """The buffer's layout: runs of parameters, each padded to a multiple of its number
        (ZeRO under expert parallelism lays out two, refgpt.parallel.zero)."""
        return [(specs, pad_to)]

    def _buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """The zeroed flat parameter and gradient buffers (a subclass may place them in memory
        other processes share: refgpt.parallel.shared)."""
        xp = array_module()                             # numpy, or cupy on a GPU
        return xp.zeros(self.padded, self.dtype), xp.zeros(self.padded, self.grad_dtype)

    def free(self) -> None:
        """Give back storage shared with other processes (refgpt.parallel.shared); plain
        buffers are left to the garbage collector."""

    # -- what the optimizer updates, and what a checkpoint reads: here the whole buffers; ZeRO
    #    (refgpt.parallel.zero) keeps a shard of them and gathers the rest on demand ------------
    def param_shard(self) -> np.ndarray:
        return self.data

    def grad_shard(self) -> np.ndarray:
        return self.grad

    def full_data(self) -> np.ndarray:
        """The whole flat parameter buffer."""
        return self.data

    def gather_shards(self, shard: np.ndarray) -> np.ndarray:
        """The whole flat buffer of which shard is this rank's part (an optimizer moment)."""
        return shard

    def param_bytes(self) -> int:
        return self.data.nbytes

    @property
    def shard_size(self) -> int:
        return sum(hi - lo for lo, hi in self.own_runs)

    def in_shard(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(a, b, at): the parts [a, b) of the flat range [lo, hi) that this rank updates, and
        at, where each starts in the optimizer's shard (the own runs one after another)."""
        out, at = [], 0
        for r0, r1 in self.own_runs:
            a, b = max(lo, r0), min(hi, r1)
            if a < b:
                out.append((a, b, at + a - r0))
            at += r1 - r0
        return out

    def grad_bytes(self) -> int:
        return self.grad.nbytes

    def _view(self, buf: np.ndarray, name: str) -> np.ndarray:
        lo, hi = self.slices[name]
        return buf[lo:hi].reshape(self.specs[name].shape)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._views[name]

    def __iter__(self):
        return iter(self.specs)

    def items(self):
        return self._views.items()

    def hold(self, unit: str, phase: str):
        """The model reads the parameters of one unit (see unit_key) only inside this context,
        in phase "forward" or "backward"; ZeRO-3 gathers them there. Plain buffers hold
        every parameter all the time."""
        return contextlib.nullcontext()

    def initialise(self, seed: int, shard=None) -> None:
        """Draw every full parameter; shard(name, full) -> this rank's part, if sharded."""
        for name, spec in self.specs.items():
            value = init_value(spec, seed)
            self._write(name, shard(name, value) if shard else value)

    def _write(self, name: str, value: np.ndarray) -> None:
        """Store a parameter's (local) value; partitioned storage keeps only its part."""
        self._views[name][...] = to_device(value)

    def zero_grad(self) -> None:
        zero_fill(self.grad)

    def decay_ranges(self) -> list[tuple[int, int]]:
        """The (start, stop) ranges of the flat buffer that AdamW decays."""
        return [self.slices[n] for n, spec in self.specs.items() if spec.decay]

    def state_dict(self) -> dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self._views.items()}

    def load_state_dict(self, tensors: dict[str, np.ndarray]) -> None:
        """Set every parameter from tensors, which must have exactly this model's names and
        shapes (KeyError, ValueError if not)."""
        missing = set(self.specs) - set(tensors)
        extra = set(tensors) - set(self.specs)
        if missing or extra:
            raise KeyError(f"parameter names differ: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(extra)[:5]}")
        for name, value in tensors.items():
            self._check_shape(name, value)
        self.load_tensors(tensors.items())

    def load_tensors(self, items) -> None:
        """Set parameters from (name, this rank's value) pairs, one at a time (from a
        generator only one is in memory at once); ValueError for a wrong shape."""
        for name, value in items:
            self._check_shape(name, value)
            self._write(name, value)

    def _check_shape(self, name: str, value: np.ndarray) -> None:
        if tuple(value.shape) != tuple(self.specs[name].shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} != {self.specs[name].shape}")

    def writes_own(self, replica_rank: int) -> bool:
        """Whether this rank writes its own part of a tensor to a checkpoint, given its index
        among the ranks holding copies of it (refgpt.parallel.grid.replica_rank): data-parallel
        replicas hold the same values, and only the first writes them (ZeRO's shards
        partition the buffers: each writes its own)."""
        return replica_rank == 0


@kernel(numba="numba_cpu", half=("numba",))
def zero_fill(a: np.ndarray) -> None:
    """a[...] = 0: a gradient buffer before the step's first backward. A kernel so that a
    backend can fill it with all its threads (NumPy's fill runs on one, and at GPT-2 124M a
    gradient buffer is 500 MB)."""
    a[...] = 0
