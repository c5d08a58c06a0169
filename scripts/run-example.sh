#!/usr/bin/env bash
# No Mac? Run the example Go suite (examples/gosuite) through the Linux stand-in `tart`:
# creates the stand-in base image `tahoe-base` once, then `invoke test-vm` on the example.
# Extra arguments go to invoke test-vm (e.g. --keep=always, --dry-run).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$repo/scripts:$PATH"
tart list -q | grep -qx tahoe-base || tart create tahoe-base
cd "$repo"
exec python3 -m invoke test-vm --config examples/gosuite/vm.yaml "$@"
