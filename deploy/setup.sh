#!/usr/bin/env bash
# Create .venv with kvstream and its dependencies (idempotent). Usage: deploy/setup.sh [--dev] [--redis]
#   --dev    also install test/lint/benchmark tools (pytest, hypothesis, ruff, mypy, triton, matplotlib, ...)
#   --redis  also install redis-server from Debian packages when it is missing (needs root)
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0; redis=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --redis) redis=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# torch first and pinned: an unpinned torch would pull the multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
extras="hf"
[ "$dev" = 1 ] && extras="dev,hf"
stamp=".venv/.kvstream-installed-$extras-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q -e ".[$extras]"
  # A venv that once held transformers 5.25 keeps Hugging Face's `kernels` distribution, which collides
  # with our `kernels` package (see pyproject.toml); nothing of ours needs it.
  if .venv/bin/pip show kernels >/dev/null 2>&1; then
    .venv/bin/pip uninstall -y -q kernels
  fi
  touch "$stamp"
fi
if [ "$redis" = 1 ] && ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server) >/dev/null
  else
    echo "setup.sh: redis-server is missing and we are not root; Redis tests will be skipped" >&2
  fi
fi
