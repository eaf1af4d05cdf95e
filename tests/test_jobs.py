"""The cluster job scripts (examples/jobs) launch what they say: each runs under bash with fake
launchers (mpiexec, srun) that record their arguments and the threads' environment, and the
test reads those with refgpt's own parsers. Per script: every flag parses, the ranks launched
equal the nodes times the ranks per node the scheduler is asked for, and each rank's threads
fill its share of a node. The Fugaku scripts must also bind one rank to each CMG."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from refgpt.study.scaling import build_study_parser
from refgpt.train import parse_config

JOBS = Path(__file__).resolve().parent.parent / "examples" / "jobs"
FUGAKU_CORES = 48                    # an A64FX node's compute cores
FAKE = """#!/bin/bash
{ printf '%s\\n' "$(basename "$0")" "$@"; printf '%s\\n' --end--; } >> "$LAUNCHED"
env | grep -E '^(OMP_|OMPI_MCA_plm_ple)' | sort > "$LAUNCHED.env"
"""


def launches(script: Path, tmp_path: Path) -> tuple[list[list[str]], dict]:
    """([launcher, arg, ...] per launch, the environment's OMP_/MCA variables at the last)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("mpiexec", "srun"):
        (fake / name).write_text(FAKE)
        (fake / name).chmod(0o755)
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text("{}")
    log = tmp_path / "launched"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", LAUNCHED=str(log),
               DATA=str(data), PJM_O_WORKDIR=str(JOBS.parent.parent))
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, check=True)
    words = log.read_text().splitlines()
    runs, run = [], []
    for word in words:
        if word == "--end--":
            runs.append(run)
            run = []
        else:
            run.append(word)
    variables = dict(line.split("=", 1) for line in Path(f"{log}.env").read_text().splitlines())
    return runs, variables


def asked(script: Path) -> tuple[int, int, int, str]:
    """(nodes, ranks per node, cores per rank, "pjm" or "slurm") from the scheduler's
    directives."""
    text = script.read_text()
    if "#PJM" in text:
        nodes = int(re.search(r'#PJM -L "node=(\d+)"', text)[1])
        per_node = int(re.search(r'max-proc-per-node=(\d+)', text)[1])
        return nodes, per_node, FUGAKU_CORES // per_node, "pjm"
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text)[1])
    per_node = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", text)[1])
    return nodes, per_node, int(re.search(r"#SBATCH --cpus-per-task=(\d+)", text)[1]), "slurm"


@pytest.mark.parametrize("script", sorted(p.name for p in JOBS.glob("*.sh")
                                          if not p.name.endswith("_binding.sh")))
def test_job_scripts_launch_what_refgpt_accepts(script, tmp_path):
    path = JOBS / script
    nodes, per_node, cores, scheduler = asked(path)
    runs, env = launches(path, tmp_path)
    assert runs, f"{script} launched nothing"
    for run in runs:
        launcher, args = run[0], run[1:]
        module = args[args.index("-m") + 1]
        flags = args[args.index("-m") + 2:]
        if launcher == "mpiexec":                    # every rank the allocation holds
            assert int(args[args.index("-n") + 1]) == nodes * per_node
        if module == "refgpt.train":
            threads = parse_config(flags)[2].threads_per_rank
        else:
            assert module == "refgpt.study.scaling"
            study = build_study_parser().parse_args(flags)
            assert max(study.ranks) <= nodes * per_node
            threads = study.threads_per_rank
        assert threads == int(env["OMP_NUM_THREADS"]) == cores   # a rank's cores, no more
    if scheduler == "pjm":                          # one rank per CMG, its cores and memory
        assert per_node == 4
        assert env["OMP_PLACES"] == "cores" and env["OMP_PROC_BIND"] == "close"
        assert env["OMPI_MCA_plm_ple_numanode_assign_policy"] == "simplex"
        assert env["OMPI_MCA_plm_ple_memory_allocation_policy"] == "bind_local"
        assert '#PJM --mpi "rank-map-bychip"' in path.read_text()
