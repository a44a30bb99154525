"""fxpar: automatic, workload-aware parallelization of PyTorch training steps."""

from fxpar.api import FxparModule, compile
from fxpar.cluster import Cluster, DeviceSpec, LinkSpec, preset
from fxpar.errors import (
    CaptureError,
    ClusterSpecError,
    FallbackWarning,
    FxparError,
    InfeasiblePlanError,
    PlanMismatchError,
    PlanTimeoutError,
    ShardingError,
    UnsupportedOpError,
)
from fxpar.launch import launch
from fxpar.plan import Plan
from fxpar.planner import plan

__all__ = [
    "CaptureError",
    "Cluster",
    "ClusterSpecError",
    "DeviceSpec",
    "FallbackWarning",
    "FxparError",
    "FxparModule",
    "InfeasiblePlanError",
    "LinkSpec",
    "Plan",
    "PlanMismatchError",
    "PlanTimeoutError",
    "ShardingError",
    "UnsupportedOpError",
    "compile",
    "launch",
    "plan",
    "preset",
]
