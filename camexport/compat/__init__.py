"""A drop-in for pytorch-grad-cam 1.5.7: the same module tree, names and signatures, computed by
camexport's ONNX graphs (``docs/compat.md``)."""
