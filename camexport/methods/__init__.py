"""CAM methods: one name registry that the CLI, the manifest and the HDF5 attributes share.

Modules: ``base`` (the Method base class), ``pipeline`` (raw maps -> CAMs, as pgc), ``inputs``
(CamInputs, what a method reads), ``gradient``, ``activation``, ``composite``,
``input_gradient``, ``perturbation``, ``factorization`` (the methods), ``registry`` (the table).
"""

from camexport.methods.registry import FUSABLE, METHODS, RECOMPUTABLE, MethodError, canonical_methods, method

__all__ = ["FUSABLE", "METHODS", "RECOMPUTABLE", "MethodError", "canonical_methods", "method"]
