"""User-facing errors. Each says what is wrong, with the values involved, and how to fix it."""

from __future__ import annotations


class FxparError(ValueError):
    """Base class of fxpar's errors about its input (a ValueError, as bad input is a value problem)."""


class UnsupportedOpError(FxparError):
    """A graph node has an op with no sharding rule."""


class ShardingError(FxparError):
    """A mesh, batch or plan does not divide the tensors it must split."""


class InfeasiblePlanError(FxparError):
    """No sharding plan fits the cluster's per-device memory."""


class PlanTimeoutError(FxparError):
    """The solver found no plan within its time limit."""


class DuplicateRuleError(FxparError):
    """A second sharding rule was registered for an op."""


class SweepError(FxparError):
    """An objective's parameters are invalid, or no configuration meets them."""


class IdleRankError(FxparError):
    """A rank that the plan leaves unused was asked to run the step."""


class ClusterSpecError(FxparError):
    """A cluster description is malformed."""


class CaptureError(FxparError):
    """The model or its inputs cannot be captured as a training step."""


class PlanMismatchError(FxparError):
    """A given plan does not belong to the captured graph."""


class PlanFileError(PlanMismatchError):
    """A plan's JSON text is malformed or contradicts itself (a hand-edited or truncated file)."""


class PlanOptionError(FxparError):
    """An argument of ``fxpar.plan`` / ``fxpar.compile`` that is not a cluster description is invalid
    (``mesh_shape``, ``optimizer``, ``force``, ``time_limit_s``, ``plan_cache``)."""


class CodegenError(PlanOptionError):
    """An unknown ``codegen=`` option."""


class RankFailedError(FxparError):
    """Another rank failed (its error is repeated here), or did not join a collective call in time."""


class StepInputError(FxparError):
    """An input of a compiled step does not match what was planned (count, dtype, device, keyword)."""


class FallbackWarning(UserWarning):
    """fxpar fell back to something slower than a planned strategy (e.g. an op without a rule)."""


def node_desc(node) -> str:
    """``%name (aten.op)`` with the op for call_function nodes, for error messages."""
    target = getattr(node, "target", None)
    if getattr(node, "op", None) == "call_function":
        return f"%{node.name} ({target})"
    return f"%{node.name}"
