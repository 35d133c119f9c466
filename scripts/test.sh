#!/usr/bin/env bash
# Set up (or refresh) .venv and run the default test suite. Extra arguments go to pytest.
# The default run excludes tests marked `slow`; run them with: bash scripts/test.sh -m slow
# Two worker processes (pytest-xdist), each test file on one worker: most of the suite's time is
# XLA compiling on one thread, so a second worker uses the second core. JQUANT_TEST_WORKERS=0
# runs in this process alone.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || { echo "set-up failed"; exit 1; }
.venv/bin/python -m pytest -q -p no:cacheprovider -n "${JQUANT_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure"
  exit 1
fi
exit "$rc"
