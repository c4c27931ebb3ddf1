"""pytorch_grad_cam.utils.find_layers: finding and swapping submodules of a torch model.

The tree is walked depth first, each module's children in registration order, a child before
its own children (the order of ``model.modules()``, without its removal of repeats: a module
registered at two places is met at both). Replacements go straight into the parent's child
table, as pgc does, so any object can take a module's place. Children set to None are skipped
(pgc fails on them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def _children(model) -> list[tuple[str, object]]:
    """(name, child) of a module's registered children, None entries left out (nothing for an
    object that took a module's place and is not one)."""
    return [(name, child) for name, child in getattr(model, "_modules", {}).items() if child is not None]


def replace_layer_recursive(model: torch.nn.Module, old_layer: torch.nn.Module, new_layer) -> bool:
    """Put ``new_layer`` in the place of the first registration of ``old_layer`` (the module
    itself, by identity) in the tree; True if one was found."""
    for name, child in _children(model):
        if child is old_layer:
            model._modules[name] = new_layer
            return True
        if replace_layer_recursive(child, old_layer, new_layer):
            return True
    return False


def replace_all_layer_type_recursive(model: torch.nn.Module, old_layer_type, new_layer) -> None:
    """Put ``new_layer`` (one object for all) in the place of every module that is an instance
    of ``old_layer_type`` (a class or a tuple of classes, subclasses included).

    A replaced module is not searched further: pgc also replaces inside it, which changes only
    that module, no longer part of the model."""
    for name, child in _children(model):
        if isinstance(child, old_layer_type):
            model._modules[name] = new_layer
        else:
            replace_all_layer_type_recursive(child, old_layer_type, new_layer)


def find_layer_types_recursive(model: torch.nn.Module, layer_types: Iterable[type]) -> list[torch.nn.Module]:
    """Every module in the tree (not ``model`` itself) whose type is one of ``layer_types``
    exactly (subclasses do not count), in walk order."""
    kinds = tuple(layer_types)
    return find_layer_predicate_recursive(model, lambda layer: type(layer) in kinds)


def find_layer_predicate_recursive(model: torch.nn.Module,
                                   predicate: Callable[[torch.nn.Module], bool]) -> list[torch.nn.Module]:
    """Every module in the tree (not ``model`` itself) for which ``predicate`` is true, in walk
    order."""
    found = []
    for _, child in _children(model):
        if predicate(child):
            found.append(child)
        found.extend(find_layer_predicate_recursive(child, predicate))
    return found


__all__ = [
    "find_layer_predicate_recursive",
    "find_layer_types_recursive",
    "replace_all_layer_type_recursive",
    "replace_layer_recursive",
]
