#!/usr/bin/env bash
# Run the test suite (as root: the tests mount real filesystems). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
exec .venv/bin/pytest "$@"
