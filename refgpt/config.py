"""Model and training configuration, with one clear message for every impossible setting.

``validate()`` raises :class:`ConfigError`; entry points print its message on one line and
exit with status 2, before any work (or, later, any collective) starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .precision import DTYPE_NAMES


class ConfigError(ValueError):
    """A configuration that cannot run. The message is meant for the user, as is."""


# The choices of the settings below, named once (the flags' help, the backends and the
# pipeline schedules take them from here).
DTYPES = DTYPE_NAMES                    # float64, float32, and 16 bits (refgpt.precision)
BACKENDS = ("numpy", "numba", "cupy")
DECAY_STYLES = ("cosine", "linear", "constant")
GELU_KINDS = ("tanh", "erf")
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
TP_MODES = ("1d", "2d")
CP_COMM_TYPES = ("p2p", "a2a")
ALLREDUCE_ALGORITHMS = ("mpi", "ring", "tree", "hierarchical")
OPTIMIZERS = ("adam", "onebit-adam", "lamb")


@dataclass
class ModelConfig:
    """Shape of a GPT-2 style model.

    ``vocab_size`` is the tokenizer's vocabulary; the embedding table has ``padded_vocab``
    rows (rounded up to ``vocab_multiple`` so the head GEMM has a friendly size). Padded rows
    stay zero and padded logits never enter softmax or loss.
    """

    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    seq_length: int = 128
    max_position_embeddings: int = 0  # 0: same as seq_length
    vocab_size: int = 8192
    vocab_multiple: int = 64
    dropout: float = 0.0
    gelu: str = "tanh"
    layernorm_eps: float = 1e-5
    init_std: float = 0.02
    num_experts: int = 0  # 0: every block has the dense MLP (refgpt.nn.moe)
    moe_layer_freq: int = 1
    moe_router_topk: int = 2
    moe_expert_capacity_factor: float = 0.0  # 0: no capacity limit, no token dropped
    moe_token_drop_policy: str = "probs"
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float = 0.0

    @property
    def n_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        positive = ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                    "vocab_size", "vocab_multiple")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"--hidden-size {self.hidden_size} is not divisible by "
                              f"--num-attention-heads {self.num_attention_heads}")
        if self.max_position_embeddings and self.max_position_embeddings < self.seq_length:
            raise ConfigError(f"--max-position-embeddings {self.max_position_embeddings} is smaller "
                              f"than --seq-length {self.seq_length}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.gelu not in GELU_KINDS:
            raise ConfigError(f"--gelu must be one of {GELU_KINDS}, got {self.gelu!r}")
        self.validate_moe()

    def validate_moe(self) -> None:
        if self.num_experts < 0:
            raise ConfigError(f"--num-experts must be >= 0 (0: no experts), got {self.num_experts}")
        if not self.num_experts:
            return
        if self.moe_layer_freq < 1:
            raise ConfigError(f"--moe-layer-freq must be >= 1, got {self.moe_layer_freq}")
        if not 1 <= self.moe_router_topk <= self.num_experts:
            raise ConfigError(f"--moe-router-topk must be between 1 and --num-experts "
                              f"{self.num_experts}, got {self.moe_router_topk}")
        if self.moe_token_drop_policy not in ("probs", "position"):
            raise ConfigError(f"--moe-token-drop-policy must be probs or position, got "
                              f"{self.moe_token_drop_policy!r}")
        for flag in ("moe_expert_capacity_factor", "moe_aux_loss_coeff", "moe_z_loss_coeff"):
            if not getattr(self, flag) >= 0:
                raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got "
                                  f"{getattr(self, flag)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model settings: {sorted(unknown)}")
        return cls(**{k: typed(cls, k, v) for k, v in d.items()})


def typed(cls, name: str, value):
    """value as the config field's type (its default's), which a TOML file may not have given:
    an integer is a float where a float is asked for; anything else of the wrong type (a
    string for a number, 2.0 or true for a count) is refused."""
    want = type(next(f for f in dataclasses.fields(cls) if f.name == name).default)
    ok = (isinstance(value, bool) if want is bool else
          isinstance(value, int) and not isinstance(value, bool) if want is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
          isinstance(value, want))
    if not ok:
        kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        raise ConfigError(f"{name.replace('_', '-')} must be {kinds.get(want, want.__name__)}, "
                          f"got {value!r}")
    return float(value) if want is float else value


@dataclass
class TrainConfig:
    """Optimisation, data and bookkeeping settings (Megatron-LM flag names, underscored)."""

    micro_batch_size: int = 4
    global_batch_size: int = 16
    train_iters: int = 200
    exit_interval: int = 0  # 0: never exit early
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup_iters: int = 20
    lr_warmup_init: float = 0.0
    lr_decay_style: str = "cosine"
    lr_decay_iters: int = 0  # 0: same as train_iters
    optimizer: str = "adam"  # adam (AdamW), onebit-adam or lamb
    onebit_warmup_iters: int = 100  # 1-bit Adam: steps of plain Adam before compression
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    seed: int = 1234
    dtype: str = "float32"  # bfloat16, float16: mixed precision (--bf16, --fp16)
    loss_scale: float = 0.0  # a static loss scale; 0: dynamic with float16, none with bfloat16
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000  # overflow-free steps before the dynamic scale doubles
    hysteresis: int = 2  # overflows in a row before it halves
    backend: str = "numba"  # numba (fused CPU kernels), numpy (the reference), cupy (GPUs)
    tf32: bool = False  # with --backend cupy, float32: cuBLAS's float32 GEMMs on tensor cores
    data_path: str = ""
    synthetic_data: bool = False
    eval_interval: int = 100
    eval_iters: int = 4
    save: str = ""
    load: str = ""
    save_interval: int = 0  # 0: only at the end
    save_retention: int = 0  # keep the newest K iteration folders (0: all)
    exit_signal_handler: bool = False  # SIGTERM/SIGINT: finish the step, save, exit 0
    async_save: bool = False  # interval checkpoints written by a thread while training goes on
    log_interval: int = 10
    log_jsonl: str = ""
    tensorboard_dir: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The settings a checkpoint recorded (those this version does not know are left out,
        those it adds since keep their defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: typed(cls, k, v) for k, v in d.items() if k in known})

    def micro_batches(self, data_parallel_size: int = 1) -> int:
        """Micro-batches each data-parallel rank runs per step: G / (d B)."""
        return self.global_batch_size // (data_parallel_size * self.micro_batch_size)

    def validate(self, data_parallel_size: int = 1) -> None:
        for f in dataclasses.fields(self):             # nan and inf pass every comparison test
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, "
                                  f"got {value}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, "
                              f"got {self.optimizer!r}")
        for name in ("micro_batch_size", "global_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("train_iters", "exit_interval", "lr_warmup_iters", "eval_interval",
                     "eval_iters", "save_interval", "save_retention", "lr_decay_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is not divisible by "
                              f"--micro-batch-size {self.micro_batch_size} x data-parallel size "
                              f"{data_parallel_size}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.tf32 and (self.backend != "cupy" or self.dtype != "float32"):
            raise ConfigError(f"--tf32 runs the float32 GEMMs of a GPU on its tensor cores: it "
                              f"needs --backend cupy and float32 (got --backend {self.backend}, "
                              f"{self.dtype})")
        if self.loss_scale < 0 or self.initial_loss_scale <= 0 or self.min_loss_scale <= 0:
            raise ConfigError("need --loss-scale >= 0 (0: dynamic), --initial-loss-scale > 0 and "
                              "--min-loss-scale > 0")
        if self.min_loss_scale > self.initial_loss_scale:
            raise ConfigError(f"--min-loss-scale {self.min_loss_scale} is above "
                              f"--initial-loss-scale {self.initial_loss_scale}")
        if self.loss_scale_window < 1 or self.hysteresis < 1:
            raise ConfigError("--loss-scale-window and --hysteresis must be >= 1")
        if self.loss_scale and self.dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"--loss-scale scales 16-bit training (--fp16, --bf16); this run "
                              f"is {self.dtype}")
        if self.lr_decay_style not in DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style must be one of {DECAY_STYLES}, got {self.lr_decay_style!r}")
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= --min-lr <= --lr, got --lr {self.lr} --min-lr {self.min_lr}")
        if not 0 <= self.lr_warmup_init <= self.lr:
            raise ConfigError(f"need 0 <= --lr-warmup-init <= --lr, got {self.lr_warmup_init}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError("--adam-beta1 and --adam-beta2 must be in [0, 1)")
        if self.optimizer == "onebit-adam" and self.onebit_warmup_iters < 1:
            raise ConfigError(f"--onebit-warmup-iters must be >= 1 (1-bit Adam freezes the "
                              f"variance its warm-up estimates), got {self.onebit_warmup_iters}")
        if self.adam_eps <= 0:
            raise ConfigError(f"--adam-eps must be > 0, got {self.adam_eps}")
        if self.clip_grad < 0:
            raise ConfigError(f"--clip-grad must be >= 0 (0 disables clipping), got {self.clip_grad}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.synthetic_data and self.data_path:
            raise ConfigError("give either --data-path or --synthetic-data, not both")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ParallelConfig:
    """Process layout and the knobs of parallel execution."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1  # experts split over groups of this many DP ranks
    context_parallel_size: int = 1  # each sequence split over groups of this many DP ranks
    cp_comm_type: str = "p2p"  # context parallelism's attention: p2p (ring) or a2a (Ulysses)
    sequence_parallel: bool = False
    pipeline_schedule: str = "1f1b"
    num_virtual_stages: int = 1
    ddp_bucket_size: int = 1_000_000  # elements per gradient all-reduce bucket; 0: one bucket
    overlap_grad_reduce: bool = True  # all-reduce buckets during backward (False: after it)
    layered_gradient_accumulation: bool = False  # micro-batches breadth-first, unit by unit
    threads_per_rank: int = 0  # 0: refgpt.parallel.threads.default_threads
    timing_log_level: int = 1
    tensor_parallel_mode: str = "1d"  # 1d: Megatron; 2d: SUMMA on a q x q grid (t = q^2)
    zero_stage: int = 0  # ZeRO over the data-parallel group: 1 optimizer state, 2 + grads, 3 + params
    dp_shared_memory: bool = False  # ZeRO-1 through node-shared memory (refgpt.parallel.shared)
    dp_allreduce_algorithm: str = "mpi"  # the DP gradient sum: mpi, ring, tree, hierarchical
    dp_comm_thread: bool = False  # the DP gradient sums on a helper thread during backward
    offload_optimizer: str = ""  # folder for AdamW's moments as np.memmap files ("": in memory)
    grad_reduce_in_bf16: bool = False  # with --bf16: gradients accumulated and reduced in bf16
    recompute_granularity: str = ""  # full: blocks rerun in backward; selective: attention cores
    recompute_method: str = "uniform"  # uniform: every block; block: the first N of each stage
    recompute_num_layers: int = 1  # uniform: blocks per recomputed chunk; block: N
    recompute_num_layers_per_stage: str = ""  # block: "N0,N1,...", N per pipeline rank
    distributed_timeout_minutes: float = 10.0  # a rank stuck this long in a phase ends the job

    def recomputed_blocks(self, blocks: int, pp_rank: int = 0) -> int:
        """How many of a model chunk's blocks (the first ones) recompute their forward, on
        pipeline rank pp_rank."""
        if self.recompute_granularity != "full":
            return 0
        if self.recompute_method == "uniform":
            return blocks
        per_stage = self.recompute_per_stage()
        return min(blocks, per_stage[pp_rank] if per_stage else self.recompute_num_layers)

    def recompute_chunk(self) -> int:
        """Blocks per recomputed chunk: --recompute-num-layers with uniform, 1 with block."""
        return self.recompute_num_layers if self.recompute_method == "uniform" else 1

    def recompute_per_stage(self) -> tuple[int, ...]:
        """--recompute-num-layers-per-stage as numbers (empty when not given)."""
        text = self.recompute_num_layers_per_stage.strip()
        if not text:
            return ()
        try:
            counts = tuple(int(n) for n in text.split(","))
        except ValueError:
            counts = (-1,)
        if min(counts) < 0:
            raise ConfigError(f"--recompute-num-layers-per-stage must be a comma-separated list "
                              f"of counts >= 0, one per pipeline stage (as 2,2,1,0), got {text!r}")
        return counts

    def validate(self) -> None:
        """Settings on their own; the fit to the world size is refgpt.parallel.grid.check_sizes."""
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.pipeline_schedule not in SCHEDULES:
            raise ConfigError(f"--pipeline-schedule must be one of {SCHEDULES}, "
                              f"got {self.pipeline_schedule!r}")
        if self.num_virtual_stages < 1:
            raise ConfigError("--num-virtual-stages must be >= 1")
        if self.ddp_bucket_size < 0 or self.threads_per_rank < 0:
            raise ConfigError("--ddp-bucket-size and --threads-per-rank must be >= 0")
        if self.tensor_parallel_mode not in TP_MODES:
            raise ConfigError(f"--tensor-parallel-mode must be one of {TP_MODES}, "
                              f"got {self.tensor_parallel_mode!r}")
        if self.tensor_parallel_mode == "2d" and self.sequence_parallel:
            raise ConfigError("--tensor-parallel-mode 2d does not combine with "
                              "--sequence-parallel (2-D already splits every activation)")
        if self.dp_allreduce_algorithm not in ALLREDUCE_ALGORITHMS:
            raise ConfigError(f"--dp-allreduce-algorithm must be one of "
                              f"{', '.join(ALLREDUCE_ALGORITHMS)}, got "
                              f"{self.dp_allreduce_algorithm!r}")
        if self.dp_comm_thread and (self.zero_stage or self.dp_shared_memory):
            raise ConfigError("--dp-comm-thread runs the data-parallel all-reduce on a helper "
                              "thread; ZeRO (and --dp-shared-memory) reduce their own way: "
                              "drop one of them")
        if self.dp_allreduce_algorithm != "mpi" and (self.zero_stage or self.dp_shared_memory):
            raise ConfigError(f"--dp-allreduce-algorithm {self.dp_allreduce_algorithm} sums the "
                              f"gradients of plain data parallelism; ZeRO reduce-scatters them "
                              f"with MPI's collectives: drop one of the two")
        if self.cp_comm_type not in CP_COMM_TYPES:
            raise ConfigError(f"--cp-comm-type must be one of {', '.join(CP_COMM_TYPES)}, "
                              f"got {self.cp_comm_type!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero-stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and Path(self.offload_optimizer).exists() \
                and not Path(self.offload_optimizer).is_dir():
            raise ConfigError(f"--offload-optimizer {self.offload_optimizer}: exists and is not "
                              f"a folder")
        if self.dp_shared_memory and self.zero_stage != 1:
            raise ConfigError("--dp-shared-memory is a way to run ZeRO-1 (the optimizer's state "
                              "and update split over a node's ranks): add --zero-stage 1")
        if self.timing_log_level not in (0, 1, 2):
            raise ConfigError(f"--timing-log-level must be 0, 1 or 2, got {self.timing_log_level}")
        if not (math.isfinite(self.distributed_timeout_minutes)
                and self.distributed_timeout_minutes >= 0):
            raise ConfigError(f"--distributed-timeout-minutes must be a number >= 0 (0: no "
                              f"watchdog), got {self.distributed_timeout_minutes}")
        if self.recompute_granularity not in ("", "full", "selective"):
            raise ConfigError(f"--recompute-granularity must be full or selective, got "
                              f"{self.recompute_granularity!r}")
        if self.recompute_method not in ("uniform", "block"):
            raise ConfigError(f"--recompute-method must be uniform or block, got "
                              f"{self.recompute_method!r}")
        if self.recompute_num_layers < (1 if self.recompute_method == "uniform" else 0):
            raise ConfigError(f"--recompute-num-layers must be >= 1 with --recompute-method "
                              f"uniform (blocks per chunk), >= 0 with block, got "
                              f"{self.recompute_num_layers}")
        if self.recompute_per_stage() and (self.recompute_granularity, self.recompute_method) \
                != ("full", "block"):
            raise ConfigError("--recompute-num-layers-per-stage goes with --recompute-granularity "
                              "full --recompute-method block (it replaces --recompute-num-layers)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
