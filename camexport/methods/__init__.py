"""CAM methods: one name registry that the CLI, the manifest and the HDF5 attributes share."""

from camexport.methods.registry import METHODS, MethodError, canonical_methods, method

__all__ = ["METHODS", "MethodError", "canonical_methods", "method"]
