"""camexport: CAM-augmented ONNX graphs that carry their own backward pass."""

__version__ = "0.1.0"
