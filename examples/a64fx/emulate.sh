#!/usr/bin/env bash
# refgpt on an emulated A64FX: builds an aarch64 Python environment from Debian's arm64
# packages and PyPI's aarch64 wheels, then runs, under qemu-aarch64 -cpu a64fx (SVE, 512-bit
# vectors), a probe of what Numba compiles for, the kernel tests, and a short float64 training
# run whose losses are compared with the same run on this (x86-64) host.
#
#   examples/a64fx/emulate.sh [setup|probe|kernels|train|all]...      (default: all)
#
# Needs: x86-64 Linux with Debian's archive and PyPI reachable (first run only), apt-get as
# root or through sudo unless qemu-user-static and debootstrap are installed, and refgpt
# installed on the host (pip install -e .). Downloads and builds are cached in
# $REFGPT_A64FX_CACHE (default ~/.cache/refgpt-a64fx, about 1 GB); a second run reuses them.
# Emulation proves correctness and instruction selection, not speed: docs/a64fx.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
CACHE=${REFGPT_A64FX_CACHE:-$HOME/.cache/refgpt-a64fx}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT=$CACHE/rootfs VENV=$CACHE/venv WHEELS=$CACHE/wheels
HOST_PY=${PYTHON:-python3}
STEPS=${*:-all}
mkdir -p "$CACHE"

say() { printf '\n== %s\n' "$*"; }
want() { [[ " $STEPS " == *" $1 "* || " $STEPS " == *" all "* ]]; }

# The emulated CPU, and the target Numba compiles for. qemu-user passes the host's
# /proc/cpuinfo through, where LLVM looks for the CPU: it reads "generic" with no features,
# so Numba would emit plain NEON code. NUMBA_CPU_NAME/NUMBA_CPU_FEATURES name the real target
# (on an A64FX itself LLVM finds "a64fx" and SVE unaided; see the probe's first lines).
export QEMU_CPU=a64fx QEMU_LD_PREFIX=$ROOT
arm() {                                                  # a Python command on the A64FX
  NUMBA_CPU_NAME=a64fx NUMBA_CPU_FEATURES=+sve NUMBA_CACHE_DIR=$CACHE/numba-cache \
    qemu-aarch64-static "$VENV/bin/python" "$@"
}

setup() {
  if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    say "installing qemu-user-static and debootstrap (Debian packages)"
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get install -y -q qemu-user-static debootstrap
  fi
  qemu-aarch64-static --version | head -1
  if [ ! -e "$ROOT/.complete" ]; then
    say "arm64 Debian bookworm with python3.11 into $ROOT (debootstrap, first stage only)"
    rm -rf "$ROOT"
    debootstrap --foreign --arch=arm64 --variant=minbase \
      --include=python3,python3-venv,libgomp1 bookworm "$ROOT" "$MIRROR"
    # The first stage unpacks only the base; nothing arm64 can run here to configure the
    # rest (no binfmt_misc), so unpack every downloaded package as it is. qemu finds the
    # loader and libraries under $ROOT (QEMU_LD_PREFIX).
    for deb in "$ROOT"/var/cache/apt/archives/*.deb; do
      dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$ROOT" --keep-directory-symlink -f -
    done
    touch "$ROOT/.complete"
  else
    say "arm64 Debian root: cached in $ROOT"
  fi
  say "aarch64 wheels into $WHEELS (pip download, pinned in examples/a64fx/requirements.txt)"
  "$HOST_PY" -m pip download -q -d "$WHEELS" --only-binary=:all: --python-version 3.11 \
    --implementation cp --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux2014_aarch64 -r examples/a64fx/requirements.txt
  if [ ! -e "$VENV/.complete" ]; then
    say "virtual environment $VENV (Debian's python3.11, run by qemu)"
    # --without-pip: ensurepip runs pip in a child process, which the host cannot execute
    # (no binfmt_misc); pip runs from Debian's own wheel instead.
    rm -rf "$VENV"
    qemu-aarch64-static "$ROOT/usr/bin/python3.11" -m venv --copies --without-pip "$VENV"
    PIP=$(ls "$ROOT"/usr/share/python-wheels/pip-*.whl)
    arm "$PIP/pip" install -q --no-index --find-links "$WHEELS" "$PIP" \
      -r examples/a64fx/requirements.txt
    touch "$VENV/.complete"
  else
    say "virtual environment: cached in $VENV"
  fi
  say "refgpt from this checkout: a wheel built here, installed there"
  rm -rf "$CACHE/project" && "$HOST_PY" -m pip wheel -q --no-deps -w "$CACHE/project" "$REPO"
  arm -m pip install -q --no-index --no-deps --force-reinstall "$CACHE"/project/refgpt-*.whl
}

probe() {
  say "what LLVM sees and what Numba emits on the emulated A64FX"
  (cd "$CACHE" && arm "$REPO/examples/a64fx/probe.py")
}

kernels() {
  say "kernel tests on the emulated A64FX (tests/test_kernels.py: 17 minutes cold on 2 cores)"
  # From $CACHE, so that the checkout's refgpt/ does not shadow the installed package.
  (cd "$CACHE" && time arm -m pytest -q -p no:cacheprovider "$REPO/tests/test_kernels.py")
}

train() {
  local data=$CACHE/data args
  say "a short float64 training run on the host and on the emulated A64FX"
  args=(--data-path "$data" --dtype float64 --num-layers 2 --hidden-size 64
        --num-attention-heads 4 --seq-length 64 --micro-batch-size 4 --global-batch-size 8
        --train-iters 10 --eval-interval 5 --eval-iters 2 --log-interval 5 --no-progress)
  "$HOST_PY" -m refgpt.prepare --output "$data" --vocab-size 512 README.md docs >/dev/null
  "$HOST_PY" -m refgpt.train "${args[@]}" --log-jsonl "$CACHE/train-host.jsonl" >/dev/null
  (cd "$CACHE" && time arm -m refgpt.train "${args[@]}" --log-jsonl "$CACHE/train-a64fx.jsonl")
  say "losses, host against A64FX"
  "$HOST_PY" examples/a64fx/compare.py "$CACHE/train-host.jsonl" "$CACHE/train-a64fx.jsonl"
}

for step in setup probe kernels train; do
  if want "$step"; then "$step"; fi
done
