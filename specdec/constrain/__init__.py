"""Structured output: constraints (JSON schema, JSON object, regular expression, Lark grammar)
checked at every tree node given its own path, and the tokens they force proposed as draft nodes."""

from specdec.constrain.constraint import Constraint, ConstraintError
from specdec.constrain.matcher import RowMatcher, TokenConstraint
from specdec.constrain.processor import ConstraintLogitsProcessor

__all__ = ["Constraint", "ConstraintError", "ConstraintLogitsProcessor", "RowMatcher", "TokenConstraint"]
