#!/usr/bin/env bash
# Set up (if needed) and run the built-in default job: pretrained EfficientNet-Lite0 on the
# photos shipped in scikit-image and foolbox; writes results/default.h5 and PNG overlays.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/camexport build efficientnet-lite0 --layer bn2 \
    --methods gradcam,gradcam++,hirescam,layercam,eigencam,ablationcam,fullgrad \
    --out artifacts/efficientnet-lite0
exec .venv/bin/python pipelines/default.py --artifact artifacts/efficientnet-lite0 --out results "$@"
