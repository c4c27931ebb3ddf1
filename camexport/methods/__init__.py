"""CAM methods: one name registry that the CLI, the manifest and the HDF5 attributes share.

Modules: ``base`` (the Method base class), ``pipeline`` (raw maps -> CAMs, as pgc), ``inputs``
(CamInputs, what a method reads), ``gradient``, ``activation``, ``composite``,
``input_gradient``, ``perturbation``, ``factorization`` (the methods), ``registry`` (the table).
The table's names are read from ``registry`` on first use, so that the fused heads
(camexport.graph.fuse, which the registry points at) can import the methods' constants.
"""

__all__ = ["FUSABLE", "METHODS", "RECOMPUTABLE", "MethodError", "canonical_methods", "method"]


def __getattr__(name: str):
    if name in __all__:
        from camexport.methods import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'camexport.methods' has no attribute {name!r}")
