"""The planner (refgpt.plan): its per-rank memory equals the registry of a real run of the
layout (one process here, in float64, float32 and bfloat16, with and without recomputation;
mpi_tests/test_plan.py runs every layout of 2 and 4 ranks); its records and command line; the
flags it refuses."""

import json
from dataclasses import replace

import pytest

from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.plan import main, rank_elements, rank_memory
from refgpt.train import parse_config

MODEL = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                    vocab_size=45, vocab_multiple=16, dropout=0.1)
TRAIN = TrainConfig(micro_batch_size=2, global_batch_size=4, train_iters=1, lr=1e-2,
                    synthetic_data=True, eval_iters=0)
CATEGORIES = ("params", "grads", "optimizer", "activations")


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("recompute", ["", "selective", "full"])
def test_predicted_memory_equals_the_registry(dtype, recompute):
    tcfg = replace(TRAIN, dtype=dtype)
    pcfg = ParallelConfig(recompute_granularity=recompute)
    t = Trainer(MODEL, tcfg, pcfg, log=lambda *_: None)
    t.train_step()
    measured = t.memory()
    want = rank_memory(MODEL, tcfg, pcfg, 1, 1, 1)
    assert {k: measured[k] for k in CATEGORIES} == {k: want[k] for k in CATEGORIES}
    assert measured["working_peak"] == want["working"] == 0


def test_the_plan_prints_records_with_commands(capsys):
    argv = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--vocab-size", "45", "--global-batch-size", "8",
            "--micro-batch-size", "1", "--synthetic-data"]
    assert main([*argv, "--nodes", "1", "--ranks-per-node", "4", "--json",
                 "--allreduce-bandwidth", "2"]) == 0
    records = json.loads(capsys.readouterr().out)
    runnable = [r for r in records if "refused" not in r]
    assert runnable and all(r["ranks"] == 4 for r in records)
    times = [r["step_time_s"]["total"] for r in runnable]
    assert times == sorted(times) and all(r["step_time_s"]["allreduce_s"] is not None
                                          for r in runnable)
    for r in runnable:
        assert r["command"][:len(argv)] == argv and "--nodes" not in r["command"]
        assert r["memory_bytes"]["total"] == sum(r["memory_bytes"][k]
                                                 for k in (*CATEGORIES, "working"))
    assert any("--zero-stage 2 with pipeline parallelism is refused" in r["refused"]
               for r in records if "refused" in r)


@pytest.mark.parametrize("argv, match", [
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--zero-stage", "1"], "the planner chooses --zero-stage itself"),
    (["--tensor-parallel-mode", "2d"], "the planner chooses --tensor-parallel-mode itself"),
    (["--pipeline-schedule", "zb-h1"], "the planner chooses --pipeline-schedule itself"),
    (["--cp-comm-type", "a2a"], "the planner chooses --cp-comm-type itself"),
    (["--context-parallel-size", "0"], "--context-parallel-size must be >= 1, got 0"),
])
def test_what_the_planner_refuses(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_a_machine_file_sets_the_rates_and_refuses_what_does_not_fit(capsys):
    """The shipped A64FX description: its GEMM rate and network, and a node's 32 GiB: GPT-2
    1.5B-sized layers on 2 nodes fit only spread out (the refusal says how much a node needs)."""
    argv = ["--num-layers", "48", "--hidden-size", "1600", "--num-attention-heads", "25",
            "--seq-length", "1024", "--vocab-size", "50257", "--global-batch-size", "16",
            "--micro-batch-size", "1", "--machine", "a64fx-fugaku", "--nodes", "2",
            "--ranks-per-node", "4", "--json"]
    assert main(argv) == 0
    records = json.loads(capsys.readouterr().out)
    refused = [r["refused"] for r in records if "refused" in r]
    assert any("GiB a node (4 ranks), the node has 32.0" in r for r in refused)
    runnable = [r for r in records if "refused" not in r]
    assert runnable and all(r["step_time_s"]["allreduce_s"] is not None for r in runnable)
    assert all(r["memory_bytes"]["total"] * 4 <= 32 * 2**30 for r in runnable)


def test_a_bad_machine_file_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "m.toml"
    bad.write_text('name = "x"\ncores_per_node = 4\n')
    with pytest.raises(SystemExit) as e:
        main(["--machine", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'memory_gib_per_node' is missing" in err
    assert len(err.strip().splitlines()) == 1
    head = 'name = "x"\ncores_per_node = 4\nmemory_gib_per_node = 1\n'
    for tail, says in (("optimizer_melem_s = 3\n[gemm_tflops_per_node]\nfloat32 = 1\n",
                        "'optimizer_melem_s' is not a table"),
                       ("process_mib = \"a\"\n[gemm_tflops_per_node]\nfloat32 = 1\n",
                        "'process_mib' is not a number"),
                       ("[gemm_tflops_per_node]\nfloat32 = 1\n[network]\n"
                        "allreduce_gbs_by_ranks = { two = 1.0 }\n", "[network]"),
                       ("[gemm_tflops_per_node]\nfloat32 = 1\n[network]\n"
                        "allreduce_gbs_by_ranks = { 2 = -1.0 }\n", "must be > 0"),
                       ("[gemm_tflops_per_node]\nfloat32 = 1\n[network]\nlatency_us = -1\n",
                        "latency_us must be a number >= 0"),
                       ("[gemm_tflops_per_node]\nfloat32 = 1\n[network.internode]\n"
                        "latency_us = \"x\"\n", "latency_us must be a number >= 0"),
                       ("[gemm_tflops_per_node]\nfloat32 = 1\n[network]\n"
                        "allreduce_algorithm = \"bus\"\n", "allreduce_algorithm must be one of")):
        bad.write_text(head + tail)
        with pytest.raises(SystemExit) as e:
            main(["--machine", str(bad), "--nodes", "1", "--ranks-per-node", "2"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:                 # before anything is measured
        main(["--calibrate", str(tmp_path / "no" / "such" / "m.toml")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot write in" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:                 # nothing allocated: the registry says
        main(["--calibrate", str(tmp_path / "here.toml"), "--num-layers", "512",
              "--hidden-size", "8192", "--num-attention-heads", "64"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "fit this node's memory in no type" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "here.toml").exists()


@pytest.mark.parametrize("p, v", [(1, 1), (2, 1), (4, 1), (2, 2)])
@pytest.mark.parametrize("experts", [0, 4])
def test_stage_flops_sum_to_the_models_and_the_head_is_the_last_stages(p, v, experts):
    from refgpt.metrics import model_flops, stage_flops
    cfg = replace(MODEL, num_layers=8, num_experts=experts,
                  moe_router_topk=2 if experts else 1)
    stages = stage_flops(cfg, 4, p, v)
    assert len(stages) == p and sum(stages) == pytest.approx(model_flops(cfg, 4), rel=1e-12)
    head = 4 * cfg.seq_length * 6.0 * (cfg.vocab_size * cfg.hidden_size + 2 * cfg.hidden_size)
    if p > 1:                                                         # equal blocks elsewhere
        assert stages[-1] - head == pytest.approx(stages[0], rel=1e-12)


def test_a_machines_step_efficiency_and_process_memory(tmp_path, capsys):
    """[step_efficiency] divides the compute term (the whole model at that share of the GEMM
    rate, the head too unless [head_efficiency] gives its own), process_mib adds to each
    rank's memory; a bad efficiency is one error line."""
    argv = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--vocab-size", "45", "--global-batch-size", "8",
            "--micro-batch-size", "1", "--nodes", "1", "--ranks-per-node", "2", "--json"]
    head = 'name = "m"\ncores_per_node = 2\nmemory_gib_per_node = 1\n'
    records = {}
    for name, extra in (("plain", ""), ("calibrated", "process_mib = 100\n"),
                        ("head", "process_mib = 100\n[head_efficiency]\nfloat32 = 1.0\n")):
        path = tmp_path / f"{name}.toml"
        path.write_text(head + extra + "[gemm_tflops_per_node]\nfloat32 = 1.0\n"
                        + ("[step_efficiency]\nfloat32 = 0.25\n" if extra else ""))
        assert main([*argv, "--machine", str(path)]) == 0
        records[name] = {r["layout"]: r for r in json.loads(capsys.readouterr().out)
                         if "refused" not in r}
    for layout, plain in records["plain"].items():
        for name in ("calibrated", "head"):
            r = records[name][layout]
            ratio = r["step_time_s"]["compute_s"] / plain["step_time_s"]["compute_s"]
            if " pp1 " in layout or name == "calibrated":     # the whole model at a quarter
                assert ratio == pytest.approx(4, rel=1e-12)
            else:                           # the last stage's head at the GEMM rate, so the
                assert 1 < ratio < 4        # blocks slower than a quarter of it
            split = r["compute_split_s"]                # the FLOPs at the bare GEMM rate
            assert split["gemm_s"] + split["other_s"] == pytest.approx(
                r["step_time_s"]["compute_s"], rel=1e-12)
            if " pp1 " in layout:
                assert split["gemm_s"] == pytest.approx(plain["step_time_s"]["compute_s"])
            assert r["memory_bytes"]["process"] == 100 * 2**20
            assert r["memory_bytes"]["total"] == plain["memory_bytes"]["total"] + 100 * 2**20
    bad = tmp_path / "bad.toml"
    bad.write_text(head + "[gemm_tflops_per_node]\nfloat32 = 1.0\n"
                   "[step_efficiency]\nfloat32 = 1.5\n")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--machine", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "must be in (0, 1]" in err


def test_a_machines_optimizer_rate_and_all_reduce_rate_by_group_size(tmp_path, capsys):
    """[optimizer_melem_s] times the elements a rank updates (its ZeRO shard); an all-reduce
    of n ranks runs at [network.allreduce_gbs_by_ranks]'s rate for n, or the next larger
    group's, else allreduce_gbs; a bad rate is one error line."""
    argv = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--vocab-size", "45", "--global-batch-size", "8",
            "--micro-batch-size", "1", "--nodes", "1", "--ranks-per-node", "4", "--json",
            "--dtype", "float32"]                     # one type planned, as the machine's
    head = ('name = "m"\ncores_per_node = 4\nmemory_gib_per_node = 1\n'
            "[gemm_tflops_per_node]\nfloat32 = 1.0\n")
    path = tmp_path / "m.toml"
    path.write_text(head + "[optimizer_melem_s]\nfloat32 = 2.0\n[network]\n"
                    "allreduce_gbs = 1.0\n[network.allreduce_gbs_by_ranks]\n2 = 4.0\n")
    assert main([*argv, "--machine", str(path)]) == 0
    records = {r["layout"]: r for r in json.loads(capsys.readouterr().out)
               if "refused" not in r}
    assert main([*argv, "--allreduce-bandwidth", "1"]) == 0
    flat = {r["layout"]: r for r in json.loads(capsys.readouterr().out) if "refused" not in r}
    elements = rank_elements(parse_config(argv[:10])[0], 1, 1, 0)
    for name, rank_params in (("tp1 pp1 dp4", elements), ("tp2 pp1 dp2", None),
                              ("tp1 pp1 dp4 zero-1", -(-elements // 4))):
        t, f = records[name]["step_time_s"], flat[name]["step_time_s"]
        dp = int(name.split("dp")[1].split()[0])
        assert t["allreduce_s"] == pytest.approx(f["allreduce_s"] / (4 if dp == 2 else 1))
        if rank_params:
            assert t["optimizer_s"] == pytest.approx(rank_params / 2e6, rel=1e-12)
        assert f["optimizer_s"] is None
    assert records["tp2 pp1 dp2"]["step_time_s"]["tensor_s"] == pytest.approx(
        flat["tp2 pp1 dp2"]["step_time_s"]["tensor_s"] / 4)
    path.write_text(head + "[optimizer_melem_s]\nfloat32 = -1\n")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--machine", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "optimizer_melem_s" in err


def test_full_recomputation_lengthens_every_stage_and_the_efficiency_inverts_the_plan():
    """Full recomputation adds a third of the blocks' FLOPs to the busiest stage and to the
    bubble (which waits on the other stages, recomputing too); step_efficiency, given the
    time a plan at efficiency e predicts, finds e from the plan at efficiency 1, as
    --calibrate does with its measured data-parallel step."""
    from refgpt.plan import Rates, plan, step_efficiency
    mcfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                       vocab_size=45)
    tcfg = TrainConfig(global_batch_size=8, micro_batch_size=1)

    def records(efficiency):
        rates = Rates(1e9, lambda n, *_: 1e9, efficiency, 1e7)
        return {r["layout"]: r for r in plan([], 4, rates, mcfg, tcfg, ParallelConfig())
                if "refused" not in r}
    one = records(1.0)
    plain, full = one["tp1 pp2 dp2"]["step_time_s"], one["tp1 pp2 dp2 recompute-full"][
        "step_time_s"]
    assert plain["bubble_s"] > 0
    for term in ("compute_s", "bubble_s"):
        assert full[term] == pytest.approx(plain[term] * (1 + 1 / 3), rel=1e-12)
    for e in (0.5, 0.3):
        at = records(e)
        for name in ("tp1 pp1 dp4", "tp2 pp2 dp1", "tp1 pp2 dp2 recompute-full"):
            assert step_efficiency(lambda x: records(x)[name]["step_time_s"]["total"],
                                   at[name]["step_time_s"]["total"]) == pytest.approx(e, rel=1e-9)
    assert step_efficiency(lambda x: one["tp1 pp1 dp4"]["step_time_s"]["total"] / x,
                           1e-9) == 1.0                  # all overhead: nothing to scale


def test_context_parallel_traffic_is_the_counters_formula():
    """At one byte a second a CP layout's context seconds are its bytes: every layer's ring or
    all-to-all volume (refgpt.parallel.context.formula_volume, which mpi_tests/test_context
    checks against the counters) for each of the rank's micro-batches; its tensor traffic
    equals the layout's without CP (C times the micro-batches, each of T / C tokens)."""
    from refgpt.parallel.context import formula_volume
    from refgpt.plan import Rates, plan
    mcfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                       vocab_size=45)
    tcfg = TrainConfig(global_batch_size=8, micro_batch_size=1)
    records = {r["layout"]: r["step_time_s"] for r in plan(
        [], 8, Rates(1e9, lambda n, *_: 1.0, 1.0), mcfg, tcfg,
        ParallelConfig(context_parallel_size=4)) if "refused" not in r}
    for name, c, kind in (("tp1 pp1 dp8 cp2", 2, "p2p"), ("tp1 pp1 dp8 cp4-a2a", 4, "a2a"),
                          ("tp2 pp1 dp4 cp2", 2, "p2p")):
        t = int(name[2])
        m = tcfg.micro_batches(8 // t // c)
        volume = sum(formula_volume(1, 16, 4 // t, 8, c, kind).values())
        assert records[name]["context_s"] == pytest.approx(m * 4 * volume * 4, rel=1e-12)
    assert records["tp2 pp1 dp4"]["tensor_s"] > 0
    assert records["tp2 pp1 dp4 cp2"]["tensor_s"] == pytest.approx(
        records["tp2 pp1 dp4"]["tensor_s"], rel=1e-12)


def test_the_shipped_machines_read_and_give_rates():
    """Every file in refgpt/machines is a machine the planner reads, with a GEMM rate (and
    where given, a step efficiency and an optimizer rate) for each type it lists."""
    from refgpt.plan import MACHINES, machine_rates, read_machine
    names = sorted(f.stem for f in MACHINES.glob("*.toml"))
    assert {"a64fx-fugaku", "xeon-emerald-rapids-16", "amd-epyc-zen4-2"} <= set(names)
    for name in names:
        machine = read_machine(name)
        for dtype in machine["gemm_tflops_per_node"]:
            rates = machine_rates(machine, TrainConfig(dtype=dtype), machine["cores_per_node"],
                                  0.0)
            assert rates.gemm > 0 and 0 < rates.efficiency <= 1


def test_precision_is_planned_where_the_run_names_none(tmp_path, capsys):
    """Without --bf16, --fp16 or --dtype the plan covers float32 and bfloat16 (each layout's
    name ends with fp32 or bf16, a bfloat16 command says --bf16) where the machine has both
    rates; each type's records are the plan of that type named; a type the machine lacks is
    left out with a note."""
    argv = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--vocab-size", "45", "--global-batch-size", "8",
            "--micro-batch-size", "1", "--nodes", "1", "--ranks-per-node", "2", "--json"]
    both = tmp_path / "both.toml"
    both.write_text('name = "m"\ncores_per_node = 2\nmemory_gib_per_node = 1\n'
                    "[gemm_tflops_per_node]\nfloat32 = 1.0\nbfloat16 = 2.0\n")
    assert main([*argv, "--machine", str(both)]) == 0
    mixed = [r for r in json.loads(capsys.readouterr().out) if "refused" not in r]
    for flags, tag in ((["--dtype", "float32"], "fp32"), (["--bf16"], "bf16")):
        assert main([*argv, *flags, "--machine", str(both)]) == 0
        named = {r["layout"]: r for r in json.loads(capsys.readouterr().out)
                 if "refused" not in r}
        mine = {r["layout"][:-len(tag) - 1]: r for r in mixed if r["layout"].endswith(tag)}
        assert mine.keys() == named.keys()
        for name, r in mine.items():
            assert r["memory_bytes"] == named[name]["memory_bytes"]
            assert r["step_time_s"] == named[name]["step_time_s"]
            assert ("--bf16" in r["command"]) == (tag == "bf16")
    config = tmp_path / "run.toml"                   # a type named in --config counts too
    config.write_text('dtype = "bfloat16"\n')
    assert main([*argv, "--config", str(config), "--machine", str(both)]) == 0
    named = [r for r in json.loads(capsys.readouterr().out) if "refused" not in r]
    assert named and not any(r["layout"].endswith(("fp32", "bf16")) or "--bf16" in r["command"]
                             for r in named)
    one = tmp_path / "one.toml"
    one.write_text(both.read_text().replace("bfloat16 = 2.0\n", ""))
    assert main([*argv, "--machine", str(one)]) == 0
    out = capsys.readouterr()
    layouts = [r["layout"] for r in json.loads(out.out)]
    assert layouts and not any(x.endswith(("fp32", "bf16")) for x in layouts)
    assert "bfloat16 not planned: --machine" in out.err


def test_groups_that_span_nodes_share_the_nodes_network_injection(tmp_path, capsys):
    """[network.internode] gbs_per_node caps a group spanning nodes at its share of the node's
    injection, g / R of it for g members on a node of R ranks: on 2 nodes of 2 ranks, each
    injecting 1 GB/s, a rank of a DP group of 4 (2 a node) moves at most 1 GB/s, of a DP pair
    two ranks apart (TP 2 x DP 2, 1 a node) 0.5, of a TP pair inside a node the node's own
    rate; the pipeline's sends between nodes too."""
    from refgpt.plan import group_link
    network = {"allreduce_gbs_by_ranks": {"2": 4.0, "4": 4.0}, "internode": {"gbs_per_node": 1.0}}
    rate = group_link(network, 0.0, ranks_per_node=2)
    assert rate(4, 1) == 0.5e9 * 2 and rate(2, 2) == 0.5e9 and rate(2, 1) == 4e9
    assert rate(2, 2, inside=8e9) == 0.5e9 and rate(2, 1, inside=8e9) == 8e9
    assert group_link(network, 0.0, ranks_per_node=4)(4, 1) == 4e9       # one node
    argv = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--vocab-size", "45", "--global-batch-size", "8",
            "--micro-batch-size", "1", "--nodes", "2", "--ranks-per-node", "2", "--json"]
    records = {}
    for name, extra in (("node", ""), ("net", "[network.internode]\ngbs_per_node = 1.0\n")):
        path = tmp_path / f"{name}.toml"
        path.write_text('name = "m"\ncores_per_node = 2\nmemory_gib_per_node = 1\n'
                        "[gemm_tflops_per_node]\nfloat32 = 1.0\n[network]\np2p_gbs = 8.0\n"
                        "[network.allreduce_gbs_by_ranks]\n2 = 4.0\n4 = 4.0\n" + extra)
        assert main([*argv, "--machine", str(path)]) == 0
        records[name] = {r["layout"]: r["step_time_s"] for r in json.loads(
            capsys.readouterr().out) if "refused" not in r}
    node, net = records["node"], records["net"]
    for name, slower in (("tp1 pp1 dp4", 4), ("tp2 pp1 dp2", 8)):
        assert net[name]["allreduce_s"] == pytest.approx(slower * node[name]["allreduce_s"])
    assert net["tp2 pp1 dp2"]["tensor_s"] == pytest.approx(node["tp2 pp1 dp2"]["tensor_s"])
    assert net["tp1 pp2 dp2"]["pipeline_s"] > 8 * node["tp1 pp2 dp2"]["pipeline_s"]


def test_link_latency_by_level_and_the_mpis_algorithm(tmp_path, capsys):
    """[network] latency_us inside a node, [network.internode] latency_us between nodes: a
    group's messages wait on its slowest link; allreduce_algorithm sets how many messages
    MPI's all-reduce sends (refgpt.study.plan.steps). The plan's latency term is the layout's
    messages at those latencies, and part of its total."""
    from refgpt.plan import group_latency
    both = group_latency({"latency_us": 1.0, "internode": {"latency_us": 5.0}}, ranks_per_node=2)
    assert both(2, 1) == 1e-6 and both(4, 1) == 5e-6 and both(2, 2) == 5e-6
    assert group_latency({"latency_us": 2.0})(8, 1) == 2e-6          # one figure for both
    assert group_latency({"internode": {"latency_us": 3.0}})(2, 1) == 3e-6
    assert group_latency({"allreduce_gbs": 1.0}) is None
    argv = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--vocab-size", "45", "--global-batch-size", "8",
            "--micro-batch-size", "1", "--nodes", "2", "--ranks-per-node", "2", "--json"]
    head = ('name = "m"\ncores_per_node = 2\nmemory_gib_per_node = 1\n'
            "[gemm_tflops_per_node]\nfloat32 = 1.0\n[network]\nallreduce_gbs = 4.0\n")
    records = {}
    for name, extra in (("none", ""), ("ring", "latency_us = 10.0\n"),
                        ("recursive", 'latency_us = 10.0\nallreduce_algorithm = "recursive"\n'
                         "[network.internode]\nlatency_us = 10.0\n")):
        path = tmp_path / f"{name}.toml"
        path.write_text(head + extra)
        assert main([*argv, "--machine", str(path)]) == 0
        records[name] = {r["layout"]: r["step_time_s"] for r in json.loads(
            capsys.readouterr().out) if "refused" not in r}
    dp, ring, recursive = "tp1 pp1 dp4", records["ring"], records["recursive"]
    assert records["none"][dp]["latency_s"] is None
    assert ring[dp]["latency_s"] == pytest.approx(2 * 3 * 10e-6)     # one bucket, ring of 4
    assert recursive[dp]["latency_s"] == pytest.approx(2 * 2 * 10e-6)
    for name, time in ring.items():
        assert time["total"] == pytest.approx(records["none"][name]["total"]
                                              + time["latency_s"]), name


def test_ranks_that_span_core_groups_run_at_the_spanning_share(tmp_path, capsys):
    """core_groups groups of a node's cores, each with memory of its own: ranks a node a
    multiple of core_groups lie each inside one and reach the node's GEMM rate; otherwise
    core_group_spanning_efficiency of it. Bad values are one error line."""
    from refgpt.plan import machine_rates, read_machine
    path = tmp_path / "m.toml"
    head = 'name = "m"\ncores_per_node = 8\nmemory_gib_per_node = 4\n'
    path.write_text(head + "core_groups = 4\ncore_group_spanning_efficiency = 0.5\n"
                    "[gemm_tflops_per_node]\nfloat32 = 8.0\n")
    machine, tcfg = read_machine(str(path)), TrainConfig()
    per_node = {r: machine_rates(machine, tcfg, r, 0.0).gemm * r for r in (1, 2, 4, 8)}
    assert per_node == {1: 4e12, 2: 4e12, 4: 8e12, 8: 8e12}
    assert machine_rates(read_machine("a64fx-fugaku"), tcfg, 1, 0.0).gemm == pytest.approx(
        0.99e12)                                     # seed 004's one process a CPU
    for tail, says in (("core_groups = 3\n", "core_groups must be a whole number"),
                       ("core_groups = 4\ncore_group_spanning_efficiency = 0\n",
                        "core_group_spanning_efficiency must be in")):
        path.write_text(head + tail + "[gemm_tflops_per_node]\nfloat32 = 8.0\n")
        with pytest.raises(SystemExit) as e:
            main(["--machine", str(path), "--num-layers", "2", "--hidden-size", "32",
                  "--num-attention-heads", "4", "--seq-length", "16", "--vocab-size", "45"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_expert_parallel_traffic_by_hand():
    """At one byte a second: a rank's experts' gradients are summed over the d / e ranks that
    hold the same experts, the rest over d; each block with experts sends every token's k
    rows to the experts' ranks and back, in forward and in backward: 4 (e-1)/e N k h bytes a
    micro-batch (balanced routing)."""
    from refgpt.plan import Rates, plan, rank_units
    from refgpt.parallel.zero import formula_traffic
    mcfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                       vocab_size=45, num_experts=4, moe_router_topk=2, moe_layer_freq=2)
    tcfg = TrainConfig(global_batch_size=8, micro_batch_size=1)
    records = {r["layout"]: r for r in plan([], 4, Rates(1e9, lambda n, *_: 1.0), mcfg, tcfg,
                                             ParallelConfig()) if "refused" not in r}
    t = records["tp1 pp1 dp4 ep2"]["step_time_s"]
    every = sum(n for _, n in rank_units(mcfg, 1, 1, 0, ep=2))
    own = sum(n for _, n in rank_units(mcfg, 1, 1, 0, ep=2, part="experts"))
    assert 0 < own < every
    assert t["allreduce_s"] == pytest.approx(formula_traffic(0, every - own, 4, 2, 4))
    sent = 2 * 2 * 4 * (1 / 2) * 16 * 2 * 32 * 4     # m, blocks, 4 (e-1)/e, N k h, fp32
    assert t["experts_s"] == pytest.approx(formula_traffic(0, own, 2, 2, 4) + sent)
    assert records["tp1 pp1 dp4"]["step_time_s"]["experts_s"] == 0.0
    assert "activations_worst_bytes" in records["tp1 pp1 dp4 ep2"]
    assert "activations_worst_bytes" not in records["tp1 pp1 dp4"]
