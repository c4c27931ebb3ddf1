"""Reverse-mode (VJP) rules, one per ONNX op, in one table (:mod:`.table`).

A rule takes ``(b, node, dys)``: the builder, the primal node and one cotangent name per node
output (None where nothing flows back), and returns exactly one cotangent per node input (None
where nothing flows, or where ``b.needs(input)`` is false). Rules only emit default-domain ONNX
ops through the builder; each rule's docstring is its formula. The rules live by op family in
:mod:`.elementwise`, :mod:`.linear`, :mod:`.shape` and :mod:`.roialign` (RoiAlign with the boxes
held fixed: a weighted scatter-add); this package imports them, which fills the
table; :mod:`.exceptions` holds the tables that replace standard rules.
"""

from camexport.graph.rules import elementwise, linear, roialign, shape  # noqa: F401 (each fills RULES)
from camexport.graph.rules.exceptions import GUIDED_RULES, MAXPOOL_WITHOUT_INDICES
from camexport.graph.rules.table import NO_GRADIENT, REFUSED, RULES, Rule, attr, find_rule, rule

__all__ = ["GUIDED_RULES", "MAXPOOL_WITHOUT_INDICES", "NO_GRADIENT", "REFUSED", "RULES", "Rule", "attr",
           "find_rule", "rule"]
