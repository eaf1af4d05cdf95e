"""``python -m refgpt.train``: train a GPT with Megatron-LM style flags.

With no argument it trains the default ~5M-parameter model on the default corpus (the Python
standard library's source, tokenised on first use and cached). ``--help`` lists every flag;
``--config FILE.toml`` takes the same keys (dashes or underscores), and flags override it.

One iteration = one optimizer step over --global-batch-size sequences, processed as
global / micro micro-batches whose losses are each normalised by the global token count, so
the accumulated gradient is that of the whole batch.

--load resumes a run: the model's shape and the training settings are the checkpoint's, and
the flags given override them (the run prints which).
"""

from __future__ import annotations

from .parallel.threads import quiet_openblas

quiet_openblas()                        # before anything imports NumPy (and loads OpenBLAS)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

from .checkpoint import read_training_state  # noqa: E402
from .cli import USER_ERRORS, CheckpointError, exit_on_user_error, parser  # noqa: E402
from .config import (BACKENDS, DECAY_STYLES, DTYPES, GELU_KINDS, SCHEDULES, TP_MODES,  # noqa: E402
                     ConfigError, ModelConfig, ParallelConfig, TrainConfig, typed)
from .engine import Trainer  # noqa: E402
from .parallel.grid import Grid  # noqa: E402
from .parallel.launch import abort_job, launched_world_size  # noqa: E402
from .parallel.threads import set_threads  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# flag -> (config object, field, type, help). Flag names follow Megatron-LM.
MODEL_FLAGS = {
    "num-layers": ("num_layers", int, "transformer blocks L"),
    "hidden-size": ("hidden_size", int, "hidden size h"),
    "num-attention-heads": ("num_attention_heads", int, "attention heads a (must divide h)"),
    "seq-length": ("seq_length", int, "tokens per sequence s"),
    "max-position-embeddings": ("max_position_embeddings", int,
                                "rows of the position table (default, 0: --seq-length)"),
    "vocab-size": ("vocab_size", int, "vocabulary size (default: the tokenizer's; 8192 for the "
                                      "default corpus and synthetic data)"),
    "make-vocab-size-divisible-by": ("vocab_multiple", int,
                                     "pad the embedding table to a multiple of this (default 64)"),
    "dropout": ("dropout", float, "dropout probability for embeddings, attention, residuals"),
    "gelu": ("gelu", str, f"GELU form: {' or '.join(GELU_KINDS)} (tanh: GPT-2's)"),
    "num-experts": ("num_experts", int, "experts per MoE layer (default, 0: dense MLPs only)"),
    "moe-layer-freq": ("moe_layer_freq", int, "every N-th block, from block 0, has experts"),
    "moe-router-topk": ("moe_router_topk", int, "experts per token (1: Switch's gate P, "
                                                "k > 1: the top-k gates renormalised)"),
    "moe-expert-capacity-factor": ("moe_expert_capacity_factor", float,
                                   "tokens an expert takes: ceil(factor x tokens x topk / "
                                   "experts) (default, 0: no limit)"),
    "moe-token-drop-policy": ("moe_token_drop_policy", str,
                              "over capacity, keep the tokens with the largest gates (probs) "
                              "or the first ones (position)"),
    "moe-aux-loss-coeff": ("moe_aux_loss_coeff", float, "load-balancing loss coefficient alpha"),
    "moe-z-loss-coeff": ("moe_z_loss_coeff", float, "router z-loss coefficient"),
}
TRAIN_FLAGS = {
    "micro-batch-size": ("micro_batch_size", int, "sequences per micro-batch"),
    "global-batch-size": ("global_batch_size", int, "sequences per optimizer step"),
    "train-iters": ("train_iters", int, "optimizer steps to train for"),
    "exit-interval": ("exit_interval", int, "stop (after saving) when iteration %% N == 0"),
    "lr": ("lr", float, "peak learning rate"),
    "min-lr": ("min_lr", float, "learning rate at the end of decay"),
    "lr-warmup-iters": ("lr_warmup_iters", int, "linear warm-up steps, from --lr-warmup-init at "
                                                "iteration 0 to --lr at this iteration "
                                                "(Megatron-LM's schedule)"),
    "lr-warmup-init": ("lr_warmup_init", float, "learning rate of iteration 0, where warm-up starts"),
    "lr-decay-style": ("lr_decay_style", str, ", ".join(DECAY_STYLES)),
    "lr-decay-iters": ("lr_decay_iters", int, "iteration where decay ends (default, 0: "
                                              "--train-iters)"),
    "optimizer": ("optimizer", str, "adam (AdamW), onebit-adam (1-bit Adam: after "
                                    "--onebit-warmup-iters steps the variance frozen and the "
                                    "momentum averaged as signs) or lamb (AdamW's moments, "
                                    "each tensor's step scaled by its trust ratio ||w|| / "
                                    "||update||)"),
    "onebit-warmup-iters": ("onebit_warmup_iters", int, "1-bit Adam's steps of uncompressed "
                                                        "Adam (DeepSpeed's freeze_step)"),
    "weight-decay": ("weight_decay", float, "AdamW decoupled decay on 2-D weights"),
    "clip-grad": ("clip_grad", float, "global gradient-norm clip (0: off)"),
    "adam-beta1": ("adam_beta1", float, "AdamW beta1"),
    "adam-beta2": ("adam_beta2", float, "AdamW beta2"),
    "adam-eps": ("adam_eps", float, "AdamW epsilon (added outside the square root)"),
    "seed": ("seed", int, "seed of initialisation, data order and dropout"),
    "dtype": ("dtype", str, f"{', '.join(DTYPES)} (float64: the reference precision; the "
                            f"16-bit types: mixed precision, as --bf16 and --fp16)"),
    "loss-scale": ("loss_scale", float, "static loss scale for 16-bit training (default, 0: "
                                        "dynamic with --fp16, none with --bf16)"),
    "initial-loss-scale": ("initial_loss_scale", float, "dynamic loss scale's start"),
    "min-loss-scale": ("min_loss_scale", float, "dynamic loss scale's floor"),
    "loss-scale-window": ("loss_scale_window", int,
                          "overflow-free steps before the dynamic loss scale doubles"),
    "hysteresis": ("hysteresis", int, "overflowing steps in a row before it halves"),
    "backend": ("backend", str, f"one of {', '.join(BACKENDS)}: numba (fused CPU kernels, "
                                "tested against the reference), numpy (the readable "
                                "reference), cupy (NVIDIA GPUs, one per rank, every layout)"),
    "data-path": ("data_path", str, "folder written by python -m refgpt.prepare "
                                    "(default: the Python stdlib corpus, prepared on first use)"),
    "eval-interval": ("eval_interval", int, "evaluate every N iterations (0: only at the end)"),
    "eval-iters": ("eval_iters", int, "global batches per evaluation (0: no evaluation)"),
    "save": ("save", str, "checkpoint folder to write"),
    "load": ("load", str, "checkpoint folder to resume from (model shape is taken from it)"),
    "save-interval": ("save_interval", int, "save every N iterations (0: only at the end)"),
    "save-retention": ("save_retention", int, "keep only the newest N checkpoints in --save "
                                              "(0: all)"),
    "log-interval": ("log_interval", int, "print a log line every N iterations"),
    "log-jsonl": ("log_jsonl", str, "write one JSON object per iteration to this file (a "
                                    "resumed run keeps the lines before its iteration)"),
    "tensorboard-dir": ("tensorboard_dir", str, "write TensorBoard scalars (loss, learning rate, "
                                                "grad norm, throughput, memory, timers) here"),
}
HALF_FLAGS = {"bf16": "bfloat16", "fp16": "float16"}          # Megatron-LM's names for --dtype
PARALLEL_FLAGS = {
    "tensor-model-parallel-size": ("tensor_model_parallel_size", int,
                                   "Megatron 1-D tensor-parallel size (alias --tp)"),
    "tensor-parallel-mode": ("tensor_parallel_mode", str,
                             f"{' or '.join(TP_MODES)}: 1d Megatron's, 2d SUMMA's on a q x q "
                             "grid (TP size q^2)"),
    "pipeline-model-parallel-size": ("pipeline_model_parallel_size", int,
                                     "pipeline-parallel size (alias --pp)"),
    "expert-model-parallel-size": ("expert_model_parallel_size", int,
                                   "experts split over groups of this many data-parallel "
                                   "ranks, tokens exchanged by all-to-all (alias --ep)"),
    "context-parallel-size": ("context_parallel_size", int,
                              "each sequence split over groups of this many data-parallel "
                              "ranks, through attention too (alias --cp)"),
    "cp-comm-type": ("cp_comm_type", str,
                     "context parallelism's attention: p2p (keys and values around a ring) "
                     "or a2a (Ulysses: heads for tokens by all-to-all)"),
    "pipeline-schedule": ("pipeline_schedule", str, ", ".join(SCHEDULES)),
    "num-virtual-stages": ("num_virtual_stages", int,
                           "model chunks per pipeline rank (interleaved schedule)"),
    "ddp-bucket-size": ("ddp_bucket_size", int,
                        "elements per data-parallel gradient all-reduce bucket (0: one bucket)"),
    "threads-per-rank": ("threads_per_rank", int,
                         "BLAS and numba threads per rank (0: when ranks share a node, the "
                         "cores the launcher bound the rank to, or 1; else the default)"),
    "zero-stage": ("zero_stage", int, "ZeRO over the data-parallel group: 0 off, 1 optimizer "
                                      "state, 2 + gradients, 3 + parameters partitioned"),
    "dp-allreduce-algorithm": ("dp_allreduce_algorithm", str,
                               "the data-parallel gradient sum: mpi (MPI_Allreduce), or written "
                               "out on point-to-point: ring, tree (double binary tree), "
                               "hierarchical (shared memory within a node, MPI among nodes); "
                               "all but mpi run after backward, without overlap"),
    "offload-optimizer": ("offload_optimizer", str, "keep AdamW's moments in np.memmap files "
                                                    "in this folder, updated chunk by chunk"),
    "timing-log-level": ("timing_log_level", int,
                         "0: no timers; 1: per-phase timers, no synchronisation; 2: with barriers"),
    "recompute-granularity": ("recompute_granularity", str,
                              "full: recomputed blocks keep only their input and rerun their "
                              "forward in backward; selective: every block reruns its attention "
                              "core (QK^T, softmax, dropout, PV) instead of keeping the "
                              "probabilities; both give bit for bit the same gradients "
                              "[default: none]"),
    "recompute-method": ("recompute_method", str,
                         "with full: uniform (every block, in chunks of "
                         "--recompute-num-layers) or block (the first --recompute-num-layers "
                         "blocks of each pipeline stage, each on its own)"),
    "recompute-num-layers": ("recompute_num_layers", int,
                             "uniform: blocks per recomputed chunk (each chunk keeps "
                             "only its input); block: blocks recomputed per stage"),
    "distributed-timeout-minutes": ("distributed_timeout_minutes", float,
                                    "a rank stuck this long in one phase (waiting for a rank "
                                    "that stopped responding) ends the job with one line "
                                    "naming the ranks that did not arrive; 0: no watchdog"),
    "recompute-num-layers-per-stage": ("recompute_num_layers_per_stage", str,
                                       "block: blocks recomputed on each pipeline stage, as "
                                       "2,2,1,0 (1F1B's early stages hold the most "
                                       "micro-batches); replaces --recompute-num-layers"),
}


def add_flags(ap: argparse.ArgumentParser, title: str, table: dict, defaults) -> None:
    """One argument group with a flag per table entry; values land on the config's field names.
    The help ends with the default unless it says what the default is, or there is none."""
    group = ap.add_argument_group(title)
    for flag, (field, typ, text) in table.items():
        value = getattr(defaults, field)
        shown = "" if "default" in text or value == "" else f" [default: {value}]"
        group.add_argument(f"--{flag}", type=typ, dest=field, help=text + shown)


def build_parser(module: str = "refgpt.train", description: str = __doc__
                 ) -> argparse.ArgumentParser:
    """Every training flag; a flag not given is absent from the parsed namespace."""
    ap = parser(module, description, argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", help="TOML file with the same keys as these flags")
    add_flags(ap, "model", MODEL_FLAGS, ModelConfig())
    add_flags(ap, "training", TRAIN_FLAGS, TrainConfig())
    add_flags(ap, "parallelism", PARALLEL_FLAGS, ParallelConfig())
    ap.add_argument("--synthetic-data", action="store_true", dest="synthetic_data",
                    help="seeded random tokens instead of a corpus (tests, benchmarks)")
    ap.add_argument("--tp", type=int, dest="tensor_model_parallel_size", help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, dest="expert_model_parallel_size", help=argparse.SUPPRESS)
    ap.add_argument("--cp", type=int, dest="context_parallel_size", help=argparse.SUPPRESS)
    ap.add_argument("--sequence-parallel", action="store_true", dest="sequence_parallel",
                    help="with --tp > 1: split LayerNorm/dropout/residual activations over tokens")
    ap.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction,
                    dest="overlap_grad_reduce",
                    help="all-reduce gradient buckets during the last backward (non-blocking); "
                         "--no-overlap-grad-reduce: after it, blocking [default: overlap]")
    ap.add_argument("--dp-comm-thread", action="store_true", dest="dp_comm_thread",
                    help="run the data-parallel gradient sums (MPI's or "
                         "--dp-allreduce-algorithm's) on a helper thread, bucket by bucket as "
                         "backward finishes them (needs MPI_THREAD_MULTIPLE)")
    ap.add_argument("--layered-gradient-accumulation", action="store_true",
                    dest="layered_gradient_accumulation",
                    help="run each layer for all micro-batches before the next (breadth-first), "
                         "so each layer's gradient is reduced, and with --zero-stage 3 its "
                         "parameters gathered, once per step; holds every micro-batch's "
                         "activations")
    ap.add_argument("--dp-shared-memory", action="store_true", dest="dp_shared_memory",
                    help="with --zero-stage 1: one copy of the parameters per node in MPI shared "
                         "memory; gradients summed by reading the other ranks' buffers")
    ap.add_argument("--bf16", action="store_true",
                    help="mixed precision: bfloat16 parameters and activations, fp32 arithmetic, "
                         "gradients and master weights (--dtype bfloat16)")
    ap.add_argument("--fp16", action="store_true",
                    help="the same in IEEE half precision, with dynamic loss scaling "
                         "(--dtype float16)")
    ap.add_argument("--tf32", action="store_true", dest="tf32",
                    help="with --backend cupy, float32: cuBLAS's float32 GEMMs on tensor cores "
                         "in TF32 (10-bit mantissa inputs, fp32 sums), as PyTorch's allow_tf32")
    ap.add_argument("--grad-reduce-in-bf16", action="store_true", dest="grad_reduce_in_bf16",
                    help="with --bf16: accumulate and all-reduce gradients in bfloat16 (half "
                         "the data-parallel bytes; each micro-batch's sum rounded to 8 bits)")
    ap.add_argument("--async-save", action="store_true", dest="async_save",
                    help="write the checkpoints of --save-interval in the background while "
                         "training goes on (each rank's part copied out first, the files "
                         "written by a thread, the checkpoint finished once all are on disk); "
                         "the last one is written before the run ends")
    ap.add_argument("--exit-signal-handler", action="store_true", dest="exit_signal_handler",
                    help="on SIGTERM or SIGINT finish the step, save (with --save) and exit 0 on "
                         "every rank (Slurm: #SBATCH --signal=TERM@120)")
    ap.add_argument("--pp", type=int, dest="pipeline_model_parallel_size", help=argparse.SUPPRESS)
    ap.add_argument("--no-progress", action="store_false", dest="progress",
                    help="no progress bar (log lines only)")
    return ap


def parse_config(argv=None) -> tuple[ModelConfig, TrainConfig, ParallelConfig, set, dict]:
    """(model, training and parallel configs, names given explicitly, other options)."""
    return configs_from(vars(build_parser().parse_args(argv)))


def configs_from(given: dict) -> tuple[ModelConfig, TrainConfig, ParallelConfig, set, dict]:
    """The configs from parsed flags (with --config's TOML file read under them)."""
    values = {}
    if "config" in given:
        path = Path(given.pop("config"))
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            values = {k.replace("-", "_"): v for k, v in tomllib.loads(path.read_text()).items()}
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
        owner = {f.name: cls for cls in (ModelConfig, TrainConfig, ParallelConfig)
                 for f in dataclasses.fields(cls)}
        for k, v in values.items():                # the file's own values, flags given or not
            if k in owner:                         # (argparse types the flags)
                try:
                    values[k] = typed(owner[k], k, v)
                except ConfigError as e:
                    raise ConfigError(f"{path}: {e}") from None
    values.update(given)
    half = [name for name in HALF_FLAGS if values.pop(name, False)]
    if half:
        if len(half) > 1 or values.get("dtype", HALF_FLAGS[half[0]]) != HALF_FLAGS[half[0]]:
            raise ConfigError(f"--{half[0]} sets --dtype {HALF_FLAGS[half[0]]}: give one of "
                              f"--bf16, --fp16 and --dtype")
        values["dtype"] = HALF_FLAGS[half[0]]
    fields = [{f for f, *_ in table.values()} for table in (MODEL_FLAGS, TRAIN_FLAGS, PARALLEL_FLAGS)]
    fields[1].update({"synthetic_data", "tf32", "exit_signal_handler", "async_save"})
    fields[2].update({"sequence_parallel", "overlap_grad_reduce", "dp_shared_memory",
                      "layered_gradient_accumulation", "dp_comm_thread",
                      "grad_reduce_in_bf16"})
    other_fields = {"progress"}
    unknown = set(values) - set().union(*fields) - other_fields
    if unknown:
        raise ConfigError(f"unknown settings: {sorted(unknown)}")
    mcfg, tcfg, pcfg = (cls(**{k: v for k, v in values.items() if k in f})
                        for cls, f in zip((ModelConfig, TrainConfig, ParallelConfig), fields))
    other = {k: values[k] for k in other_fields if k in values}
    return mcfg, tcfg, pcfg, set(values), other


def resumed(tcfg: TrainConfig, given: set) -> tuple[TrainConfig, list[str]]:
    """With --load: the checkpoint's training settings, but for those given (flags or
    --config), and the list of what they change ("name old -> new")."""
    saved = TrainConfig.from_dict(read_training_state(tcfg.load)[1]["train"])
    fields = set(saved.to_dict()) & (set(given) | {"load"})
    changes = [f"--{k.replace('_', '-')} {getattr(saved, k)!r} -> {getattr(tcfg, k)!r}"
               for k in sorted(fields - {"load"}) if getattr(saved, k) != getattr(tcfg, k)]
    return replace(saved, **{k: getattr(tcfg, k) for k in fields}), changes


def setup(argv, world_comm) -> Trainer:
    """Parse, build the grid and the trainer (which validates the configuration before any
    work). User errors raise here, before any training collective: either the same on every
    rank, or agreed on by all ranks. Resuming (--load) continues the saved run: the model's
    shape and the training settings are the checkpoint's, but for the flags given."""
    mcfg, tcfg, pcfg, given, other = parse_config(argv)
    grid = Grid(world_comm, pcfg.tensor_model_parallel_size, pcfg.pipeline_model_parallel_size,
                pcfg.expert_model_parallel_size, pcfg.context_parallel_size)
    threads = set_threads(world_comm, pcfg.threads_per_rank)
    error = trainer = changes = None
    try:
        if tcfg.load:
            tcfg, changes = resumed(tcfg, given)
        trainer = Trainer(mcfg, tcfg, pcfg, grid, given, progress=other.get("progress", True))
    except USER_ERRORS as e:                   # e.g. data or checkpoint missing on some rank
        error = e
    if world_comm is not None:                 # every rank learns whether any rank failed
        errors = world_comm.allgather(None if error is None else f"{error}")
        failed = [(r, msg) for r, msg in enumerate(errors) if msg is not None]
        if failed and error is None:
            r, msg = failed[0]
            error = ConfigError(f"rank {r}: {msg}")
    if error is not None:
        raise error
    trainer.log(threads)
    if changes is not None:
        trainer.log("training settings from the checkpoint" + (
            "; changed by flags: " + ", ".join(changes) if changes else ", none changed by flags"))
    return trainer


@exit_on_user_error
def run_single(argv) -> int:
    setup(argv, None).run()
    return 0


def main(argv=None) -> int:
    """Single process: plain python, or mpiexec -n 1 (no MPI needed). Several processes:
    set-up errors print once (rank 0) and every rank exits with status 2; any error after
    that prints "rank R: ..." with its traceback and aborts the whole job."""
    if launched_world_size() == 1:
        return run_single(argv)
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if rank != 0:                              # --help and usage errors: print once
        sys.stdout = sys.stderr = open(os.devnull, "w")
    try:
        trainer = setup(argv, comm)
    except USER_ERRORS as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except SystemExit:
        raise
    except BaseException as e:                 # noqa: BLE001 - any failure must end the job
        abort(comm, e)
    try:
        trainer.run()
    except CheckpointError as e:               # a failed save, raised on every rank alike
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:                  # mpiexec passes Ctrl-C to every rank: one line
        if rank == 0:
            print("interrupted (--exit-signal-handler saves a checkpoint first)",
                  file=sys.stderr, flush=True)
        else:                                  # rank 0 first: mpiexec ends the job at the
            time.sleep(2.0)                    # first exit, and its line would be lost
        os._exit(130)
    except BaseException as e:                 # noqa: BLE001 - user errors too: others may wait
        abort(comm, e)
    return 0


def abort(comm, e: BaseException) -> None:
    abort_job(comm, f"rank {comm.Get_rank()}: {type(e).__name__}: {e}\n{traceback.format_exc()}")


if __name__ == "__main__":
    sys.exit(main())
