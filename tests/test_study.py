"""The scaling study: layouts and plan, the cost model, the report and its loss check, and one
end-to-end run that launches its own 2-rank job (so it lives in the single-process session)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from refgpt.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from refgpt.metrics import model_flops, model_params
from refgpt.study.plan import Config, Layout, make_plan, parse_layout, predict, steps
from refgpt.study.report import COLUMNS
from refgpt.study.scaling import Study

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--vocab-size", "64", "--micro-batch-size", "1",
        "--global-batch-size", "8", "--dtype", "float64"]


def test_layouts():
    assert parse_layout("dp") == Layout("dp", 1, 1)
    assert parse_layout("tp2") == Layout("tp2", 2, 1)
    assert parse_layout("tp2pp4") == Layout("tp2pp4", 2, 4)
    assert parse_layout("dp-z1") == Layout("dp-z1", 1, 1, 1)
    assert parse_layout("tp2-z0") == Layout("tp2-z0", 2, 1, 0)
    assert parse_layout("dp-shm") == Layout("dp-shm", 1, 1, 1, shared=True)
    for bad in ("", "dp2", "pp2tp2", "tp", "tp0", "-z1", "dp-z4"):
        with pytest.raises(ConfigError, match="layout"):
            parse_layout(bad)


def test_plan_keeps_the_global_batch_and_says_why_a_layout_cannot_run():
    m = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64)
    t = TrainConfig(micro_batch_size=1, global_batch_size=8)
    plan = {c.key: c for c in make_plan([1, 2, 3, 4], [parse_layout(x) for x in ("dp", "tp3", "pp2")],
                                        m, t, ParallelConfig())}
    assert (plan["4:dp"].dp, plan["4:dp"].micro_batches) == (4, 2)
    assert (plan["4:pp2"].dp, plan["4:pp2"].micro_batches, plan["4:pp2"].skip) == (2, 4, "")
    assert "not divisible by tp x pp = 2" in plan["1:pp2"].skip
    assert "--global-batch-size 8 is not divisible" in plan["3:dp"].skip
    assert "--num-attention-heads 4" in plan["3:tp3"].skip
    for name in ("dp-z1", "dp-shm"):
        zero = make_plan([1, 2], [parse_layout(name)], m, t, ParallelConfig())
        assert zero[0].skip == "ZeRO needs data parallelism > 1" and not zero[1].skip


def test_cost_model_by_hand():
    m = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=128,
                    seq_length=32)
    t = TrainConfig(micro_batch_size=2, global_batch_size=16, dtype="float32")
    g, b = 1e10, 1e9
    cfg = Config(8, Layout("tp2", 2, 1), dp=4, micro_batches=2)
    p = predict(cfg, m, t, ParallelConfig(), g, b)
    assert p["compute_s"] == pytest.approx(model_flops(m, 16) / (8 * g))
    params = (model_params(m) + 32 * 64) // 2
    assert p["allreduce_s"] == pytest.approx(2 * 3 / 4 * params * 4 / b)
    shm = predict(replace(cfg, layout=parse_layout("tp2-shm")), m, t, ParallelConfig(), g, b)
    assert shm["allreduce_s"] == pytest.approx(3 / 4 * params * 4 / b)     # reads, no sends
    assert p["tensor_s"] == pytest.approx(2 * 4 * 4 * 2 * 1 / 2 * (2 * 32 * 64) * 4 / b)
    total = p["compute_s"] + p["allreduce_s"] + p["tensor_s"]
    assert p["allreduce_share"] == pytest.approx(p["allreduce_s"] / total)
    piped = predict(Config(2, Layout("pp2", 1, 2), 1, 16), m, t, ParallelConfig(), g, None)
    assert piped["allreduce_s"] is None and piped["allreduce_share"] is None
    tokens = 16 * 32                                   # two blocks a stage, the head on the last
    block = tokens * (6 * (12 * 64 * 64 + 13 * 64) + 12 * 64 * 32)
    head = tokens * 6 * (128 * 64 + 2 * 64)
    assert piped["compute_s"] == pytest.approx((2 * block + head) / g)      # the busiest stage
    assert piped["bubble_s"] == pytest.approx(2 * block / g * 1 / 16)       # (p-1)/m of the other
    assert piped["pipeline_s"] is None
    sends = 2 * 16 * (2 * 32 * 64) * 4               # each micro-batch on and back, fp32
    table = m.padded_vocab * 64 * 4                  # the tied wte's gradient, first + last
    for p2p in (None, 2e9):
        piped = predict(Config(2, Layout("pp2", 1, 2), 1, 16), m, t, ParallelConfig(), g, b,
                        p2p_rate=p2p)
        assert piped["pipeline_s"] == pytest.approx(sends / (p2p or b) + table / b)


def test_messages_and_their_latency_by_hand():
    """Each collective's messages (steps) by algorithm, and the latency term of a layout: its
    collectives' messages at the latency of each group's link."""
    assert [steps("allreduce", n) for n in (1, 2, 8)] == [0, 2, 14]
    assert [steps("allreduce", n, "recursive") for n in (2, 8, 9)] == [2, 6, 8]
    assert steps("allreduce", 8, "tree") == 14 and steps("reduce-scatter", 8) == 7
    assert steps("all-gather", 8, "recursive") == 3 and steps("alltoall", 4) == 3
    assert steps("bcast", 4) == 2 and steps("send", 2) == 1
    m = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=128,
                    seq_length=32)
    t = TrainConfig(micro_batch_size=2, global_batch_size=16, dtype="float32")
    one_ms = lambda n, stride=1: 1e-3                               # noqa: E731
    P = (model_params(m) + 32 * 64) // 2                            # a TP rank's elements
    buckets = -(-P // 10_000)
    pcfg = ParallelConfig(ddp_bucket_size=10_000)
    cfg = Config(8, Layout("tp2", 2, 1), dp=4, micro_batches=2)
    for algorithm, allreduce in (("ring", lambda n: 2 * (n - 1)), ("recursive", lambda n: 2 * {
            2: 1, 4: 2}[n])):
        got = predict(cfg, m, t, pcfg, 1e10, 1e9, latency=one_ms, algorithm=algorithm)
        # the gradients' buckets over 4, and 4 all-reduces of 2 a layer and micro-batch
        want = buckets * allreduce(4) + 2 * 4 * 4 * allreduce(2)
        assert got["latency_s"] == pytest.approx(want * 1e-3)
    zero3 = predict(replace(cfg, layout=Layout("tp2-z3", 2, 1, 3)), m, t, pcfg, 1e10, 1e9,
                    latency=one_ms)
    units = 4 + 2                                 # the blocks, the embeddings, ln_f
    assert zero3["latency_s"] == pytest.approx(
        (2 * units * 3 + 2 * 2 * units * 3 + 2 * 4 * 4 * 2) * 1e-3)
    # hierarchical: only the leaders of the 2 nodes a DP group of 8 spans (4 a node) send
    flat = Config(8, Layout("dp", 1, 1), dp=8, micro_batches=1)
    hier = predict(flat, m, t, replace(pcfg, dp_allreduce_algorithm="hierarchical"), 1e10, 1e9,
                   latency=one_ms, ranks_per_node=4)
    assert hier["latency_s"] == pytest.approx(-(-2 * P // 10_000) * 2 * 1e-3)
    piped = predict(Config(2, Layout("pp2", 1, 2), 1, 16), m, t, pcfg, 1e10, 1e9,
                    latency=one_ms)
    assert piped["latency_s"] == pytest.approx((2 * 16 + 2) * 1e-3)   # sends, the tied table
    assert predict(cfg, m, t, pcfg, 1e10, 1e9)["latency_s"] is None


def test_dry_run_prints_the_plan(capsys, tmp_path):
    study = Study([*TINY, "--ranks", "1", "2", "--layouts", "dp", "tp2", "--dry-run",
                   "--allreduce-bandwidth", "1.5", "--out", str(tmp_path)])
    assert [c.key for c in study.runnable] == ["1:dp", "2:dp", "2:tp2"]
    study.print_plan(1e10, 1.5e9, {})
    out = capsys.readouterr().out
    assert "all-reduce 1.50 GB/s moved per rank" in out
    assert "skipped: 1 ranks are not divisible by tp x pp = 2" in out
    assert out.count("to measure") == 3


def result(ranks, layout, iter_s, losses):
    phases = {"batch-generator": 0.0, "forward": iter_s / 3, "backward": iter_s / 2,
              "pipeline-bubble": 0.0, "grads-all-reduce": 0.01, "optimizer": 0.02}
    return {"key": f"{ranks}:{layout}", "ranks": ranks, "layout": layout, "dp": ranks, "tp": 1,
            "pp": 1, "micro_batch": 1, "accumulation": 8 // ranks, "global_batch": 8,
            "seq_length": 16, "threads_per_rank": 1, "warmup": 1, "iters": 2, "iter_s": iter_s,
            "phases_s": phases, "losses": losses, "megatron_flops": 2e9, "model_flops": 1e9,
            "gemm_per_core": 1e10, "gemm_loaded_per_core": 9e9, "dp_comm_bytes": 2**20,
            "peak_rss": 2**27, "machine": {"cpu": "test", "cores_per_node": 2, "mpi": "test",
                                           "python": "3", "numpy": "2"},
            "time": 0.0, "command": "python -m refgpt.study.scaling"}


@pytest.mark.parametrize("perturb", [0.0, 1e-6])
def test_report_columns_and_loss_check(tmp_path, capsys, perturb):
    study = Study([*TINY, "--ranks", "1", "2", "--out", str(tmp_path)])
    study.record(result(1, "dp", 1.0, [4.0, 3.9, 3.8]))
    study.record(result(2, "dp", 0.6, [4.0, 3.9 * (1 + perturb), 3.8]))
    status = study.write_report()
    rows = list(csv.DictReader(open(tmp_path / "scaling.csv")))
    assert tuple(rows[0]) == COLUMNS
    assert all(v != "" for row in rows for v in row.values())
    assert float(rows[1]["speedup"]) == pytest.approx(1 / 0.6, rel=1e-3)
    assert float(rows[1]["efficiency"]) == pytest.approx(1 / 1.2, rel=1e-3)
    assert float(rows[1]["pct_gemm_peak"]) == pytest.approx(100 * 1e9 / 0.6 / 2 / 1e10, rel=1e-3)
    for name in ("scaling.md", "speedup.png", "efficiency.png", "breakdown.png"):
        assert (tmp_path / name).stat().st_size > 0
    if perturb:
        assert status == 1 and rows[1]["losses_match"] == "NO"
        assert "losses differ from the baseline" in capsys.readouterr().err
        assert "**Losses differ**" in (tmp_path / "scaling.md").read_text()
    else:
        assert status == 0 and [r["losses_match"] for r in rows] == ["yes", "yes"]


def test_study_end_to_end_with_a_launcher(tmp_path):
    """1 rank in this process, 2 ranks (DP, TP, PP) in a launched job: every column filled,
    the losses equal in float64; a second run reuses the measurements."""
    assert shutil.which("mpiexec"), "mpiexec not found: install the mpich extra"
    cmd = [sys.executable, "-m", "refgpt.study.scaling", *TINY, "--ranks", "1", "2",
           "--layouts", "dp", "tp2", "pp2", "--warmup-iters", "1", "--iters", "2",
           "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = list(csv.DictReader(open(tmp_path / "scaling.csv")))
    assert [(row["ranks"], row["layout"]) for row in rows] == [
        ("1", "dp"), ("2", "dp"), ("2", "tp2"), ("2", "pp2")]
    assert all(v != "" for row in rows for v in row.values())
    assert all(row["losses_match"] == "yes" and float(row["max_loss_rel_diff"]) < 1e-12
               for row in rows)
    assert float(rows[3]["bubble_s"]) > 0 and float(rows[1]["bubble_s"]) == 0
    raw = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert all(len(x["losses"]) == 3 for x in raw)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "reusing 4 configuration(s)" in again.stdout
    assert "starting" not in again.stdout


def test_stage_seconds_put_the_head_at_its_own_efficiency():
    """With a step efficiency e, the whole model takes F / (g e); the head runs at its own
    measured share e_h of g (e where none is measured) and the blocks at the e_b that makes
    the whole so, so a pipeline's last stage is lighter than its FLOPs say when e_h > e."""
    from refgpt.metrics import head_flops, stage_flops
    from refgpt.study.plan import stage_seconds
    m = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=128,
                    seq_length=32)
    g, e = 1e10, 0.5
    F, H = model_flops(m, 16), head_flops(m, 16)
    first, last = stage_flops(m, 16, 2)
    assert stage_seconds(m, 16, 2, 1, g, e) == pytest.approx([first / (g * e), last / (g * e)])
    for e_h in (1.0, 0.8, 0.3):
        assert stage_seconds(m, 16, 1, 1, g, e, e_h) == pytest.approx([F / (g * e)])
        e_b = (F - H) / (F / e - H / e_h)
        two = stage_seconds(m, 16, 2, 1, g, e, e_h)
        assert two == pytest.approx([first / (g * e_b), ((last - H) / e_b + H / e_h) / g])
        assert sum(two) == pytest.approx(F / (g * e))
