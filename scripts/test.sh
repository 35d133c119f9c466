#!/usr/bin/env bash
# Set up (or refresh) .venv and run the default test suite. Extra arguments go to pytest.
# The default run excludes tests marked `slow`; run them with: bash scripts/test.sh -m slow
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || { echo "set-up failed"; exit 1; }
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure"
  exit 1
fi
exit "$rc"
