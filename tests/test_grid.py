"""The grid's closed form, without MPI (mpi_tests check the real communicators)."""

import pytest

from refgpt.parallel.grid import check_sizes, coords, groups


def factorisations(world):
    return [(t, p) for t in range(1, world + 1) for p in range(1, world + 1) if world % (t * p) == 0]


@pytest.mark.parametrize("world", range(1, 17))
def test_every_factorisation_partitions_the_world(world):
    for tp, pp in factorisations(world):
        dp = world // (tp * pp)
        g = groups(world, tp, pp)
        for kind, size in (("tp", tp), ("dp", dp), ("pp", pp), ("mp", tp * pp)):
            members = sorted(r for group in g[kind] for r in group)
            assert members == list(range(world)) and all(len(x) == size for x in g[kind])
        for group in g["tp"]:                                   # TP groups are contiguous
            assert group == list(range(group[0], group[0] + tp))
        for r in range(world):                                  # coordinates index the groups
            c = coords(r, tp, dp)
            assert c.tp + tp * (c.dp + dp * c.pp) == r
            assert [grp for grp in g["tp"] if r in grp][0][c.tp] == r
            assert [grp for grp in g["dp"] if r in grp][0][c.dp] == r
            assert [grp for grp in g["pp"] if r in grp][0][c.pp] == r


def test_megatron_example():
    g = groups(16, 2, 4)
    assert g["tp"][:2] == [[0, 1], [2, 3]]
    assert g["dp"][:2] == [[0, 2], [1, 3]]
    assert g["pp"][0] == [0, 4, 8, 12]


def test_impossible_layouts():
    with pytest.raises(ValueError, match="world size 6 is not divisible by --tp 2 x --pp 2"):
        check_sizes(6, 2, 2)
    with pytest.raises(ValueError, match=">= 1"):
        check_sizes(4, 0, 1)


def test_tensor_parallel_divisibility_errors():
    from refgpt.config import ConfigError, ModelConfig
    from refgpt.parallel.tensor import check_divisible
    cfg = ModelConfig(num_layers=1, hidden_size=24, num_attention_heads=6, seq_length=10,
                      vocab_size=50, vocab_multiple=8)
    check_divisible(cfg, 2, sequence_parallel=True)
    with pytest.raises(ConfigError, match="--num-attention-heads 6 is not divisible by the "
                                          "tensor-parallel size 4"):
        check_divisible(cfg, 4, False)
    with pytest.raises(ConfigError, match="--seq-length 10 is not divisible"):
        check_divisible(ModelConfig(num_layers=1, hidden_size=24, num_attention_heads=3,
                                    seq_length=10, vocab_size=48, vocab_multiple=8), 3, True)
    with pytest.raises(ConfigError, match="padded vocabulary"):
        check_divisible(ModelConfig(num_layers=1, hidden_size=24, num_attention_heads=3,
                                    vocab_size=50, vocab_multiple=8), 3, False)


def test_the_gpu_backend_refuses_optimizer_offload_by_name():
    from refgpt.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
    from refgpt.parallel.build import check_layout
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=45, vocab_multiple=16)
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=4, backend="cupy")
    check_layout(cfg, tcfg, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                                           pipeline_model_parallel_size=2, zero_stage=1),
                 2, 1, 2)                                             # these run on GPUs
    check_layout(cfg, tcfg, ParallelConfig(tensor_model_parallel_size=4,
                                           tensor_parallel_mode="2d"), 4, 1, 1)
    with pytest.raises(ConfigError, match="--offload-optimizer .* drop it with --backend cupy"):
        check_layout(cfg, tcfg, ParallelConfig(zero_stage=1, offload_optimizer="/tmp/x"), 1, 2, 1)
