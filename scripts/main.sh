#!/usr/bin/env bash
# The main job: set up .venv, quantize the default model (SmolLM2-135M-Instruct) with a
# recipe (default: round-to-nearest W4 g64) and print float vs quantized quality on
# out-of-domain text, then write the visual report (OUT_DIR/report/index.html). Usage: bash scripts/main.sh [RECIPE] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${1:-rtn_w4_g64}
OUT=${2:-runs/smollm2-$RECIPE}
bash scripts/setup_env.sh
.venv/bin/jquant quantize --recipe "$RECIPE" --out "$OUT" --overwrite
.venv/bin/jquant eval "$OUT"
.venv/bin/jquant report "$OUT"
