"""Per-op sharding rules: one registry (``register_rule``), one rule per op, written for one axis."""

from fxpar.rules import indexing, matmul, pointwise, reduction, views  # noqa: F401  (registers rules)
from fxpar.rules.registry import (
    AxisStrategy,
    OpInfo,
    OpStrategy,
    get_rule,
    register_rule,
    registered_ops,
)

__all__ = ["AxisStrategy", "OpInfo", "OpStrategy", "get_rule", "register_rule", "registered_ops"]
