"""Per-op sharding rules: one registry (``register_rule``), one rule per op, written for one axis."""

from fxpar.rules import attention, conv, embedding, indexing, matmul, norm, pointwise, pool, reduction, shape_ops, views  # noqa: F401  (registers rules)
from fxpar.rules.registry import (
    AxisStrategy,
    OpInfo,
    OpStrategy,
    get_rule,
    register_rule,
    registered_ops,
)

__all__ = ["AxisStrategy", "OpInfo", "OpStrategy", "get_rule", "register_rule", "registered_ops"]
