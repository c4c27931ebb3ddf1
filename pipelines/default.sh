#!/usr/bin/env bash
# Set up (if needed) and run the built-in default job (pipelines/efficientnet_lite0.sh):
# pretrained EfficientNet-Lite0 on the photos shipped in scikit-image and foolbox; writes
# results/default.h5 and PNG overlays with an index.html in results/default/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CAMEXPORT=.venv/bin/camexport exec bash pipelines/efficientnet_lite0.sh "$@"
