#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the embedded demo: no downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cpo-fast demo "$@"
