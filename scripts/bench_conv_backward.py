"""onnxruntime CPU: a stride-1 convolution's backward as camexport's Conv rule makes it (a Conv
of dY with the kernel rearranged) against the ConvTranspose it made before, on the shapes of
ResNet-50, MobileNet/EfficientNet depthwise blocks and a 1x1 projection. Same dY, same result
(checked), time per run.

    .venv/bin/python scripts/bench_conv_backward.py [--batch 8] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

#: (channels, kernel, group, side): dense 3x3 (ResNet-50 layer3 and layer1), a 1x1 projection,
#: depthwise 3x3 and 5x5 (EfficientNet/MobileNet blocks)
SHAPES = ((256, 3, 1, 14), (64, 3, 1, 56), (128, 1, 1, 28), (144, 3, 144, 56), (672, 5, 672, 14))


def _model(op: str, weight: np.ndarray, batch: int, channels: int, side: int, **attrs) -> bytes:
    node = helper.make_node(op, ["dy", "w"], ["dx"], **attrs)
    dy = helper.make_tensor_value_info("dy", TensorProto.FLOAT, [batch, channels, side, side])
    dx = helper.make_tensor_value_info("dx", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "backward", [dy], [dx], [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _timed(session, feed, repeats: int) -> tuple[float, np.ndarray]:
    out = session.run(None, feed)[0]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, batch {args.batch}")
    for channels, kernel, group, side in SHAPES:
        # the forward Conv's weight (C_out, C_in / group, k, k); dY has C_out channels
        weight = rng.standard_normal((channels, channels // group, kernel, kernel)).astype(np.float32)
        pad = kernel // 2
        per = channels // group
        flipped = (weight.reshape(group, per, per, kernel, kernel).transpose(0, 2, 1, 3, 4)
                   .reshape(channels, per, kernel, kernel)[:, :, ::-1, ::-1].copy())
        dy = rng.standard_normal((args.batch, channels, side, side)).astype(np.float32)
        cpu = ["CPUExecutionProvider"]
        transposed = ort.InferenceSession(_model("ConvTranspose", weight, args.batch, channels, side,
                                                 group=group, pads=[pad] * 4), providers=cpu)
        conv = ort.InferenceSession(_model("Conv", flipped, args.batch, channels, side, group=group,
                                           pads=[kernel - 1 - pad] * 4), providers=cpu)
        before, expected = _timed(transposed, {"dy": dy}, args.repeats)
        after, got = _timed(conv, {"dy": dy}, args.repeats)
        error = np.abs(got - expected).max() / np.abs(expected).max()
        print(f"{channels:4d} ch {kernel}x{kernel} group {group:3d} {side:3d}x{side:<3d} ConvTranspose "
              f"{before * 1e3:6.2f} ms  Conv {after * 1e3:6.2f} ms  {before / after:4.1f}x  "
              f"(max |diff| / max {error:.1e})")


if __name__ == "__main__":
    main()
