"""Pipeline schedules as instruction lists, checked without MPI: every op once, W after its
B, every send matched by a receive, and the unit-cost simulation's idle time and peak stash
equal the formulas."""

from collections import Counter

import pytest

from refgpt.parallel.schedules import Op, compute_ops, instructions, simulate

CASES = [(s, p, m, 2 if s == "interleaved" else 1)
         for s in ("gpipe", "1f1b", "interleaved", "zb-h1") for p in (2, 4) for m in (p, 2 * p, 4 * p)]


@pytest.mark.parametrize("schedule, p, m, v", CASES)
def test_every_op_once_and_weights_after_their_backward(schedule, p, m, v):
    for ops in compute_ops(p, m, v, schedule):
        seen = Counter((op.kind, op.mb, op.chunk) for op in ops)
        assert all(n == 1 for n in seen.values())
        for mb in range(m):
            for c in range(v):
                assert seen[("F", mb, c)] == 1
                if schedule == "zb-h1":
                    assert seen[("B", mb, c)] == seen[("W", mb, c)] == 1
                    assert ops.index(Op("B", mb, c)) < ops.index(Op("W", mb, c))
                else:
                    assert seen[("BW", mb, c)] == 1
                first_back = Op("B" if schedule == "zb-h1" else "BW", mb, c)
                assert ops.index(Op("F", mb, c)) < ops.index(first_back)


@pytest.mark.parametrize("schedule, p, m, v", CASES)
def test_every_send_has_its_receive(schedule, p, m, v):
    ranks = instructions(p, m, v, schedule)
    sends = Counter((r, op.peer, op.kind.split("_")[1], op.tag) for r, ops in enumerate(ranks)
                    for op in ops if op.kind.startswith("SEND"))
    recvs = Counter((op.peer, r, op.kind.split("_")[1], op.tag) for r, ops in enumerate(ranks)
                    for op in ops if op.kind.startswith("RECV"))
    assert sends == recvs and all(n == 1 for n in sends.values())
    assert len(sends) == 2 * m * (p * v - 1)               # one activation and one gradient per hop
    assert all(ops[-1] == Op("STEP") for ops in ranks)
    assert all(0 <= op.tag < 2 * v * m for ops in ranks for op in ops if op.tag >= 0)


@pytest.mark.parametrize("schedule, p, m, v", CASES)
def test_unit_cost_idle_time_and_peak_stash(schedule, p, m, v):
    sim = simulate(p, m, v, schedule)
    idle = {"gpipe": 3 * (p - 1), "1f1b": 3 * (p - 1), "interleaved": 3 * (p - 1) / v,
            "zb-h1": p - 1}[schedule]
    assert sim.idle == pytest.approx([idle] * p)
    for r in range(p):
        expected = {"gpipe": m, "1f1b": min(p - r, m),
                    "interleaved": m * v if m == p else min(2 * (p - r - 1) + (v - 1) * p + 1, m * v),
                    "zb-h1": min(p - r, m)}[schedule]
        assert sim.peak_stash[r] == expected
        assert sim.w_at_peak[r] == (r if schedule == "zb-h1" else 0)
    assert sim.makespan == pytest.approx(sim.busy[0] + idle)
    # bubble fraction idle / busy: (p-1)/m, (p-1)/(vm), (p-1)/(3m)
    assert idle / sim.busy[0] == pytest.approx({"gpipe": (p - 1) / m, "1f1b": (p - 1) / m,
                                                "interleaved": (p - 1) / (v * m),
                                                "zb-h1": (p - 1) / (3 * m)}[schedule])


def test_deadlock_is_detected():
    # the last stage orders micro-batch 0's backward before the forward it needs
    ranks = [[Op("F", 0), Op("BW", 0)], [Op("BW", 0), Op("F", 0)]]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(2, 1, ranks=ranks)


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of the pipeline size"):
        compute_ops(4, 6, 2, "interleaved")
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        compute_ops(2, 2, 1, "zb-v")
    with pytest.raises(ValueError, match="needs the interleaved schedule"):
        compute_ops(2, 2, 2, "1f1b")
