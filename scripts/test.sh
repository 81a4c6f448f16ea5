#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests on tiny random models, integration tests on the
# real SmolLM2 + Wikipedia slices (marked slow), and the 2-process distributed test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
