"""Every command of the README's bash blocks, run as a user would, in README order, in one
working folder: as written, or with flags appended that make it small (a later flag wins), or
with a stated reason it cannot run here. A command added to the README, or changed, fails
until it is listed here, so the README cannot drift from the code."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("--num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 32 "
         "--micro-batch-size 2 --global-batch-size 4 --eval-iters 1 --no-progress")

# README command -> how it runs here: "" as written; "+ FLAGS" with FLAGS appended;
# "= COMMAND" instead as COMMAND; "skip: REASON" not here, for that reason.
HOW = {
    'pip install -e ".[dev]"': "skip: the set-up itself: .ci/run runs it first",
    "mpiexec -n 2 python -m refgpt.train": f"+ {SMALL} --train-iters 3",
    "python -m pytest tests && mpiexec -n 2 python -m pytest --with-mpi mpi_tests":
        "skip: the tests themselves (.ci/run)",
    "python -m refgpt.prepare --output data/mine notes/ book.txt": "",
    "python -m refgpt.train --data-path data/mine --num-layers 6 --hidden-size 384 "
    "--num-attention-heads 6 --seq-length 256 --micro-batch-size 8 --global-batch-size 32 "
    "--train-iters 2000 --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 100 --save runs/mine "
    "--save-interval 500 --log-jsonl runs/mine/log.jsonl --tensorboard-dir runs/mine/tb":
        f"+ {SMALL} --train-iters 4 --save-interval 2 --eval-interval 2 --lr-warmup-iters 1",
    "python -m refgpt.train --load runs/mine --train-iters 4000": "+ --train-iters 6",
    'python -m refgpt.generate --load runs/mine --prompt "def fibonacci(n):" --max-new-tokens 80':
        "",
    "python -m refgpt.train --synthetic-data --dtype float64 --train-iters 20":
        f"+ {SMALL} --train-iters 3",
    "python -m refgpt.train --bf16 --save runs/bf16": f"+ {SMALL} --train-iters 3",
    "python -m refgpt.study.scaling --ranks 1 2 4 --layouts dp tp2 pp2 --dry-run":
        "+ --synthetic-data --num-layers 2 --hidden-size 32 --num-attention-heads 2 "
        "--seq-length 32",
    "python -m refgpt.plan --nodes 1 --ranks-per-node 16 --global-batch-size 16 "
    "--micro-batch-size 1": "+",
    "mpiexec -n 4 python -m refgpt.train --global-batch-size 16 --micro-batch-size 2":
        "+ --num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 32 "
        "--eval-iters 1 --no-progress --train-iters 2",
    "mpiexec -n 16 python -m refgpt.train --zero-stage 1 --dp-shared-memory --micro-batch-size 1":
        "= mpiexec -n 4 python -m refgpt.train --zero-stage 1 --dp-shared-memory "
        "--micro-batch-size 1 --num-layers 1 --hidden-size 32 --num-attention-heads 2 "
        "--seq-length 32 --eval-iters 1 --no-progress --train-iters 2   # 4 ranks on 2 cores",
    "srun python -m refgpt.train ...": "skip: Slurm is not here (examples/jobs/slurm.sh)",
    "pjsub examples/jobs/fugaku.pjm.sh": "skip: Fujitsu's PJM is not here",
    "python -m refgpt.validate --against hf --num-layers 2 --hidden-size 24 "
    "--num-attention-heads 3 --vocab-size 101 --seq-length 7 --dtype float64 --steps 3": "",
    "python -m refgpt.convert --to hf runs/mine hf_mine": "",
    "python -m refgpt.convert --from hf hf_mine runs/from_hf": "",
    "python -m refgpt.validate --dump mine.safetensors --load runs/mine --dtype float64": "",
    "python examples/hf_dump.py hf_mine theirs.safetensors": "",
    "python -m refgpt.validate --compare theirs.safetensors mine.safetensors": "",
    "python -m refgpt.validate --compare theirs.safetensors": "",
    "pip install -e .": "skip: a reinstall without the MPICH wheel (CI keeps it)",
    "env MPICC=$(which mpicc) pip install --force-reinstall --no-binary=mpi4py --no-cache-dir "
    "mpi4py": "skip: needs a site MPI's mpicc",
    'pip install pytest pytest-mpi "torch==2.13.0" transformers matplotlib':
        "skip: what the set-up's [dev] extra installs",
}


def readme_commands() -> list[str]:
    """The commands of README.md's bash blocks: continuation lines joined, a trailing comment
    dropped, runs of spaces made one."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"\s#.*$", "", line).split())
            if line:
                out.append(line)
    return out


def runnable() -> list[str]:
    return [c for c in readme_commands() if not HOW.get(c, "").startswith("skip:")]


def test_every_readme_command_is_listed_here():
    cmds = readme_commands()
    assert [c for c in cmds if c not in HOW] == [], "README commands this test does not know"
    assert [c for c in HOW if c not in cmds] == [], "commands listed here the README lost"
    assert all(len(how) > len("skip: ") for how in HOW.values() if how.startswith("skip:"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The user's folder: a few text files to prepare, the examples beside, and a cache with a
    small default corpus (the real one takes half a minute: tests/test_cli.py prepares it)."""
    from refgpt.data import corpus, prepared
    work = tmp_path_factory.mktemp("user")
    stdlib = corpus.default_corpus_files()
    (work / "notes").mkdir()
    for i, f in enumerate(stdlib[:12]):
        (work / "notes" / f"n{i}.md").write_text(f.read_text(errors="replace"))
    (work / "book.txt").write_text("\n".join(f.read_text(errors="replace") for f in stdlib[12:20]))
    (work / "examples").symlink_to(ROOT / "examples")
    cache = work / ".cache"
    default = cache / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-v8192"
    prepared.prepare([str(f) for f in stdlib[20:60]], default, 8192, log=lambda *_: None)
    env = dict(os.environ, REFGPT_CACHE=str(cache))
    return work, env


@pytest.mark.parametrize("command", runnable())
def test_readme_command(command, workspace):
    how = HOW[command]
    run = how[1:].strip() if how.startswith("=") else f"{command} {how[1:].strip()}"
    work, env = workspace
    r = subprocess.run(run, shell=True, cwd=work, env=env, capture_output=True, text=True,
                       timeout=600, executable="/bin/bash")
    assert r.returncode == 0, f"{run}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    if "--compare" in command:
        assert r.stdout.rstrip().endswith("PASS (tolerance 1e-10)"), r.stdout[-2000:]
