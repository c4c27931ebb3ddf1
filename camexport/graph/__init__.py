"""Graph-level work: locating layers, reverse-mode differentiation, augmentation."""

from camexport.artifact import get_manifest
from camexport.graph.augment import (
    SCORE,
    SCORE_FUNCTIONS,
    TARGET_WEIGHTS,
    activation_name,
    augment,
    gradient_name,
)
from camexport.graph.autodiff import GradientError

__all__ = [
    "SCORE", "SCORE_FUNCTIONS", "TARGET_WEIGHTS", "GradientError", "activation_name", "augment",
    "get_manifest", "gradient_name",
]
