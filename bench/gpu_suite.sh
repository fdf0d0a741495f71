#!/bin/sh
# bench/gpu_suite.py with the repository's virtualenv (.venv) where there is one, else python3:
#   bench/gpu_suite.sh --out "$OUT/gpu_suite.json"     bench/gpu_suite.sh --dry-run
root=$(cd "$(dirname "$0")/.." && pwd)
py="$root/.venv/bin/python"
[ -x "$py" ] || py=python3
exec "$py" "$root/bench/gpu_suite.py" "$@"
